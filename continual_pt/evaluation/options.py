"""The options of `cpt eval` (see `continual_pt.options`)."""

from __future__ import annotations

from dataclasses import dataclass

from continual_pt.layout import PRECISIONS, SCORES, TAG_PREFIX
from continual_pt.options import option

TASKS = "downstream tasks"


@dataclass(kw_only=True)
class EvalOptions:
    """What `cpt eval` scores, on which sets, how, and where the rows go."""

    GROUPS = {TASKS: "lm-evaluation-harness tasks scored on the same checkpoints, their metrics stored as rows "
                     "of the same store (needs the extra: pip install -e '.[lm-eval]')"}

    targets: list[str] = option(help=f"a run directory (all its committed checkpoints), a checkpoint folder "
                                f"{TAG_PREFIX}<N>, a Hugging Face model folder, or a hub name such as "
                                "EleutherAI/pythia-410m@step143000", positional=True, nargs="+", metavar="CHECKPOINT")
    sets: list[str] = option([], help="a held-out set: a prepared dataset's val split (default) or, with :train, "
                             "its whole training split; repeatable, e.g. --set pile=data/pile --set sp=data/sp",
                             flags=("--set",), metavar="NAME=PATH[:SPLIT]")
    tokens: int | None = option(None, help="token budget per set: ceil(N / seq_len) windows spread evenly over the whole split (default: "
                                "every window)")
    seq_len: int | None = option(None, help="tokens per window (default: the run's data.seq_len for our "
                                 "checkpoints, else 2048 capped at the model's max_position_embeddings)")
    micro_batch_size: int | None = option(None, help="sequences per forward pass per rank (default: the run's "
                                          "eval/train micro batch, else 8)")
    dtype: str = option("fp32", help="weights dtype", choices=PRECISIONS)
    store: str | None = option(None, help=f"{SCORES} to append to (default: <run dir>/{SCORES} of each "
                               "checkpoint's run; required for Hugging Face folders and hub names); scores.csv is "
                               "written beside it")
    task_index: str | None = option(None, help="score only checkpoint number N of the list, numbered from 0 in the "
                                    "order --list prints (arguments as given, a run's checkpoints oldest first; the "
                                    "numbers shift when a run prunes or adds one: --claim does not); default: "
                                    "$SLURM_ARRAY_TASK_ID when set; 'all' ignores it")
    by_domain: bool = option(False, help="also a row per domain of each set (sets prepared with --domain-field or "
                             "--layout), and the macro mean; a --tokens budget is shared among the domains so that "
                             "small ones are measured too")
    list_only: bool = option(False, help="print the numbered checkpoint list (with --set: which are not yet scored) "
                             "and exit", flags=("--list",))
    claim: bool = option(False, help="score the oldest committed checkpoint that lacks a row and no other job is "
                         "scoring, then the next, until none is left: any number of concurrent jobs (a job array's "
                         "tasks) drains the run, each checkpoint scored once (eval.sbatch uses it)")
    lm_eval: list[str] = option([], help="lm-evaluation-harness tasks, groups or tags to score each checkpoint on, "
                                "comma-separated and repeatable, e.g. --lm-eval hellaswag,arc_easy (without a network, "
                                "their datasets must be in the datasets cache, or the tasks local ones: --include-path)",
                                flags=("--lm-eval",), metavar="TASKS", group=TASKS)
    lm_eval_limit: str | None = option(None, help="documents per task: a count, or a fraction below 1 (default: all); "
                                       "a limited score is another measurement than the full one",
                                       metavar="N", group=TASKS)
    num_fewshot: int | None = option(None, help="few-shot examples per document (default: each task's own)",
                                     metavar="K", group=TASKS)
    lm_eval_batch_size: str = option("1", help="documents per forward pass: a count, auto or auto:N (as "
                                     "the harness's --batch_size)", metavar="B", group=TASKS)
    include_path: list[str] = option([], help="a folder of task YAML files of your own (local data files need no "
                                     "network); repeatable", metavar="DIR", group=TASKS)
