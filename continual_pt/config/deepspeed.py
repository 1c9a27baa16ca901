"""DeepSpeed configs: find a file of ds_configs/ and fill its "auto" fields from the run config.

ZeRO stage and offload live in the JSON files; batch sizes, accumulation, clipping and
precision are decided by the run config and written there as "auto". The shipped files are
package data (continual_pt/ds_configs/), so a wheel install finds them too.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from continual_pt.errors import UserError
from continual_pt.layout import PRECISIONS

DS_CONFIG_DIR = Path(__file__).resolve().parents[1] / "ds_configs"
# Sections that `fill` and the readers below descend into: each must be a JSON object if present.
OBJECT_SECTIONS = ("bf16", "fp16", "zero_optimization", "zero_optimization.offload_optimizer")
_JSON_KINDS = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true/false",
               type(None): "null"}


class BatchSizeError(ValueError):
    """global batch != micro batch x gradient accumulation x data-parallel size."""


class DeepSpeedFileError(UserError, ValueError):
    """A DeepSpeed config file that is not a JSON object of settings; the message names the file."""


def available() -> list[str]:
    """Names of the configs shipped in ds_configs/."""
    return sorted(p.stem for p in DS_CONFIG_DIR.glob("*.json"))


def find(name_or_path: str) -> Path | None:
    """The JSON file for a ds_configs/ name (`zero2`) or a path; None if there is none."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".json" and candidate.is_file():
        return candidate
    shipped = DS_CONFIG_DIR / f"{name_or_path}.json"
    return shipped if shipped.is_file() else None


def load(name_or_path: str) -> dict[str, Any]:
    """Parse a DeepSpeed config by name or path, with a clear error naming the file."""
    path = find(name_or_path)
    if path is None:
        raise FileNotFoundError(
            f"no DeepSpeed config {name_or_path!r}; accepted: {', '.join(available())} or a path to a JSON file")
    return read(path)


def read(path: Path) -> dict[str, Any]:
    """The settings of one DeepSpeed JSON file; `DeepSpeedFileError` naming it if they are unusable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DeepSpeedFileError(f"{path}: not valid JSON: {exc}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DeepSpeedFileError(f"{path}: cannot read it: {exc}") from None
    if not isinstance(data, dict):
        raise DeepSpeedFileError(f"{path}: expected a JSON object of DeepSpeed settings ({{...}}), "
                                 f"got {_JSON_KINDS.get(type(data), type(data).__name__)}")
    for section in OBJECT_SECTIONS:
        parent, _, key = section.rpartition(".")
        node = data.get(parent, {}) if parent else data
        if isinstance(node, dict) and key in node and not isinstance(node[key], dict):
            raise DeepSpeedFileError(f"{path}: {section}: expected a JSON object, got {node[key]!r}")
    return data


def problem(name_or_path: str) -> str | None:
    """What is wrong with a DeepSpeed config given by name or path, or None if it is usable."""
    path = find(name_or_path)
    if path is None:
        return f"no DeepSpeed config {name_or_path!r}; accepted: {', '.join(available())} or a path to a JSON file"
    try:
        read(path)
    except DeepSpeedFileError as exc:
        return str(exc)
    return None


def check_batch(global_batch_size: int, micro_batch_size: int, grad_accum: int, dp_size: int) -> None:
    """Raise `BatchSizeError` unless global = micro x accumulation x data-parallel size."""
    product = micro_batch_size * grad_accum * dp_size
    if global_batch_size != product:
        raise BatchSizeError(
            f"global batch {global_batch_size} != micro batch {micro_batch_size} x gradient accumulation "
            f"{grad_accum} x data-parallel size {dp_size} = {product}; set train.global_batch_size to "
            f"{product}, or change train.micro_batch_size / train.grad_accum")


def fill(raw: dict[str, Any], *, micro_batch_size: int, grad_accum: int, dp_size: int,
         precision: str, grad_clip: float, global_batch_size: int | None = None,
         steps_per_print: int = 2**31 - 1) -> dict[str, Any]:
    """A copy of `raw` with every "auto" field filled and the batch arithmetic checked.

    Values already fixed in the file must agree with the run config: a file that says
    `"gradient_accumulation_steps": 8` while the run asks for 4 is an error, not a silent winner.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; accepted: {', '.join(PRECISIONS)}")
    if global_batch_size is None:
        global_batch_size = micro_batch_size * grad_accum * dp_size
    check_batch(global_batch_size, micro_batch_size, grad_accum, dp_size)
    cfg = {k: copy.deepcopy(v) for k, v in raw.items() if not k.startswith("_")}
    decided = {
        "train_batch_size": global_batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": float(grad_clip),
        "steps_per_print": steps_per_print,
    }
    for key, value in decided.items():
        current = cfg.get(key, "auto")
        if current != "auto" and current != value:
            raise ValueError(f"ds config field {key} is {current!r} but the run config gives {value!r}; "
                             "write \"auto\" in the file to let the run config decide")
        cfg[key] = value
    for section, enabled in (("bf16", precision == "bf16"), ("fp16", precision == "fp16")):
        sub = cfg.setdefault(section, {})
        current = sub.get("enabled", "auto")
        if current != "auto" and bool(current) != enabled:
            raise ValueError(f"ds config field {section}.enabled is {current!r} but train.precision is "
                             f"{precision!r}; write \"auto\" in the file")
        sub["enabled"] = enabled
    leftover = [path for path in _auto_paths(cfg)]
    if leftover:
        raise ValueError(f"ds config fields still \"auto\" that the run config does not decide: {', '.join(leftover)}")
    return cfg


def _auto_paths(node: Any, prefix: str = ""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _auto_paths(v, f"{prefix}.{k}" if prefix else k)
    elif node == "auto":
        yield prefix


def zero_stage(cfg: dict[str, Any]) -> int:
    """ZeRO stage of a (filled) DeepSpeed config."""
    return int(cfg.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(cfg: dict[str, Any]) -> bool:
    """Whether the optimizer step runs on the CPU (needs DeepSpeedCPUAdam)."""
    device = cfg.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device not in (None, "none")


DS_REDUCE_BUCKET = 500_000_000   # DeepSpeed's default zero_optimization.reduce_bucket_size (elements)


def fit_reduce_bucket(cfg: dict[str, Any], trainable: int) -> dict[str, Any]:
    """`cfg` with ZeRO 1/2's reduce bucket no larger than all trainable parameters together.

    Those stages allocate the bucket anew every optimizer step (two with overlap_comm): at the
    default 5e8 elements that is 2 GB of fp32 for any model, where a 4M-parameter model fills
    16 MB of it (on a CPU, one mapping and unmapping and a page fault per 4 KiB touched each
    step; on a GPU, 2 GB held). A bucket of exactly the trainable count still takes every
    gradient, so the gradients are grouped and reduced as before; larger models are left as
    configured."""
    zero = cfg.get("zero_optimization", {})
    if zero_stage(cfg) not in (1, 2) or trainable <= 0 or trainable >= int(zero.get("reduce_bucket_size",
                                                                                    DS_REDUCE_BUCKET)):
        return cfg
    return {**cfg, "zero_optimization": {**zero, "reduce_bucket_size": int(trainable)}}
