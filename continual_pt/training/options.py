"""The options of `cpt launch` and `cpt stop` (`cpt train` takes a `ConfigSource`; see `continual_pt.options`)."""

from __future__ import annotations

from dataclasses import dataclass

from continual_pt.options import REST, option


@dataclass(kw_only=True)
class LaunchOptions:
    """`cpt launch -- COMMAND`: the launcher command and how long to wait for what it leaves behind."""

    run_dir: str | None = option(None, help="the run directory (default: from the --config and overrides inside "
                                 "COMMAND)")
    grace: float = option(600.0, help="seconds to wait, once the launcher exits, for processes it left behind")
    command: list[str] = option([], help="the launcher command, e.g. deepspeed --num_gpus 8 -m continual_pt.train "
                                "--config run.yaml", positional=True, nargs=REST, metavar="-- COMMAND ...")


@dataclass(kw_only=True)
class StopOptions:
    """`cpt stop RUN_DIR`: which run, and how long to wait for its answer."""

    run_dir: str = option(help="the run directory (out_dir/name)", positional=True)
    wait: float = option(0.0, help="seconds to wait for the run's answer (0: do not wait)")
