"""`dtengine train-interpreter`: fit a `FeatureInterpreter` on the frozen teacher's features of a few labelled
images, then measure its mIoU on held-out shards.

The labelled set is the first `num_labelled` samples with a "seg.png" label map, reading the shards in sorted
order (no shuffling), so the same shards always give the same set. Every step draws a minibatch from it, flips it
(image and labels together) and noises it afresh at the teacher's t, exactly as the teacher's own forward does
during distillation. Writes into out_dir: interpreter.safetensors, interpreter.json (architecture, teacher levels
and config, held-out mIoU), metrics.jsonl.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dtengine.data.augment import flip_where, random_flip_mask
from dtengine.data.builtin import builtin_dataset
from dtengine.data.labelled import LabelledSplit, load_labelled_split
from dtengine.data.shard_stream import DataConfig
from dtengine.eval.metrics import confusion_matrix, mean_iou, per_class_iou, pixel_accuracy
from dtengine.losses.segmentation import IGNORE_INDEX, interpreter_loss
from dtengine.runtime.config import config_to_dict
from dtengine.runtime.device import resolve_device
from dtengine.runtime.errors import ConfigError, DataError, OutputDirError
from dtengine.runtime.io import prepare_output_dir
from dtengine.runtime.logging import MetricsLogger, StepWindow, progress_bar
from dtengine.teachers.build import build_teacher
from dtengine.teachers.config import TeacherConfig
from dtengine.teachers.interpreter import WEIGHTS_FILE, FeatureInterpreter, save_interpreter
from dtengine.teachers.noising import NoisingTeacher

_BUILTIN_PATTERNS = ("builtin", "builtin:train", "builtin:val")


@dataclass
class InterpreterTrainingConfig:
    """`dtengine train-interpreter`."""

    out_dir: str = "runs/interpreter"
    """Folder for interpreter.safetensors + interpreter.json; pass it to distill as distill.interpreter=DIR."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The frozen teacher whose features are read; use the same blocks and t as the distillation run."""
    data: DataConfig = field(default_factory=lambda: DataConfig(shards="builtin:train", batch_size=8))
    """Labelled training shards (need "seg.png"); of this only shards, image_size, batch_size (the minibatch
    drawn from the labelled set each step) and builtin_root are used."""
    val_shards: str = "builtin:val"
    """Held-out labelled shards for the mIoU reported at the end ("" = skip)."""
    num_val: int = 256
    """Held-out images evaluated (the first ones in sorted shard order)."""
    num_labelled: int = 20
    """Labelled training images: the first this many with a label map (paper: a few dozen)."""
    num_classes: int = 0
    """Classes K; 0 = the built-in dataset's class count, or the largest label id seen + 1 for other shards."""
    steps: int = 300
    """Optimizer steps (AdamW, cosine decay)."""
    lr: float = 1e-3
    weight_decay: float = 1e-4
    dice_weight: float = 3.0
    """Weight of the soft Dice term (paper: CE + 3 * Dice)."""
    channels: int = 256
    """Width after fusing the levels (paper: 256); a multiple of 32 for GroupNorm(32)."""
    dropout: float = 0.1
    """Dropout before the logits (paper: 0.1)."""
    output_stride: int = 0
    """Resolution of the fused map and logits, as input pixels per logit pixel (0 = the finest teacher level's
    stride). Logits are upsampled bilinearly to the label maps for the loss and mIoU."""
    seed: int = 0
    device: str = "auto"
    log_every: int = 10
    progress: bool = True

    def __post_init__(self) -> None:
        if self.num_labelled <= 0 or self.steps <= 0 or self.lr <= 0 or self.log_every <= 0 or self.num_val < 0:
            raise ConfigError("num_labelled, steps, lr and log_every must be positive and num_val >= 0")
        if self.channels <= 0 or self.channels % 32:
            raise ConfigError(f"channels must be a positive multiple of 32 (GroupNorm(32)), got {self.channels}")
        if not 0 <= self.dropout < 1 or self.output_stride < 0 or self.num_classes < 0 or self.dice_weight < 0:
            raise ConfigError("dropout must be in [0, 1); output_stride, num_classes and dice_weight >= 0")


def load_labelled_images(pattern: str, count: int, image_size: int, builtin_root: str = "") -> LabelledSplit:
    """The first `count` samples with a label map, in sorted shard order (unlabelled samples are passed over).

    Raises:
        DataError: the shards hold no label maps, or fewer than `count` labelled samples.
    """
    split = load_labelled_split(
        pattern, image_size, builtin_root=builtin_root, limit=count, labels=("seg",), skip_unlabelled=True
    )
    if len(split) < count:
        raise DataError(f"shards '{pattern}' hold only {len(split)} labelled samples; lower the count to at most that")
    return split


def _num_classes(cfg: InterpreterTrainingConfig, *label_sets: torch.Tensor) -> int:
    if cfg.num_classes:
        return cfg.num_classes
    if cfg.data.shards.strip() in _BUILTIN_PATTERNS:
        return len(builtin_dataset(cfg.data.builtin_root or None, image_size=cfg.data.image_size).classes)
    return max(int(labels[labels != IGNORE_INDEX].max()) for labels in label_sets) + 1


@torch.no_grad()
def evaluate_interpreter(
    teacher: NoisingTeacher, interpreter: FeatureInterpreter, split: LabelledSplit, batch: int
) -> dict:
    """Held-out mIoU, pixel accuracy and per-class IoU of the interpreter's argmax at the labels' resolution."""
    interpreter.eval()
    device = next(interpreter.parameters()).device
    confusion = torch.zeros(interpreter.num_classes, interpreter.num_classes, dtype=torch.long)
    for start in range(0, len(split), batch):
        x = split.images[start : start + batch].to(device).float().div_(255)  # (B, 3, S, S)
        y = split.seg[start : start + batch]
        logits = interpreter(teacher(x).features, out_size=y.shape[-2:])  # (B, K, S, S)
        confusion += confusion_matrix(logits.argmax(1).cpu(), y, interpreter.num_classes)
    return {
        "miou": mean_iou(confusion),
        "pixel_accuracy": pixel_accuracy(confusion),
        "per_class_iou": per_class_iou(confusion),
        "images": len(split),
    }


def train_interpreter(cfg: InterpreterTrainingConfig) -> tuple[Path, dict | None]:
    """Train, evaluate and save the interpreter as configured.

    Returns:
        (path of interpreter.safetensors, held-out metrics dict or None when val_shards is "").
    """

    out_dir = prepare_output_dir(cfg.out_dir, fix="choose another with out_dir=DIR")
    if (out_dir / WEIGHTS_FILE).exists():
        raise OutputDirError(f"'{out_dir}' already holds an interpreter; choose a new out_dir")
    train = load_labelled_images(cfg.data.shards, cfg.num_labelled, cfg.data.image_size, cfg.data.builtin_root)
    val = None
    if cfg.val_shards and cfg.num_val:
        val = load_labelled_images(cfg.val_shards, cfg.num_val, cfg.data.image_size, cfg.data.builtin_root)
    num_classes = _num_classes(cfg, train.seg, *([val.seg] if val else []))
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    with _flush_denormals(device.type == "cpu"):
        return _fit_and_save(cfg, device, out_dir, train, val, num_classes)


@contextmanager
def _flush_denormals(enabled: bool):
    """Real images drive some activations subnormal; on CPU that made a step ~5x slower (2.96 s -> 0.57 s at
    batch 8, 64 px). Flushing them to zero changes nothing measurable; the setting is process-wide, so it is put
    back to torch's default (off; torch has no getter) afterwards."""
    if enabled:
        torch.set_flush_denormal(True)
    try:
        yield
    finally:
        if enabled:
            torch.set_flush_denormal(False)


def _fit_and_save(cfg, device, out_dir, train: LabelledSplit, val, num_classes) -> tuple[Path, dict | None]:
    teacher = build_teacher(cfg.teacher, device)
    teacher.check_image_size(cfg.data.image_size)
    interpreter = FeatureInterpreter(teacher.levels, num_classes, cfg.channels, cfg.dropout, cfg.output_stride)
    interpreter = interpreter.to(device)
    optimizer = torch.optim.AdamW(interpreter.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.steps)
    metrics = MetricsLogger(out_dir, tensorboard=False)
    sampler = torch.Generator().manual_seed(cfg.seed)
    batch_size = min(cfg.data.batch_size, len(train))

    interpreter.train()
    bar = progress_bar(cfg.steps, "train-interpreter", enabled=cfg.progress)
    window = StepWindow()
    for step in range(1, cfg.steps + 1):
        index = torch.randperm(len(train), generator=sampler)[:batch_size]
        x, y = train.images[index].float().div_(255), train.seg[index]  # (B, 3, S, S), (B, S, S)
        x, y = flip_where(random_flip_mask(len(index), generator=sampler), x, y)
        features = teacher(x.to(device)).features  # fresh noise at t each step
        terms = interpreter_loss(interpreter(features, out_size=y.shape[-2:]), y.to(device), cfg.dice_weight)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        schedule.step()
        window.add_tensors(terms)
        window.add(steps=1, images=batch_size)
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            sums = window.pull()
            row = {name: sums[name] / sums["steps"] for name in terms}
            row["img_per_s"] = sums["images"] / sums["seconds"]
            metrics.log(step, row)
            bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.1f}", refresh=False)
    bar.close()

    held_out = evaluate_interpreter(teacher, interpreter, val, cfg.data.batch_size) if val else None
    if held_out is not None:
        metrics.log(cfg.steps, {"val_miou": held_out["miou"], "val_pixel_accuracy": held_out["pixel_accuracy"]})
    metrics.close()
    extra = {"teacher": config_to_dict(cfg.teacher), "val": held_out, "config": config_to_dict(cfg)}
    return save_interpreter(interpreter.eval(), out_dir, extra), held_out
