"""`cpt sweep`: a grid's plan, printed and written (one config per run and `sweep.json`).

The sweep directory holds `sweep.json` (the plan: every run's name, config file, run dir and
axis values), `configs/<run>.yaml` (each resolved and validated) and `runs/<run>/` (the run
dirs). Writing is idempotent: the same grid writes the same files. A run that has started is
never given another config: a grid edit that would change it is refused, naming the run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from continual_pt.config import RunConfig
from continual_pt.config.load import dump
from continual_pt.errors import UserError
from continual_pt.files import atomic_write_text, check_writable
from continual_pt.layout import EXIT_OK, RUN_CONFIG, SWEEP_PLAN
from continual_pt.sweep import local, status, submit
from continual_pt.sweep.grid import PlannedRun, Sweep, label_of, load_sweep
from continual_pt.sweep.options import SweepOptions
from continual_pt.training.lock import RunLock

LOCAL_LOCK = "local.lock"   # held by `cpt sweep --local` in the sweep dir


def run_sweep(opts: SweepOptions) -> int:
    """Expand the grid, print the plan; write it unless --dry-run; then run, submit or report status."""
    sweep = load_sweep(opts.grid, parse_vars(opts.var))
    if sum((opts.dry_run, opts.local, opts.submit, opts.status)) > 1:
        raise UserError("give at most one of --dry-run, --local, --submit, --status")
    if opts.status:
        return status.show_status(sweep)
    if not opts.dry_run:
        _check_writable(sweep, runs=opts.local or opts.submit)
    print(plan_text(sweep, opts.tokens_per_s))
    if opts.dry_run:
        return EXIT_OK
    if opts.local:   # one local sweep at a time per sweep dir: a second would fail each run it meets live
        lock = RunLock(sweep.directory, LOCAL_LOCK, label="sweep dir", what="sweep")
        lock.acquire()
        try:
            _write(sweep)
            return local.run_local(sweep)
        finally:
            lock.release()
    _write(sweep)
    if opts.submit:
        return submit.submit_sweep(sweep, opts)
    return EXIT_OK


def _check_writable(sweep: Sweep, runs: bool) -> None:
    """The sweep dir, and with `runs` every run dir (they train), can be written: said before anything is."""
    check_writable(sweep.directory, "sweep dir (the grid's out)")
    for run in sweep.runs if runs else ():
        check_writable(run.config.run_dir, f"run dir of {run.name}")


def _write(sweep: Sweep) -> None:
    written = write_plan(sweep)
    same = len(sweep.runs) - written
    print(f"wrote {written} run config(s)" + (f" ({same} unchanged)" if same else "")
          + f" and {SWEEP_PLAN} under {sweep.directory}")


def parse_vars(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise UserError(f"--var {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


# --------------------------------------------------------------------------- the plan


def run_tokens(cfg: RunConfig) -> tuple[int, bool]:
    """Tokens the run trains on, and whether that is per data-parallel rank (no global batch given)."""
    per_step = cfg.train.global_batch_size or cfg.train.micro_batch_size * cfg.train.grad_accum
    return cfg.train.max_steps * per_step * cfg.data.seq_len, cfg.train.global_batch_size is None


def _human(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return f"{n:.0f}"


def extra_settings(run: PlannedRun, sweep: Sweep) -> str:
    """What a run sets besides the axes and what every run sets (a baseline's own keys), as key=value."""
    return " ".join(f"{k}={v}" for k, v in run.settings.items() if k not in sweep.axis_keys + sweep.common_keys)


def plan_text(sweep: Sweep, tokens_per_s: float | None = None) -> str:
    """The plan as a table: one row per run with its axis values, steps and tokens."""
    header = ["run", "steps", "tokens", *sweep.axis_keys, "other settings"]
    rows, total, per_rank = [], 0, False
    for run in sweep.runs:
        tokens, rank_only = run_tokens(run.config)
        total, per_rank = total + tokens, per_rank or rank_only
        rows.append([run.name, str(run.config.train.max_steps), _human(tokens) + ("/rank" if rank_only else ""),
                     *(label_of(run.varying[k]) for k in sweep.axis_keys), extra_settings(run, sweep)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [f"sweep {sweep.name}: {len(sweep.runs)} run(s) under {sweep.directory} (grid {sweep.grid_path})",
             "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    summary = f"total: {_human(total)} tokens" + (" per data-parallel rank (set train.global_batch_size)"
                                                    if per_rank else "")
    if tokens_per_s:
        summary += f"; at {tokens_per_s:,.0f} tokens/s per GPU: {total / tokens_per_s / 3600:,.0f} GPU-hours"
    return "\n".join([*lines, summary])


# --------------------------------------------------------------------------- writing


def config_path(sweep: Sweep, run: PlannedRun) -> Path:
    return sweep.directory / "configs" / f"{run.name}.yaml"


def plan_record(sweep: Sweep) -> dict[str, Any]:
    return {"sweep": sweep.name, "grid": str(sweep.grid_path), "base": str(sweep.base) if sweep.base else None,
            "axes": sweep.axis_keys,
            "runs": [{"name": r.name, "config": str(config_path(sweep, r)), "run_dir": str(r.config.run_dir),
                      "varying": r.varying, "settings": r.settings, "steps": r.config.train.max_steps,
                      "tokens": run_tokens(r.config)[0]} for r in sweep.runs]}


def write_plan(sweep: Sweep) -> int:
    """Write every run's config and sweep.json; refuse first if a started run's config would change.
    Returns how many run configs were new or changed (the others are left as they are)."""
    changed = []
    for run in sweep.runs:
        path = config_path(sweep, run)
        started = (run.config.run_dir / RUN_CONFIG).exists()
        if started and path.exists() and path.read_text(encoding="utf-8") != dump(run.config):
            changed.append(f"  - {run.name}: {path} differs from what the grid now gives, and the run has "
                           f"started ({run.config.run_dir})")
    if changed:
        raise UserError("the grid would change the config of started runs (give the changed runs new names, "
                        "or a new sweep directory with `out`):\n" + "\n".join(changed))
    written = 0
    for run in sweep.runs:
        path = config_path(sweep, run)
        text = dump(run.config)
        if not path.exists() or path.read_text(encoding="utf-8") != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(path, text)
            written += 1
    atomic_write_text(sweep.directory / SWEEP_PLAN, json.dumps(plan_record(sweep), indent=1, default=str) + "\n")
    return written


def read_plan(directory: str | Path) -> dict[str, Any]:
    """A sweep directory's sweep.json (for cpt plot, cpt report and --status)."""
    path = Path(directory) / SWEEP_PLAN
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{directory} is not a sweep directory (it has no {SWEEP_PLAN})") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the sweep plan: {exc}") from None
