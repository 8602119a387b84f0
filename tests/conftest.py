"""Shared fixtures: a tiny teacher and tiny shards, both made by the project's own code, once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DTENGINE_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "test-cache"))

from tiny import TINY_IMAGE, tiny_unet_arch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> str:
    """Train shards of the built-in dataset at 32 px: 48 images in 3 shards."""
    from dtengine.data import builtin_dataset

    root = tmp_path_factory.mktemp("builtin") / "shapes"
    data = builtin_dataset(root, image_size=TINY_IMAGE, num_train=48, num_val=16, samples_per_shard=16, seed=0)
    return data.train_pattern


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory) -> Path:
    """A randomly initialised tiny DDPM saved in diffusers pipeline layout (unet/, scheduler/)."""
    from diffusers import DDPMScheduler

    from dtengine.teachers.ddpm_training import build_unet, save_teacher_pipeline

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("teacher")
    save_teacher_pipeline(build_unet(TINY_IMAGE, tiny_unet_arch()), DDPMScheduler(num_train_timesteps=1000), out)
    return out


@pytest.fixture
def tiny_run_overrides(tiny_shards, tiny_teacher_dir, tmp_path) -> list[str]:
    """Overrides that turn the demo config into a seconds-long CPU run."""
    return [
        f"out_dir={tmp_path / 'run'}",
        f"data.shards={tiny_shards}",
        f"data.image_size={TINY_IMAGE}",
        "data.batch_size=4",
        "data.num_workers=0",
        "data.shuffle_buffer=8",
        f"teacher.path={tiny_teacher_dir}",
        "teacher.blocks=[0,1]",
        "student.model=resnet18",
        "student.regressor_channels=32",
        "optim.warmup_steps=1",
        "train.steps=3",
        "train.log_every=1",
        "train.progress=false",
        "checkpoint.every=2",
    ]
