"""Checkpoints: written atomically (temp file + fsync + rename), found by step, RNG states included.

An interrupted write leaves the previous checkpoint intact: readers only ever see complete files.
"""

from __future__ import annotations

import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtengine.errors import CheckpointError, ConfigError

CHECKPOINT_PATTERN = re.compile(r"step_(\d+)\.pt$")


@dataclass
class CheckpointConfig:
    """When and how many training checkpoints are kept."""

    every: int = 100
    """Write a checkpoint every this many optimizer steps (and always at the end)."""
    keep: int = 3
    """Keep the newest this many checkpoints; older ones are deleted once a newer one is safely written."""

    def __post_init__(self) -> None:
        if self.every <= 0 or self.keep <= 0:
            raise ConfigError(f"checkpoint.every and checkpoint.keep must be positive, got {self.every}, {self.keep}")


def atomic_write(path: Path, write_fn) -> None:
    """Call `write_fn(file_object)` on a temp file in `path`'s folder, fsync it, then rename it to `path`."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            write_fn(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def capture_rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_path(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:08d}.pt"


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if CHECKPOINT_PATTERN.search(p.name)]
    return sorted(found, key=lambda p: int(CHECKPOINT_PATTERN.search(p.name).group(1)))


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = checkpoint_path(directory, step)
    atomic_write(path, lambda handle: torch.save(state, handle))
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not found:
            raise CheckpointError(f"no checkpoint (step_*.pt) found in '{path}'; pass a run directory or a .pt file")
        path = found[-1]
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a run directory or a step_*.pt file")
    try:
        # Our own checkpoints hold RNG states and config dicts, not just tensors.
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # torch raises many kinds for truncated / foreign files
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({type(err).__name__}); use an earlier one") from err
