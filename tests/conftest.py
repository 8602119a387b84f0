"""Shared fixtures: a tiny teacher and tiny shards, both made by the project's own code, once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("DTENGINE_CACHE", str(Path(__file__).resolve().parent.parent / ".cache" / "test-cache"))

from dtengine.parallel.compile import use_dtengine_inductor_cache

from tiny import TINY_IMAGE, tiny_unet_arch

# The tests' compiled graphs go to a cache folder keyed by the ops' sources, as the engine's do: a changed op must
# never replay a graph compiled against its old fake.
use_dtengine_inductor_cache()


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

    from dtengine.teachers.unet import build_unet, save_teacher_pipeline

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


@pytest.fixture(scope="session")
def tiny_val_shards(tiny_shards) -> str:
    """The held-out shards (16 images, with label maps) of the dataset `tiny_shards` belongs to."""
    return str(Path(tiny_shards).parent / "val-*.tar")


@pytest.fixture(scope="session")
def tiny_interpreter_overrides(tiny_shards, tiny_val_shards, tiny_teacher_dir) -> list[str]:
    """train-interpreter overrides for a seconds-long CPU run on the tiny teacher (blocks 0, 1 as in distill)."""
    return [
        f"data.shards={tiny_shards}",
        f"data.image_size={TINY_IMAGE}",
        "data.batch_size=4",
        f"val_shards={tiny_val_shards}",
        "num_val=8",
        "num_labelled=6",
        f"teacher.path={tiny_teacher_dir}",
        "teacher.blocks=[0,1]",
        "channels=32",
        "steps=3",
        "log_every=1",
        "progress=false",
    ]


@pytest.fixture(scope="session")
def tiny_interpreter_dir(tiny_interpreter_overrides, tmp_path_factory) -> Path:
    """An interpreter trained for 3 steps on the tiny teacher's blocks 0, 1 (the levels `tiny_run_overrides` use)."""
    from dtengine import load_config
    from dtengine.train.interpreter_training import InterpreterTrainingConfig, train_interpreter

    out = tmp_path_factory.mktemp("interpreter")
    cfg = load_config(None, [*tiny_interpreter_overrides, f"out_dir={out}"], schema=InterpreterTrainingConfig)
    weights, _ = train_interpreter(cfg)
    return weights.parent
