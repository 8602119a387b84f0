"""One way to choose an op's implementation ("backend"), shared by every op in `dtengine.ops`.

    forced   = the op's environment switch, if set (runtime.flags), else what the caller asked for
    "auto"   = the first backend of the op's preference order that can run the call and is not passed over
               for it (a known fault: an explicit request still runs it)
    Triton   = never used while DTENGINE_DISABLE_TRITON=1: a request for it, explicit or forced, falls back to
               the op's reference backend (a kill switch that always works)
    explicit = used when it can run the call; otherwise a one-line `BackendError` saying why and what to use

An op describes itself with an `OpBackends`: its backend names, its preference order for "auto", its reference
backend, and one function per backend that returns why that backend cannot take a call (None when it can).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from dtengine.runtime.errors import BackendError
from dtengine.runtime.flags import flags

TRITON = "triton"


@dataclass(frozen=True)
class OpBackends:
    op: str
    """The op's public name, for messages."""
    unavailable: Mapping[str, Callable[..., str | None]]
    """Backend name -> f(*call_tensors) returning why it cannot run the call, or None."""
    auto_order: Sequence[str]
    """Backends "auto" tries, best first; the last must always be able to run."""
    reference: str
    """The pure-PyTorch backend that Triton falls back to when it is switched off."""
    passed_over_by_auto: Mapping[str, Callable[..., str | None]] = field(default_factory=dict)
    """Backend name -> f(*call_tensors) returning why "auto" does not pick that backend for a call it can run (a
    fault seen on some GPU), or None."""

    @property
    def names(self) -> tuple[str, ...]:
        return ("auto", *self.unavailable)


def resolve_backend(backends: OpBackends, requested: str, forced: str, *call) -> str:
    """The backend a call with tensors `call` runs on; see the module docstring for the rules.

    Raises:
        BackendError: an unknown name, or an explicit backend that cannot run this call.
    """
    name = forced or requested
    if name not in backends.names:
        source = "the environment switch" if forced else "backend"
        raise BackendError(f"{backends.op} {source} must be one of {backends.names}, got {name!r}")
    triton_off = flags().disable_triton
    if name == "auto":
        for candidate in backends.auto_order:
            if (candidate == TRITON and triton_off) or backends.unavailable[candidate](*call) is not None:
                continue
            passed_over = backends.passed_over_by_auto.get(candidate)
            if passed_over is None or passed_over(*call) is None:
                return candidate
        return backends.reference
    if name == TRITON and triton_off:
        return backends.reference
    reason = backends.unavailable[name](*call)
    if reason is not None:
        raise BackendError(
            f"{backends.op} backend '{name}' cannot run this call: {reason}; use backend='auto' or "
            f"'{backends.reference}'"
        )
    return name
