"""The baseline of bench_step's `naive` mode: DreamTeacher distillation as a competent user writes it by hand.

Plain eager PyTorch from the paper, nothing of the engine's machinery:

    data      torchvision ImageFolder over JPEG files + DataLoader (resize, centre crop, flip, ToTensor in workers)
    teacher   the U-Net's full forward (all decoder blocks and the output head), features taken with forward
              hooks on the tapped decoder blocks (diffusers U-Net or ADM)
    loss      the unfused fp32 reference of the feature loss
    step      torch.optim.AdamW with its defaults, gradient clipping, `loss.item()` for the progress display
    on CUDA   bf16 autocast and cudnn.benchmark, like the engine, so a ratio is never a precision gap

The student model is the engine's (timm backbone + PPM/FPN regressor): same architecture, same FLOPs, so the
comparison is about how the step is run, not what it computes.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn
from torchvision import datasets, transforms

from dtengine.ops import feature_regression_loss_reference


def decoder_taps(unet: nn.Module, blocks: list[int]) -> list[tuple[nn.Module, bool]]:
    """(module, read its input rather than its output) per tapped decoder block: the features before upsampling."""
    taps = []
    if hasattr(unet, "output_blocks"):  # ADM: a block ends in its upsampler when it has one
        for index in blocks:
            block = unet.output_blocks[index]
            upsamples = (
                block[-1].__class__.__name__ == "Upsample"
                or getattr(block[-1], "h_upd", None).__class__.__name__ == "Upsample"
            )
            taps.append((block[-1], True) if upsamples else (block, False))
        return taps
    for index in blocks:
        block = unet.up_blocks[index]
        attentions = getattr(block, "attentions", None)
        taps.append((attentions[-1] if attentions else block.resnets[-1], False))
    return taps


class NaiveDistillation:
    """One hand-written training step, split in the parts bench_step times."""

    def __init__(self, unet, scheduler, blocks, timestep, student, image_folder: Path, image_size, batch_size,
                 workers, lr, device):  # fmt: skip
        self.unet, self.scheduler, self.timestep, self.student, self.device = unet, scheduler, timestep, student, device
        self.features: list[torch.Tensor] = []
        for tap, reads_input in decoder_taps(unet, blocks):
            if reads_input:
                tap.register_forward_pre_hook(lambda module, args: self.features.append(args[0]))
            else:
                tap.register_forward_hook(lambda module, args, output: self.features.append(output))
        transform = transforms.Compose([
            transforms.Resize(image_size), transforms.CenterCrop(image_size),
            transforms.RandomHorizontalFlip(), transforms.ToTensor(),
        ])  # fmt: skip
        dataset = datasets.ImageFolder(str(image_folder), transform=transform)
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
            pin_memory=device.type == "cuda", persistent_workers=workers > 0,
        )  # fmt: skip
        self.batches = iter(self.loader)
        self.optimizer = torch.optim.AdamW(student.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
        self.autocast = (
            torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
        )
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.last_loss = 0.0

    def next_batch(self) -> torch.Tensor:
        try:
            images, _ = next(self.batches)
        except StopIteration:
            self.batches = iter(self.loader)
            images, _ = next(self.batches)
        return images

    def to_device(self, images: torch.Tensor) -> torch.Tensor:
        return images.to(self.device, non_blocking=True)

    @torch.no_grad()
    def teacher_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        x0 = images * 2 - 1
        t = torch.full((x0.shape[0],), self.timestep, device=x0.device, dtype=torch.long)
        noisy = self.scheduler.add_noise(x0, torch.randn_like(x0), t)
        self.features = []
        with self.autocast:
            self.unet(noisy, t)
        return self.features

    def student_backward(self, images: torch.Tensor, targets: list[torch.Tensor]) -> torch.Tensor:
        with self.autocast:
            predicted = self.student(images, [f.shape[-2:] for f in targets]).features
        loss = feature_regression_loss_reference(predicted, targets).loss
        loss.backward()
        return loss

    def optimizer_step(self, loss: torch.Tensor) -> None:
        torch.nn.utils.clip_grad_norm_(self.student.parameters(), 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.last_loss = loss.item()  # what a progress bar shows every step

    def step(self) -> None:
        images = self.to_device(self.next_batch())
        self.optimizer_step(self.student_backward(images, self.teacher_features(images)))
