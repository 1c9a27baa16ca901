"""The options of `cpt sweep` (see `continual_pt.options`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from continual_pt.options import option

SUBMIT = "--submit"


@dataclass(kw_only=True)
class SweepOptions:
    """`cpt sweep`: the grid, its variables, and what to do with the runs it expands to."""

    GROUPS: ClassVar[dict[str, str]] = {
        SUBMIT: "where the batch scripts are and sbatch options for your cluster (each value split like a shell "
                "line; write --sbatch-args='--partition=gpu')"}

    grid: str = option(help="the grid file (see configs/paper/ and configs/sweeps/)", flags=("--grid", "-g"))
    var: list[str] = option([], help="a value for one of the grid's vars (repeatable; default: the environment, "
                            "then the grid)", metavar="NAME=VALUE")
    dry_run: bool = option(False, help="print the plan; write nothing", exclusive="mode")
    local: bool = option(False, help="run the runs one after another here (finished ones are skipped, stopped "
                         "ones resume)", exclusive="mode")
    submit: bool = option(False, help="submit each run through launch/slurm/train.sbatch with its eval array "
                          "chained", exclusive="mode")
    status: bool = option(False, help="show each run's state", exclusive="mode")
    tokens_per_s: float | None = option(None, help="tokens/s per GPU: the plan then shows the sweep's GPU-hours")
    scripts: str | None = option(None, help="folder with train.sbatch and eval.sbatch (default: launch/slurm/ of "
                                 "the clone cpt runs from, else ./launch/slurm/)", metavar="DIR", group=SUBMIT)
    sbatch_args: list[str] = option([], help="sbatch options for every job, e.g. '--partition=gpu "
                                    "--account=proj' (repeatable)", metavar="OPTIONS", group=SUBMIT)
    train_sbatch_args: list[str] = option([], help="sbatch options for the training jobs only, e.g. '--nodes=4 "
                                          "--time=2-00:00:00'", metavar="OPTIONS", group=SUBMIT)
    eval_sbatch_args: list[str] = option([], help="sbatch options for the eval arrays only, e.g. "
                                         "'--time=04:00:00'", metavar="OPTIONS", group=SUBMIT)
