"""Resuming a checkpoint on another number of ranks or another ZeRO stage (1, 2, 3).

ZeRO partitions the optimizer state by rank, so a checkpoint loads as saved only on the world size
and stage that wrote it. DeepSpeed's universal format stores every parameter's fp32 weights and Adam
moments whole (`zero/<name>/{fp32,exp_avg,exp_avg_sq}.pt`), which any world size and stage can
partition again. A committed checkpoint `checkpoints/global_step<N>` is converted once into
`checkpoints/universal/global_step<N>` and reused by later resumes.

The conversion is committed like a save: it is written into a hidden temporary folder, gets its own
marker (every file with its size and checksum, and the checksum of the original's marker, so a
re-saved original is never paired with an old conversion), and appears under its name by one rename.
A kill mid-conversion leaves only a temporary that the next conversion removes. The original
checkpoint is only read.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import shutil
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import deepspeed
import torch
from deepspeed.checkpoint import ds_to_universal

from continual_pt.checkpoint import integrity
from continual_pt.errors import UserError
from continual_pt.files import atomic_write_text, fsync_dir, fsync_tree
from continual_pt.layout import MARKER, UNIVERSAL
from continual_pt.runtime import distributed

TEMPORARY = ".converting-"
FORMAT_VERSION = 1

NOT_EXACT = ("the weights, Adam moments, schedule step, tokens seen and data position carry over exactly; "
             "what does not: each rank's RNG stream (ranks that did not exist in the saved run start from "
             "the seed) and the order of the gradient reduction across ranks, so the losses differ from an "
             "uninterrupted run in the last digits")


def needs_universal(meta: dict[str, Any], world_size: int, zero_stage: int, mode: str) -> bool:
    """Whether a resume must go through the universal format: another ZeRO stage, or another world size
    with ZeRO partitioning, both sides ZeRO 1-3, and `checkpoint.elastic: auto`. Anything else loads
    as saved or meets the usual refusals."""
    saved_world = meta.get("world_size", world_size)
    saved_stage = meta.get("zero_stage", zero_stage)
    if saved_stage == zero_stage and (saved_world == world_size or zero_stage == 0):
        return False
    return mode == "auto" and saved_stage > 0 and zero_stage > 0


def universal_path(tag_dir: Path) -> Path:
    """Where the universal conversion of a checkpoint folder lives (whether or not it exists)."""
    tag_dir = Path(tag_dir)
    return tag_dir.parent / UNIVERSAL / tag_dir.name


def _source_digest(tag_dir: Path) -> str:
    return integrity.checksum(Path(tag_dir) / MARKER)


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(folder) / MARKER).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def usable(tag_dir: Path) -> Path | None:
    """The committed conversion of this very checkpoint with every file intact, else None."""
    out = universal_path(tag_dir)
    meta = read_marker(out)
    if not meta or meta.get("source", {}).get(integrity.CHECKSUM) != _source_digest(tag_dir):
        return None
    files = meta.get("files", {})
    if any(integrity.problem(out, name, recorded) for name, recorded in files.items()):
        return None
    return out


def clear_temporaries(base: Path) -> None:
    """Remove what interrupted conversions left in `checkpoints/universal/`."""
    if Path(base).is_dir():
        for path in Path(base).glob(f"{TEMPORARY}*"):
            shutil.rmtree(path, ignore_errors=True)


def _run_converter(tag_dir: Path, target: Path) -> None:
    args = SimpleNamespace(input_folder=str(tag_dir), output_folder=str(target), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as exc:   # noqa: BLE001  (any failure of DeepSpeed's converter is reported alike)
        raise UserError(f"could not convert checkpoint {tag_dir} to DeepSpeed's universal format "
                        f"({type(exc).__name__}: {exc}); resume with the world size and ZeRO stage it was "
                        "saved with, or start a new phase from its weights (checkpoint.init)") from None


def _load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=False)


def _zero3_shapes(target: Path) -> dict[str, torch.Size]:
    """Each parameter's shape, from a ZeRO 3 model states file (ZeRO 1/2 conversions store shaped tensors)."""
    file = target / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    groups = _load(file).get("param_shapes") or [] if file.is_file() else []
    return {name: shape for group in groups for name, shape in group.items()}


def _common_layout(target: Path) -> None:
    """One layout that ZeRO 1/2 and ZeRO 3 engines both load. The converter writes two: from ZeRO 1/2,
    `{"param": tensor}` files with a `step.pt` per parameter and the optimizer's top-level state;
    from ZeRO 3, flat tensors, the step inside `optimizer_state_dict`. Each gets what the other has."""
    zero = target / "zero"
    state = _load(zero / "optimizer_state.pt")
    groups = state.get("param_groups") or state["optimizer_state_dict"]["param_groups"]
    inner = state.get("optimizer_state_dict") or {}
    folders = sorted(p for p in zero.iterdir() if p.is_dir())
    step = next(iter(inner["state"].values())).get("step") if inner.get("state") else None
    if step is None:
        step = next((_load(f / "step.pt") for f in folders if (f / "step.pt").is_file()), None)
    shapes = _zero3_shapes(target)
    for folder in folders:
        for key in ("fp32", "exp_avg", "exp_avg_sq"):
            file = folder / f"{key}.pt"
            value = _load(file) if file.is_file() else None
            if torch.is_tensor(value):
                torch.save({"param": value.view(shapes.get(folder.name, value.shape))}, file)
        if step is not None and not (folder / "step.pt").is_file():
            torch.save(step, folder / "step.pt")
    state.setdefault("param_groups", groups)
    state.setdefault("ds_version", deepspeed.__version__)
    state.setdefault("optimizer_state_dict", {"state": {0: {"step": step}}, "param_groups": groups})
    torch.save(state, zero / "optimizer_state.pt")


def _both_layouts(target: Path) -> None:
    """ZeRO 1/2 engines read a universal folder's `mp_rank_00_model_states.pt`, ZeRO 3 engines its
    `zero_pp_rank_0_mp_rank_00_model_states.pt`; the converter keeps only the source stage's name.
    The other is added: a copy, or (from ZeRO 3, whose file holds empty partitions) the full weights."""
    flat, zero3 = target / "mp_rank_00_model_states.pt", target / "zero_pp_rank_0_mp_rank_00_model_states.pt"
    if flat.is_file() and not zero3.is_file():
        shutil.copy2(flat, zero3)
    elif zero3.is_file() and not flat.is_file():
        state = _load(zero3)
        state["module"] = {name: _load(target / "zero" / name / "fp32.pt")["param"] for name in state["module"]}
        torch.save(state, flat)


def restore_param_groups(engine, out: Path) -> None:
    """After a universal load: each optimizer group's saved hyperparameters (weight decay, betas, eps),
    LR aside (the schedule sets it), since DeepSpeed's ZeRO 3 path gives every group the first group's
    values (weight decay on biases and norms); and one Adam step counter per parameter state."""
    saved = _load(Path(out) / "zero" / "optimizer_state.pt")
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    groups = saved.get("param_groups") or []
    if len(groups) != len(base.param_groups):
        raise UserError(f"universal checkpoint {out} has {len(groups)} optimizer groups, this run "
                        f"{len(base.param_groups)}; resume with the world size and ZeRO stage it was saved with")
    for group, old in zip(base.param_groups, groups):
        group.update({k: v for k, v in old.items() if k not in ("params", "lr", "initial_lr")})
    # The ZeRO 3 path also hands every group one shared step tensor, which an in-place optimizer
    # (fused AdamW) would then advance once per group and step: each gets its own.
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def complete_param_groups(engine) -> list[str]:
    """After loading optimizer state saved by another optimizer class (optimizer offload turned on or
    off: torch's AdamW and DeepSpeed's CPU Adam keep different group keys), give each group the keys
    this optimizer needs from its defaults; the hyperparameters they share (betas, eps, weight decay)
    stay as saved. Returns the keys that were missing."""
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)
    defaults = getattr(base, "defaults", {})
    missing = sorted({k for group in base.param_groups for k in defaults if k not in group})
    for group in base.param_groups:
        for key in missing:
            group.setdefault(key, defaults[key])
    return missing


def convert(tag_dir: Path) -> Path:
    """Convert a committed checkpoint folder to `checkpoints/universal/<tag>` (replacing an older one)."""
    tag_dir = Path(tag_dir)
    out = universal_path(tag_dir)
    base = out.parent
    base.mkdir(parents=True, exist_ok=True)
    clear_temporaries(base)
    work = base / f"{TEMPORARY}{tag_dir.name}-{secrets.token_hex(4)}"
    target = work / tag_dir.name
    digest = _source_digest(tag_dir)
    try:
        _run_converter(tag_dir, target)
        _common_layout(target)
        _both_layouts(target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    files = {name: integrity.entry(target / name) for name in integrity.listed_files(target)}
    meta = {"format_version": FORMAT_VERSION, "time": time.time(), "deepspeed": deepspeed.__version__,
            "source": {"tag": tag_dir.name, integrity.CHECKSUM: digest}, "files": files}
    atomic_write_text(target / MARKER, json.dumps(meta, indent=1))
    fsync_tree(target)
    stale = None
    if out.exists():
        stale = base / f"{TEMPORARY}stale-{secrets.token_hex(4)}"
        os.rename(out, stale)
    os.rename(target, out)
    fsync_dir(base)
    shutil.rmtree(work, ignore_errors=True)
    if stale is not None:
        shutil.rmtree(stale, ignore_errors=True)
    return out


def prepare(tag_dir: Path, is_main: bool) -> tuple[Path, bool]:
    """On every rank: rank 0 finds this checkpoint's conversion or converts it, the others wait.
    Returns (its path, whether it was converted now); a failure on rank 0 fails every rank."""
    def convert_if_needed() -> bool:
        if usable(tag_dir) is not None:
            return False
        convert(tag_dir)
        return True

    converted = bool(distributed.on_main_rank(is_main, convert_if_needed, f"rank 0 could not convert "
                                              f"checkpoint {tag_dir} to the universal format (see its error)"))
    return universal_path(tag_dir), converted


def with_universal_loading(ds_cfg: dict[str, Any]) -> dict[str, Any]:
    """The DeepSpeed config with `checkpoint.load_universal` on (it changes loading only)."""
    return {**ds_cfg, "checkpoint": {**ds_cfg.get("checkpoint", {}), "load_universal": True}}


def note(meta: dict[str, Any], world_size: int, zero_stage: int, out: Path, converted: bool,
         tokens_per_step: int) -> str:
    """The one log line of an elastic resume: from what to what, and what does not carry exactly."""
    how = "converted now" if converted else "converted by an earlier resume"
    line = (f"elastic resume: checkpoint {meta.get('step')} was saved by {meta.get('world_size')} ranks with ZeRO "
            f"{meta.get('zero_stage')}, this run has {world_size} ranks with ZeRO {zero_stage}; loading its "
            f"universal copy {out} ({how}); {NOT_EXACT}")
    step, tokens = meta.get("step"), meta.get("tokens_seen")
    if step and tokens and tokens // step != tokens_per_step:
        line += (f". Note: the global batch changes from {tokens // step} to {tokens_per_step} tokens per step "
                 "(set train.grad_accum or train.global_batch_size to keep it)")
    return line


def prune(root: Path, kept_tags: set[str]) -> None:
    """Drop the conversions of checkpoints no longer kept."""
    base = Path(root) / UNIVERSAL
    if not base.is_dir():
        return
    for path in base.iterdir():
        if path.is_dir() and not path.name.startswith(TEMPORARY) and path.name not in kept_tags:
            shutil.rmtree(path, ignore_errors=True)
