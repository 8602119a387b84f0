"""The positive control: the student architecture trained from scratch with full supervision on the train split.

If the evaluation protocol cannot tell this model from random init, the protocol is broken, not the student.
The trained backbone is frozen and then evaluated like every other model (its head is discarded).
"""

from __future__ import annotations

import torch

from dtengine.data.labelled import LabelledSplit
from dtengine.eval.config import SupervisedConfig
from dtengine.eval.finetune import train_segmenter
from dtengine.eval.heads import LevelwiseLinearHead
from dtengine.eval.sources import BackboneSource, random_source
from dtengine.runtime.device import seeded


def supervised_source(
    model_name: str, train: LabelledSplit, num_classes: int, cfg: SupervisedConfig, seed: int, device: torch.device,
    progress: bool = True,
) -> BackboneSource:  # fmt: skip
    """Train `model_name` from its seeded random init with per-pixel cross-entropy on every train image.

    Args:
        model_name: timm name of the student architecture.
        train: the whole train split (images and seg).
        num_classes: K.
        cfg: steps, batch size, peak lr (cosine to 0), weight decay.
        seed: initialisation, batch order and flips.
        device: where to train.
        progress: progress bar.

    Returns:
        The trained backbone as a frozen source in eval mode.
    """
    source = random_source(model_name, seed).to(device)
    with seeded(seed):
        head = LevelwiseLinearHead(source.channels, num_classes, norm=True).to(device)
    train_segmenter(
        source, head, train, steps=cfg.steps, batch_size=min(cfg.batch_size, len(train)), lr=cfg.lr,
        weight_decay=cfg.weight_decay, seed=seed, device=device, cosine=True, desc="supervised control",
        progress=progress,
    )  # fmt: skip
    return source.eval().requires_grad_(False)
