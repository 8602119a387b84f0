"""`dtengine distill`: the distillation loop around the `Distiller` step.

    world    one process, or a torchrun job (`parallel.distributed`: DDP or FSDP2 over the ranks)
    build    run directory, `Distiller.from_config`, `apply_compile`, `wrap_student`, optimizer, schedule
    resume   model, optimizer, schedule, RNG states and data position from a checkpoint (`run_checkpoint`)
    loop     micro-batches -> `Distiller` -> backward -> `optimizer_step`; metrics stay on the device and are
             pulled (and averaged over ranks) every `train.log_every` steps; held-out loss every
             `train.val_every`; checkpoints every `checkpoint.every`; a profiler trace over `train.profile_steps`
    finish   export the backbone, plot the loss curve

The config states the global batch (`train.global_batch`); each rank takes micro-batches of `data.batch_size`
and accumulates as many as the world size leaves to reach it. Rank 0 alone prints, logs, plots, checkpoints and
exports.

The first step of a process (compilation included) is timed on its own and logged as `first_step_s`; img/s
counts the steps after it. Outputs in the run directory: config.yaml, metrics.jsonl, tensorboard/, checkpoints/,
loss_curve.png, backbone.safetensors, and profile/ when asked for. A resumed run takes exactly the steps an
uninterrupted one would have taken.
"""

from __future__ import annotations

import contextlib
import functools
import signal
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
from dtengine.parallel.compile import apply_compile, student_compiles
from dtengine.parallel.distributed import (
    World,
    full_backbone,
    gradient_sync,
    init_world,
    shutdown,
    wrap_student,
)
from dtengine.runtime import checkpoint as ckpt
from dtengine.runtime.config import config_to_yaml
from dtengine.runtime.device import deterministic_algorithms, peak_memory_gb, seed_everything, synchronize
from dtengine.runtime.errors import ConfigError, OutputDirError
from dtengine.runtime.io import FolderLock, atomic_write, prepare_output_dir
from dtengine.runtime.logging import (
    MetricsLogger,
    StepProfiler,
    StepWindow,
    parse_step_range,
    plot_loss_curve,
    progress_bar,
)
from dtengine.teachers.build import describe_teacher
from dtengine.train.optim import build_optimizer, build_scheduler, optimizer_step
from dtengine.train.run_checkpoint import clean_partial_checkpoints, resume_run, save_run
from dtengine.train.run_config import RunConfig
from dtengine.train.stopping import NonFiniteError, NonFiniteGuard, RunStopped, StopRequest


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
    world: World
    run_dir: Path
    distiller: Distiller
    optimizer: torch.optim.Optimizer
    scheduler: Any
    architecture: dict[str, Any]
    compiled: list[str] = field(default_factory=list)
    parallel: str = "single process"
    global_batch: int = 0
    accumulation: int = 1
    step: int = 0
    data_state: dict[str, Any] | None = None
    loader: str = ""
    lock: FolderLock | None = None
    last_saved: int = 0
    logged_losses: list[float] = field(default_factory=list)

    def set_global_batch(self, global_batch: int) -> None:
        """Images per step over all ranks; each rank accumulates global / (data.batch_size x world) micro-batches."""
        per_step = self.cfg.data.batch_size * self.world.size
        if global_batch % per_step:
            raise ConfigError(
                f"train.global_batch {global_batch} is not a multiple of data.batch_size x world size = "
                f"{self.cfg.data.batch_size} x {self.world.size}; change data.batch_size or the number of ranks"
            )
        self.global_batch, self.accumulation = global_batch, global_batch // per_step
        self.cfg.train.global_batch, self.cfg.train.grad_accum = global_batch, self.accumulation


def prepare_run_dir(out_dir: str | Path, resuming: bool) -> Path:
    """Create and check `out_dir`; a fresh run refuses a folder that already holds checkpoints."""
    run_dir = prepare_output_dir(out_dir, fix="choose another with out_dir=DIR")
    clean_partial_checkpoints(run_dir / "checkpoints")
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


def build_run(cfg: RunConfig, world: World, resuming: bool) -> DistillationRun:
    run_dir, lock = Path(cfg.out_dir).expanduser(), None
    if world.main:
        prepare_output_dir(run_dir, fix="choose another with out_dir=DIR")
        lock = FolderLock(run_dir).acquire()  # before anything is read or written: one run per folder
    try:
        return _build_run(cfg, world, resuming, run_dir, lock)
    except BaseException:
        if lock is not None:
            lock.release()
        raise


def _build_run(cfg: RunConfig, world: World, resuming: bool, run_dir: Path, lock) -> DistillationRun:
    if world.main:
        prepare_run_dir(run_dir, resuming)
    world.barrier()
    seed_everything(cfg.train.seed)
    distiller = Distiller.from_config(cfg, device=world.device)
    distiller.teacher.check_image_size(cfg.data.image_size)
    resolve_shards(cfg.data.shards, cfg.data.builtin_root, cfg.data.image_size)  # fail fast on a bad pattern
    architecture = architecture_of(cfg, distiller)
    # Under DDP the student is compiled inside the DDP wrapper (see parallel/distributed.py), not here.
    compiled = apply_compile(distiller, cfg.compile, student=not world.distributed)
    ddp = world.distributed and cfg.distributed.strategy == "ddp"
    compile_student = ddp and student_compiles(cfg.compile, world.device)
    parallel = wrap_student(distiller, world, cfg.distributed, cfg.compile if compile_student else None)
    compiled += ["student"] if compile_student else []
    sharded = world.distributed and cfg.distributed.strategy == "fsdp2"
    optimizer = build_optimizer(distiller.student, cfg.optim, fused=not sharded)
    scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
    run = DistillationRun(cfg, world, run_dir, distiller, optimizer, scheduler, architecture, compiled, parallel)
    run.lock = lock
    run.set_global_batch(cfg.train.global_batch or cfg.data.batch_size * cfg.train.grad_accum * world.size)
    return run


def metrics_row(run: DistillationRun, sums: dict[str, float], grad_norm: torch.Tensor, lr: float, epoch: int):
    """One metrics.jsonl row from a window's sums; the one place the loop reads the device."""
    steps = sums["steps"]
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor
    return {
        **{name: sums[name] / steps for name in run.distiller.term_names},
        "lr": lr,
        "grad_norm": grad_norm.item(),
        "img_per_s": sums.get("images", 0) * run.world.size / sums["seconds"],  # all ranks take equal batches
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
    # Every rank scores the same batches with the same keys; DDP's wrapper is bypassed (FSDP2's cannot be).
    with distiller.plain_student() if run.cfg.distributed.strategy == "ddp" else contextlib.nullcontext():
        for index, images in enumerate(batches):
            window.add_tensors(distiller(images, step=VALIDATION_STEP, first_index=index * images.shape[0]))
    distiller.train()
    sums = window.pull()
    return {f"val_{name}": sums[name] / len(batches) for name in distiller.term_names}


def check_finite(run: DistillationRun, guard: NonFiniteGuard) -> int:
    """Read the non-finite flags (a host sync: at logging and saving boundaries only) and apply the policy.

    Returns: the non-finite steps so far. Raises: NonFiniteError when the run must stop.
    """
    report = guard.report(reduce=run.world.all_max)
    bad, policy = report["bad_steps"], run.cfg.train.on_nonfinite
    if bad == 0:
        return 0
    what = ", ".join(report["what"]) or "a value"
    if policy == "stop":
        raise NonFiniteError(
            f"step {report['first_bad_step'] + 1}: non-finite {what}; the update was not applied and nothing "
            "non-finite was saved; lower optim.lr, check the data, or set train.on_nonfinite=skip"
        )
    limit = run.cfg.train.max_nonfinite_in_a_row
    if report["max_in_a_row"] >= limit:
        raise NonFiniteError(
            f"{limit} steps in a row had non-finite {what} (first at step {report['first_bad_step'] + 1}, {bad} "
            "in all); the run stopped without applying them; lower optim.lr or check the data"
        )
    return bad


def train_loop(run: DistillationRun, cursor, metrics: MetricsLogger | None, stop: StopRequest) -> None:
    cfg, distiller, world = run.cfg, run.distiller, run.world
    accum, batch_size = run.accumulation, cfg.data.batch_size
    bar = progress_bar(cfg.train.steps, "distill", initial=run.step, enabled=cfg.train.progress and world.main)
    profiler = StepProfiler(parse_step_range(cfg.train.profile_steps), run.run_dir / "profile")
    val_batches = held_out_batches(cfg) if cfg.train.val_every else []
    guard = NonFiniteGuard(distiller.term_names, world.device)
    window, first_step = StepWindow(), run.step + 1
    distiller.train()
    try:
        while run.step < cfg.train.steps:
            profiler.step(run.step)
            micro_losses, teacher_finite = [], torch.ones((), dtype=torch.bool, device=world.device)
            buffers = guard.buffers_before(distiller.student) if cfg.train.on_nonfinite == "skip" else []
            for micro in range(accum):
                wait_start = time.perf_counter()
                batch = cursor.next()
                window.add(wait=time.perf_counter() - wait_start, skipped=batch.get("skipped_corrupt", 0))
                # The sample keys count over the whole step: micro-batch, then rank, then position.
                first_index = (micro * world.size + world.rank) * batch_size
                with gradient_sync(distiller, enabled=micro == accum - 1):
                    losses = distiller(batch["image"], step=run.step, first_index=first_index)
                    (losses["loss"] / accum).backward()
                micro_losses.append(losses)
                teacher_finite = teacher_finite & distiller.teacher_finite
                window.add_tensors(losses, scale=1 / accum)
                window.add(images=batch["image"].shape[0])
            grad_norm, lr, finite = optimizer_step(
                distiller, run.optimizer, run.scheduler, cfg.optim.grad_clip,
                check=functools.partial(guard.step_finite, micro_losses, teacher_finite),
            )  # fmt: skip
            guard.record(finite, run.step)
            guard.restore_buffers(buffers, finite)
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
                row.update(metrics_row(run, window.pull(reduce=world.all_mean), grad_norm, lr, cursor.epoch))
                row.update(nonfinite_steps=check_finite(run, guard))
                run.logged_losses.append(row["loss"])
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}", refresh=False)
            if cfg.train.val_every and (run.step % cfg.train.val_every == 0 or run.step == cfg.train.steps):
                row.update(validate(run, val_batches))
            if row and metrics is not None:
                metrics.log(run.step, row)
            signum = stop.agreed()
            if run.step % cfg.checkpoint.every == 0 or run.step == cfg.train.steps or signum:
                check_finite(run, guard)  # nothing non-finite is ever saved
                save_run(run, cursor)
            if signum:
                raise RunStopped(stop_message(run, signum), 128 + signum)
        profiler.step(run.step)
    finally:
        profiler.close()
        bar.close()


def stop_message(run: DistillationRun, signum: int) -> str:
    launcher = "torchrun --nproc-per-node=N -m dtengine" if run.world.distributed else "dtengine"
    resume = f"{launcher} distill --resume out_dir={run.run_dir}"
    return (
        f"stopped by {signal.Signals(signum).name} after step {run.step} of {run.cfg.train.steps}; checkpoint "
        f"step {run.step} is in {run.run_dir / 'checkpoints'}; resume with: {resume}"
    )


def finish_run(run: DistillationRun) -> RunResult:
    student, path = run.distiller.student, run.run_dir / "backbone.safetensors"
    backbone = full_backbone(student, run.world)  # a collective under FSDP2, so every rank calls it
    curve = None
    if run.world.main:
        if not all(t.isfinite().all() for t in backbone.state_dict().values() if t.is_floating_point()):
            raise NonFiniteError("the trained backbone holds non-finite weights; it was not exported")
        export_backbone(backbone, student.model_name, path)
        curve = plot_loss_curve(
            run.run_dir / "metrics.jsonl", run.run_dir / "loss_curve.png", keys=("loss", "mse", "at", "ld")
        )
    first, final = (run.logged_losses[0], run.logged_losses[-1]) if run.logged_losses else (None, None)
    return RunResult(run.run_dir, run.step, first, final, path, curve)


def banner(run: DistillationRun, changes: list[str], cursor) -> str:
    cfg, world = run.cfg, run.world
    lines = [
        f"world: {world.size} rank(s) on {world.device.type}, {run.parallel}; data loader: {run.loader}",
        f"batch: {cfg.data.batch_size} per micro-batch x {run.accumulation} accumulated x {world.size} rank(s) = "
        f"global batch {run.global_batch}; optim.lr {cfg.optim.lr:g} applies to the global batch as configured "
        "(no rescaling with the world size)",
        f"images: {cfg.data.image_size} px, crop {cfg.data.crop}",
        *describe_teacher(cfg.teacher, cfg.data.image_size).lines(),
    ]
    unused = cursor.unused_per_epoch()
    if unused:
        lines.append(f"note: {unused} samples per epoch are not used (every rank takes the same number of full "
                     "batches); lower data.batch_size or add data to use them")  # fmt: skip
    if cfg.optim.warmup_steps >= cfg.train.steps:
        lines.append(f"note: the run ({cfg.train.steps} steps) ends within its warmup ({cfg.optim.warmup_steps} "
                     "steps), so it never leaves the warmup's rising learning rate")  # fmt: skip
    return "\n".join(lines + [f"resumed with {change}" for change in changes])


def run_distillation(
    cfg: RunConfig, resume: str | bool | None = None, trust_checkpoint: bool = False, changes: list[str] = ()
) -> RunResult:
    """Train the student on the teacher's features as configured; see the module docstring for outputs.

    Under torchrun every rank calls this; the process group is started here and left in step at the end.

    Args:
        cfg: the resolved run configuration (for a resume, see `run_config.config_for_resume`).
        resume: None/False for a fresh run; True to continue from the newest checkpoint in `cfg.out_dir`;
            a path (run dir, step_*.pt or step_*.dcp) to continue from that checkpoint, writing to `cfg.out_dir`.
        trust_checkpoint: load a sharded (FSDP2) checkpoint from outside the run's own checkpoints folder.
        changes: settings the resume changes, listed in the banner.
    Raises:
        RunStopped: a signal stopped the run after a checkpoint (the CLI exits 128 + the signal).
    """
    with deterministic_algorithms(cfg.train.deterministic):
        return _run_distillation(cfg, resume, trust_checkpoint, changes)


def _run_distillation(cfg: RunConfig, resume, trust_checkpoint: bool, changes: list[str]) -> RunResult:
    world = init_world(cfg.train.device, cfg.distributed)
    run = build_run(cfg, world, resuming=bool(resume))
    try:
        changes = [*changes, *(resume_run(run, resume, trust_checkpoint) if resume else [])]
        cursor, run.loader = open_batches(
            cfg.data, cfg.train.seed, world.rank, world.size, device=world.device, state=run.data_state
        )
        metrics = None
        if world.main:
            atomic_write(run.run_dir / "config.yaml", config_to_yaml(cfg))
            print(banner(run, changes, cursor), flush=True)
            metrics = MetricsLogger(run.run_dir, cfg.train.tensorboard, resume_step=run.step if resume else None)
        try:
            with StopRequest(cfg.train.stop_grace_s, world.distributed) as stop:
                train_loop(run, cursor, metrics, stop)
        finally:
            if metrics is not None:
                metrics.close()
        result = finish_run(run)
    finally:
        if run.lock is not None:
            run.lock.release()
    shutdown(world)  # only on success: a failing rank must not wait in a barrier for peers stuck elsewhere
    return result
