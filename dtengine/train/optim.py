"""Optimizer (AdamW or LAMB, from timm), a warmup + cosine learning-rate schedule, and the optimizer step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from timm.optim import create_optimizer_v2
from torch import nn

from dtengine.runtime.errors import ConfigError

OPTIMIZERS = ("adamw", "lamb")


@dataclass
class OptimConfig:
    """Optimizer and schedule (paper, Table 17: AdamW/LAMB, betas 0.9/0.95, wd 0.05, cosine with warmup)."""

    name: str = "adamw"
    """"adamw" or "lamb" (the paper's ImageNet recipe uses LAMB at batch 2048)."""
    lr: float = 4e-3
    """Peak learning rate, reached at the end of warmup."""
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 0.05
    """Decoupled weight decay; biases and normalisation weights are exempt."""
    warmup_steps: int = 100
    """Linear warmup from 0 to `lr` over this many optimizer steps."""
    min_lr_ratio: float = 0.0
    """Cosine decay ends at lr * min_lr_ratio."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optim.name must be one of {OPTIMIZERS}, got {self.name!r}")
        if self.lr <= 0:
            raise ConfigError(f"optim.lr must be positive, got {self.lr}")
        if len(self.betas) != 2:
            raise ConfigError(f"optim.betas must have two values, got {list(self.betas)}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.warmup_steps and optim.grad_clip must be >= 0, optim.min_lr_ratio in [0, 1]")


def build_optimizer(model: nn.Module, cfg: OptimConfig, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW or LAMB over `model`'s parameters; timm exempts biases and norm weights from weight decay, as the
    paper's recipes assume. AdamW is torch's fused implementation: one kernel per step, and its step counters
    live on the parameters' device (the for-loop implementation reads them back with `.item()` every step).
    `fused=False` takes the foreach implementation instead (FSDP2's sharded DTensor parameters)."""
    extra = {"fused": True} if fused else {"foreach": True}
    extra = extra if cfg.name == "adamw" else {}
    return create_optimizer_v2(
        model, opt=cfg.name, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas), **extra
    )


class WarmupCosine:
    """Multiplier on the peak lr at optimizer step `step`: linear warmup, then cosine to `min_ratio`."""

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float):
        self.warmup_steps, self.total_steps, self.min_ratio = warmup_steps, total_steps, min_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, total_steps: int):
    schedule = WarmupCosine(min(cfg.warmup_steps, total_steps), total_steps, cfg.min_lr_ratio)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def mask_update(optimizer: torch.optim.Optimizer, finite: torch.Tensor) -> None:
    """Make the next `optimizer.step()` leave everything untouched when `finite` (a 0-dim bool on the device) is
    False, without a host sync: a fused optimizer reads `found_inf` (as under a GradScaler) and skips the step; any
    other gets its gradients zeroed instead (it still applies weight decay and moment decay)."""
    if optimizer.defaults.get("fused"):
        optimizer.found_inf = (~finite).float()
        return
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is not None:
                # FSDP2's gradients are DTensors: each rank zeroes its own shard (every rank has the same `finite`).
                grad = param.grad.to_local() if hasattr(param.grad, "to_local") else param.grad
                grad.copy_(torch.where(finite, grad, torch.zeros_like(grad)))


def optimizer_step(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler, grad_clip: float, check=None):
    """Clip the gradient norm, step, clear the gradients, advance the schedule: the end of every training step.

    Args:
        check: optional f(grad_norm) -> whether the step is finite (a 0-dim bool on the device); a non-finite step
            leaves the parameters untouched (`mask_update`).
    Returns:
        (the gradient norm before clipping, a 0-dim tensor left on the device; the lr this step used; the check's
        result or None).
    """
    max_norm = grad_clip if grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    finite = check(grad_norm) if check is not None else None
    if finite is not None:
        mask_update(optimizer, finite)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    lr = scheduler.get_last_lr()[0]
    scheduler.step()
    return grad_norm, lr, finite
