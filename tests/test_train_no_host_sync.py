"""The hot loop never reads a tensor on the host: `.item()`, `bool()`, `float()` and `.tolist()` raise inside it,
except where the loop is meant to read (the metrics row every `log_every` steps, the non-finite flags at those
boundaries, checkpoint saving) and in the
data loader, whose tensors are host tensors by design (DataLoader draws its worker seed with `.item()`)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from dtengine import load_config
from dtengine.data.shard_stream import BatchCursor
from dtengine.runtime.logging import StepWindow
from dtengine.train import distillation

SYNCING = ("item", "__bool__", "__float__", "tolist")


class HostSyncGuard:
    """Patches the syncing Tensor methods to raise while `hot` and not inside an allowed function."""

    def __init__(self, monkeypatch):
        self.hot, self.allowed, self.calls = False, 0, []
        for name in SYNCING:
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._guarded(name, original))

    def _guarded(self, name, original):
        def method(tensor, *args, **kwargs):
            if self.hot and not self.allowed:
                raise AssertionError(f"host sync: Tensor.{name} called in the hot loop")
            return original(tensor, *args, **kwargs)

        return method

    def allow(self, function):
        def wrapper(*args, **kwargs):
            self.allowed += 1
            self.calls.append(function.__name__)
            try:
                return function(*args, **kwargs)
            finally:
                self.allowed -= 1

        return wrapper

    @contextlib.contextmanager
    def hot_section(self):
        self.hot = True
        try:
            yield
        finally:
            self.hot = False


@pytest.mark.parametrize("mode_overrides", [[], ["train.grad_accum=2"]], ids=["feature", "grad_accum"])
def test_five_steps_without_a_host_sync_outside_logging(monkeypatch, tiny_run_overrides, mode_overrides):
    guard = HostSyncGuard(monkeypatch)
    monkeypatch.setattr(distillation, "metrics_row", guard.allow(distillation.metrics_row))
    monkeypatch.setattr(distillation, "save_run", guard.allow(distillation.save_run))
    monkeypatch.setattr(distillation, "check_finite", guard.allow(distillation.check_finite))
    monkeypatch.setattr(StepWindow, "pull", guard.allow(StepWindow.pull))
    monkeypatch.setattr(BatchCursor, "next", guard.allow(BatchCursor.next))
    real_loop = distillation.train_loop

    def guarded_loop(*args, **kwargs):
        with guard.hot_section():
            return real_loop(*args, **kwargs)

    monkeypatch.setattr(distillation, "train_loop", guarded_loop)
    cfg = load_config(None, [*tiny_run_overrides, "train.steps=5", "train.log_every=5", *mode_overrides])
    result = distillation.run_distillation(cfg)
    assert result.steps == 5 and torch.isfinite(torch.tensor(result.final_loss))
    # The guard was live: the loop did read the device, but only in the allowed places, once for logging; the
    # non-finite flags at that boundary and before each of the 3 checkpoints (steps 2, 4, 5).
    assert guard.calls.count("metrics_row") == 1 and "pull" in guard.calls
    assert guard.calls.count("check_finite") == 1 + 3


def test_the_guard_catches_a_sync():
    with pytest.MonkeyPatch.context() as monkeypatch:
        guard = HostSyncGuard(monkeypatch)
        with guard.hot_section(), pytest.raises(AssertionError, match="host sync: Tensor.item"):
            torch.ones(()).item()
