"""Environment switches, read once when dtengine is imported (in the style of timm's `layers/config.py`).

    DTENGINE_DISABLE_TRITON=1               no op uses a Triton kernel (a kill switch: explicit requests too)
    DTENGINE_FEATURE_LOSS_BACKEND=<name>    force feature_regression_loss's backend (torch | triton)
    DTENGINE_ATTENTION_BACKEND=<name>       force attention's backend (sdpa | triton | xformers)
    DTENGINE_ATTENTION_AUTOTUNE=1           Triton attention forward: time a small space of tiles per (D, N)
                                            instead of the shipped table (cached on disk; see docs/kernels.md)
    DTENGINE_ATTENTION_TMA=1                Triton attention forward: read q, k, v through TMA descriptors on sm_90+
                                            (unverified on a GPU, hence off)

Reading the environment once keeps it out of hot paths and out of compiled graphs: `torch.compile` sees a module
global it can guard on, never `os.environ`. Change a switch inside a process with `override(...)` (a context
manager) or `set_flags(...)`; setting the variable after import changes nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Flags:
    disable_triton: bool = False
    """Keep every op off its Triton kernel (DTENGINE_DISABLE_TRITON=1)."""
    feature_loss_backend: str = ""
    """Backend forced on `feature_regression_loss` ("" = what the caller asked; DTENGINE_FEATURE_LOSS_BACKEND)."""
    attention_backend: str = ""
    """Backend forced on `attention` ("" = what the caller asked; DTENGINE_ATTENTION_BACKEND)."""
    attention_autotune: bool = False
    """Autotune the Triton attention forward's tiles per (head dim, sequence length) (DTENGINE_ATTENTION_AUTOTUNE=1)."""
    attention_tma: bool = False
    """Load the Triton attention forward's tiles through TMA descriptors where possible (DTENGINE_ATTENTION_TMA=1)."""


ENVIRONMENT = {
    "disable_triton": "DTENGINE_DISABLE_TRITON",
    "feature_loss_backend": "DTENGINE_FEATURE_LOSS_BACKEND",
    "attention_backend": "DTENGINE_ATTENTION_BACKEND",
    "attention_autotune": "DTENGINE_ATTENTION_AUTOTUNE",
    "attention_tma": "DTENGINE_ATTENTION_TMA",
}
"""Flag name -> the environment variable it is read from."""


def from_environment(environ: dict[str, str] | None = None) -> Flags:
    environ = os.environ if environ is None else environ
    return Flags(
        disable_triton=environ.get(ENVIRONMENT["disable_triton"], "") == "1",
        feature_loss_backend=environ.get(ENVIRONMENT["feature_loss_backend"], ""),
        attention_backend=environ.get(ENVIRONMENT["attention_backend"], ""),
        attention_autotune=environ.get(ENVIRONMENT["attention_autotune"], "") == "1",
        attention_tma=environ.get(ENVIRONMENT["attention_tma"], "") == "1",
    )


_current = from_environment()


def flags() -> Flags:
    """The switches in force."""
    return _current


def set_flags(**changes) -> Flags:
    """Change switches for the rest of the process (names as in `Flags`); returns the previous ones."""
    global _current
    previous, _current = _current, dataclasses.replace(_current, **changes)
    return previous


@contextlib.contextmanager
def override(**changes) -> Iterator[Flags]:
    """Change switches inside the block only (e.g. a test), restoring them afterwards."""
    previous = set_flags(**changes)
    try:
        yield _current
    finally:
        set_flags(**dataclasses.asdict(previous))
