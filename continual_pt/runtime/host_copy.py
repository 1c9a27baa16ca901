"""A device value read on the host without draining the device's queue.

`HostCopy(t)` queues a copy of `t` into pinned host memory and records an event behind it;
`value()` waits for that event only, i.e. for the work queued before the copy, not for the work
queued after it. The step posts the loss's finiteness before it queues the backward pass and reads
it after, so the GPU runs the backward while the host checks the flag; the gradient norm of step n
is read during step n + 1, when it is long done. On the CPU there is no queue: the copy is the value.
"""

from __future__ import annotations

import torch


class HostCopy:
    """One tensor's value, copied to the host behind the work queued so far."""

    def __init__(self, tensor: torch.Tensor):
        tensor = tensor.detach()
        self._event = None
        if tensor.device.type == "cuda":
            self._host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            self._host.copy_(tensor, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = tensor.to("cpu", copy=True)

    def ready(self) -> bool:
        """Whether value() would return without waiting."""
        return self._event is None or self._event.query()

    def value(self) -> float | bool | int:
        """The scalar's value (waits for the copy, and only for the work queued before it)."""
        if self._event is not None:
            self._event.synchronize()
        return self._host.item()
