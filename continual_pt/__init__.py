"""continual-pt: continual pre-training of LLMs on DeepSpeed with re-warming LR schedules."""

__version__ = "0.1.0"
