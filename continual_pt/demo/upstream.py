"""The demo's upstream model: pre-trained on the upstream corpus with Pythia's recipe.

`cpt demo --pretrain` builds it: a byte-level BPE fit on the upstream corpus only (Pythia's
tokenizer predates SlimPajama), then `cpt train` from scratch, then the checkpoints at 7%, 19%
and 100% of the steps exported as Hugging Face folders (each with the tokenizer) beside a
`provenance.json` (the command, seed, config, tokens per parameter, final losses and a SHA-256
of every file). The package ships the one built at the demo scale for each shift under
`continual_pt/demo/upstream/<shift>/`, so the default demo spends its minutes on the continual
phase, like the paper, which starts from published Pythia checkpoints.
"""

from __future__ import annotations

import hashlib
import json
import math
import platform
import shutil
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml
from safetensors import safe_open

from continual_pt import __version__
from continual_pt.checkpoint.refs import list_committed
from continual_pt.checkpoint.weights import export_hf
from continual_pt.data.options import TokenizerOptions
from continual_pt.data.tokenizer_training import train_tokenizer
from continual_pt.demo.recipe import Scale, pretrain_config
from continual_pt.errors import UserError
from continual_pt.files import atomic_write_text
from continual_pt.layout import CHECKPOINTS, EXIT_OK, EXIT_RESUMABLE, METRICS
from continual_pt.results.records import read_metrics
from continual_pt.sweep.local import train_once

SHIPPED = Path(__file__).resolve().parent / "upstream"
PROVENANCE = "provenance.json"
FINAL = "final"


def checkpoint_names(scale: Scale) -> dict[str, int]:
    """Folder name -> pre-training step of the exported checkpoints."""
    early, mid = scale.early_steps
    return {f"step{early}": early, f"step{mid}": mid, FINAL: scale.pretrain_steps}


def shipped(shift: str, scale: Scale) -> Path | None:
    """The packaged upstream model of this shift, if one was shipped at this scale."""
    folder = SHIPPED / shift
    try:
        provenance = json.loads((folder / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    return folder if provenance.get("scale") == scale.name else None


def read_provenance(folder: Path) -> dict[str, Any]:
    path = folder / PROVENANCE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read the upstream model's provenance ({exc}); rebuild it with "
                        "`cpt demo --pretrain`") from None


def verify(folder: Path) -> dict[str, Any]:
    """The provenance, after checking every file it lists has the recorded SHA-256."""
    provenance = read_provenance(folder)
    for rel, digest in provenance["sha256"].items():
        path = folder / rel
        if not path.is_file() or _sha256(path) != digest:
            raise UserError(f"{path}: missing or changed since the upstream model was built (SHA-256 "
                            f"recorded in {folder / PROVENANCE}); rebuild it with `cpt demo --pretrain`")
    return provenance


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def fit_tokenizer(corpus: Path, scale: Scale, out: Path) -> Path:
    """A byte-level BPE fit on the upstream corpus only."""
    if not (out / "tokenizer.json").is_file():
        train_tokenizer(TokenizerOptions(sources=[str(corpus)], out=str(out), vocab_size=scale.vocab_size,
                                         quiet=True))
    return out


def pretrain(scale: Scale, shift: str, work: Path, datasets: dict[str, Path], out: Path,
             command: str | None = None) -> int:
    """Train the upstream model in `work` (resuming if it was stopped) and export it to `out`: EXIT_OK, or
    EXIT_RESUMABLE when a stop (Ctrl-C, SIGTERM) ended the training with a committed checkpoint. `command`:
    the `cpt demo` command line its provenance records (default: the built-in corpora's, of `shift`)."""
    cfg = pretrain_config(scale, f"upstream-{shift}", str(work), str(datasets["upstream"]),
                          str(datasets["downstream"]))
    config_path = work / f"upstream-{shift}.yaml"
    atomic_write_text(config_path, yaml.safe_dump(cfg, sort_keys=False))
    run_dir = work / cfg["name"]
    print(f"pre-training the upstream model: {scale.pretrain_steps} steps of "
          f"{scale.pretrain_micro_batch * scale.seq_len:,} tokens ({config_path})", flush=True)
    status, error, _ = train_once(config_path)
    if status == EXIT_RESUMABLE:
        print(f"the upstream pre-training stopped with a committed checkpoint ({run_dir}); run the same command "
              "again to resume it", flush=True)
        return EXIT_RESUMABLE
    if status != EXIT_OK:
        raise UserError(f"upstream pre-training failed with exit {status}" + (f": {error}" if error else "")
                        + f"; its run is {run_dir}")
    _export(run_dir, scale, out)
    _write_provenance(out, run_dir, cfg, scale, shift, command)
    return EXIT_OK


def _export(run_dir: Path, scale: Scale, out: Path) -> None:
    committed = {ref.step: ref for ref in list_committed(run_dir / CHECKPOINTS)}
    for name, step in checkpoint_names(scale).items():
        if step not in committed:
            raise UserError(f"{run_dir}: no committed checkpoint at step {step}")
        if (out / name).exists():
            shutil.rmtree(out / name)
        export_hf(committed[step], out / name)


def _params(folder: Path) -> int:
    """Parameters of an exported model (embedding and output layer included, as Pythia counts)."""
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return sum(math.prod(f.get_slice(key).get_shape()) for key in f.keys())


def _write_provenance(out: Path, run_dir: Path, cfg: dict[str, Any], scale: Scale, shift: str,
                      command: str | None) -> None:
    records = read_metrics(run_dir / METRICS)
    train = [r for r in records if r.get("kind") == "train"]
    tokens = int(train[-1]["tokens"]) if train else 0
    final = {r["set"]: r["loss"] for r in records
             if r.get("kind") == "eval" and r.get("step") == scale.pretrain_steps}
    params = _params(out / FINAL)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != PROVENANCE)
    provenance = {
        "command": command or (f"cpt demo --pretrain --shift {shift}"
                               + ("" if scale.name == "demo" else f" --scale {scale.name}")),
        "scale": scale.name, "shift": shift, "seed": scale.seed, "config": cfg,
        "checkpoints": checkpoint_names(scale), "params": params, "tokens": tokens,
        "tokens_per_param": round(tokens / params, 1), "final_eval_loss": final,
        "python": sys.version.split()[0], "platform": platform.platform(), "continual_pt": __version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "sha256": {p.relative_to(out).as_posix(): _sha256(p) for p in files},
    }
    atomic_write_text(out / PROVENANCE, json.dumps(provenance, indent=1) + "\n")
