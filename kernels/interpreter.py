"""The one check of where dtkernels' kernels can run in this process.

`@triton.jit` decides when a kernel is decorated whether it runs on the GPU or in Triton's numpy interpreter
(TRITON_INTERPRET=1 set before triton is imported): the mode cannot change inside a running process, so it is
read once here. Tests run the interpreter in a subprocess.
"""

from __future__ import annotations

import torch
from triton import knobs

INTERPRETED = bool(knobs.runtime.interpret)
"""True when the kernels run in Triton's interpreter: they then take fp32 CPU tensors only."""

CAPTURING = False
"""True inside `aot.capture_launches()`: launches are recorded for ahead-of-time compilation, not run."""


def can_run_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device` in this process: CUDA, the CPU when interpreted, or any
    device while launches are only captured."""
    return device.type == "cuda" or (INTERPRETED and device.type == "cpu") or CAPTURING
