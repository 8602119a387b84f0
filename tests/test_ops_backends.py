"""One backend rule for every op (`dtengine.ops.backends`), checked on both ops side by side, on CPU."""

from __future__ import annotations

import pytest
import torch

from dtengine.ops import attention, feature_regression_loss
from dtengine.ops.attention import ATTENTION_BACKENDS
from dtengine.ops.backends import resolve_backend
from dtengine.ops.feature_loss import FEATURE_LOSS_BACKENDS
from dtengine.runtime import flags
from dtengine.runtime.errors import BackendError, DTEngineError

OPS = [
    pytest.param(FEATURE_LOSS_BACKENDS, "torch", "feature_loss_backend", id="feature_loss"),
    pytest.param(ATTENTION_BACKENDS, "sdpa", "attention_backend", id="attention"),
]


def cpu_call(backends):
    x = torch.randn(1, 2, 8, 16)
    return (x, x) if backends is FEATURE_LOSS_BACKENDS else (x,)


@pytest.mark.parametrize(("backends", "reference", "flag"), OPS)
def test_auto_and_explicit_on_cpu(backends, reference, flag):
    call = cpu_call(backends)
    assert resolve_backend(backends, "auto", "", *call) == reference
    assert resolve_backend(backends, reference, "", *call) == reference
    with pytest.raises(BackendError, match="'triton' cannot run this call: it needs CUDA tensors") as caught:
        resolve_backend(backends, "triton", "", *call)
    assert "\n" not in str(caught.value) and f"'{reference}'" in str(caught.value)
    with pytest.raises(BackendError, match="must be one of"):
        resolve_backend(backends, "flash3", "", *call)


@pytest.mark.parametrize(("backends", "reference", "flag"), OPS)
def test_disable_triton_is_a_kill_switch_for_both_ops(backends, reference, flag):
    call = cpu_call(backends)
    with flags.override(disable_triton=True):
        assert resolve_backend(backends, "triton", "", *call) == reference
        assert resolve_backend(backends, "auto", "triton", *call) == reference  # beats a forced backend too


@pytest.mark.parametrize(("backends", "reference", "flag"), OPS)
def test_the_environment_switch_forces_a_backend(backends, reference, flag):
    call = cpu_call(backends)
    with flags.override(**{flag: "triton"}), pytest.raises(BackendError, match="'triton'"):
        resolve_backend(backends, reference, getattr(flags.flags(), flag), *call)
    with flags.override(**{flag: "nonsense"}), pytest.raises(BackendError, match="environment switch"):
        resolve_backend(backends, "auto", getattr(flags.flags(), flag), *call)


def test_public_ops_read_the_switches():
    q = torch.randn(1, 1, 8, 16)
    with flags.override(attention_backend="triton"), pytest.raises(BackendError):
        attention(q, q, q, backend="sdpa")
    with flags.override(attention_backend="sdpa"):
        assert attention(q, q, q, backend="triton").shape == q.shape
    with flags.override(feature_loss_backend="triton"), pytest.raises(BackendError):
        feature_regression_loss(q, q, backend="torch")
    with flags.override(disable_triton=True):
        assert feature_regression_loss(q, q, backend="triton").loss.ndim == 0


def test_backend_errors_are_one_line_user_errors():
    assert issubclass(BackendError, DTEngineError)


def test_switches_are_read_once_from_the_environment():
    read = flags.from_environment({
        "DTENGINE_DISABLE_TRITON": "1", "DTENGINE_ATTENTION_BACKEND": "sdpa", "DTENGINE_FEATURE_LOSS_BACKEND": "torch",
        "DTENGINE_ATTENTION_AUTOTUNE": "1", "DTENGINE_ATTENTION_TMA": "1",
    })  # fmt: skip
    assert read == flags.Flags(
        disable_triton=True, feature_loss_backend="torch", attention_backend="sdpa", attention_autotune=True,
        attention_tma=True,
    )  # fmt: skip
    before = flags.flags()
    with flags.override(disable_triton=not before.disable_triton) as inside:
        assert flags.flags() is inside and inside.disable_triton != before.disable_triton
    assert flags.flags() == before


def test_auto_passes_over_a_backend_with_a_known_fault_but_an_explicit_request_runs_it():
    from dtengine.ops.attention import _triton_passed_over
    from dtengine.ops.backends import OpBackends

    def odd_width(x):
        return "odd width" if x.shape[-1] % 2 else None

    backends = OpBackends(
        op="toy", unavailable={"triton": lambda x: None, "torch": lambda x: None}, auto_order=("triton", "torch"),
        reference="torch", passed_over_by_auto={"triton": odd_width},
    )  # fmt: skip
    assert resolve_backend(backends, "auto", "", torch.zeros(2, 4)) == "triton"
    assert resolve_backend(backends, "auto", "", torch.zeros(2, 5)) == "torch"
    assert resolve_backend(backends, "triton", "", torch.zeros(2, 5)) == "triton"
    # Attention: the head dims whose Triton forward faulted on an H100 (65-96), and their neighbours.
    faulted = {d for d in (32, 40, 64, 65, 72, 80, 96, 97, 128, 160) if _triton_passed_over(torch.zeros(1, 1, 4, d))}
    assert faulted == {65, 72, 80, 96}
    assert "faulted on an H100" in _triton_passed_over(torch.zeros(1, 1, 4, 72))
