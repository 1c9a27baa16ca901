"""The checks of a resume: may the saved checkpoint continue under this config, and how it loads
(as saved, or through its universal conversion on another world size or ZeRO stage)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from continual_pt.checkpoint import elastic, refs
from continual_pt.config import RunConfig
from continual_pt.errors import UserError
from continual_pt.files import read_json_lines
from continual_pt.layout import METRICS, RUN_CONFIG
from continual_pt.runtime import distributed


@dataclass(frozen=True)
class Start:
    """How this phase starts: resume (everything), init (weights only) or scratch."""

    kind: str  # "resume", "init_checkpoint", "init_hf", "scratch"
    ref: refs.CheckpointRef | None = None
    reference: str | None = None


class RunFinished(Exception):
    """The run's checkpoint is already at train.max_steps: nothing to train, nothing to write."""


def saved_run_config(ref: refs.CheckpointRef) -> dict[str, Any] | None:
    """The resolved config a checkpoint was written under (its run/config.yaml), if it has one."""
    path = ref.path / "run" / RUN_CONFIG
    return yaml.safe_load(path.read_text()) if path.is_file() else None


def final_eval_missing(cfg: RunConfig, is_main: bool) -> bool:
    """Whether a run with held-out sets lacks the in-loop eval of its last step on some set (a stop cut
    it short; the start that resumes at max_steps makes it). Rank 0 reads the metrics it wrote; every
    rank learns its answer."""
    missing = False
    if is_main and cfg.eval.sets:
        done = {r.get("set") for r in read_json_lines(cfg.run_dir / METRICS)
                if r.get("kind") == "eval" and r.get("step") == cfg.train.max_steps}
        missing = not set(cfg.eval.sets) <= done
    return bool(distributed.all_reduce_max([1.0 if missing else 0.0])[0])


def check_resume(cfg: RunConfig, start: Start, zero_stage: int, world_size: int | None = None,
                 is_main: bool = True) -> None:
    """Refuse a resume that cannot continue the run as saved; RunFinished when nothing is left to do
    (a checkpoint at max_steps, and the final eval made). A change of ZeRO stage passes when the
    checkpoint will load through its universal conversion."""
    if start.kind != "resume":
        return
    ref, max_steps = start.ref, cfg.train.max_steps
    if ref.step > max_steps:
        raise UserError(f"checkpoint {ref.path} is at step {ref.step}, beyond train.max_steps={max_steps}; "
                        "raise train.max_steps or resume from an earlier checkpoint (checkpoint.resume=...)")
    meta = ref.meta()
    elastic_load = world_size is not None and elastic.needs_universal(meta, world_size, zero_stage,
                                                                       cfg.checkpoint.elastic)
    for field, saved, now in (("ZeRO stage (train.ds_config)", meta.get("zero_stage"), zero_stage),
                              ("train.precision", meta.get("precision"), cfg.train.precision)):
        if saved is not None and saved != now and not (elastic_load and field.startswith("ZeRO")):
            raise UserError(f"checkpoint {ref.path} was saved with {field} {saved}, this run asks for {now}; "
                            f"resume with {saved}, or start a new phase from its weights (checkpoint.init)")
    saved_model = ((saved_run_config(ref) or {}).get("model") or {}).get("config")
    if saved_model is not None and saved_model != cfg.model.config:
        changed = ", ".join(f"{k}: {saved_model.get(k)!r} saved, {cfg.model.config.get(k)!r} now"
                            for k in sorted(set(saved_model) | set(cfg.model.config))
                            if saved_model.get(k) != cfg.model.config.get(k))
        raise UserError(f"model.config differs from the one checkpoint {ref.path} was trained with ({changed}); "
                        "a resume continues the saved architecture: restore model.config, or start a new phase "
                        "from its weights (checkpoint.init)")
    if ref.step == max_steps and not final_eval_missing(cfg, is_main):
        raise RunFinished(f"finished: checkpoint {ref.path} is at train.max_steps={max_steps}, nothing to do "
                          "(raise train.max_steps to train further)")
