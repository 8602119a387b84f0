"""The configuration of a distillation run (`RunConfig`), and what a resume may change of it.

A resume takes the run's own `config.yaml`; overrides given on resume apply on top and are listed. Settings that
only change how the run is carried out (logging, checkpoints, compile, distribution, device, the world size) may
change freely; any other (the schedule, the data order, the model, the loss) would change what the run computes,
so a resume refuses it unless `--allow-change KEY` names it (a key or a whole section).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dtengine.data.shard_stream import DataConfig
from dtengine.losses.objective import DistillConfig, LossConfig
from dtengine.parallel.compile import CompileConfig
from dtengine.parallel.distributed import DistributedConfig
from dtengine.runtime.checkpoint import CheckpointConfig
from dtengine.runtime.config import config_to_dict, load_config
from dtengine.runtime.device import PRECISIONS
from dtengine.runtime.errors import CheckpointError, ConfigError
from dtengine.runtime.logging import parse_step_range
from dtengine.students.student import StudentConfig
from dtengine.teachers.config import TeacherConfig
from dtengine.train.optim import OptimConfig
from dtengine.train.stopping import NONFINITE_POLICIES


@dataclass
class TrainConfig:
    """The training loop."""

    steps: int = 300
    """Optimizer steps to train for (the schedule's length)."""
    global_batch: int = 0
    """Images per optimizer step over all ranks. 0 = data.batch_size x grad_accum x the world size at the first
    start; the value used is written to config.yaml and kept by every resume, on any world size."""
    grad_accum: int = 1
    """Micro-batches per optimizer step when global_batch is 0; otherwise derived: global_batch / (data.batch_size
    x world size)."""
    seed: int = 0
    """Seeds the student's initialisation, data order, and every sample's noise and flip, which are keyed by
    (seed, step, global sample index) and drawn outside any compiled region: a run gives the same result on 1 or
    N ranks and compiled or eager."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"."""
    precision: str = "auto"
    """Student autocast: "auto" = bf16 on CUDA with bf16 support, fp32 elsewhere; or "fp32" / "bf16"."""
    hflip: bool = True
    """Random horizontal flips, the paper's only augmentation."""
    log_every: int = 10
    """Write a metrics row (loss terms, lr, img/s, data wait) every this many steps; the only steps on which the
    loop reads values back from the device."""
    val_every: int = 0
    """Every this many steps, the loss terms on `val_batches` held-out batches (`data.val_shards`), logged as
    val_loss, val_mse, ... and plotted beside the training loss (0 = never)."""
    val_batches: int = 4
    """Held-out batches per validation: the first ones of the held-out shards, with the same noise every time."""
    profile_steps: str = ""
    """"A:B" writes a torch profiler trace of optimizer steps A..B (1-based) into the run's profile/ folder."""
    on_nonfinite: str = "stop"
    """A step whose losses, teacher features or gradients are not finite is never applied. "stop": the run ends
    with an error naming the step and what went non-finite; "skip": the step is dropped and counted, and the run
    stops after max_nonfinite_in_a_row such steps in a row."""
    max_nonfinite_in_a_row: int = 5
    """With on_nonfinite=skip: how many non-finite steps in a row end the run."""
    stop_grace_s: float = 25.0
    """After SIGTERM / SIGINT: seconds to finish the step and write the checkpoint before exiting anyway (torchrun
    kills the survivors of a failed rank after 30 s)."""
    deterministic: bool = False
    """Deterministic algorithms only (torch.use_deterministic_algorithms, cuDNN without benchmarking): the same
    numbers on every run of a GPU too, for debugging; slower."""
    tensorboard: bool = True
    progress: bool = True
    """Show a progress bar with loss, img/s and ETA."""

    def __post_init__(self) -> None:
        if self.steps <= 0 or self.grad_accum <= 0 or self.log_every <= 0:
            raise ConfigError("train.steps, train.grad_accum and train.log_every must be positive integers")
        if self.val_every < 0 or self.val_batches <= 0:
            raise ConfigError("train.val_every must be >= 0 and train.val_batches positive")
        try:
            parse_step_range(self.profile_steps)
        except ValueError as err:
            raise ConfigError(f"train.profile_steps: {err}") from None
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.on_nonfinite not in NONFINITE_POLICIES:
            raise ConfigError(f"train.on_nonfinite must be one of {NONFINITE_POLICIES}, got {self.on_nonfinite!r}")
        if self.max_nonfinite_in_a_row <= 0 or self.stop_grace_s <= 0:
            raise ConfigError("train.max_nonfinite_in_a_row and train.stop_grace_s must be positive")


@dataclass
class RunConfig:
    """Everything one `dtengine distill` run needs."""

    out_dir: str = "runs/distill"
    """Run directory: resolved config, metrics, TensorBoard events, checkpoints, exported backbone."""
    data: DataConfig = field(default_factory=DataConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    compile: CompileConfig = field(default_factory=CompileConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        if self.teacher.kind == "gan":  # the generator makes the images: no dataset is read
            if self.data.loader == "auto":
                self.data.loader = "synthetic"
            elif self.data.loader != "synthetic":
                raise ConfigError(
                    f"teacher.kind=gan generates the student's images, so data.loader={self.data.loader} has nothing "
                    "to do; use data.loader=synthetic (or auto)"
                )


FREE_ON_RESUME = (  # fmt: skip
    "out_dir",
    "train.log_every",
    "train.progress",
    "train.tensorboard",
    "train.val_every",
    "train.val_batches",
    "train.profile_steps",
    "train.device",
    "train.precision",
    "train.on_nonfinite",
    "train.max_nonfinite_in_a_row",
    "train.stop_grace_s",
    "train.deterministic",
    "train.global_batch",
    "train.grad_accum",
    "checkpoint.",
    "compile.",
    "distributed.",
    "data.prefetch",
    "data.val_shards",
    "data.builtin_root",
    "data.loader",
)
"""Keys (or sections, ending in ".") a resume may change without `--allow-change`: they change how the run is
carried out, not what it computes. (The global batch is kept from the checkpoint whatever the config says; a
checkpoint's data position refuses another loader.)"""


def run_dir_of(source: str | Path) -> Path:
    """The run directory a `--resume-from` source belongs to (a run dir, or a checkpoint inside one)."""
    path = Path(source).expanduser()
    if path.is_dir() and not path.name.startswith("step_"):
        return path
    return path.parent.parent if path.parent.name == "checkpoints" else path.parent


def _flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_for_resume(
    config_path: str | None, overrides: list[str], source: str | bool, allowed: list[str]
) -> tuple[RunConfig, list[str]]:
    """The config a resume runs with, and one line per setting it changes (see the module docstring).

    Args:
        config_path: a config file given on resume (None: the run's own config.yaml).
        overrides: key=value overrides given on resume.
        source: True (the run in out_dir) or a run directory / checkpoint to continue from.
        allowed: keys or sections (ending in ".") the user allows to change.
    Raises:
        CheckpointError: the run has no config.yaml. ConfigError: a change to the run's meaning not allowed.
    """
    run_dir = Path(load_config(config_path, overrides, schema=RunConfig).out_dir) if source is True else None
    run_dir = run_dir if run_dir is not None else run_dir_of(source)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        raise CheckpointError(f"'{run_dir}' has no config.yaml to resume with; pass --config with the run's settings")
    saved = load_config(saved_path, schema=RunConfig)
    cfg = load_config(config_path or saved_path, overrides, schema=RunConfig)
    before, after = _flatten(config_to_dict(saved)), _flatten(config_to_dict(cfg))
    changed = [key for key in after if after[key] != before.get(key)]
    free = [*FREE_ON_RESUME, *(a if a.endswith(".") or a in after else f"{a}." for a in allowed)]
    refused = [key for key in changed if not any(key == f or (f.endswith(".") and key.startswith(f)) for f in free)]
    if refused:
        listed = "; ".join(f"{key}: {before.get(key)!r} -> {after[key]!r}" for key in refused)
        raise ConfigError(
            f"resuming would change what the run computes ({listed}); resume with the run's own settings, or allow "
            f"it with --allow-change {refused[0]}"
        )
    return cfg, [f"{key}: {before.get(key)!r} -> {after[key]!r}" for key in changed]
