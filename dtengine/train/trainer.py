"""The distillation loop: loader -> teacher features (+ interpreter soft labels) -> student -> loss -> step.

`run_distillation(cfg)` builds every component from its config, trains for `train.steps` optimizer steps and
leaves in the run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/, loss_curve.png and
backbone.safetensors. Resuming restores model, optimizer, schedule, RNG states and the data position, so a
resumed run takes exactly the steps an uninterrupted one would have taken.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dtengine.data.augment import random_hflip
from dtengine.data.loader import ShardStream, resolve_shards
from dtengine.errors import CheckpointError, ConfigError
from dtengine.export import export_backbone
from dtengine.losses.label_distillation import distillation_terms, term_names
from dtengine.students.student import DistillationStudent
from dtengine.teachers.diffusion import build_diffusion_teacher
from dtengine.teachers.interpreter import load_interpreter
from dtengine.train import checkpoint as ckpt
from dtengine.train.device import autocast, autocast_dtype, resolve_device, use_channels_last
from dtengine.train.metrics import MetricsLogger, plot_loss_curve
from dtengine.train.optim import build_optimizer, build_scheduler
from dtengine.train.run_dir import prepare_run_dir

if TYPE_CHECKING:
    from dtengine.config import RunConfig

PRECISIONS = ("auto", "fp32", "bf16")


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 300
    """Optimizer steps to train for (the schedule's length)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the effective batch is data.batch_size * grad_accum."""
    seed: int = 0
    """Seeds parameters, noise, augmentation and data order."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"."""
    precision: str = "auto"
    """Student autocast: "auto" = bf16 on CUDA with bf16 support, fp32 elsewhere; or "fp32" / "bf16"."""
    hflip: bool = True
    """Random horizontal flips, the paper's only augmentation."""
    log_every: int = 10
    """Write a metrics row (loss terms, lr, img/s, data wait) every this many steps."""
    tensorboard: bool = True
    progress: bool = True
    """Show a progress bar with loss, img/s and ETA."""

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.grad_accum <= 0 or self.log_every <= 0:
            raise ConfigError("train.steps, train.grad_accum and train.log_every must be positive integers")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    first_loss: float | None
    final_loss: float | None
    backbone_path: Path
    loss_curve: Path | None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def architecture_of(cfg: RunConfig, teacher_levels, num_classes: int = 0) -> dict[str, Any]:
    """What must match for a checkpoint's weights to fit: compared on resume.

    Label / mixed runs add their mode and logit-head classes; feature runs keep the keys they always had, so
    their older checkpoints still resume.
    """
    architecture = {
        "student": cfg.student.model,
        "regressor_channels": cfg.student.regressor_channels,
        "pool_scales": list(cfg.student.pool_scales),
        "teacher_levels": [[lvl.block, lvl.stride, lvl.channels] for lvl in teacher_levels],
    }
    if cfg.distill.mode != "feature":
        architecture.update(distill_mode=cfg.distill.mode, logit_head_classes=num_classes)
    return architecture


def new_window(names: tuple[str, ...]) -> dict[str, float]:
    """Running sums of the logged quantities between two metrics rows."""
    return {**dict.fromkeys(names, 0.0), "images": 0, "wait": 0.0, "steps": 0, "skipped": 0}


class BatchCursor:
    """Endless batches from a `ShardStream`, tracking (epoch, batches consumed in it) so a resume can seek."""

    def __init__(self, stream: ShardStream, epoch: int = 0, batch_in_epoch: int = 0):
        self.stream, self.epoch, self.batch_in_epoch = stream, epoch, batch_in_epoch
        self._batches: Iterator[dict] = stream.epoch(epoch, skip_batches=batch_in_epoch)

    def next(self) -> dict:
        for _ in range(2):
            try:
                batch = next(self._batches)
                self.batch_in_epoch += 1
                return batch
            except StopIteration:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._batches = self.stream.epoch(self.epoch)
        raise ConfigError("the training shards yield no full batch; lower data.batch_size or add data")


def run_distillation(cfg: RunConfig, resume: str | bool | None = None) -> RunResult:
    """Train the student on the teacher's features as configured; see the module docstring for outputs.

    Args:
        cfg: the resolved run configuration.
        resume: None/False for a fresh run; True to continue from the newest checkpoint in `cfg.out_dir`;
            a path (run dir or step_*.pt) to continue from that checkpoint, writing to `cfg.out_dir`.
    """
    from dtengine.config import config_to_dict, config_to_yaml

    run_dir = prepare_run_dir(cfg.out_dir, resuming=bool(resume))
    resolve_shards(cfg.data.shards, cfg.data.builtin_root, cfg.data.image_size)  # fail fast on a bad pattern
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    teacher = build_diffusion_teacher(cfg.teacher, device)
    mode = cfg.distill.mode
    # Frozen and in eval mode (no dropout); it reads the features of the teacher pass the student learns from.
    interpreter = load_interpreter(cfg.distill.interpreter, teacher.levels, device) if mode != "feature" else None
    num_classes = interpreter.num_classes if interpreter is not None else 0
    student = DistillationStudent(cfg.student, teacher.levels, num_classes, predict_features=mode != "label")
    student = student.to(device)
    if use_channels_last(device):
        student = student.to(memory_format=torch.channels_last)
        teacher = teacher.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(student, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    architecture = architecture_of(cfg, teacher.levels, num_classes)
    names = term_names(mode)

    step, epoch, batch_in_epoch = 0, 0, 0
    if resume:
        state = ckpt.load_checkpoint(run_dir if resume is True else Path(resume))
        if state.get("architecture") != architecture:
            raise CheckpointError(
                f"checkpoint was written for {state.get('architecture')}, but this config builds {architecture}; "
                "resume with the run's own config.yaml or start a new out_dir"
            )
        student.load_state_dict(state["student"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        ckpt.restore_rng_state(state["rng"])
    (run_dir / "config.yaml").write_text(config_to_yaml(cfg))

    cursor = BatchCursor(ShardStream(cfg.data, seed=cfg.train.seed), epoch, batch_in_epoch)
    metrics = MetricsLogger(run_dir, tensorboard=cfg.train.tensorboard)
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    channels_last = use_channels_last(device)

    def save(at_step: int) -> Path:
        state = {
            "step": at_step,
            "epoch": cursor.epoch,
            "batch_in_epoch": cursor.batch_in_epoch,
            "student": student.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": ckpt.capture_rng_state(),
            "architecture": architecture,
            "config": config_to_dict(cfg),
        }
        return ckpt.save_checkpoint(run_dir / "checkpoints", at_step, state, keep=cfg.checkpoint.keep)

    student.train()
    bar = tqdm(total=cfg.train.steps, initial=step, disable=not cfg.train.progress, unit="step", dynamic_ncols=True)
    first_loss = final_loss = None
    window = new_window(names)
    window_start = time.perf_counter()
    last_saved = step
    try:
        while step < cfg.train.steps:
            for _ in range(cfg.train.grad_accum):
                wait_start = time.perf_counter()
                batch = cursor.next()
                window["wait"] += time.perf_counter() - wait_start
                window["skipped"] += batch.get("skipped_corrupt", 0)
                images = batch["image"].to(device, non_blocking=True).float().div_(255)  # (B, 3, H, W)
                if channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                if cfg.train.hflip:
                    images = random_hflip(images)
                target = teacher(images)
                soft_labels = None
                if interpreter is not None:
                    with torch.no_grad():
                        soft_labels = interpreter(target.features)  # (B, K, H / s, W / s) logits
                with autocast(device, amp_dtype):
                    predicted = student.predict(target.images, [f.shape[-2:] for f in target.features])
                terms = distillation_terms(
                    predicted.features, target.features, predicted.logits, soft_labels, cfg.loss, cfg.distill
                )
                (terms["loss"] / cfg.train.grad_accum).backward()
                for name in names:
                    window[name] += terms[name].item() / cfg.train.grad_accum
                window["images"] += images.shape[0]
            grad_norm = torch.nn.utils.clip_grad_norm_(
                student.parameters(), cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
            )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr = scheduler.get_last_lr()[0]
            scheduler.step()
            step += 1
            window["steps"] += 1
            bar.update(1)

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                elapsed = time.perf_counter() - window_start
                n = window["steps"]
                row = {
                    **{name: window[name] / n for name in names},
                    "lr": lr,
                    "grad_norm": grad_norm.item(),
                    "img_per_s": window["images"] / elapsed,
                    "data_wait_s": window["wait"] / n,
                    "skipped_corrupt": window["skipped"],
                    "epoch": cursor.epoch,
                }
                metrics.log(step, row)
                first_loss = row["loss"] if first_loss is None else first_loss
                final_loss = row["loss"]
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}", refresh=False)
                window = new_window(names)
                window_start = time.perf_counter()
            if step % cfg.checkpoint.every == 0 or step == cfg.train.steps:
                save(step)
                last_saved = step
    except KeyboardInterrupt:
        bar.close()
        metrics.close()
        raise KeyboardInterrupt(
            f"interrupted at step {step}; newest checkpoint is step {last_saved} in {run_dir / 'checkpoints'}; "
            "continue with --resume"
        ) from None
    bar.close()
    metrics.close()
    backbone_path = export_backbone(student.backbone, cfg.student.model, run_dir / "backbone.safetensors")
    curve = plot_loss_curve(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", keys=("loss", "mse", "at", "ld"))
    return RunResult(run_dir, step, first_loss, final_loss, backbone_path, curve)
