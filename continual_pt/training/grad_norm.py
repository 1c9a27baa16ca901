"""The gradient norm of the last applied optimizer step, measured and read without a device sync.

Where the norm comes from depends on the engine: DeepSpeed's ZeRO 1-3 and mixed-precision
optimizers report it (`get_global_grad_norm()`); a plain fp32 ZeRO 0 engine that clips computes it
and drops it (`KeptClipNorm` keeps it); one that does not clip never computes it (it is computed
here, from the gradients, before the step zeroes them). Whichever it is, the value stays on the
device until it is asked for: a step later, when it is long done, or at the step boundary before
a log, eval or save, so that a non-finite norm stops the run before it reaches a log line or a
checkpoint.
"""

from __future__ import annotations

import math

import torch
from deepspeed import DeepSpeedEngine

from continual_pt.runtime.host_copy import HostCopy
from continual_pt.runtime.lean_engine import KeptClipNorm
from continual_pt.training.state import NonFiniteLoss


class GradNorm:
    """Applies each optimizer step on the engine and answers one question: the norm of the last one."""

    def __init__(self, engine: DeepSpeedEngine, zero_stage: int, precision: str):
        self._engine = engine
        plain_fp32 = zero_stage == 0 and precision == "fp32"
        clips = plain_fp32 and engine.gradient_clipping() > 0
        self._kept = KeptClipNorm(engine) if clips else None
        self._computed_here = plain_fp32 and not clips
        self._pending: tuple[int, HostCopy | float | None] | None = None   # (step, its norm, unread)
        self._value: float | None = None

    def update(self, step: int) -> None:
        """The engine's optimizer step that makes step `step`, its gradient norm posted for reading later.

        Call it instead of `engine.step()` after the step's last backward pass. The previous step's
        norm is read first: its device work finished while this step's backward ran."""
        self.settle()
        own = gradient_norm(self._engine.module) if self._computed_here else None
        self._engine.step()
        norm = self._engine.get_global_grad_norm()
        if norm is None:
            norm = self._kept.take() if self._kept is not None else own
        self._pending = (step, HostCopy(norm) if torch.is_tensor(norm) else norm)

    def settle(self) -> None:
        """Read the last step's norm if it is still unread; a non-finite one raises NonFiniteLoss.

        The loop calls it at a step boundary before any log, eval or save: never a log line or a
        checkpoint of weights that a non-finite gradient reached."""
        if self._pending is None:
            return
        step, norm = self._pending
        self._pending = None
        value = norm.value() if isinstance(norm, HostCopy) else norm
        if value is not None and not math.isfinite(float(value)):
            raise NonFiniteLoss(f"step {step}: gradient norm is {float(value)}; the weights are no longer "
                                "usable, stopping without saving (resume from the last checkpoint)")
        self._value = None if value is None else float(value)

    def of_last_step(self) -> float | None:
        """The 2-norm of the gradients (before clipping) that the last applied step used; None before any."""
        self.settle()
        return self._value


def gradient_norm(module: torch.nn.Module) -> torch.Tensor | float:
    """The 2-norm over all gradients of `module` (before clipping), on their device.

    torch's foreach norm: one pass over the gradients in their own dtype, no float64 copies."""
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else 0.0
