"""Checkpoints: written atomically, found by step, kept k at a time, loaded with `weights_only=True`.

A checkpoint is a dict of tensors, containers and plain Python values only, so it loads without unpickling
arbitrary objects. Random-number states are stored as tensors (NumPy's MT19937 state as its key array in an
int64 tensor plus its position). The file holds `format_version`, the SHA-256 of the serialised state and the
state itself as bytes, so a torn or bit-flipped file is recognised before anything trusts it; one written before
this format gets a one-line error saying so instead of an unpickling traceback. `load_newest_checkpoint` falls back
to the previous checkpoint (with a warning) when the newest one does not verify.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import random
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dtengine.runtime.errors import CheckpointError, ConfigError
from dtengine.runtime.io import atomic_write

FORMAT_VERSION = 4
"""1 (never written with this key): pickled RNG states, loaded with weights_only=False. 2: tensors only. 3: the
data position is the loader's own state (`"data"`), e.g. DALI's pipeline checkpoint. 4: the state is stored as
bytes beside its SHA-256."""
CHECKPOINT_PATTERN = re.compile(r"step_(\d+)\.(pt|dcp)$")  # a file, or a sharded (distributed) checkpoint folder


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


def capture_rng_state() -> dict[str, torch.Tensor | list[torch.Tensor]]:
    """Python's, NumPy's, torch's (and CUDA's) global RNG states, as tensors."""
    version, python_state, gauss = random.getstate()
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": torch.tensor([version, *python_state], dtype=torch.int64),
        "python_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
        "numpy_extra": torch.tensor([position, has_gauss, cached_gaussian], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    version, *python_state = (int(x) for x in state["python"])
    has_gauss, gauss = state["python_gauss"].tolist()
    random.setstate((version, tuple(python_state), gauss if has_gauss else None))
    position, has_gauss, cached_gaussian = state["numpy_extra"].tolist()
    keys = state["numpy"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(position), int(has_gauss), cached_gaussian))
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


def write_checkpoint(path: Path, state: dict[str, Any]) -> Path:
    """Write `state` to `path` atomically, with the format version and the SHA-256 of its serialised bytes."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    wrapped = {
        "format_version": FORMAT_VERSION,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
    }
    return atomic_write(path, lambda handle: torch.save(wrapped, handle))


def save_checkpoint(directory: Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` (+ format_version) as step_<step>.pt atomically, then delete all but the newest `keep`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = write_checkpoint(checkpoint_path(directory, step), state)
    for old in list_checkpoints(directory)[:-keep]:
        shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    return path


def find_checkpoint(path: Path) -> Path:
    """`path` itself if it is a file, else the newest checkpoint of a run directory (or of a checkpoints folder)."""
    path = Path(path).expanduser()
    if path.is_dir() and not CHECKPOINT_PATTERN.search(path.name):
        found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
        if not found:
            raise CheckpointError(f"no checkpoint (step_*.pt) found in '{path}'; pass a run directory or a .pt file")
        return found[-1]
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a run directory or a step_*.pt file")
    if path.suffix == ".safetensors":
        raise CheckpointError(
            f"'{path}' is an exported backbone, not a training checkpoint; pass the run directory or a step_*.pt file"
        )
    return path


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a checkpoint (a file, or the newest in a run directory) on the CPU with `weights_only=True`.

    Raises:
        CheckpointError: missing, unreadable, written by an older dtengine, or not a dtengine checkpoint.
    """
    path = find_checkpoint(path)
    try:
        wrapped = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"checkpoint '{path}' holds objects a safe (weights_only) load refuses: it was written by an older "
            f"dtengine (before checkpoint format {FORMAT_VERSION}) or by another program; start a new run"
        ) from err
    except Exception as err:  # torch raises many kinds for truncated / foreign files
        raise CheckpointError(f"checkpoint '{path}' is unreadable ({type(err).__name__}); use an earlier one") from err
    if not isinstance(wrapped, dict) or wrapped.get("format_version") != FORMAT_VERSION:
        found = wrapped.get("format_version", "none") if isinstance(wrapped, dict) else type(wrapped).__name__
        raise CheckpointError(
            f"checkpoint '{path}' has format {found}, this dtengine reads format {FORMAT_VERSION}; start a new run"
        )
    payload = wrapped["payload"].numpy().tobytes()
    if hashlib.sha256(payload).hexdigest() != wrapped.get("sha256"):
        raise CheckpointError(f"checkpoint '{path}' is corrupt (its checksum does not match); use an earlier one")
    return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)


def load_newest_checkpoint(directory: Path) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint of a checkpoints folder that loads and verifies, and its path; a newer one that does
    not is skipped with a warning (a save torn by a crash, a disk error).

    Raises:
        CheckpointError: none verifies (the newest one's error).
    """
    found = [p for p in list_checkpoints(directory) if p.is_file()]
    if not found:
        raise CheckpointError(f"no checkpoint (step_*.pt) found in '{directory}'; pass a run directory or a .pt file")
    first_error = None
    for path in reversed(found):
        try:
            state = load_checkpoint(path)
        except CheckpointError as err:
            first_error = first_error or err
            warnings.warn(f"skipping checkpoint '{path.name}': {err}", stacklevel=2)
            continue
        return state, path
    raise first_error
