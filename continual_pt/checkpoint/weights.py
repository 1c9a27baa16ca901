"""A checkpoint's weights outside the engine: consolidated fp32 weights whatever the ZeRO stage,
a transformers model for a new phase (checkpoint.init), and `cpt export`'s Hugging Face folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoConfig, AutoModelForCausalLM

from continual_pt.checkpoint.options import ExportOptions
from continual_pt.checkpoint.refs import CheckpointRef, resolve
from continual_pt.errors import UserError
from continual_pt.files import atomic_output, check_writable
from continual_pt.layout import EXIT_OK
from continual_pt.model.causal_lm import DTYPES


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


def check_export_out(out: Path) -> None:
    """Refuse an `out` that export could not write, or would clobber: before the checkpoint is read."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is an existing file; name a folder to write the model into")
    check_writable(out, "--out", replaced=True)   # made beside it, renamed over it
    if out.exists() and any(out.iterdir()):
        raise UserError(f"export: {out} exists and is not empty; choose another --out")


def export_hf(ref: CheckpointRef, out: Path, dtype: str = "fp32") -> Path:
    """Write a Hugging Face folder (model + tokenizer) loadable without DeepSpeed."""
    out = Path(out)
    check_export_out(out)
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


def run_export(options: ExportOptions) -> int:
    """`cpt export`: a Hugging Face folder from a committed checkpoint."""
    check_export_out(Path(options.out))   # verifying the checkpoint reads all of it
    ref = resolve(options.checkpoint)
    out = export_hf(ref, Path(options.out), options.dtype)
    print(f"exported {ref.path} (step {ref.step}) to {out}")
    return EXIT_OK
