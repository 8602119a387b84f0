"""Optimizer choice, warmup + cosine schedule, gradient accumulation."""

from __future__ import annotations

import math

import pytest
import torch
from timm.optim import Lamb

from dtengine import load_config
from dtengine.train.distillation import run_distillation
from dtengine.train.optim import OptimConfig, WarmupCosine, build_optimizer, build_scheduler


def test_warmup_then_cosine():
    schedule = WarmupCosine(warmup_steps=4, total_steps=12, min_ratio=0.1)
    assert [schedule(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert schedule(4) == pytest.approx(1.0)
    assert schedule(8) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert schedule(12) == pytest.approx(0.1)
    assert schedule(50) == pytest.approx(0.1)


def test_optimizers_and_no_decay_groups():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    adamw = build_optimizer(model, OptimConfig(name="adamw", betas=[0.9, 0.95]))
    assert isinstance(adamw, torch.optim.AdamW)
    assert adamw.param_groups[0]["betas"] == (0.9, 0.95)
    decays = sorted(group["weight_decay"] for group in adamw.param_groups)
    assert decays == [0.0, 0.05], "biases and norm weights are exempt from weight decay"
    assert isinstance(build_optimizer(model, OptimConfig(name="lamb")), Lamb)
    scheduler = build_scheduler(adamw, OptimConfig(warmup_steps=2), total_steps=10)
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5 * 4e-3)  # half-way through warmup of the peak lr


def test_lamb_with_gradient_accumulation_runs(tiny_run_overrides):
    cfg = load_config(None, [*tiny_run_overrides, "optim.name=lamb", "train.grad_accum=2", "train.steps=2"])
    result = run_distillation(cfg)
    assert result.steps == 2 and math.isfinite(result.final_loss)
