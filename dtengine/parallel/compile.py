"""`torch.compile` for the `Distiller` step, applied where a loop builds it: `apply_compile(distiller, cfg)`.

The step's two parts are compiled apart, because they are different programs:

    teacher pass    `teacher_targets(images, noise)`: inference only, static shapes, the U-Net stops after its
                    last tapped block (the early exit is in the traced code, so it stays). On CUDA it is compiled
                    with mode "reduce-overhead": inductor's kernels replayed as a CUDA graph, which removes the
                    launch overhead of a U-Net's hundreds of small kernels. That is valid here because nothing in
                    it changes shape or reads the host, and the graph's outputs are only read inside their own
                    micro-batch: every call marks a new step (`cudagraph_mark_step_begin`) first, since a replay
                    overwrites the previous outputs. Elsewhere: inductor's default mode (no CUDA graphs on CPU).
    student pass    `student_losses(images, targets)`: student + regressor (+ logit head) + the objective,
                    forward and backward, with `fullgraph=True`: a graph break fails loudly instead of
                    silently splitting the step. The fused loss is a custom op with fake and autograd
                    registrations, so it is traced as one node.

Per-sample noise and flips are drawn before either part (`Distiller.inputs`), so compiled and eager steps see
the same inputs. The optimizer step is not compiled: torch's fused AdamW is one kernel already, and the scheduled
learning rate stays a Python float that no graph guards on. Compiled code is cached between runs under dtengine's
cache folder (`$DTENGINE_CACHE/inductor/<hash of the ops' sources>`, unless TORCHINDUCTOR_CACHE_DIR is set), so
a second run starts faster.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from dtengine.distill import Distiller, TeacherTargets
from dtengine.runtime.errors import ConfigError
from dtengine.runtime.io import cache_dir

MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
BACKENDS = ("inductor", "aot_eager", "eager")


@dataclass
class CompileConfig:
    """torch.compile of the training step."""

    enabled: bool | None = None
    """Compile the step: null (default) = on for CUDA, off for CPU; true / false force it."""
    teacher: bool = True
    """Compile the teacher's feature pass (when enabled)."""
    student: bool | None = None
    """Compile student + regressor + loss with fullgraph=True (when enabled): null = on CUDA only. On a CPU,
    inductor's generated training-mode BatchNorm kernels and its channels-last layout conversions were measured
    slower than ATen's kernels (the demo's student pass 206 ms compiled vs 159 ms eager on 2 cores)."""
    mode: str = "default"
    """Inductor mode of the student pass: default | reduce-overhead | max-autotune | max-autotune-no-cudagraphs."""
    teacher_mode: str = "auto"
    """Inductor mode of the teacher pass: "auto" = reduce-overhead (CUDA graphs) on CUDA, default elsewhere."""
    backend: str = "inductor"
    """torch.compile backend: inductor (generates kernels); aot_eager / eager trace without generating code, to
    find graph breaks or numerical differences quickly."""

    def __post_init__(self) -> None:
        for name, value, allowed in (("mode", self.mode, MODES), ("backend", self.backend, BACKENDS)):
            if value not in allowed:
                raise ConfigError(f"compile.{name} must be one of {allowed}, got {value!r}")
        if self.teacher_mode not in ("auto", *MODES):
            raise ConfigError(f"compile.teacher_mode must be auto or one of {MODES}, got {self.teacher_mode!r}")


def compile_enabled(cfg: CompileConfig, device: torch.device) -> bool:
    return device.type == "cuda" if cfg.enabled is None else cfg.enabled


def use_dtengine_inductor_cache() -> None:
    """Keep inductor's compiled kernels in dtengine's cache folder unless the user chose another folder.

    Inductor writes its default (a per-user folder in /tmp, wiped on reboot) into TORCHINDUCTOR_CACHE_DIR the
    first time it is imported, which diffusers already does, so "unset" means "holds inductor's default" here.
    """
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    if os.environ.get("TORCHINDUCTOR_CACHE_DIR") in (None, default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(cache_dir() / "inductor" / ops_fingerprint())


def ops_fingerprint() -> str:
    """Short hash of the sources of dtengine's custom ops and their kernels.

    Inductor's cache keys name a custom op but do not see its fake or its kernels, so a graph compiled against an
    older version of an op (say, one that returned other shapes) would be replayed after an upgrade. One cache
    folder per version of the ops' sources rules that out.
    """
    digest = hashlib.sha256()
    for package in ("dtengine.ops", "dtkernels"):
        root = Path(importlib.util.find_spec(package).origin).parent
        for path in sorted(root.rglob("*.py")):
            digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def student_compiles(cfg: CompileConfig, device: torch.device) -> bool:
    """Whether `cfg` compiles the student pass on `device` (see `CompileConfig.student`)."""
    return compile_enabled(cfg, device) and (device.type == "cuda" if cfg.student is None else cfg.student)


def apply_compile(distiller: Distiller, cfg: CompileConfig, student: bool = True) -> list[str]:
    """Replace the distiller's teacher and student passes with compiled ones, as `cfg` says, in place.

    Args:
        student: False leaves the student pass to the caller (a DDP job compiles it inside DDP instead).
    Returns:
        The parts compiled ("teacher", "student"); empty when compile is off for this device.
    """
    device = distiller.device
    if not compile_enabled(cfg, device):
        return []
    use_dtengine_inductor_cache()
    compiled = []
    if cfg.teacher:
        teacher_mode = cfg.teacher_mode
        if teacher_mode == "auto":
            teacher_mode = "reduce-overhead" if device.type == "cuda" else "default"
        options = {"mode": teacher_mode} if cfg.backend == "inductor" else {}
        teacher_pass = torch.compile(distiller.teacher_targets, backend=cfg.backend, dynamic=False, **options)
        graphed_modes = ("reduce-overhead", "max-autotune")
        cuda_graphs = cfg.backend == "inductor" and device.type == "cuda" and teacher_mode in graphed_modes

        def compiled_teacher_targets(images: torch.Tensor, noise: torch.Tensor) -> TeacherTargets:
            if cuda_graphs:
                # A replay overwrites the previous outputs: they belong to the micro-batch that is over.
                torch.compiler.cudagraph_mark_step_begin()
            return teacher_pass(images, noise)

        distiller.teacher_targets = compiled_teacher_targets
        compiled.append("teacher")
    if student and student_compiles(cfg, device):
        options = {"mode": cfg.mode} if cfg.backend == "inductor" else {}
        distiller.student_losses = torch.compile(
            distiller.student_losses, backend=cfg.backend, fullgraph=True, dynamic=False, **options
        )
        compiled.append("student")
    return compiled
