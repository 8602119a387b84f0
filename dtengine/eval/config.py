"""The evaluation protocol as config: one small dataclass per part, loaded with `load_config(schema=EvalConfig)`.

Every model evaluated in one run gets exactly these settings; only the seeds differ between repeats.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dtengine.runtime.errors import ConfigError

BASELINES = ("random", "teacher", "supervised")
"""Models `dtengine eval --baseline` can put beside the student; `supervised` is the positive control."""


def _check_positive(section: str, obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if isinstance(value, bool) or value <= 0:
            raise ConfigError(f"{section}.{name} must be positive, got {value!r}")


@dataclass
class EvalDataConfig:
    """Labelled shards (each sample needs "seg.png" and "cls") for training the probes and measuring them."""

    train_shards: str = "builtin:train"
    """Shards the probes, the fine-tuning subset and the supervised control are trained on."""
    val_shards: str = "builtin:val"
    """Held-out shards every reported number is measured on."""
    image_size: int = 64
    """Images and label maps are resized and centre-cropped to this square size."""
    builtin_root: str = ""
    """Cache folder of the built-in dataset ("" = `$DTENGINE_CACHE`, default `~/.cache/dtengine`)."""
    num_classes: int = 5
    """Number of label ids in "seg" and "cls" (the built-in data: 5 = background + 4 shapes)."""
    max_train_images: int = 0
    """Use only the first this many train images (0 = all); for quick checks, not for reported numbers."""
    max_val_images: int = 0
    """Use only the first this many held-out images (0 = all)."""
    batch_size: int = 64
    """Images per forward pass when extracting frozen features and predicting."""

    def __post_init__(self) -> None:
        _check_positive("data", self, "image_size", "num_classes", "batch_size")
        if self.max_train_images < 0 or self.max_val_images < 0:
            raise ConfigError("data.max_train_images and data.max_val_images must be >= 0 (0 = all)")


@dataclass
class ProbeConfig:
    """Frozen-feature linear probes: (a) dense 1x1 conv segmentation, (b) global linear classification."""

    resolution: int = 0
    """Side of the grid the dense probe's logits are formed on (0 = the full image size). Logits are always
    upsampled to the full image size for the loss and the metrics, so labels are never downsampled."""
    epochs: int = 15
    """Passes over the cached train features for the dense probe."""
    batch_size: int = 64
    """Images per dense-probe step."""
    lr: float = 1e-2
    """Adam learning rate of the dense probe."""
    global_steps: int = 300
    """Full-batch Adam steps of the global (pooled-feature) probe."""
    global_lr: float = 1e-2
    """Adam learning rate of the global probe."""
    weight_decay: float = 1e-4
    """L2 penalty (AdamW decoupled) of both probes."""

    def __post_init__(self) -> None:
        _check_positive("probe", self, "epochs", "batch_size", "lr", "global_steps", "global_lr")
        if self.resolution < 0 or self.weight_decay < 0:
            raise ConfigError("probe.resolution and probe.weight_decay must be >= 0")


@dataclass
class FinetuneConfig:
    """(c) label-efficient fine-tuning: the whole backbone plus a light head on the first N train images."""

    images: int = 20
    """Labelled train images fine-tuned on (the first N of the train split, the same for every model and seed)."""
    steps: int = 60
    """Optimizer steps."""
    batch_size: int = 10
    """Images per step (drawn from the N in a seeded order, with seeded horizontal flips)."""
    lr: float = 1e-3
    """AdamW learning rate, constant, for backbone and head alike."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""

    def __post_init__(self) -> None:
        _check_positive("finetune", self, "images", "steps", "batch_size", "lr")


@dataclass
class SupervisedConfig:
    """The positive control: the student architecture trained from scratch on the seg labels of the train split."""

    steps: int = 600
    """Optimizer steps (a fixed budget; at batch 32 on the built-in data, about 9 epochs, ~2.5 min on 2 CPU cores).
    150 steps left the control barely above random init (dense probe mIoU 0.255 vs 0.220); 600 give 0.391."""
    batch_size: int = 32
    """Images per step, drawn from the whole train split in a seeded order with horizontal flips."""
    lr: float = 2e-3
    """Peak AdamW learning rate (cosine decay to 0 over `steps`)."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""

    def __post_init__(self) -> None:
        _check_positive("supervised", self, "steps", "batch_size", "lr")


@dataclass
class EvalConfig:
    """Everything `dtengine eval` needs besides the checkpoint, the baselines and the number of seeds."""

    data: EvalDataConfig = field(default_factory=EvalDataConfig)
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    supervised: SupervisedConfig = field(default_factory=SupervisedConfig)
    seed: int = 0
    """Base seed: repeat k of every metric uses seed + k; the random and supervised baselines are built with it."""
    teacher_path: str = ""
    """Teacher for `--baseline teacher` ("" = the one in the run's config; "builtin" = the shipped teacher)."""
    device: str = "auto"
    """"auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"."""
    progress: bool = True
    """Show progress bars."""
