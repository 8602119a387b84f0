"""The `dali` loader: NVIDIA DALI over the same WebDataset shards and index files as the `wds` loader.

    read    `fn.readers.webdataset` over every shard, each rank its own range of samples (`shard_id` / `num_shards`:
            DALI splits ranks by sample ranges, not by files), shuffled in a seeded buffer
    decode  on the GPU (`device="mixed"`) on CUDA; a CPU pipeline (`device_id=None`) elsewhere
    crop    centre crop (resize the shorter side, bicubic, then crop) or random-resized (a random window, decoded
            alone, resized bilinearly with antialiasing), as `data.crop` says; label maps get the same geometry,
            nearest-neighbour. On the CPU the image (or window) leaves DALI as decoded and torch's vectorised
            uint8 kernels resize it straight into the batch: DALI's CPU resize costs more than its decode,
            torch's an eighth of DALI's.
            Its centre geometry is the wds loader's (decode.py), which DALI's own resize and crop follow: CPU
            and GPU batches agree within 2/255 on average (tested)
    output  uint8 torch tensors (B, 3, S, S) over NHWC memory (channels_last), as DALI's decoders write them: what
            the student reads on CUDA; on the CPU the step's conversion to float writes NCHW in the same pass, so
            no transpose is spent in DALI's threads (one was 13% of the CPU pipeline's time);
            "seg" (B, S, S) and "cls" (B,) when the shards hold them and `labels` is on

Flips and the conversion to float stay in the `Distiller` step, where flips are keyed by sample.

Equal steps: every rank yields floor(smallest rank's samples / batch) batches per epoch and discards the rest of
its own reader epoch, so ranks stay in step and DALI's epochs stay aligned with ours. DALI reuses its output
buffers, so every batch is copied into tensors of its own before it is handed out. Resume is exact: the
pipeline's own checkpoint (`enable_checkpointing=True`) is part of `state()`. DALI cannot skip a corrupt sample
(the pipeline stops): the error names the first corrupt sample of this rank's shards and points to
`dtengine check-shards --fix`; skip-and-count is a wds feature.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from dtengine.data.decode import (
    CorruptSample,
    center_crop,
    center_label_map,
    image_batch,
    load_sample,
    resize_window,
)
from dtengine.data.pipeline import read_shards
from dtengine.data.shard_stream import DataConfig, resolve_shards
from dtengine.data.shards import ensure_index
from dtengine.runtime.errors import DataError

READER = "reader"
IMAGE_EXTENSIONS = "jpg;jpeg;png;webp"


@functools.cache
def dali_unavailable_reason() -> str | None:
    """Why DALI cannot run here (None when it can): imported and a one-sample CPU pipeline built, once."""
    try:
        from nvidia.dali import fn, pipeline_def

        @pipeline_def(batch_size=1, num_threads=1, device_id=None)
        def probe():
            return fn.constant(idata=[1])

        probe().build()
    except Exception as err:  # ImportError, or a broken install raising its own kinds
        return f"nvidia-dali is not usable ({type(err).__name__}: {(str(err).strip().splitlines() or [''])[0][:120]})"
    return None


@dataclass
class _Sizes:
    per_rank: list[int]  # samples in each rank's range
    batches: int  # batches every rank yields per epoch


def _rank_sizes(total: int, world: int, batch: int) -> _Sizes:
    # DALI's split: rank r reads samples [total * r // world, total * (r + 1) // world).
    per_rank = [total * (r + 1) // world - total * r // world for r in range(world)]
    return _Sizes(per_rank, min(per_rank) // batch)


def _pipeline(cfg: DataConfig, shards: list[str], seed: int, rank: int, world: int, device: torch.device,
              labels: bool, checkpoint: bytes | None, resize: bool = True):  # fmt: skip
    """The built DALI pipeline. With `resize` off, images leave it as decoded (a random crop's window alone) and
    the label maps of centre crops whole, for `_cpu_crops` and `_cpu_center_label_maps` to finish."""
    from nvidia.dali import fn, pipeline_def, types

    cuda = device.type == "cuda"
    size = cfg.image_size
    ext = [IMAGE_EXTENSIONS] + (["seg.png", "cls"] if labels else [])

    @pipeline_def(enable_checkpointing=True)
    def pipeline():
        outputs = fn.readers.webdataset(
            paths=shards, index_paths=[s[: -len(".tar")] + ".idx" for s in shards], ext=ext,
            missing_component_behavior="error", shard_id=rank, num_shards=world, stick_to_shard=True,
            random_shuffle=cfg.shuffle_buffer > 0, initial_fill=max(1, cfg.shuffle_buffer), pad_last_batch=True,
            seed=seed, name=READER,
        )  # fmt: skip
        encoded = outputs[0] if labels else outputs
        decoder = "mixed" if cuda else "cpu"
        if cfg.crop == "random_resized":
            anchor, shape = fn.random_crop_generator(
                fn.peek_image_shape(encoded), random_area=list(cfg.crop_scale),
                random_aspect_ratio=list(cfg.crop_ratio), seed=seed + 1,
            )  # fmt: skip
            image = fn.decoders.image_slice(
                encoded, anchor, shape, axes=[0, 1], device=decoder, output_type=types.RGB
            )  # only the window is decoded
            if resize:
                image = fn.resize(image, size=[size, size], interp_type=types.INTERP_LINEAR, antialias=True)
        else:
            image = fn.decoders.image(encoded, device=decoder, output_type=types.RGB)
            if resize:
                image = fn.resize(image, resize_shorter=size, interp_type=types.INTERP_CUBIC, antialias=True)
                image = fn.crop(image, crop=(size, size))
        if not labels:
            return image
        seg = fn.decoders.image(outputs[1], device="cpu", output_type=types.GRAY)
        if cfg.crop == "random_resized":
            seg = fn.slice(seg, anchor, shape, axes=[0, 1])
            seg = fn.resize(seg, size=[size, size], interp_type=types.INTERP_NN, antialias=False)
        elif resize:
            seg = fn.resize(seg, resize_shorter=size, interp_type=types.INTERP_NN, antialias=False)
            seg = fn.crop(seg, crop=(size, size))
        return image, seg, outputs[2]

    built = pipeline(
        batch_size=cfg.batch_size, num_threads=max(1, cfg.num_workers), device_id=(device.index or 0) if cuda else None,
        prefetch_queue_depth=cfg.prefetch, seed=seed, checkpoint=checkpoint,
    )  # fmt: skip
    built.build()
    return built


def _shards_have_labels(shards: list[str]) -> bool:
    with open(shards[0][: -len(".tar")] + ".idx") as index:
        first = index.read().splitlines()[1].split()
    return "seg.png" in first[0::4] and "cls" in first[0::4]


def _cpu_crops(images, size: int, crop: str) -> torch.Tensor:
    """A batch of decoded images or random windows (HWC, each its own size, viewed in DALI's buffers) cropped and
    resized straight into a batch of its own: (B, 3, S, S) uint8 over NHWC memory, the layout DALI's own resize
    writes. One intra-op thread: DALI's threads decode the next batches on the other cores meanwhile (with two,
    bench_input ran 1.6x slower)."""
    batch = image_batch(len(images), size)
    crop_one = resize_window if crop == "random_resized" else center_crop
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i in range(len(images)):
            crop_one(torch.from_numpy(np.asarray(images[i])), size, out=batch[i])
    finally:
        torch.set_num_threads(threads)
    return batch


def _cpu_center_label_maps(maps, images, size: int) -> np.ndarray:
    """Decoded label maps (H, W, 1) centre-cropped as their images are by `_cpu_crops`: (B, S, S)."""
    cropped = []
    for i in range(len(maps)):
        height, width = images[i].shape()[:2]
        cropped.append(center_label_map(Image.fromarray(np.asarray(maps[i])[..., 0]), width, height, size))
    return np.stack(cropped)


_DALI_NOISE = ("Critical error in pipeline:", "Current pipeline object is no longer valid.", "encountered:")


def _dali_reason(err: Exception) -> str:
    """The line of a DALI error that says what went wrong, without its pipeline traceback, stack trace, source
    locations and boilerplate (DALI's messages run to a dozen lines)."""
    lines = [line.strip() for line in str(err).splitlines()]
    if "encountered:" in lines:  # "Error in CPU operator ... with the following traceback: ... encountered: <why>"
        lines = lines[lines.index("encountered:") + 1 :]
    for line in lines:
        if line.startswith("Stacktrace"):
            break
        line = re.sub(r"\[/[^\]]*\]\s*", "", line).strip()  # "[/opt/dali/....cc:123] "
        if line and line not in _DALI_NOISE and not re.match(r"File |which was used|Error in \w+ operator", line):
            return line[:200]
    return type(err).__name__


class DaliBatches:
    """Endless batches from DALI, epoch after epoch, the same number on every rank.

    Args:
        cfg: the data config (shards, image_size, crop, batch_size, num_workers = DALI threads, prefetch, ...).
        seed: seeds DALI's shuffle and crops.
        rank, world_size: this rank's place; each reads its own range of samples.
        device: CUDA (GPU decoding) or CPU.
        state: what `state()` returned, to continue exactly where a checkpoint left off.
        labels: also yield "seg" and "cls" when the shards hold them.
    """

    def __init__(self, cfg: DataConfig, seed: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", state: dict | None = None, labels: bool = False):  # fmt: skip
        self.cfg, self.rank, self.device = cfg, rank, torch.device(device)
        self.shards = resolve_shards(cfg.shards, cfg.builtin_root, cfg.image_size)
        total = sum(ensure_index(shard) for shard in self.shards)  # DALI needs the .idx of every shard
        self.sizes = _rank_sizes(total, world_size, cfg.batch_size)
        if self.sizes.batches == 0:
            raise DataError(
                f"data.shards hold {total} samples: too few for a batch of {cfg.batch_size} on each of "
                f"{world_size} rank(s); lower data.batch_size or add data"
            )
        self.labels = labels and _shards_have_labels(self.shards)
        state = state or {}
        self.epoch, self.batch_in_epoch = int(state.get("epoch", 0)), int(state.get("batch_in_epoch", 0))
        checkpoint = bytes(state["pipeline"].tolist()) if "pipeline" in state else None
        # Images are resized in DALI on the GPU, by torch on the CPU (see the module docstring).
        self.resize_here = self.device.type != "cuda"
        self.pipeline = _pipeline(
            cfg, self.shards, seed, rank, world_size, self.device, self.labels, checkpoint, not self.resize_here
        )  # fmt: skip
        # Reader batches per DALI epoch for this rank (the last one padded); those past `sizes.batches` are dropped.
        self.reader_batches = -(-self.sizes.per_rank[rank] // cfg.batch_size)

    def unused_per_epoch(self) -> int:
        """Samples of an epoch no rank's batches take (each rank stops at the fewest full batches of any)."""
        return sum(self.sizes.per_rank) - self.sizes.batches * self.cfg.batch_size * len(self.sizes.per_rank)

    def _run(self):
        try:
            return self.pipeline.run()
        except RuntimeError as err:
            raise self._explain(err) from None

    def _explain(self, err: RuntimeError) -> DataError:
        for sample in read_shards({"url": url} for url in self.shards):
            if not self.labels:  # only what DALI reads: a bad label map or class it never saw did not stop it
                sample = {key: value for key, value in sample.items() if key not in ("seg.png", "cls")}
            try:
                load_sample(sample, self.cfg.image_size)
            except CorruptSample as bad:
                return DataError(
                    f"DALI stopped at a corrupt sample: {bad.what} '{sample['__key__']}' in shard "
                    f"'{sample['__url__']}' ({bad.detail}); DALI cannot skip it: run `dtengine check-shards --fix "
                    f"{self.cfg.shards}` or use data.loader=wds (which skips and counts)"
                )
        return DataError(
            f"DALI pipeline failed ({_dali_reason(err)}); check the shards with `dtengine check-shards "
            f"{self.cfg.shards}` or try data.loader=wds"
        )

    def _to_torch(self, output) -> torch.Tensor:
        """A batch output as a tensor of its own (DALI reuses its buffers at the next run)."""
        if self.device.type == "cuda":
            from nvidia.dali.plugin.pytorch import feed_ndarray

            dense = output.as_tensor()
            tensor = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(dense, tensor, cuda_stream=torch.cuda.current_stream(self.device))
            return tensor
        return torch.from_numpy(output.as_array())  # as_array copies out of DALI's buffer

    def next(self) -> dict:
        if self.batch_in_epoch == self.sizes.batches:
            for _ in range(self.reader_batches - self.sizes.batches):  # the rest of this rank's reader epoch
                self._run()
            self.epoch, self.batch_in_epoch = self.epoch + 1, 0
        outputs = self._run()
        self.batch_in_epoch += 1
        if self.resize_here:
            images = _cpu_crops(outputs[0], self.cfg.image_size, self.cfg.crop)
        else:
            images = self._to_torch(outputs[0]).permute(0, 3, 1, 2)  # (B, 3, S, S) over NHWC memory: channels_last
        batch = {"image": images, "skipped_corrupt": 0}
        if self.labels:
            if self.resize_here and self.cfg.crop == "center":
                seg = _cpu_center_label_maps(outputs[1], outputs[0], self.cfg.image_size)
            else:
                seg = outputs[1].as_array()[..., 0]
            batch["seg"] = torch.from_numpy(seg.astype(np.int64))
            cls = [bytes(outputs[2].at(i)).decode("ascii").strip() for i in range(len(outputs[2]))]
            batch["cls"] = torch.tensor([int(c) for c in cls], dtype=torch.int64)
        return batch

    def state(self) -> dict:
        """Where the stream is: DALI's pipeline checkpoint (as a uint8 tensor, for weights_only loading) and the
        position in the epoch."""
        checkpoint = np.frombuffer(bytes(self.pipeline.checkpoint()), dtype=np.uint8)
        return {
            "loader": "dali",
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "pipeline": torch.from_numpy(checkpoint.copy()),
        }
