"""Run configuration: typed sections, loading with overrides, gathered problems, DeepSpeed configs.

Precedence is defaults < YAML file < command-line overrides (`schedule.max_lr=6e-4`). Every
problem (unknown key, wrong type, out-of-range or inconsistent value) is gathered into one
`ConfigError` naming the file (or "command line") and the dotted key, raised before anything
is written. A resolved config dumps to YAML that loads back equal.

Knows no torch, plots or command line: `import continual_pt.config` stays fast.
"""

from continual_pt.config.load import dump, from_dict, load, load_schedule_spec
from continual_pt.config.sections import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    EvalSetConfig,
    LogConfig,
    ModelConfig,
    OptimConfig,
    RunConfig,
    SourceConfig,
    TrainConfig,
)
from continual_pt.config.typed import (
    ConfigError,
    Problems,
    build_section,
    parse_duration,
    parse_override,
    to_dict,
)
from continual_pt.schedules import Length, ScheduleConfig, resolve_length

__all__ = [
    "CheckpointConfig", "ConfigError", "DataConfig", "EvalConfig", "EvalSetConfig", "Length", "LogConfig",
    "ModelConfig", "OptimConfig", "Problems", "RunConfig", "ScheduleConfig", "SourceConfig", "TrainConfig",
    "build_section", "dump", "from_dict", "load", "load_schedule_spec", "parse_duration", "parse_override",
    "resolve_length", "to_dict",
]
