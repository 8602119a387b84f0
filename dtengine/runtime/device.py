"""Device, precision and random numbers: resolved once from config, used by teacher and student alike.

Random numbers come in two kinds. Model initialisation and the other one-off draws use `seeded(seed)`, which
forks torch's RNG so nothing outside is disturbed. Per-sample draws in the training step (a sample's flip, its
diffusion noise) are keyed by (seed, step, global sample index) with `SampleKeys`: a sample gets the same
numbers whichever rank, micro-batch or process draws it, and the draws are made eagerly, outside any compiled
region, so compiled and eager steps see identical inputs.
"""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

from dtengine.runtime.errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16")
"""Precision settings every component accepts: "auto" = bf16 on a CUDA device that supports it, else fp32."""


def resolve_device(name: str, key: str = "device") -> torch.device:
    """ "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N" -> a torch.device.

    Raises:
        ConfigError: one line naming the config `key` the value came from.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{key} '{name}' requested but CUDA is not available; use {key}=cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"{key} '{name}' is not a torch device (use auto, cpu or cuda[:N])") from err


@torch.compiler.assume_constant_result
def _cuda_supports_bf16() -> bool:
    # Called inside compiled passes (the student's step asks per call): dynamo cannot trace a torch query that
    # returns a bool, and the hardware does not change while a graph lives, so it is a constant to the compiler.
    return torch.cuda.is_bf16_supported()


def resolve_precision(precision: str, device: torch.device | str) -> torch.dtype:
    """The compute dtype for `precision` on `device`: bf16 or fp32 ("auto": bf16 only on CUDA that supports it)."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto" and torch.device(device).type == "cuda" and _cuda_supports_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Autocast to `dtype` on `device`, or nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def use_channels_last(device: torch.device) -> bool:
    # Tensor cores want NHWC; on CPU it buys nothing for these models.
    return device.type == "cuda"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): only around timings, never in the hot loop."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gb(device: torch.device) -> dict[str, float]:
    """{"peak_mem_gb": the CUDA allocator's peak} on CUDA, {"peak_rss_gb": the process's peak RSS} elsewhere.

    Both are host-side counters: reading them does not wait for the device.
    """
    if device.type == "cuda":
        return {"peak_mem_gb": torch.cuda.max_memory_allocated(device) / 2**30}
    import resource

    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # ru_maxrss is in KiB


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (for what a run builds before training)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Inside the block, only deterministic algorithms when `enabled` (`torch.use_deterministic_algorithms`, cuDNN
    without autotuning, cuBLAS with a fixed workspace): the same numbers on every run of a GPU too, slower. An op
    with no deterministic version warns instead of failing. The previous settings come back afterwards."""
    if not enabled:
        yield
        return
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.benchmark, os.environ.get("CUBLAS_WORKSPACE_CONFIG"))  # fmt: skip
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS is deterministic only with this set
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.benchmark = previous[2]
        if previous[3] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the block with torch's CPU generator seeded to `seed`, restoring its state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


class SampleKeys(NamedTuple):
    """Where a batch sits in a run; each sample's random numbers are keyed by (seed, step, global index).

    The global index counts the samples of one optimizer step over all micro-batches and ranks, so the same
    sample gets the same numbers on 1 or N ranks and with any split into micro-batches.
    """

    seed: int
    step: int
    first_index: int = 0
    """Global index of the batch's first sample within the step."""

    def generators(self, count: int) -> list[np.random.Generator]:
        """One independent NumPy generator per sample of a batch of `count`."""
        return [np.random.default_rng([self.seed, self.step, self.first_index + i]) for i in range(count)]


def keyed_uniform(generators: Sequence[np.random.Generator]) -> Tensor:
    """One U[0, 1) draw per sample. Returns (B,) fp64 on the CPU."""
    return torch.tensor([g.random() for g in generators], dtype=torch.float64)


def keyed_normal(
    generators: Sequence[np.random.Generator], shape: Sequence[int], device: torch.device, dtype=torch.float32
) -> Tensor:
    """One standard-normal tensor of `shape` per sample, drawn on `device` from a torch generator seeded per sample.

    Returns: (B, *shape). Sample i's values depend only on its key (and the device type's generator).
    """
    out = torch.empty((len(generators), *shape), device=device, dtype=dtype)
    generator = torch.Generator(device=device)
    for i, sample_rng in enumerate(generators):
        generator.manual_seed(int(sample_rng.integers(2**63)))
        out[i].normal_(generator=generator)
    return out
