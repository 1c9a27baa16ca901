"""Work a DeepSpeed engine does that its setting makes useless, left out; what it computes and
drops, kept.

Both change nothing in what the engine computes: tests/test_engine_alone.py trains the same
weights bitwise with and without them.
"""

from __future__ import annotations

import torch
from deepspeed import DeepSpeedEngine
from deepspeed.runtime.utils import clip_grad_norm_


def skip_lone_allreduce(engine: DeepSpeedEngine, zero_stage: int) -> bool:
    """Turn off a ZeRO 0 engine's gradient all-reduce when it has no data-parallel peer.

    Alone, it would still pack every gradient into one buffer, all-reduce the buffer with itself
    and copy it back after each step's last backward: the same values, ~2% of a small model's
    step. ZeRO 1-3 move gradients into their own partitions there: left as they are."""
    if engine.dp_world_size != 1 or zero_stage != 0:
        return False
    engine.enable_backward_allreduce = False
    return True


class KeptClipNorm:
    """The gradient norm a plain fp32 engine (ZeRO 0, no loss scaling) computes to clip, kept.

    Such an engine clips with `deepspeed.runtime.utils.clip_grad_norm_` in its
    `clip_fp32_gradients` and drops the norm it returns (`get_global_grad_norm()` is None): the
    method is replaced, on this engine only, by the same call that keeps the result. Computing the
    norm again for the log would cost a second pass over every gradient each step."""

    def __init__(self, engine: DeepSpeedEngine):
        self._engine = engine
        self._value: torch.Tensor | None = None
        engine.clip_fp32_gradients = self._clip

    def _clip(self) -> None:
        engine = self._engine
        self._value = clip_grad_norm_(parameters=engine.module.parameters(), max_norm=engine.gradient_clipping(),
                                      mpu=engine.mpu)

    def take(self) -> torch.Tensor | None:
        """The norm of the last clip (before clipping), once; None if none happened since."""
        value, self._value = self._value, None
        return value
