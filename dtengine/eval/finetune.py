"""(c) Label-efficient fine-tuning: the whole backbone plus a light head, trained on a few labelled images.

`train_segmenter` is also the supervised control's training loop, so both use the same head, augmentation and
optimiser; only data, budget and schedule differ.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from dtengine.data.augment import flip_where, random_flip_mask
from dtengine.data.labelled import LabelledSplit
from dtengine.eval.config import FinetuneConfig
from dtengine.eval.heads import LevelwiseLinearHead
from dtengine.eval.metrics import confusion_matrix, mean_iou, pixel_accuracy
from dtengine.runtime.device import seeded


def train_segmenter(
    source: nn.Module, head: LevelwiseLinearHead, split: LabelledSplit, *, steps: int, batch_size: int, lr: float,
    weight_decay: float, seed: int, device: torch.device, cosine: bool = False, desc: str = "train",
    progress: bool = True,
) -> None:  # fmt: skip
    """Train `source` and `head` in place with per-pixel cross-entropy on `split`.

    Batches follow a seeded permutation of the split (re-drawn each pass), each image flipped left-right with
    probability 1/2 from the same generator; the global RNG is untouched.

    Args:
        source: images in [0, 1] -> [(B, C_l, H_l, W_l)], trainable.
        head: per-level logits head on the source's levels.
        split: images uint8 (N, 3, S, S) and seg int64 (N, S, S).
        steps, batch_size, lr, weight_decay: AdamW on all parameters, `steps` steps of `batch_size` images.
        seed: batch order and flips.
        device: where to train.
        cosine: cosine-decay the lr to 0 (else constant).
        desc, progress: progress bar.
    """
    generator = torch.Generator().manual_seed(seed)
    params = [p for p in [*source.parameters(), *head.parameters()] if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps) if cosine else None
    source.train()
    head.train()
    order, cursor = torch.randperm(len(split), generator=generator), 0
    for _ in tqdm(range(steps), desc=desc, disable=not progress, leave=False):
        if cursor + batch_size > len(order):
            order, cursor = torch.randperm(len(split), generator=generator), 0
        index = order[cursor : cursor + batch_size]
        cursor += len(index)
        images = split.images[index].float().div_(255)  # (B, 3, S, S)
        seg = split.seg[index]  # (B, S, S)
        images, seg = flip_where(random_flip_mask(len(index), generator=generator), images, seg)
        images, seg = images.to(device), seg.to(device)
        logits = head(source(images), seg.shape[-2:])  # (B, K, S, S)
        loss = F.cross_entropy(logits, seg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
    source.eval()
    head.eval()


@torch.no_grad()
def evaluate_segmenter(
    source: nn.Module, head: LevelwiseLinearHead, split: LabelledSplit, num_classes: int, batch_size: int,
    device: torch.device,
) -> dict[str, float]:  # fmt: skip
    """mIoU and pixel accuracy of source + head (eval mode) on `split`. Returns: {"miou", "pixel_acc"}."""
    source.eval()
    head.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    for start in range(0, len(split), batch_size):
        images = split.images[start : start + batch_size].to(device).float().div_(255)
        pred = head(source(images), images.shape[-2:]).argmax(dim=1).cpu()  # (B, S, S)
        confusion += confusion_matrix(pred, split.seg[start : start + batch_size], num_classes)
    return {"miou": mean_iou(confusion), "pixel_acc": pixel_accuracy(confusion)}


def finetune_segmentation(
    source: nn.Module, train: LabelledSplit, val: LabelledSplit, num_classes: int, cfg: FinetuneConfig, seed: int,
    device: torch.device, eval_batch_size: int = 64, progress: bool = True,
) -> dict[str, float]:  # fmt: skip
    """Fine-tune a copy of `source` with a fresh BatchNorm + 1x1-conv head on the first `cfg.images` train images.

    Args:
        source: a finetunable feature source (left unchanged; a deep copy is trained).
        train: the train split; only its first `cfg.images` samples are used, the same for every model and seed.
        val: held-out split.
        num_classes: K.
        cfg: images, steps, batch size, learning rate, weight decay.
        seed: head initialisation, batch order and flips.
        device: where to train.
        eval_batch_size, progress: evaluation batch size; progress bar.

    Returns:
        {"miou", "pixel_acc"} on held-out.
    """
    model = copy.deepcopy(source).to(device).requires_grad_(True)
    with seeded(seed):
        head = LevelwiseLinearHead(model.channels, num_classes, norm=True).to(device)
    subset = train.head(cfg.images)
    train_segmenter(
        model, head, subset, steps=cfg.steps, batch_size=min(cfg.batch_size, len(subset)), lr=cfg.lr,
        weight_decay=cfg.weight_decay, seed=seed, device=device, desc="fine-tune", progress=progress,
    )  # fmt: skip
    return evaluate_segmenter(model, head, val, num_classes, eval_batch_size, device)
