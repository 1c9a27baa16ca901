"""The step reads device values on the host only through `HostCopy`, and a non-finite gradient
norm read a step late still stops the run before anything logs, evaluates or saves that step."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from continual_pt.runtime import host_copy
from continual_pt.runtime.host_copy import HostCopy
from continual_pt.training import grad_norm, loop
from continual_pt.training.loop import NonFiniteLoss
from tests.test_loop import FakeEngine, Run, make_cfg


class NormEngine(FakeEngine):
    """Gives its gradient norm as a device tensor, as DeepSpeed's ZeRO optimizers do; NaN after `nan_step`."""

    def __init__(self, nan_step: int = 0):
        super().__init__()
        self.nan_step = nan_step
        self.grad_accum = 2

    def get_global_grad_norm(self) -> torch.Tensor:
        step = self.optimizer_steps // self.grad_accum
        return torch.tensor(math.nan if step == self.nan_step else 0.5, dtype=torch.float64)


def test_a_host_copy_holds_the_value_at_the_time_it_was_posted():
    t = torch.tensor(1.5)
    copy = HostCopy(t)
    t.add_(1.0)
    assert copy.ready() and copy.value() == 1.5
    assert HostCopy(torch.isfinite(torch.tensor(math.inf))).value() is False


def test_the_step_reads_device_values_only_through_host_copies(monkeypatch):
    """No `.item()`, `float()`, `bool()` or `.tolist()` on a tensor in the loop's own code but the log's:
    two host copies per step (the loss's finiteness, the gradient norm), read after later work was queued."""
    readers: list[tuple[str, str]] = []
    for name in ("item", "__float__", "__bool__", "tolist"):
        real = getattr(torch.Tensor, name)

        def spy(self, *args, _real=real, **kwargs):
            code = sys._getframe(1).f_code
            readers.append((code.co_filename, code.co_name))
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, spy)
    posted = []
    real_init = HostCopy.__init__

    def counting_init(self, tensor):
        posted.append(tuple(tensor.shape))
        real_init(self, tensor)

    monkeypatch.setattr(HostCopy, "__init__", counting_init)
    run = Run(make_cfg(6, log_every=100, with_eval_sets=False), engine=NormEngine())
    assert run.train() == loop.EXIT_OK
    own = (loop.__file__, grad_norm.__file__)
    assert [name for file, name in readers if file in own] == ["log_step"]   # the last step's log
    assert len(posted) == 12                                 # 6 steps x (finiteness, norm)
    assert [file for file, _ in readers].count(host_copy.__file__) == 12   # each read once, none left unread
    assert run.steps("save") == [6]


@pytest.mark.parametrize("log_every, save_every, expected_logs, expected_saves, expected_updates", [
    (100, 0, [], [], 7),     # read during step 4, before its update: 3 steps x 2 micro-batches + 1
    (1, 0, [1, 2], [], 6),   # step 3's log reads it first
    (100, 1, [], [1, 2], 6),  # step 3's save reads it first
])
def test_a_nonfinite_gradient_norm_stops_before_its_step_logs_or_saves(log_every, save_every, expected_logs,
                                                                       expected_saves, expected_updates):
    engine = NormEngine(nan_step=3)
    run = Run(make_cfg(6, log_every=log_every, save_every=save_every, with_eval_sets=False), engine=engine)
    with pytest.raises(NonFiniteLoss, match=r"^step 3: gradient norm is nan; the weights are no longer usable"):
        run.train()
    assert run.steps("log") == expected_logs
    assert run.steps("save") == expected_saves
    assert engine.optimizer_steps == expected_updates
    assert all(math.isfinite(r["grad_norm"]) for r in run.logger.records)


def test_a_nonfinite_gradient_norm_of_the_last_step_is_never_saved():
    engine = NormEngine(nan_step=6)
    run = Run(make_cfg(6, log_every=100, with_eval_sets=False), engine=engine)
    with pytest.raises(NonFiniteLoss, match=r"^step 6: gradient norm is nan"):
        run.train()
    assert run.steps("save") == []
