"""Frozen-feature linear probes: features are extracted once per model and split, then probes train on the cache.

Cached features are standardised per channel with train-split statistics. A linear probe could absorb that
affine map itself, so the hypothesis class is unchanged; it only puts every model's levels on the same scale, so
one learning rate and schedule serve all models (raw ResNet levels and whitened teacher maps differ by orders of
magnitude).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from dtengine.data.labelled import LabelledSplit
from dtengine.eval.config import ProbeConfig
from dtengine.eval.heads import LevelwiseLinearHead
from dtengine.eval.metrics import confusion_matrix, mean_iou, pixel_accuracy, top1_accuracy
from dtengine.runtime.device import seeded


@dataclass
class CachedFeatures:
    """One split's frozen features, standardised (see the module docstring)."""

    levels: list[Tensor]
    """fp16 (N, C_l, H_l, W_l) per level, at the level's own resolution."""
    pooled: Tensor
    """fp32 (N, sum C_l): global-average-pooled levels, concatenated."""


@torch.no_grad()
def extract_features(
    source: nn.Module, images: Tensor, batch_size: int, device: torch.device, progress: bool = True
) -> tuple[list[Tensor], Tensor]:
    """Run a frozen source over a split.

    Args:
        source: images in [0, 1] (B, 3, S, S) -> [(B, C_l, H_l, W_l)].
        images: uint8 (N, 3, S, S).
        batch_size: images per forward.
        device: where the source runs.
        progress: show a progress bar.

    Returns:
        (levels: fp32 (N, C_l, H_l, W_l) on CPU, pooled: fp32 (N, sum C_l)).
    """
    source.eval()
    levels: list[Tensor] = []
    pooled = []
    for start in tqdm(range(0, len(images), batch_size), desc="features", disable=not progress, leave=False):
        batch = images[start : start + batch_size].to(device).float().div_(255)  # (B, 3, S, S)
        feats = [f.float().cpu() for f in source(batch)]
        if not levels:  # preallocate: concatenating chunks would hold every level twice
            levels = [torch.empty((len(images), *f.shape[1:])) for f in feats]
        for store, f in zip(levels, feats):
            store[start : start + len(f)] = f
        pooled.append(torch.cat([f.mean(dim=(2, 3)) for f in feats], dim=1))
    return levels, torch.cat(pooled)


def _stats(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    # fp32 is enough: torch reduces with pairwise sums, and a float64 copy of a level would double the memory.
    return x.mean(dim=dims, keepdim=True), x.std(dim=dims, keepdim=True).clamp_min(1e-6)


def cache_features(
    source: nn.Module, train: LabelledSplit, val: LabelledSplit, batch_size: int, device: torch.device, progress=True
) -> tuple[CachedFeatures, CachedFeatures]:
    """Extract, standardise with train statistics, and store (fp16 maps) the features of both splits.

    Returns:
        (train features, held-out features).
    """
    reseed = getattr(source, "reseed", None)
    caches = []
    train_stats = None
    for split_index, split in enumerate((train, val)):
        if reseed is not None:
            reseed(1_000 + split_index)  # the teacher's noise: fixed per split, independent of the other split
        levels, pooled = extract_features(source, split.images, batch_size, device, progress)
        if train_stats is None:
            train_stats = ([_stats(x, (0, 2, 3)) for x in levels], _stats(pooled, (0,)))
        level_stats, (pooled_mean, pooled_std) = train_stats
        stored = []
        for i, (mean, std) in enumerate(level_stats):
            stored.append(((levels[i] - mean) / std).half())
            levels[i] = None  # free the fp32 copy level by level
        caches.append(CachedFeatures(stored, (pooled - pooled_mean) / pooled_std))
    return caches[0], caches[1]


def _predict_dense(head: LevelwiseLinearHead, cache: CachedFeatures, size, grid: int, batch_size: int) -> Tensor:
    preds = []
    with torch.no_grad():
        for start in range(0, cache.pooled.shape[0], batch_size):
            feats = [level[start : start + batch_size] for level in cache.levels]
            preds.append(head(feats, size, grid).argmax(dim=1))
    return torch.cat(preds)  # (N, S, S)


def dense_linear_probe(
    train: CachedFeatures, train_seg: Tensor, val: CachedFeatures, val_seg: Tensor, num_classes: int,
    cfg: ProbeConfig, seed: int, progress: bool = True,
) -> dict[str, float]:  # fmt: skip
    """(a) A 1x1 conv on the upsampled, concatenated levels, trained with cross-entropy at full label resolution.

    Args:
        train, val: cached features of the two splits.
        train_seg, val_seg: int64 (N, S, S) label maps.
        num_classes: K.
        cfg: epochs, batch size, learning rate, weight decay, logit grid.
        seed: probe initialisation and batch order.
        progress: show a progress bar.

    Returns:
        {"miou", "pixel_acc"} on held-out.
    """
    generator = torch.Generator().manual_seed(seed)
    with seeded(seed):
        head = LevelwiseLinearHead([level.shape[1] for level in train.levels], num_classes)
    optimizer = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    size, count = tuple(train_seg.shape[-2:]), train_seg.shape[0]
    steps_per_epoch = max(1, count // cfg.batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.epochs * steps_per_epoch)
    for _ in tqdm(range(cfg.epochs), desc="dense probe", disable=not progress, leave=False):
        order = torch.randperm(count, generator=generator)
        for step in range(steps_per_epoch):
            index = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            logits = head([level[index] for level in train.levels], size, cfg.resolution)  # (B, K, S, S)
            loss = F.cross_entropy(logits, train_seg[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    confusion = confusion_matrix(_predict_dense(head, val, size, cfg.resolution, cfg.batch_size), val_seg, num_classes)
    return {"miou": mean_iou(confusion), "pixel_acc": pixel_accuracy(confusion)}


def global_linear_probe(
    train: CachedFeatures, train_cls: Tensor, val: CachedFeatures, val_cls: Tensor, num_classes: int,
    cfg: ProbeConfig, seed: int,
) -> dict[str, float]:  # fmt: skip
    """(b) A linear classifier on the pooled, concatenated levels (multinomial logistic regression, full batch).

    Args:
        train, val: cached features; only `pooled` (N, sum C_l) is used.
        train_cls, val_cls: int64 (N,) class ids.
        num_classes: K.
        cfg: steps, learning rate, weight decay.
        seed: initialisation.

    Returns:
        {"top1"} on held-out.
    """
    with seeded(seed):
        classifier = nn.Linear(train.pooled.shape[1], num_classes)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=cfg.global_lr, weight_decay=cfg.weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cfg.global_steps)
    for _ in range(cfg.global_steps):
        loss = F.cross_entropy(classifier(train.pooled), train_cls)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    with torch.no_grad():
        return {"top1": top1_accuracy(classifier(val.pooled), val_cls)}
