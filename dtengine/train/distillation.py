"""`dtengine distill`: the distillation loop around the `Distiller` step.

    build    run directory, `Distiller.from_config`, `apply_compile`, optimizer, schedule
    resume   model, optimizer, schedule, RNG states and data position from a checkpoint
    loop     micro-batches -> `Distiller` -> backward -> `optimizer_step`; metrics stay on the device and are
             pulled every `train.log_every` steps; held-out loss every `train.val_every`; checkpoints every
             `checkpoint.every`; a profiler trace over `train.profile_steps`
    finish   export the backbone, plot the loss curve

The first step of a process (compilation included) is timed on its own and logged as `first_step_s`; img/s
counts the steps after it. Outputs in the run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/,
loss_curve.png, backbone.safetensors, and profile/ when asked for. A resumed run takes exactly the steps an
uninterrupted one would have taken.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from dtengine.data.loaders import open_batches
from dtengine.data.shard_stream import DataConfig, ShardStream, held_out_shards, resolve_shards
from dtengine.distill import Distiller
from dtengine.export import export_backbone
from dtengine.levels import describe_levels
from dtengine.losses.objective import DistillConfig, LossConfig
from dtengine.parallel.compile import CompileConfig, apply_compile
from dtengine.runtime import checkpoint as ckpt
from dtengine.runtime.checkpoint import CheckpointConfig
from dtengine.runtime.config import config_to_dict, config_to_yaml
from dtengine.runtime.device import PRECISIONS, peak_memory_gb, seed_everything, synchronize
from dtengine.runtime.errors import CheckpointError, ConfigError, OutputDirError
from dtengine.runtime.io import atomic_write, prepare_output_dir
from dtengine.runtime.logging import (
    MetricsLogger,
    StepProfiler,
    StepWindow,
    parse_step_range,
    plot_loss_curve,
    progress_bar,
)
from dtengine.students.student import StudentConfig
from dtengine.teachers.diffusion import TeacherConfig
from dtengine.train.optim import OptimConfig, build_optimizer, build_scheduler, optimizer_step


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 300
    """Optimizer steps to train for (the schedule's length)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step; the effective batch is data.batch_size * grad_accum."""
    seed: int = 0
    """Seeds the student's initialisation, data order, and every sample's noise and flip, which are keyed by
    (seed, step, global sample index) and drawn outside any compiled region: a run gives the same result on 1 or
    N ranks and compiled or eager."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"."""
    precision: str = "auto"
    """Student autocast: "auto" = bf16 on CUDA with bf16 support, fp32 elsewhere; or "fp32" / "bf16"."""
    hflip: bool = True
    """Random horizontal flips, the paper's only augmentation."""
    log_every: int = 10
    """Write a metrics row (loss terms, lr, img/s, data wait) every this many steps; the only steps on which the
    loop reads values back from the device."""
    val_every: int = 0
    """Every this many steps, the loss terms on `val_batches` held-out batches (`data.val_shards`), logged as
    val_loss, val_mse, ... and plotted beside the training loss (0 = never)."""
    val_batches: int = 4
    """Held-out batches per validation: the first ones of the held-out shards, with the same noise every time."""
    profile_steps: str = ""
    """"A:B" writes a torch profiler trace of optimizer steps A..B (1-based) into the run's profile/ folder."""
    tensorboard: bool = True
    progress: bool = True
    """Show a progress bar with loss, img/s and ETA."""

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.grad_accum <= 0 or self.log_every <= 0:
            raise ConfigError("train.steps, train.grad_accum and train.log_every must be positive integers")
        if self.val_every < 0 or self.val_batches <= 0:
            raise ConfigError("train.val_every must be >= 0 and train.val_batches positive")
        try:
            parse_step_range(self.profile_steps)
        except ValueError as err:
            raise ConfigError(f"train.profile_steps: {err}") from None
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")


@dataclass
class RunConfig:
    """Everything one `dtengine distill` run needs."""

    out_dir: str = "runs/distill"
    """Run directory: resolved config, metrics, TensorBoard events, checkpoints, exported backbone."""
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    first_loss: float | None
    final_loss: float | None
    backbone_path: Path
    loss_curve: Path | None


@dataclass
class DistillationRun:
    """The state of one run while it trains."""

    cfg: RunConfig
    run_dir: Path
    distiller: Distiller
    optimizer: torch.optim.Optimizer
    scheduler: Any
    architecture: dict[str, Any]
    compiled: list[str] = field(default_factory=list)
    step: int = 0
    data_state: dict[str, Any] | None = None
    loader: str = ""
    last_saved: int = 0
    logged_losses: list[float] = field(default_factory=list)


def prepare_run_dir(out_dir: str | Path, resuming: bool) -> Path:
    """Create and check `out_dir`; a fresh run refuses a folder that already holds checkpoints."""
    run_dir = prepare_output_dir(out_dir, fix="choose another with out_dir=DIR")
    if not resuming and ckpt.list_checkpoints(run_dir / "checkpoints"):
        raise OutputDirError(
            f"output directory '{run_dir}' already holds a run; pass --resume to continue it or choose a new out_dir"
        )
    return run_dir


def architecture_of(cfg: RunConfig, distiller: Distiller) -> dict[str, Any]:
    """What must match for a checkpoint's weights to fit: compared on resume."""
    architecture = {
        "student": cfg.student.model,
        "regressor_channels": cfg.student.regressor_channels,
        "pool_scales": list(cfg.student.pool_scales),
        "teacher_levels": describe_levels(distiller.teacher.levels),
    }
    if cfg.distill.mode != "feature":
        classes = distiller.interpreter.num_classes
        architecture.update(distill_mode=cfg.distill.mode, logit_head_classes=classes)
    return architecture


def build_run(cfg: RunConfig, resuming: bool) -> DistillationRun:
    run_dir = prepare_run_dir(cfg.out_dir, resuming)
    resolve_shards(cfg.data.shards, cfg.data.builtin_root, cfg.data.image_size)  # fail fast on a bad pattern
    seed_everything(cfg.train.seed)
    distiller = Distiller.from_config(cfg)
    architecture = architecture_of(cfg, distiller)
    compiled = apply_compile(distiller, cfg.compile)
    optimizer = build_optimizer(distiller, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    return DistillationRun(cfg, run_dir, distiller, optimizer, scheduler, architecture, compiled)


def resume_run(run: DistillationRun, source: str | bool) -> None:
    """Restore `run` from the newest checkpoint of its own directory (True) or of `source` (a run dir or .pt)."""
    state = ckpt.load_checkpoint(run.run_dir if source is True else Path(source))
    if state.get("architecture") != run.architecture:
        raise CheckpointError(
            f"checkpoint was written for {state.get('architecture')}, but this config builds {run.architecture}; "
            "resume with the run's own config.yaml or start a new out_dir"
        )
    run.distiller.student.load_state_dict(state["student"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.step, run.data_state = state["step"], state["data"]
    run.last_saved = run.step
    ckpt.restore_rng_state(state["rng"])


def save_run(run: DistillationRun, batches) -> Path:
    state = {
        "step": run.step,
        "data": batches.state(),
        "student": run.distiller.student.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "rng": ckpt.capture_rng_state(),
        "architecture": run.architecture,
        "config": config_to_dict(run.cfg),
    }
    run.last_saved = run.step
    return ckpt.save_checkpoint(run.run_dir / "checkpoints", run.step, state, keep=run.cfg.checkpoint.keep)


def metrics_row(run: DistillationRun, sums: dict[str, float], grad_norm: torch.Tensor, lr: float, epoch: int):
    """One metrics.jsonl row from a window's sums; the one place the loop reads the device."""
    steps = sums["steps"]
    return {
        **{name: sums[name] / steps for name in run.distiller.term_names},
        "lr": lr,
        "grad_norm": grad_norm.item(),
        "img_per_s": sums.get("images", 0) / sums["seconds"],
        "data_wait_s": sums["wait"] / steps,
        "skipped_corrupt": int(sums["skipped"]),
        "epoch": epoch,
        **peak_memory_gb(run.distiller.device),
    }


VALIDATION_STEP = 2**62
"""The step key of held-out batches: the same noise and flips at every validation, never a training step's."""


def held_out_batches(cfg: RunConfig) -> list[torch.Tensor]:
    """The first `train.val_batches` batches of the held-out shards, in shard order, kept in memory."""
    data = DataConfig(
        shards=held_out_shards(cfg.data), image_size=cfg.data.image_size, batch_size=cfg.data.batch_size,
        num_workers=0, shuffle_buffer=0, on_corrupt="skip", builtin_root=cfg.data.builtin_root,
    )  # fmt: skip
    batches = []
    for batch in ShardStream(data, seed=0).epoch(0):
        batches.append(batch["image"])
        if len(batches) == cfg.train.val_batches:
            break
    if not batches:
        raise ConfigError(f"held-out shards '{data.shards}' give no full batch of {data.batch_size}; add data")
    return batches


@torch.no_grad()
def validate(run: DistillationRun, batches: list[torch.Tensor]) -> dict[str, float]:
    """Mean loss terms over the held-out batches, the student in eval mode (its running BatchNorm statistics)."""
    distiller, window = run.distiller, StepWindow()
    distiller.eval()
    for index, images in enumerate(batches):
        window.add_tensors(distiller(images, step=VALIDATION_STEP, first_index=index * images.shape[0]))
    distiller.train()
    sums = window.pull()
    return {f"val_{name}": sums[name] / len(batches) for name in distiller.term_names}


def train_loop(run: DistillationRun, cursor, metrics: MetricsLogger) -> None:
    cfg, distiller = run.cfg, run.distiller
    accum, batch_size = cfg.train.grad_accum, cfg.data.batch_size
    bar = progress_bar(cfg.train.steps, "distill", initial=run.step, enabled=cfg.train.progress)
    profiler = StepProfiler(parse_step_range(cfg.train.profile_steps), run.run_dir / "profile")
    val_batches = held_out_batches(cfg) if cfg.train.val_every else []
    window, first_step = StepWindow(), run.step + 1
    distiller.train()
    try:
        while run.step < cfg.train.steps:
            profiler.step(run.step)
            for micro in range(accum):
                wait_start = time.perf_counter()
                batch = cursor.next()
                window.add(wait=time.perf_counter() - wait_start, skipped=batch.get("skipped_corrupt", 0))
                losses = distiller(batch["image"], step=run.step, first_index=micro * batch_size)
                (losses["loss"] / accum).backward()
                window.add_tensors(losses, scale=1 / accum)
                window.add(images=batch["image"].shape[0])
            grad_norm, lr = optimizer_step(distiller, run.optimizer, run.scheduler, cfg.optim.grad_clip)
            run.step += 1
            window.add(steps=1)
            bar.update(1)
            row = {}
            if run.step == first_step:
                # Compilation and warm-up, timed apart: one sync, outside the steady state.
                synchronize(distiller.device)
                row.update(first_step_s=window.restart_clock(), compiled=",".join(run.compiled) or "none")
                row.update(loader=run.loader)
            if run.step % cfg.train.log_every == 0 or run.step == cfg.train.steps:
                row.update(metrics_row(run, window.pull(), grad_norm, lr, cursor.epoch))
                run.logged_losses.append(row["loss"])
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}", refresh=False)
            if cfg.train.val_every and (run.step % cfg.train.val_every == 0 or run.step == cfg.train.steps):
                row.update(validate(run, val_batches))
            if row:
                metrics.log(run.step, row)
            if run.step % cfg.checkpoint.every == 0 or run.step == cfg.train.steps:
                save_run(run, cursor)
        profiler.step(run.step)
    finally:
        profiler.close()
        bar.close()


def finish_run(run: DistillationRun) -> RunResult:
    student = run.distiller.student
    backbone_path = export_backbone(student.backbone, student.model_name, run.run_dir / "backbone.safetensors")
    curve = plot_loss_curve(
        run.run_dir / "metrics.jsonl", run.run_dir / "loss_curve.png", keys=("loss", "mse", "at", "ld")
    )
    first, final = (run.logged_losses[0], run.logged_losses[-1]) if run.logged_losses else (None, None)
    return RunResult(run.run_dir, run.step, first, final, backbone_path, curve)


def run_distillation(cfg: RunConfig, resume: str | bool | None = None) -> RunResult:
    """Train the student on the teacher's features as configured; see the module docstring for outputs.

    Args:
        cfg: the resolved run configuration.
        resume: None/False for a fresh run; True to continue from the newest checkpoint in `cfg.out_dir`;
            a path (run dir or step_*.pt) to continue from that checkpoint, writing to `cfg.out_dir`.
    """
    run = build_run(cfg, resuming=bool(resume))
    if resume:
        resume_run(run, resume)
    atomic_write(run.run_dir / "config.yaml", config_to_yaml(cfg))
    device = run.distiller.device
    cursor, run.loader = open_batches(cfg.data, cfg.train.seed, device=device, state=run.data_state)
    print(f"data loader: {run.loader}", flush=True)
    metrics = MetricsLogger(run.run_dir, tensorboard=cfg.train.tensorboard)
    try:
        train_loop(run, cursor, metrics)
    except KeyboardInterrupt:
        raise KeyboardInterrupt(
            f"interrupted at step {run.step}; newest checkpoint is step {run.last_saved} in "
            f"{run.run_dir / 'checkpoints'}; continue with --resume"
        ) from None
    finally:
        metrics.close()
    return finish_run(run)
