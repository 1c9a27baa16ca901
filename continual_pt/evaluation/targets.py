"""What `cpt eval` scores and on what: checkpoints found from paths or hub names, held-out sets,
and the checks between them (tokenizer, vocabulary, sequence length) made before any work.

A target is one of:
  * a run directory or its checkpoints/ folder: every committed checkpoint, oldest first
    (uncommitted or partial ones are skipped with a warning: a save may be in progress);
  * a checkpoint folder `global_step<N>`: an error if it is not committed and complete;
  * a Hugging Face model folder (config.json + weights);
  * a hub name with an optional revision, `EleutherAI/pythia-410m@step143000`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from continual_pt import layout
from continual_pt.checkpoint import refs
from continual_pt.data.tokenizer import canonical_sha256, tokenizer_sha256
from continual_pt.errors import UserError
from continual_pt.evaluation.sets import EvalSet
from continual_pt.model.causal_lm import check_vocab, load_hf_config, split_revision

HUB_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")
DEFAULT_SEQ_LEN = 2048  # Pythia's context, for models without a run config
DEFAULT_MICRO_BATCH = 8

Warn = Callable[[str], None]


@dataclass
class Target:
    """One model to score and what identifies it in the results store."""

    kind: str
    """checkpoint (one of ours), hf (a Hugging Face folder) or hub (a hub name)."""
    identity: str
    """The absolute folder path, or `name@revision` for a hub model."""
    run: str
    tag: str
    step: int | None = None
    tokens_seen: int | None = None
    run_dir: Path | None = None
    ref: Any = None
    """The CheckpointRef of one of our checkpoints."""
    run_config: dict[str, Any] = field(default_factory=dict)
    name_or_path: str = ""
    revision: str | None = None


def _yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {}


def checkpoint_target(ref) -> Target:
    """A committed checkpoint of ours: step and tokens from its commit marker, run from its config."""
    meta = ref.meta()
    run_dir = ref.root.parent if ref.root.name == layout.CHECKPOINTS else None
    run_cfg = _yaml(ref.path / "run" / layout.RUN_CONFIG) or (_yaml(run_dir / layout.RUN_CONFIG) if run_dir else {})
    name = run_cfg.get("name") or (run_dir.name if run_dir else ref.root.name)
    return Target("checkpoint", str(ref.path.resolve()), str(name), ref.tag, ref.step, meta.get("tokens_seen"),
                  run_dir.resolve() if run_dir else None, ref, run_cfg, str(ref.path))


def _run_targets(root: Path, warn: Warn) -> list[Target]:
    targets = []
    for path in refs.list_tags(root):
        if not refs.is_committed(path):
            warn(f"skipping {path}: not committed (no {layout.MARKER}; a save in progress or interrupted)")
            continue
        try:
            targets.append(checkpoint_target(refs.verify(path, checksums=False)))
        except (UserError, OSError) as exc:
            if not path.exists():
                continue   # pruned by its run (keep_last) since the folder was listed
            if not isinstance(exc, UserError) and not refs.removed(path):
                raise
            warn(f"skipping: {exc}")
    if not targets:
        warn(f"{root}: no committed checkpoint")
    return targets


def _hub_target(spec: str) -> Target:
    name, revision = split_revision(spec)
    step = re.fullmatch(r"step(\d+)", revision or "")
    return Target("hub", spec, name, revision or "main", int(step.group(1)) if step else None,
                  name_or_path=name, revision=revision)


def _expand(spec: str, warn: Warn) -> list[Target]:
    path = Path(spec).expanduser()
    if path.exists():
        if layout.step_of(path.name) is not None:
            return [checkpoint_target(refs.verify(path, checksums=False))]
        if (path / layout.CHECKPOINTS).is_dir():
            return _run_targets(path / layout.CHECKPOINTS, warn)
        if refs.is_ours(path):
            return _run_targets(path, warn)
        if (path / "config.json").is_file():
            return [Target("hf", str(path.resolve()), path.resolve().name, path.resolve().name,
                           name_or_path=str(path))]
        raise UserError(f"{spec}: not a run directory (no checkpoints/), a checkpoint folder ({layout.TAG_PREFIX}<N>) "
                        "or a Hugging Face model folder (no config.json)")
    first = Path(spec.split("/")[0])
    if HUB_RE.match(spec) and not spec.startswith((".", "~")) and not first.is_dir():
        return [_hub_target(spec)]
    raise UserError(f"{spec} does not exist (nor is it a hub name such as EleutherAI/pythia-410m@step143000)")


def expand_targets(specs: list[str], warn: Warn, allow_none: bool = False) -> list[Target]:
    """Every checkpoint named, in command-line order, run directories expanded oldest first; none is an
    error unless `allow_none` (a job draining a run that has not committed a checkpoint yet)."""
    targets: list[Target] = []
    for spec in specs:
        for target in _expand(spec, warn):
            if all(t.identity != target.identity for t in targets):
                targets.append(target)
    if not targets and not allow_none:
        raise UserError(f"nothing to score: no committed checkpoint in {', '.join(specs)}")
    return targets


def task_index(value: str | None) -> int | None:
    """--task-index, else SLURM_ARRAY_TASK_ID, else None (all); 'all' ignores the array id."""
    source = "--task-index"
    if value is None:
        value, source = os.environ.get("SLURM_ARRAY_TASK_ID") or None, "SLURM_ARRAY_TASK_ID"
    if value is None or value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{source}={value!r}: expected an integer index or 'all'") from None


def print_listing(targets: list[Target], unscored: list[bool] | None = None, scored_on: str = "--set") -> None:
    """The numbered list a job array indexes (`--list`); with `unscored`, which still lack a row of
    every `scored_on` (the options asked for)."""
    for i, t in enumerate(targets):
        mark = "" if unscored is None else ("\tunscored" if unscored[i] else "\tscored")
        print(f"{i}\t{t.identity}{mark}")
    left = "" if unscored is None else f"; {sum(unscored)} not yet scored on every {scored_on}"
    print(f"{len(targets)} checkpoint(s): use --task-index 0..{len(targets) - 1} "
          f"(sbatch --array=0-{len(targets) - 1}){left}")


def pick_task(targets: list[Target], value: str | None) -> list[Target]:
    """The one target of a job-array task, or all of them."""
    index = task_index(value)
    if index is None:
        return targets
    if not 0 <= index < len(targets):
        source = "--task-index" if value is not None else "SLURM_ARRAY_TASK_ID"
        raise UserError(f"{source} {index} is out of range: there are {len(targets)} checkpoint(s) to score "
                        f"(indices 0..{len(targets) - 1}); size the job array to {len(targets)} tasks")
    return [targets[index]]


# --------------------------------------------------------------------------- checks


def model_config(target: Target):
    """The transformers config of a target, without loading its weights."""
    if target.kind == "checkpoint":
        return load_hf_config(str(target.ref.path / "model"))
    return load_hf_config(target.name_or_path, target.revision)


def tokenizer_hash(target: Target) -> tuple[str | None, str]:
    """(sha256 as the data package hashes it, where from) of the target's tokenizer; None if it has none."""
    if target.kind == "hub":
        try:
            return tokenizer_sha256(target.name_or_path), target.name_or_path
        except UserError:
            return None, ""
    folder = target.ref.path / "tokenizer" if target.kind == "checkpoint" else Path(target.name_or_path)
    if (folder / "tokenizer.json").is_file():
        return canonical_sha256((folder / "tokenizer.json").read_text(encoding="utf-8")), str(folder)
    if any((folder / name).is_file() for name in ("vocab.json", "tokenizer.model")):
        try:
            return tokenizer_sha256(str(folder)), str(folder)
        except UserError:
            return None, ""
    return None, ""


def check_sets(target: Target, hf_config, sets: list[EvalSet], warn: Warn) -> None:
    """Every set must be tokenized with the target's tokenizer and fit its embedding."""
    sha, where = tokenizer_hash(target)
    for s in sets:
        ds = s.dataset
        check_vocab(int(hf_config.vocab_size), ds.vocab_size, f"eval set {s.name} ({s.path})")
        if sha is not None and sha != ds.tokenizer_sha256:
            raise UserError(f"eval set {s.name} ({s.path}) was prepared with tokenizer {ds.tokenizer_name!r} "
                            f"(sha256 {ds.tokenizer_sha256[:16]}), but {target.identity} uses another one "
                            f"(sha256 {sha[:16]}, {where}); prepare the set again with "
                            f"`cpt prepare --tokenizer {where}`")
    if sha is None:
        warn(f"{target.identity} has no tokenizer to compare with the sets' (only the vocabulary size "
             f"{hf_config.vocab_size} was checked); make sure they were prepared with the model's tokenizer")


def plan_target(target: Target, sets: list[EvalSet], seq_len: int | None, micro_batch_size: int | None,
                warn: Warn) -> tuple[int, int]:
    """Check a target against the sets; returns its (seq_len, micro_batch_size).

    Defaults: our checkpoints use their run's data.seq_len and eval (else train) micro batch;
    other models 2048 tokens capped at max_position_embeddings, and 8 sequences.
    """
    hf_config = model_config(target)
    check_sets(target, hf_config, sets, warn)
    data = target.run_config.get("data") or {}
    limit = getattr(hf_config, "max_position_embeddings", None)
    seq = seq_len or data.get("seq_len") or min(DEFAULT_SEQ_LEN, limit or DEFAULT_SEQ_LEN)
    if limit and seq > limit:
        raise UserError(f"--seq-len {seq} exceeds the max_position_embeddings ({limit}) of {target.identity}")
    for s in sets:
        if s.dataset.num_tokens < seq + 1:
            raise UserError(f"eval set {s.name} ({s.path}, split {s.split}) has {s.dataset.num_tokens} tokens, "
                            f"fewer than one window of seq_len + 1 = {seq + 1}; lower --seq-len")
    cfg_eval, cfg_train = target.run_config.get("eval") or {}, target.run_config.get("train") or {}
    mbs = micro_batch_size or cfg_eval.get("micro_batch_size") or cfg_train.get("micro_batch_size") \
        or DEFAULT_MICRO_BATCH
    return int(seq), int(mbs)
