"""Saving and resuming a distillation run, on any world size.

    DDP (and one process)  one file, `checkpoints/step_<n>.pt`, written by rank 0 and loaded with
                           `weights_only=True`: the student (unwrapped names), optimizer and schedule (the same on
                           every rank), RNG states, the run's config and architecture, and every rank's data
                           position
    FSDP2                  a `torch.distributed.checkpoint` folder, `checkpoints/step_<n>.dcp/`, each rank writing
                           its shards, with the rest of the state in its `meta.pt`. DCP reads its metadata with
                           pickle, so it is loaded only from the run's own checkpoints folder unless the caller
                           trusts the source (`--trust-checkpoint`). Several nodes need a shared filesystem.

Any world size resumes any checkpoint. The global batch (`train.global_batch`) is taken from the checkpoint, so
a resume on another world size keeps the run's meaning, and the data position is restored per rank when the
world size is the same; otherwise the epoch restarts from its first batch, and the banner says so.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from dtengine.runtime import checkpoint as ckpt
from dtengine.runtime.config import config_to_dict
from dtengine.runtime.errors import CheckpointError

if TYPE_CHECKING:
    from dtengine.train.distillation import DistillationRun

SHARDED_SUFFIX = ".dcp"
META_FILE = "meta.pt"


def _sharded(run: DistillationRun) -> bool:
    return run.world.distributed and run.cfg.distributed.strategy == "fsdp2"


def save_run(run: DistillationRun, batches) -> Path:
    """Write a checkpoint of `run` at its current step (a collective: every rank calls it)."""
    data_states = run.world.gather(batches.state())
    meta = {
        "step": run.step,
        "data": {"world_size": run.world.size, "ranks": data_states},
        "scheduler": run.scheduler.state_dict(),
        "rng": ckpt.capture_rng_state(),
        "architecture": run.architecture,
        "config": config_to_dict(run.cfg),
    }
    directory = run.run_dir / "checkpoints"
    run.last_saved = run.step
    if _sharded(run):
        return _save_sharded(run, directory, meta)
    path = ckpt.checkpoint_path(directory, run.step)
    if run.world.main:
        state = {**meta, "student": run.distiller.student.state_dict(), "optimizer": run.optimizer.state_dict()}
        path = ckpt.save_checkpoint(directory, run.step, state, keep=run.cfg.checkpoint.keep)
    run.world.barrier()
    return path


def _save_sharded(run: DistillationRun, directory: Path, meta: dict) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = directory / f"step_{run.step:08d}{SHARDED_SUFFIX}"
    staging = directory / f".{target.name}.partial"
    if run.world.main:
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
    run.world.barrier()
    model, optimizer = get_state_dict(run.distiller.student, run.optimizer)
    dcp.save({"student": model, "optimizer": optimizer}, checkpoint_id=staging)
    if run.world.main:
        ckpt.write_checkpoint(staging / META_FILE, meta)
        staging.rename(target)  # the folder appears whole or not at all
        for old in ckpt.list_checkpoints(directory)[: -run.cfg.checkpoint.keep]:
            shutil.rmtree(old) if old.is_dir() else old.unlink(missing_ok=True)
    run.world.barrier()
    return target


def resume_run(run: DistillationRun, source: str | bool, trust: bool = False) -> list[str]:
    """Restore `run` from the newest checkpoint of its own directory (True) or of `source` (run dir, .pt or
    .dcp folder). Returns lines saying what changed (world size, global batch, data position)."""
    path = ckpt.find_checkpoint(run.run_dir if source is True else Path(source))
    sharded = path.is_dir() and path.name.endswith(SHARDED_SUFFIX)
    if sharded != _sharded(run):
        kinds = ("an FSDP2 (sharded)", "a DDP / single-process") if sharded else ("a DDP / single-process", "FSDP2")
        raise CheckpointError(f"'{path}' is {kinds[0]} checkpoint, but this run uses {kinds[1]}; resume with the "
                              "strategy that wrote it")  # fmt: skip
    if sharded:
        meta = ckpt.load_checkpoint(path / META_FILE)
    elif source is True or Path(source).is_dir():  # the newest that verifies; a torn or corrupt one is skipped
        meta, path = ckpt.load_newest_checkpoint(path.parent)
    else:
        meta = ckpt.load_checkpoint(path)
    if meta.get("architecture") != run.architecture:
        raise CheckpointError(
            f"checkpoint was written for {meta.get('architecture')}, but this config builds {run.architecture}; "
            "resume with the run's own config.yaml or start a new out_dir"
        )
    if sharded:
        _load_sharded(run, path, trust)
    else:
        run.distiller.student.load_state_dict(meta["student"])
        run.optimizer.load_state_dict(meta["optimizer"])
    run.scheduler.load_state_dict(meta["scheduler"])
    run.step = run.last_saved = meta["step"]
    ckpt.restore_rng_state(meta["rng"])
    return _restore_position(run, meta)


def _load_sharded(run: DistillationRun, path: Path, trust: bool) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    own = (run.run_dir / "checkpoints").resolve()
    if not trust and path.resolve().parent != own:
        raise CheckpointError(
            f"'{path}' is a sharded checkpoint outside this run's checkpoints folder; its metadata is read with "
            "pickle, so load it only if you trust it: pass --trust-checkpoint"
        )
    model, optimizer = get_state_dict(run.distiller.student, run.optimizer)
    state = {"student": model, "optimizer": optimizer}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(run.distiller.student, run.optimizer, model_state_dict=state["student"],
                   optim_state_dict=state["optimizer"])  # fmt: skip


def _restore_position(run: DistillationRun, meta: dict) -> list[str]:
    saved = meta["data"]
    changes = []
    saved_batch = meta["config"]["train"]["global_batch"]
    if saved_batch != run.global_batch:
        changes.append(f"global batch {run.global_batch} -> {saved_batch}: the checkpoint's, so the run's meaning "
                       "stays")  # fmt: skip
        run.set_global_batch(saved_batch)
    if saved["world_size"] == run.world.size:
        run.data_state = saved["ranks"][run.world.rank]
        return changes
    first = saved["ranks"][0]
    epoch = int(first.get("epoch", 0))
    run.data_state = {"loader": first.get("loader", "wds"), "epoch": epoch, "batch_in_epoch": 0, "batches": 0}
    changes.append(
        f"world size {saved['world_size']} -> {run.world.size}: each rank now reads other samples, so the data "
        f"position restarts at the first batch of epoch {epoch}"
    )
    return changes


def clean_partial_checkpoints(directory: Path) -> None:
    """Remove what an interrupted save left half-written (it never got its final name): sharded checkpoint folders
    and the temporary files of atomic writes."""
    for partial in Path(directory).glob(f".step_*{SHARDED_SUFFIX}.partial"):
        shutil.rmtree(partial, ignore_errors=True)
    for partial in Path(directory).glob(".step_*.tmp"):
        partial.unlink(missing_ok=True)
