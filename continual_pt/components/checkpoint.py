"""Checkpoints: save, find, load and prune under a commit protocol; weights for init and export.

A checkpoint is `checkpoints/global_step<N>/`: DeepSpeed's files, one `rank<r>.pt` per rank
(sampler position and RNG states), the model's config and tokenizer, and last of all the
commit marker `COMMITTED.json` listing every file with its size. `checkpoints/latest` is
replaced atomically only after the marker exists, and loaders trust committed tags alone,
so a kill at any moment of a save leaves the previous committed checkpoint in charge.

The marker records each file's size and xxh3_64 checksum; every rank hashes the files it wrote
itself (still in its own page cache, and in parallel across nodes), rank 0 the shared ones.
A tag is never written into while it carries a marker: re-saving a committed step first moves
the old tag aside (one rename) and deletes it only after the new one is committed.
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM

from continual_pt.components import commit, distributed, elastic, integrity
from continual_pt.components.model import DTYPES
from continual_pt.errors import UserError
from continual_pt.files import atomic_output, atomic_write_text, fsync_dir, fsync_tree

MARKER = "COMMITTED.json"
LATEST = "latest"
RANK_FILE = commit.RANK_FILE
FORMAT_VERSION = 3  # 3: every rank's files checked present, 2: each file as {"size", "xxh3_64"}, 1: its size
RETIRED = ".retired-"
TAG_PATTERN = re.compile(r"^global_step(\d+)$")
"""The name of a checkpoint folder; group 1 is its optimizer step."""


def tag_for(step: int) -> str:
    return f"global_step{step}"


def step_of(name: str) -> int | None:
    """The step of a checkpoint folder name (`global_step<N>`), None for any other name."""
    match = TAG_PATTERN.match(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class CheckpointRef:
    """A committed checkpoint folder."""

    path: Path

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def tag(self) -> str:
        return self.path.name

    @property
    def step(self) -> int:
        return step_of(self.tag)

    def meta(self) -> dict[str, Any]:
        return json.loads((self.path / MARKER).read_text())


def is_committed(tag_dir: Path) -> bool:
    return (tag_dir / MARKER).is_file()


def verify(tag_dir: Path, *, hint: bool = True, checksums: bool = True) -> CheckpointRef:
    """A committed checkpoint whose files all match the marker's sizes and checksums, else UserError
    (with `hint`, naming the newest intact checkpoint before it). `checksums=False` checks sizes
    only: for listing many checkpoints, of which a job then loads one."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        raise UserError(f"checkpoint {tag_dir} does not exist")
    if step_of(tag_dir.name) is None:
        raise UserError(f"{tag_dir} is not a checkpoint folder (expected a name like global_step1000)")
    if not is_committed(tag_dir):
        raise UserError(f"checkpoint {tag_dir} is partial: it has no {MARKER} (the save was interrupted); "
                        "use an earlier committed checkpoint" + (_intact_hint(tag_dir) if hint else ""))
    try:
        meta = json.loads((tag_dir / MARKER).read_text())
        files = meta["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        raise UserError(f"{tag_dir / MARKER}: unreadable commit marker ({exc})"
                        + (_intact_hint(tag_dir) if hint else "")) from None
    missing = commit.expected_missing(files, meta.get("world_size", 1), meta.get("zero_stage")) \
        if meta.get("format_version", 0) >= 3 else []
    if missing:
        raise UserError(f"checkpoint {tag_dir} is partial: its commit marker lists no {', '.join(missing)} for a "
                        f"save by {meta.get('world_size')} ranks" + (_intact_hint(tag_dir) if hint else ""))
    for name, recorded in files.items():
        wrong = integrity.problem(tag_dir, name, recorded, checksums)
        if wrong:
            raise UserError(f"checkpoint {tag_dir} {wrong}" + (_intact_hint(tag_dir) if hint else ""))
    return CheckpointRef(tag_dir)


def _intact_hint(tag_dir: Path) -> str:
    """Where to resume from instead of a broken checkpoint: the newest older one that verifies."""
    for ref in reversed(list_committed(tag_dir.parent)):
        if ref.step < step_of(tag_dir.name):
            try:
                verify(ref.path, hint=False)
            except UserError:
                continue
            return f"; the newest intact checkpoint is {ref.path}: resume from it with checkpoint.resume={ref.path}"
    return f"; no older intact checkpoint under {tag_dir.parent}"


def list_tags(root: Path) -> list[Path]:
    """Every checkpoint folder under a checkpoints/ folder, committed or not, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and step_of(p.name) is not None),
                  key=lambda p: step_of(p.name))


def list_committed(root: Path) -> list[CheckpointRef]:
    """Committed checkpoints under a checkpoints/ folder, oldest first."""
    return [CheckpointRef(p) for p in list_tags(root) if is_committed(p)]


def newest_committed(root: Path) -> CheckpointRef | None:
    """The newest committed checkpoint (not whatever `latest` says: loaders trust markers)."""
    refs = list_committed(root)
    return refs[-1] if refs else None


def resolve(path: str | Path, *, what: str = "checkpoint") -> CheckpointRef:
    """A run dir, its checkpoints/ dir or a tag dir -> the checkpoint it names (verified)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{what}: {path} does not exist")
    if step_of(path.name) is not None:
        return verify(path)
    root = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    ref = newest_committed(root)
    if ref is None:
        raise UserError(f"{what}: no committed checkpoint under {root}")
    return verify(ref.path)


def is_ours(path: str | Path) -> bool:
    """Whether a path is one of our run, checkpoints or checkpoint folders (else: Hugging Face)."""
    path = Path(path)
    return path.is_dir() and ((path / "checkpoints").is_dir() or (path / MARKER).is_file()
                              or step_of(path.name) is not None or (path / LATEST).is_file())


class Checkpointer:
    """Saves and loads DeepSpeed checkpoints of one run under the commit protocol."""

    def __init__(self, root: Path, keep_last: int, rank: int, world_size: int, keep_every: int = 0):
        self.root = Path(root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.rank = rank
        self.world_size = world_size

    def save(self, engine, step: int, client_state: dict[str, Any], rank_state: dict[str, Any],
             extras: dict[str, Any]) -> CheckpointRef:
        """Save on every rank; rank 0 commits once every rank's files are complete.

        `extras` maps a folder name in the checkpoint to a callable writing it (rank 0 only),
        e.g. the model config and tokenizer needed for export.
        """
        path = self.root / tag_for(step)
        self._check_space(engine, path)
        retired = self._retire(path) if self.rank == 0 else None
        distributed.barrier()
        problem = None
        try:
            self._write(engine, path, client_state, rank_state, extras)
            reports = commit.gather_reports(commit.report(path, self.rank))   # every rank's files, durable
            if self.rank == 0:
                try:
                    self._commit(path, step, client_state, retired, reports)
                except UserError as exc:
                    problem = exc
                    self._undo(path, retired)
        except (OSError, RuntimeError) as exc:
            if not integrity.is_disk_full(exc, self.root):
                raise
            raise UserError(self._abandon(path, retired)) from None
        if distributed.all_reduce_max([float(problem is not None)])[0]:   # every rank learns the outcome
            raise problem or UserError(f"checkpoint {path} was not committed: rank 0 refused it (see its error)")
        return CheckpointRef(path)

    def _write(self, engine, path: Path, client_state: dict[str, Any], rank_state: dict[str, Any],
               extras: dict[str, Any]) -> None:
        engine.save_checkpoint(str(self.root), tag=path.name, client_state=client_state, save_latest=False)
        rank_file = path / RANK_FILE.format(rank=self.rank)
        with atomic_output(rank_file) as tmp:
            torch.save(rank_state, tmp)
        if self.rank == 0:
            for name, write in extras.items():
                write(path / name)

    def _check_space(self, engine, path: Path) -> None:
        """Refuse, on every rank alike, a save that would not fit: a full disk mid-save costs the save."""
        previous = newest_committed(self.root)
        try:
            need = integrity.recorded_size(previous.meta()["files"]) if previous else 0
        except (OSError, json.JSONDecodeError, KeyError):
            need = 0
        free = integrity.free_bytes(self.root)
        if distributed.all_reduce_max([float(need > free)])[0]:
            raise UserError(f"no space left on device: checkpoint {path} needs about "
                            f"{integrity.megabytes(need)} (the size of {previous.tag}) and {self.root} has "
                            f"{integrity.megabytes(free)} free; free some space (or move out_dir) and run again "
                            f"(the committed {previous.path} is untouched)")

    def _retire(self, path: Path) -> Path | None:
        """Clear the way for a save of `path`: drop a partial tag, rename a committed one aside."""
        self.root.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            return None
        if not is_committed(path):
            shutil.rmtree(path)  # a stale partial save of this same step
            return None
        retired = self.root / f"{RETIRED}{path.name}-{secrets.token_hex(4)}"
        os.rename(path, retired)
        fsync_dir(self.root)
        return retired

    def _undo(self, path: Path, retired: Path | None) -> None:
        """Rank 0, after a save that cannot commit: remove it, put back the committed tag it replaced."""
        shutil.rmtree(path, ignore_errors=True)
        if retired is not None:
            os.rename(retired, path)

    def _abandon(self, path: Path, retired: Path | None) -> str:
        """After a full disk: remove the partial save, put back what it replaced; the message to show."""
        if self.rank == 0:
            self._undo(path, retired)
        previous = newest_committed(self.root)
        kept = f"the committed {previous.path} is intact" if previous else "there is no earlier committed checkpoint"
        free = integrity.megabytes(integrity.free_bytes(self.root))
        return (f"no space left on device while saving checkpoint {path}: {free} free on {self.root}; the "
                f"partial save was removed and {kept}; free some space (or move out_dir) and run again")

    def _commit(self, path: Path, step: int, client_state: dict[str, Any], retired: Path | None,
                reports: list[dict[str, Any]]) -> None:
        """Rank 0: the marker (every rank's reported files, checked here, and rank 0's), then `latest`."""
        fsync_tree(path)
        files = commit.assemble(path, reports, client_state.get("zero_stage"))
        meta = {"format_version": FORMAT_VERSION, "step": step, "world_size": self.world_size,
                "time": time.time(), "files": files,
                **{k: client_state[k] for k in ("tokens_seen", "zero_stage", "precision") if k in client_state}}
        atomic_write_text(path / MARKER, json.dumps(meta, indent=1))
        atomic_write_text(self.root / LATEST, path.name)
        if retired is not None:
            shutil.rmtree(retired, ignore_errors=True)
        self.prune()

    def prune(self) -> None:
        """Keep the newest `keep_last` committed checkpoints and every `keep_every`-th step's; drop
        partial ones older than the newest."""
        committed = list_committed(self.root)
        keep = {r.step for r in committed[-self.keep_last:]}
        keep |= {r.step for r in committed if self.keep_every and r.step % self.keep_every == 0}
        for ref in committed:
            if ref.step not in keep:
                shutil.rmtree(ref.path, ignore_errors=True)
        elastic.prune(self.root, {tag_for(step) for step in keep})
        if committed:
            newest = committed[-1].step
            for p in list_tags(self.root):
                if step_of(p.name) < newest and not is_committed(p):
                    shutil.rmtree(p, ignore_errors=True)

    def load(self, engine, ref: CheckpointRef, *, load_optimizer: bool = True, load_schedule: bool = True,
             universal: Path | None = None) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Restore the engine from a committed checkpoint, or from its `universal` conversion (an engine
        configured to load universal checkpoints); returns (client state, this rank's state)."""
        meta = ref.meta()
        saved_world = meta.get("world_size", self.world_size)
        if load_optimizer and saved_world != self.world_size and meta.get("zero_stage", 0) > 0 and not universal:
            raise UserError(f"checkpoint {ref.path} was written by {saved_world} ranks with ZeRO stage "
                            f"{meta['zero_stage']}; this run has {self.world_size} ranks. Resume with "
                            f"{saved_world} ranks, or start a new phase from its weights (checkpoint.init)")
        source = Path(universal).parent if universal else ref.root
        _, client_state = engine.load_checkpoint(str(source), tag=ref.tag,
                                                 load_optimizer_states=load_optimizer,
                                                 load_lr_scheduler_states=load_schedule)
        if client_state is None:
            raise UserError(f"DeepSpeed could not load checkpoint {ref.path}")
        if hasattr(engine.lr_scheduler, "apply"):
            # Loaded optimizer state carries the old schedule's LR; this run's schedule wins.
            engine.lr_scheduler.apply()
        rank_file = ref.path / RANK_FILE.format(rank=self.rank)
        if not rank_file.is_file():
            rank_file = ref.path / RANK_FILE.format(rank=0)
        rank_state = torch.load(rank_file, map_location="cpu", weights_only=False)
        return client_state, rank_state


# --------------------------------------------------------------------------- RNG state


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------- weights


def _strip(state: dict[str, torch.Tensor], prefix: str = "model.") -> dict[str, torch.Tensor]:
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}


def consolidated_state_dict(ref: CheckpointRef) -> dict[str, torch.Tensor]:
    """The full fp32 weights of a checkpoint, whatever its ZeRO stage and world size, by HF key."""
    if any(ref.path.glob("*_optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ref.root), tag=ref.tag)
    else:
        module = torch.load(ref.path / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        state = {k: v.float() for k, v in module["module"].items()}
    return _strip(dict(state))


def load_model_from_checkpoint(ref: CheckpointRef, attn_implementation: str = "sdpa"):
    """A transformers model with a checkpoint's architecture and fp32 weights."""
    hf_config = AutoConfig.from_pretrained(ref.path / "model")
    model = AutoModelForCausalLM.from_config(hf_config, attn_implementation=attn_implementation,
                                             dtype=torch.float32)
    state = consolidated_state_dict(ref)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    if unexpected or set(missing) - tied:
        raise UserError(f"checkpoint {ref.path} does not match its model config: missing {sorted(missing)[:5]}, "
                        f"unexpected {sorted(unexpected)[:5]}")
    return model


def export_hf(ref: CheckpointRef, out: Path, dtype: str = "fp32") -> Path:
    """Write a Hugging Face folder (model + tokenizer) loadable without DeepSpeed."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; name a folder to write the model into")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export: {out} exists and is not empty; choose another --out")
    model = load_model_from_checkpoint(ref, attn_implementation="eager")
    model = model.to(DTYPES[dtype])
    # An empty `out` is replaced by the finished folder, never seen without its tokenizer.
    with atomic_output(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer = ref.path / "tokenizer"
        if tokenizer.is_dir():
            for file in tokenizer.iterdir():
                shutil.copy2(file, tmp / file.name)
    return out


@dataclass
class ExportOptions:
    """`cpt export`: which checkpoint, where to, in which dtype."""

    checkpoint: str
    """A run directory (its newest committed checkpoint) or a checkpoint folder."""
    out: str
    dtype: str = "fp32"


def run_export(options: ExportOptions) -> int:
    """`cpt export`: a Hugging Face folder from a committed checkpoint."""
    ref = resolve(options.checkpoint)
    out = export_hf(ref, Path(options.out), options.dtype)
    print(f"exported {ref.path} (step {ref.step}) to {out}")
    return 0
