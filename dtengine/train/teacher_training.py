"""`dtengine train-teacher`: train a small pixel-space DDPM (diffusers UNet2DModel + DDPMScheduler) on shards.

Made for the built-in data on CPU in minutes, but any shards and sizes work. The result is saved with
`DDPMPipeline.save_pretrained` (unet/, scheduler/, model_index.json), which is exactly what `teacher.path`
loads, next to metrics.jsonl, loss_curve.png and samples.png (DDIM samples from the EMA weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from dtengine.data.augment import flip_where, random_flip_mask
from dtengine.data.shard_stream import BatchCursor, DataConfig, ShardStream, resolve_shards
from dtengine.runtime.config import config_to_dict
from dtengine.runtime.device import resolve_device
from dtengine.runtime.errors import ConfigError, OutputDirError
from dtengine.runtime.io import atomic_write, prepare_output_dir
from dtengine.runtime.logging import MetricsLogger, StepWindow, plot_loss_curve, progress_bar
from dtengine.teachers.diffusion import load_diffusion_components
from dtengine.teachers.unet import UNetArchConfig, build_unet, save_teacher_pipeline


@dataclass
class TeacherTrainingConfig:
    """`dtengine train-teacher`."""

    out_dir: str = "runs/teacher"
    data: DataConfig = field(default_factory=lambda: DataConfig(batch_size=32))
    model: UNetArchConfig = field(default_factory=UNetArchConfig)
    steps: int = 150
    """Optimizer steps; 150 at batch 32 take about 5 minutes on a 2-core CPU (the shipped teacher used 600)."""
    lr: float = 5e-4
    warmup_steps: int = 50
    num_train_timesteps: int = 1000
    ema_decay: float = 0.995
    """EMA of the weights, saved as the teacher (sharper samples from short training)."""
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    num_samples: int = 16
    """Images drawn with 50 DDIM steps at the end for samples.png (0 = skip)."""
    init_from: str = ""
    """Start from this teacher's U-Net weights ("builtin" = the shipped teacher, or a folder written by
    train-teacher) instead of random ones, to train an existing teacher further; `model` is then ignored."""
    save_every: int = 0
    """Also save the EMA teacher every this many steps (0 = only at the end). Each save replaces the last one
    atomically; Ctrl-C saves too, so an interrupted run still leaves a usable teacher."""
    progress: bool = True

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.lr <= 0 or not 0 <= self.ema_decay < 1:
            raise ConfigError("steps and lr must be positive and ema_decay in [0, 1)")
        if self.save_every < 0:
            raise ConfigError(f"save_every must be >= 0, got {self.save_every}")


@torch.no_grad()
def _save_samples(unet, scheduler, cfg: TeacherTrainingConfig, device, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(scheduler.config)
    ddim.set_timesteps(50)
    generator = torch.Generator(device="cpu").manual_seed(cfg.seed)
    size = unet.config.sample_size
    x = torch.randn(cfg.num_samples, 3, size, size, generator=generator).to(device)
    for t in ddim.timesteps:
        x = ddim.step(unet(x, t).sample, t, x).prev_sample
    images = ((x.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy()
    cols = min(8, len(images))
    rows = (len(images) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(1.3 * cols, 1.3 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image in zip(axes.flat, images):
        ax.imshow(image)
    fig.suptitle(f"teacher samples (DDIM 50 steps, after {cfg.steps} training steps)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _initial_unet(cfg: TeacherTrainingConfig):
    if not cfg.init_from:
        return build_unet(cfg.data.image_size, cfg.model)
    unet, _ = load_diffusion_components(cfg.init_from)  # one-line errors for missing / corrupt folders
    if unet.config.sample_size != cfg.data.image_size:
        raise ConfigError(
            f"init_from teacher '{cfg.init_from}' was trained at {unet.config.sample_size} px but data.image_size is "
            f"{cfg.data.image_size}; use the same size"
        )
    return unet


def train_teacher(cfg: TeacherTrainingConfig) -> Path:
    """Train the DDPM as configured; returns the output directory (a valid `teacher.path`)."""
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel

    out_dir = prepare_output_dir(cfg.out_dir, fix="choose another with out_dir=DIR")
    if (out_dir / "unet").exists():
        raise OutputDirError(f"'{out_dir}' already holds a teacher; choose a new out_dir so it is not overwritten")
    resolve_shards(cfg.data.shards, cfg.data.builtin_root, cfg.data.image_size)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    unet = _initial_unet(cfg).to(device).train()
    scheduler = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule="linear")
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps)))
    cursor = BatchCursor(ShardStream(cfg.data, seed=cfg.seed))
    metrics = MetricsLogger(out_dir, tensorboard=False)
    atomic_write(out_dir / "train_teacher_config.json", json.dumps(config_to_dict(cfg), indent=2))

    def save_ema(step: int) -> None:
        ema.store(unet.parameters())
        ema.copy_to(unet.parameters())
        save_teacher_pipeline(unet, scheduler, out_dir)
        ema.restore(unet.parameters())
        metrics.log(step, {"saved_teacher": 1})

    bar = progress_bar(cfg.steps, "train-teacher", enabled=cfg.progress)
    window, step = StepWindow(), 0
    try:
        for step in range(1, cfg.steps + 1):
            x0 = cursor.next()["image"].to(device).float() / 127.5 - 1  # (B, 3, H, W) in [-1, 1]
            (x0,) = flip_where(random_flip_mask(len(x0), device=device), x0)
            noise = torch.randn_like(x0)
            t = torch.randint(0, cfg.num_train_timesteps, (x0.shape[0],), device=device)
            loss = F.mse_loss(unet(scheduler.add_noise(x0, noise, t), t).sample, noise)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
            optimizer.step()
            warmup.step()
            ema.step(unet.parameters())
            window.add_tensors({"loss": loss})
            window.add(steps=1, images=x0.shape[0])
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                sums = window.pull()
                row = {"loss": sums["loss"] / sums["steps"], "img_per_s": sums["images"] / sums["seconds"]}
                metrics.log(step, {**row, "epoch": cursor.epoch})
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}", refresh=False)
            if cfg.save_every and step % cfg.save_every == 0 and step < cfg.steps:
                save_ema(step)
    except KeyboardInterrupt:
        bar.close()
        completed = step - 1  # the step in flight did not finish
        if completed > 0:
            save_ema(completed)
        metrics.close()
        saved = f"saved the EMA teacher of step {completed} to {out_dir}" if completed > 0 else "nothing saved"
        raise KeyboardInterrupt(f"interrupted at step {step}; {saved}") from None
    bar.close()
    metrics.close()
    ema.copy_to(unet.parameters())
    unet.eval()
    save_teacher_pipeline(unet, scheduler, out_dir)
    plot_loss_curve(out_dir / "metrics.jsonl", out_dir / "loss_curve.png", keys=("loss",))
    if cfg.num_samples > 0:
        _save_samples(unet, scheduler, cfg, device, out_dir / "samples.png")
    return out_dir
