"""Data-parallel training on PyTorch's own stack: torchrun, DDP (default), FSDP2 (`fully_shard`), SyncBatchNorm.

    torchrun --nproc-per-node=8 -m dtengine distill --config ...      # one node
    torchrun --nnodes=4 --nproc-per-node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 -m dtengine distill ...

`init_world` reads RANK / LOCAL_RANK / WORLD_SIZE (set by torchrun), starts the process group (NCCL on CUDA,
gloo on CPU) and binds the rank to its local device; without them the run is a single process. `wrap_student`
wraps only what trains, the student + regressor (+ logit head): the frozen teacher is replicated on every rank,
never wrapped or synchronised.

DDP runs with `static_graph=True` (the student's graph never changes, and it tolerates the regressor's smoothing
layers that a teacher level leaves unused) and `no_sync` on every micro-batch but the last of an accumulation.
Compiled, the student module is compiled (fullgraph) inside DDP, `DDP(torch.compile(student))`: compiling DDP's
own forward does not trace it (its hooks are a graph break), and the loss, one fused op, stays outside. FSDP2
shards the backbone's stages and the student (for students too large to replicate); compile then covers the
teacher only.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from dtengine.distill import Distiller
from dtengine.runtime.device import resolve_device
from dtengine.runtime.errors import ConfigError

STRATEGIES = ("ddp", "fsdp2")


@dataclass
class DistributedConfig:
    """How a torchrun job splits the work (a plain `python -m dtengine` run ignores it)."""

    strategy: str = "ddp"
    """"ddp": every rank holds the whole student, gradients are averaged; "fsdp2": parameters, gradients and
    optimizer state are sharded over the ranks (`fully_shard`), for students too large to replicate."""
    sync_batchnorm: bool = False
    """Normalise with the statistics of the global batch (SyncBatchNorm) instead of each rank's; CUDA only."""
    timeout_s: int = 600
    """How long a collective may wait before the job fails (a rank that died cannot hang the others)."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"distributed.strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.timeout_s <= 0:
            raise ConfigError(f"distributed.timeout_s must be positive, got {self.timeout_s}")


@dataclass(frozen=True)
class World:
    """This process's place in the job."""

    rank: int
    local_rank: int
    size: int
    device: torch.device

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        """The rank that writes logs, metrics, plots, checkpoints and the export."""
        return self.rank == 0

    def all_mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over the ranks (itself in a single process)."""
        if not self.distributed:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor / self.size

    def all_max(self, tensor: torch.Tensor) -> torch.Tensor:
        """The elementwise max of `tensor` over the ranks (itself in a single process)."""
        if not self.distributed:
            return tensor
        tensor = tensor.clone()
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return tensor

    def gather(self, value) -> list:
        """Every rank's `value` (a picklable object), in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_world(device: str, cfg: DistributedConfig) -> World:
    """The process's world, the process group started when torchrun launched it (see the module docstring)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(0, 0, 1, resolve_device(device, "train.device"))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device in ("auto", "cuda")
    if device not in ("auto", "cuda", "cpu"):
        raise ConfigError(f"under torchrun train.device must be auto, cuda or cpu (each rank takes its local GPU), "
                          f"got {device!r}")  # fmt: skip
    placed = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(placed)
    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if cuda else "gloo", timeout=datetime.timedelta(seconds=cfg.timeout_s),
            device_id=placed if cuda else None,
        )  # fmt: skip
    return World(rank, local_rank, size, placed)


def shutdown(world: World) -> None:
    """Leave the process group in step: every rank reaches the barrier before it is destroyed (destroying it
    while a peer is still in a gloo collective aborts that peer)."""
    if world.distributed and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def wrap_student(distiller: Distiller, world: World, cfg: DistributedConfig, compile_cfg=None) -> str:
    """Wrap the distiller's student for `world` as `cfg` says, in place; returns a one-line description.

    Args:
        compile_cfg: a `CompileConfig` to compile the student with inside DDP (None: not compiled).
    """
    if not world.distributed:
        return "single process"
    if cfg.sync_batchnorm:
        if world.device.type != "cuda":
            raise ConfigError("distributed.sync_batchnorm needs CUDA (SyncBatchNorm has no CPU kernels); turn it off")
        distiller.student = nn.SyncBatchNorm.convert_sync_batchnorm(distiller.student)
    if cfg.strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for stage in distiller.student.backbone.children():
            if any(p.requires_grad for p in stage.parameters()):
                fully_shard(stage)
        fully_shard(distiller.student)
        distiller.wrap_student(distiller.student)
        return f"FSDP2 over {world.size} ranks"
    from torch.nn.parallel import DistributedDataParallel

    inner = distiller.student
    if compile_cfg is not None:
        options = {"mode": compile_cfg.mode} if compile_cfg.backend == "inductor" else {}
        inner = torch.compile(inner, backend=compile_cfg.backend, fullgraph=True, dynamic=False, **options)
    device_ids = [world.device.index] if world.device.type == "cuda" else None
    distiller.wrap_student(DistributedDataParallel(inner, device_ids=device_ids, static_graph=True))
    return f"DDP over {world.size} ranks" + (" (compiled student inside)" if compile_cfg is not None else "")


@contextlib.contextmanager
def gradient_sync(distiller: Distiller, enabled: bool) -> Iterator[None]:
    """Reduce gradients across ranks in this block only if `enabled` (the last micro-batch of a step)."""
    wrapped = distiller._student_call
    if hasattr(wrapped, "no_sync") and not enabled:
        with wrapped.no_sync():
            yield
        return
    if hasattr(distiller.student, "set_requires_gradient_sync"):  # FSDP2
        distiller.student.set_requires_gradient_sync(enabled)
    yield


def full_backbone(student: nn.Module, world: World) -> nn.Module | None:
    """The student's backbone with all its weights: itself, except under FSDP2, where the full weights are
    gathered (a collective: every rank calls it) into a fresh copy of the architecture on rank 0 (None elsewhere)."""
    if not hasattr(student, "set_requires_gradient_sync"):
        return student.backbone
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from dtengine.students.backbone import create_backbone

    full = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not world.main:  # the gathered weights land on rank 0 only
        return None
    backbone = create_backbone(student.model_name)
    backbone.load_state_dict({k.removeprefix("backbone."): v for k, v in full.items() if k.startswith("backbone.")})
    return backbone
