"""`Distiller`: the distillation step. Images in, a dict of named loss tensors out.

    distiller = Distiller.from_config(dtengine.load_config("configs/demo.yaml"))
    losses = distiller(images, step=step)     # {"loss", "mse", "at"} (+ "ld" in label / mixed mode)
    losses["loss"].backward()

`forward` runs three parts, which compile and distributed wrappers (and the step benchmark) use one by one:

    images, noise = distiller.inputs(images, keys)        # eager: to float on the device, flips, teacher noise
    targets = distiller.teacher_targets(images, noise)     # frozen teacher (+ interpreter) under no_grad
    losses = distiller.student_losses(targets.images, targets)   # student + regressor (+ head) + objective

Randomness is keyed by sample (`runtime.device.SampleKeys`): a sample's flip and noise depend only on (seed,
step, its global index in the step), so a step gives the same result on 1 or N ranks, in any split into
micro-batches, compiled or eager. Nothing in the step reads a tensor value on the host.

The teacher and the interpreter are frozen and held outside the module tree: they are not in `state_dict()`,
`parameters()` or `train()`, so checkpoints, optimizers, DDP and FSDP cover only the student, its regressor and
its logit head. `.to()` and friends still move them with the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from dtengine.data.augment import flip_where
from dtengine.losses.objective import DistillConfig, LossConfig, distillation_terms, term_names
from dtengine.runtime.device import (
    SampleKeys,
    autocast,
    keyed_normal,
    keyed_uniform,
    resolve_device,
    resolve_precision,
    seeded,
    use_channels_last,
)
from dtengine.students.student import DistillationStudent, StudentConfig
from dtengine.teachers.build import build_teacher
from dtengine.teachers.interface import Teacher
from dtengine.teachers.interpreter import FeatureInterpreter, load_interpreter

FLIP_PROBABILITY = 0.5


class TeacherTargets(NamedTuple):
    """What the student learns from, for one batch."""

    images: Tensor  # (B, 3, H, W) in [0, 1]: what the student sees (the teacher's own input, for diffusion)
    features: list[Tensor]  # one (B, C_l, H_l, W_l) teacher map per level, not whitened
    soft_labels: Tensor | None  # (B, K, h, w) interpreter logits in label / mixed mode, else None


class Distiller(nn.Module):
    """The distillation step: a frozen teacher, a student backbone + regressor (+ logit head), and the objective.

    Args:
        teacher: a frozen teacher (`dtengine.teachers.Teacher`: `levels` and `teacher(images, noise)`).
        student: a timm model name, a timm `features_only` backbone, or a ready `DistillationStudent`.
        loss: feature-loss settings (`loss.*` of the run config).
        distill: mode, interpreter folder, label weight, temperature (`distill.*`).
        interpreter: a loaded `FeatureInterpreter` for label / mixed mode (default: loaded from
            `distill.interpreter`).
        student_cfg: regressor width and pool scales (`student.*`); its `model` is replaced by a name in `student`.
        precision: the student's autocast: "auto" (bf16 on CUDA that supports it), "fp32" or "bf16".
        hflip: random horizontal flips (the paper's only augmentation).
        seed: keys the per-sample randomness and seeds the student's initialisation.
    """

    def __init__(
        self,
        teacher: Teacher,
        student: str | nn.Module = "resnet18",
        *,
        loss: LossConfig | None = None,
        distill: DistillConfig | None = None,
        interpreter: FeatureInterpreter | None = None,
        student_cfg: StudentConfig | None = None,
        precision: str = "auto",
        hflip: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        self.loss_cfg = loss or LossConfig()
        self.distill_cfg = distill or DistillConfig()
        self.precision, self.hflip, self.seed = precision, hflip, seed
        self.term_names = term_names(self.distill_cfg.mode)
        mode = self.distill_cfg.mode
        if mode != "feature" and interpreter is None:
            interpreter = load_interpreter(self.distill_cfg.interpreter, teacher.levels)
        # Frozen parts bypass nn.Module registration: no state_dict, parameters or train() reach them.
        object.__setattr__(self, "teacher", teacher)
        object.__setattr__(self, "interpreter", interpreter if mode != "feature" else None)
        num_classes = self.interpreter.num_classes if self.interpreter is not None else 0
        self.student = self._build_student(student, student_cfg or StudentConfig(), num_classes, mode != "label")
        self.wrap_student(self.student)
        self._calls = 0

    def _build_student(self, student, cfg: StudentConfig, num_classes: int, predict_features: bool):
        if isinstance(student, DistillationStudent):
            return student
        if isinstance(student, str):
            cfg = dataclasses.replace(cfg, model=student)
        backbone = student if isinstance(student, nn.Module) else None
        with seeded(self.seed):
            return DistillationStudent(cfg, self.teacher.levels, num_classes, predict_features, backbone=backbone)

    @classmethod
    def from_config(cls, cfg: Any, device: torch.device | str | None = None) -> Distiller:
        """The step a run config (`dtengine.load_config(...)`, a `RunConfig`) describes: its teacher, distill,
        student, loss and train sections, on `device` (default `train.device`), in channels_last on CUDA."""
        device = resolve_device(cfg.train.device, "train.device") if device is None else torch.device(device)
        teacher = build_teacher(cfg.teacher, device)
        interpreter = None
        if cfg.distill.mode != "feature":
            interpreter = load_interpreter(cfg.distill.interpreter, teacher.levels, device)
        distiller = cls(
            teacher,
            cfg.student.model,
            loss=cfg.loss,
            distill=cfg.distill,
            interpreter=interpreter,
            student_cfg=cfg.student,
            precision=cfg.train.precision,
            hflip=cfg.train.hflip,
            seed=cfg.train.seed,
        )
        return distiller.place(device)

    def place(self, device: torch.device | str) -> Distiller:
        """Move the step (student, teacher, interpreter) to `device`, in channels_last on CUDA; returns self."""
        device = torch.device(device)
        self.to(device)
        return self.to(memory_format=torch.channels_last) if use_channels_last(device) else self

    def wrap_student(self, wrapped) -> None:
        """Run the student through `wrapped` (e.g. DDP(student), a compiled student) in `student_losses`. It is
        not registered: state_dict(), parameters() and checkpoints keep the plain student's names."""
        object.__setattr__(self, "_student_call", wrapped)

    @contextlib.contextmanager
    def plain_student(self) -> Iterator[None]:
        """Inside the block, `student_losses` calls the plain student (no wrapper: no collectives, e.g. for a
        validation on some ranks only)."""
        wrapped = self._student_call
        self.wrap_student(self.student)
        try:
            yield
        finally:
            self.wrap_student(wrapped)

    def _apply(self, fn, recurse: bool = True):
        # .to(), .cuda(), .half() ... move the frozen parts too, although they are not registered children.
        super()._apply(fn, recurse)
        for frozen in (self.teacher, self.interpreter):
            if frozen is not None:
                frozen._apply(fn, recurse)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def inputs(self, images: Tensor, keys: SampleKeys) -> tuple[Tensor, Tensor]:
        """The float batch teacher and student see, and the teacher's noise; eager, keyed by sample.

        Args:
            images: (B, 3, H, W), uint8 in [0, 255] or float in [0, 1], on any device.
            keys: the batch's place in the run.
        Returns:
            images (B, 3, H, W) fp32 in [0, 1] on the student's device (channels_last on CUDA), flipped where
            drawn; noise (B, 3, H, W) fp32 standard normal.
        """
        device = self.device
        layout = torch.channels_last if use_channels_last(device) else torch.contiguous_format
        was_uint8 = images.dtype == torch.uint8
        # One pass converts to fp32 and to the student's layout (a loader may hand NHWC memory to a CPU step).
        images = images.to(device, non_blocking=True).to(torch.float32, memory_format=layout)
        if was_uint8:
            images = images.div_(255)  # a fresh tensor: the conversion copied
        generators = keys.generators(images.shape[0])
        # Drawn whether or not flips are on, so a sample's noise does not depend on the flip setting.
        flips = keyed_uniform(generators) < FLIP_PROBABILITY  # (B,)
        if self.hflip:
            if device.type == "cuda":
                flips = flips.pin_memory()
            (images,) = flip_where(flips.to(device, non_blocking=True), images)
        noise = keyed_normal(generators, images.shape[1:], device)  # (B, 3, H, W)
        return images, noise

    @torch.no_grad()
    def teacher_targets(self, images: Tensor, noise: Tensor) -> TeacherTargets:
        """The frozen teacher's features for `images` (fp32 in [0, 1]) noised with `noise`, and in label / mixed
        mode the interpreter's soft labels from the same pass."""
        out = self.teacher(images, noise)
        soft_labels = self.interpreter(out.features) if self.interpreter is not None else None
        return TeacherTargets(out.images, out.features, soft_labels)

    def student_losses(self, images: Tensor, targets: TeacherTargets) -> dict[str, Tensor]:
        """The student's predictions for `images` scored against `targets`: `term_names` -> 0-dim fp32 tensors."""
        dtype = resolve_precision(self.precision, images.device)
        with autocast(images.device, dtype):
            predicted = self._student_call(images, [f.shape[-2:] for f in targets.features])
        return distillation_terms(
            predicted.features, targets.features, predicted.logits, targets.soft_labels, self.loss_cfg, self.distill_cfg
        )

    def forward(self, images: Tensor, step: int | None = None, first_index: int = 0) -> dict[str, Tensor]:
        """One step's losses for a batch.

        Args:
            images: (B, 3, H, W), uint8 or float in [0, 1].
            step: the optimizer step, which keys the randomness with `first_index`; None counts calls instead.
            first_index: global index of this batch's first sample within the step (micro-batch x batch size,
                plus rank x per-rank batch under data parallelism).
        Returns:
            {"loss": what to minimise, "mse", "at" (feature / mixed), "ld" (label / mixed)}, 0-dim fp32 tensors;
            only "loss" carries gradient.
        """
        if step is None:
            step, self._calls = self._calls, self._calls + 1
        images, noise = self.inputs(images, SampleKeys(self.seed, step, first_index))
        targets = self.teacher_targets(images, noise)
        # Read by the loop's non-finite guard at its boundaries (a bf16 teacher can overflow), never here.
        self.teacher_finite = torch.stack([feature.isfinite().all() for feature in targets.features]).all()
        return self.student_losses(targets.images, targets)
