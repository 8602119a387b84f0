"""ADM, the paper's teacher: guided-diffusion's U-Net, loaded from a released `*.pt` checkpoint.

The network is restated here with guided-diffusion's module names and nesting, so a checkpoint's state dict
loads with strict key matching (every key used, every shape checked) and nothing has to be converted. Three
details the released checkpoints depend on, all checked against the original code by a golden test:

- GroupNorm runs in fp32 and is cast back to the input's dtype (the checkpoints were trained in fp16 that way);
- the legacy attention layout: the qkv projection's 3C outputs are grouped per head as (q | k | v), not as
  (all q | all k | all v) (`use_new_attention_order=True` selects the latter);
- the timestep embedding is (cos | sin) of t * 10000^(-i / half), on the raw step index.

Self-attention runs through `dtengine.ops.attention` (the Triton kernel on CUDA, SDPA otherwise) with q, k and v
as (B, heads, tokens, head_dim) views of one projection, so no transposed copy is made. `teacher.blocks` are
0-based indices into `output_blocks`; the forward stops after the last one requested.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtengine.levels import TeacherLevel
from dtengine.ops import attention
from dtengine.runtime.device import seeded
from dtengine.runtime.errors import ConfigError, TeacherError
from dtengine.teachers.noising import NoisingTeacher, state_dict_mismatch

PRESETS = {
    # The released unconditional 256 px checkpoints (guided-diffusion's README, MODEL_FLAGS): ImageNet
    # (256x256_diffusion_uncond.pt) and LSUN bedroom / cat / horse. Dropout differs between them; it is
    # inactive in a frozen teacher, so one preset serves each family.
    "imagenet256-uncond": dict(
        image_size=256,
        num_channels=256,
        num_res_blocks=2,
        channel_mult="",
        attention_resolutions="32,16,8",
        num_heads=4,
        num_head_channels=64,
        num_heads_upsample=-1,
        use_scale_shift_norm=True,
        resblock_updown=True,
        learn_sigma=True,
        use_new_attention_order=False,
        class_cond=False,
        diffusion_steps=1000,
        noise_schedule="linear",
    ),  # fmt: skip
}
PRESETS["lsun256"] = dict(PRESETS["imagenet256-uncond"])
DEFAULT_CHANNEL_MULT = {512: "0.5,1,1,2,2,4,4", 256: "1,1,2,2,4,4", 128: "1,1,2,3,4", 64: "1,2,3,4"}
NOISE_SCHEDULES = {"linear": "linear", "cosine": "squaredcos_cap_v2"}  # guided-diffusion name -> diffusers name


@dataclass
class ADMConfig:
    """guided-diffusion's model flags, named exactly as its scripts take them. Unset flags come from `preset`,
    else from guided-diffusion's defaults (`model_and_diffusion_defaults`)."""

    preset: str = ""
    """"imagenet256-uncond" or "lsun256": the flags of the released unconditional 256 px checkpoints."""
    image_size: int | None = None
    num_channels: int | None = None
    num_res_blocks: int | None = None
    channel_mult: str | None = None
    """e.g. "1,1,2,2,4,4"; "" = guided-diffusion's default for image_size."""
    attention_resolutions: str | None = None
    """Feature-map sizes (in pixels, of image_size) that get self-attention, e.g. "32,16,8"."""
    num_heads: int | None = None
    num_head_channels: int | None = None
    """Channels per attention head; -1 = use num_heads heads instead."""
    num_heads_upsample: int | None = None
    use_scale_shift_norm: bool | None = None
    resblock_updown: bool | None = None
    learn_sigma: bool | None = None
    use_new_attention_order: bool | None = None
    class_cond: bool | None = None
    diffusion_steps: int | None = None
    noise_schedule: str | None = None
    """"linear" or "cosine"."""

    def __post_init__(self) -> None:
        if self.preset and self.preset not in PRESETS:
            raise ConfigError(f"teacher.adm.preset must be one of {sorted(PRESETS)} or empty, got {self.preset!r}")
        if self.class_cond:
            raise ConfigError(
                "teacher.adm.class_cond=true: class-conditional ADM checkpoints need a label for every image, "
                "which distillation does not have; use an unconditional checkpoint (e.g. preset imagenet256-uncond)"
            )
        if self.noise_schedule is not None and self.noise_schedule not in NOISE_SCHEDULES:
            raise ConfigError(f"teacher.adm.noise_schedule must be one of {sorted(NOISE_SCHEDULES)}")

    def resolved(self) -> ADMConfig:
        """Every flag set: the explicit ones, then the preset's, then guided-diffusion's defaults. (Resolved at
        build time, not on load, so that a preset given after the defaults still applies.)"""
        defaults = PRESETS.get(self.preset, GUIDED_DIFFUSION_DEFAULTS)
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        full = ADMConfig(**{k: defaults[k] if v is None and k != "preset" else v for k, v in values.items()})
        full.multipliers()
        full.attention_strides()
        return full

    def multipliers(self) -> list[float]:
        text = self.channel_mult or DEFAULT_CHANNEL_MULT.get(self.image_size)
        if text is None:
            raise ConfigError(
                f"teacher.adm.channel_mult is empty and guided-diffusion has no default for image_size "
                f"{self.image_size}; set it, e.g. channel_mult=1,1,2,2,4,4"
            )
        try:
            return [float(m) for m in text.split(",")]
        except ValueError:
            raise ConfigError(f"teacher.adm.channel_mult {text!r} is not a comma-separated list of numbers") from None

    def attention_strides(self) -> set[int]:
        """The downsampling factors with attention (guided-diffusion turns resolutions into these)."""
        try:
            return {self.image_size // int(res) for res in self.attention_resolutions.split(",") if res.strip()}
        except ValueError:
            raise ConfigError(
                f"teacher.adm.attention_resolutions {self.attention_resolutions!r} is not a comma-separated list "
                "of feature-map sizes, e.g. 32,16,8"
            ) from None


GUIDED_DIFFUSION_DEFAULTS = dict(
    image_size=64, num_channels=128, num_res_blocks=2, channel_mult="", attention_resolutions="16,8", num_heads=4,
    num_head_channels=-1, num_heads_upsample=-1, use_scale_shift_norm=True, resblock_updown=False, learn_sigma=False,
    use_new_attention_order=False, class_cond=False, diffusion_steps=1000, noise_schedule="linear",
)  # fmt: skip


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32) computed in fp32 and cast back: how the checkpoints were trained, and what bf16 needs."""

    def __init__(self, channels: int):
        super().__init__(32, channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x.float(), self.num_groups, self.weight.float(), self.bias.float(), self.eps).to(x.dtype)


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """(B,) step indices -> (B, dim) sinusoidal embedding, cos half first."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    angles = timesteps.float()[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    return F.pad(embedding, (0, dim % 2))


class Upsample(nn.Module):
    """Nearest 2x, then a 3x3 conv when `use_conv`."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else None

    def forward(self, x: Tensor) -> Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return x if self.conv is None else self.conv(x)


class Downsample(nn.Module):
    """A stride-2 3x3 conv when `use_conv`, else 2x2 average pooling."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class ResBlock(nn.Module):
    """Norm-act-conv twice, with the timestep embedding added (or applied as scale and shift) in between; `up` /
    `down` resample inside the block, after the first norm-act."""

    def __init__(self, channels: int, emb_channels: int, out_channels: int, scale_shift: bool, resample: str = ""):
        super().__init__()
        self.scale_shift = scale_shift
        self.in_layers = nn.Sequential(
            GroupNorm32(channels), nn.SiLU(), nn.Conv2d(channels, out_channels, 3, padding=1)
        )
        resampler = {"up": lambda: Upsample(channels, False), "down": lambda: Downsample(channels, False)}
        self.h_upd = resampler[resample]() if resample else nn.Identity()
        self.x_upd = resampler[resample]() if resample else nn.Identity()
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels * (2 if scale_shift else 1)))
        self.out_layers = nn.Sequential(
            GroupNorm32(out_channels), nn.SiLU(), nn.Dropout(0.0), nn.Conv2d(out_channels, out_channels, 3, padding=1)
        )
        self.skip_connection = nn.Identity() if out_channels == channels else nn.Conv2d(channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.in_layers[:-1](x)
        h = self.in_layers[-1](self.h_upd(h))
        x = self.x_upd(x)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        if self.scale_shift:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Residual self-attention over all pixels: GroupNorm, a 1x1 qkv projection, attention, a 1x1 projection."""

    def __init__(self, channels: int, heads: int, legacy_order: bool):
        super().__init__()
        if channels % heads:
            raise ConfigError(f"ADM attention: {channels} channels do not split into {heads} heads")
        self.heads, self.legacy_order = heads, legacy_order
        self.norm = GroupNorm32(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv1d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        head_dim = channels // self.heads
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        qkv = F.linear(tokens, self.qkv.weight[:, :, 0], self.qkv.bias)  # (B, N, 3C), contiguous
        # Legacy: the 3C outputs are heads x (q | k | v); new order: (q | k | v) x heads.
        split = (self.heads, 3) if self.legacy_order else (3, self.heads)
        qkv = qkv.view(batch, height * width, *split, head_dim)
        q, k, v = (qkv.select(3 if self.legacy_order else 2, i).transpose(1, 2) for i in range(3))  # (B, h, N, d)
        out = attention(q, k, v, scale=head_dim**-0.5).transpose(1, 2).reshape(batch, height * width, channels)
        out = F.linear(out, self.proj_out.weight[:, :, 0], self.proj_out.bias)
        return x + out.transpose(1, 2).reshape(batch, channels, height, width)


class TimestepSequential(nn.Sequential):
    """Layers run in order; residual blocks also get the timestep embedding."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


def is_upsampler(layer: nn.Module) -> bool:
    return isinstance(layer, Upsample) or (isinstance(layer, ResBlock) and isinstance(layer.h_upd, Upsample))


class ADMUNet(nn.Module):
    """guided-diffusion's `UNetModel` (2-D, unconditional), with its parameter names.

    Besides the layers it records, per output block, the channels it produces and its stride before and after
    its upsampler (`output_levels`), which is all a teacher needs to describe its taps without a dry run.
    """

    def __init__(self, cfg: ADMConfig):
        super().__init__()
        cfg = cfg.resolved()
        ch = self.model_channels = cfg.num_channels
        emb_channels = 4 * ch
        mults = cfg.multipliers()
        attention_strides = cfg.attention_strides()
        heads_down = cfg.num_heads
        heads_up = cfg.num_heads if cfg.num_heads_upsample == -1 else cfg.num_heads_upsample

        def attention_block(channels: int, heads: int) -> AttentionBlock:
            if cfg.num_head_channels != -1:
                if channels % cfg.num_head_channels:
                    raise ConfigError(
                        f"teacher.adm.num_head_channels {cfg.num_head_channels} does not divide {channels} channels"
                    )
                heads = channels // cfg.num_head_channels
            return AttentionBlock(channels, heads, legacy_order=not cfg.use_new_attention_order)

        def res_block(channels: int, out: int, resample: str = "") -> ResBlock:
            return ResBlock(channels, emb_channels, out, cfg.use_scale_shift_norm, resample)

        self.time_embed = nn.Sequential(nn.Linear(ch, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))
        ch = int(mults[0] * cfg.num_channels)
        first = ch
        self.input_blocks = nn.ModuleList([TimestepSequential(nn.Conv2d(3, ch, 3, padding=1))])
        skip_channels, stride = [ch], 1
        for level, mult in enumerate(mults):
            for _ in range(cfg.num_res_blocks):
                layers = [res_block(ch, int(mult * cfg.num_channels))]
                ch = int(mult * cfg.num_channels)
                if stride in attention_strides:
                    layers.append(attention_block(ch, heads_down))
                self.input_blocks.append(TimestepSequential(*layers))
                skip_channels.append(ch)
            if level != len(mults) - 1:
                down = res_block(ch, ch, "down") if cfg.resblock_updown else Downsample(ch, use_conv=True)
                self.input_blocks.append(TimestepSequential(down))
                skip_channels.append(ch)
                stride *= 2
        self.total_stride = stride

        self.middle_block = TimestepSequential(res_block(ch, ch), attention_block(ch, heads_down), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        self.output_levels: list[tuple[int, int, int]] = []  # (channels, stride before, stride after upsampler)
        for level, mult in reversed(list(enumerate(mults))):
            for index in range(cfg.num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), int(cfg.num_channels * mult))]
                ch = int(cfg.num_channels * mult)
                if stride in attention_strides:
                    layers.append(attention_block(ch, heads_up))
                before = stride
                if level and index == cfg.num_res_blocks:
                    layers.append(res_block(ch, ch, "up") if cfg.resblock_updown else Upsample(ch, use_conv=True))
                    stride //= 2
                self.output_blocks.append(TimestepSequential(*layers))
                self.output_levels.append((ch, before, stride))

        out_channels = 6 if cfg.learn_sigma else 3
        self.out = nn.Sequential(GroupNorm32(ch), nn.SiLU(), nn.Conv2d(first, out_channels, 3, padding=1))

    def forward(self, x: Tensor, timesteps: Tensor) -> Tensor:
        """The full network: (B, 3, H, W) noisy images, (B,) steps -> (B, 3 or 6, H, W) eps (and variance)."""
        _, h = self.run(x, timesteps, taps=range(len(self.output_blocks)), before_upsample=False)
        return self.out(h)

    def run(
        self, x: Tensor, timesteps: Tensor, taps, before_upsample: bool
    ) -> tuple[list[Tensor], Tensor]:  # fmt: skip
        """Up to output block max(taps); returns (the tapped features, the last block's output).

        A tap reads `output_blocks[i]`'s output exactly as guided-diffusion's forward computes it, or, with
        `before_upsample`, the input of the block's upsampler (the block's output when it has none).
        """
        taps = set(taps)
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels))
        h, skips = x, []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        features = []
        for index, block in enumerate(self.output_blocks[: max(taps) + 1]):
            h = torch.cat([h, skips.pop()], dim=1)
            if before_upsample and index in taps and is_upsampler(block[-1]):
                h = block[:-1](h, emb)
                features.append(h)
                h = block[-1](h, emb) if isinstance(block[-1], ResBlock) else block[-1](h)
                continue
            h = block(h, emb)
            if index in taps:
                features.append(h)
        return features, h

    def levels(self, taps: list[int], before_upsample: bool) -> list[TeacherLevel]:
        described = []
        for tap in taps:
            channels, before, after = self.output_levels[tap]
            described.append(TeacherLevel(block=tap, stride=before if before_upsample else after, channels=channels))
        return described


def load_adm_state_dict(path: str) -> dict[str, Tensor]:
    """A guided-diffusion checkpoint's state dict, read with `weights_only=True` (no code in it can run)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise TeacherError(
            f"ADM checkpoint '{file}' does not exist; set teacher.path to a guided-diffusion .pt file "
            "(e.g. 256x256_diffusion_uncond.pt)"
        )
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch.load raises many types for corrupt / foreign files
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TeacherError(f"cannot read ADM checkpoint '{file}': {first_line}") from None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise TeacherError(
            f"ADM checkpoint '{file}' is not a state dict of tensors (guided-diffusion saves model.state_dict())"
        )
    return state


def load_strict(model: ADMUNet, state: dict[str, Tensor], source: str) -> None:
    """Copy `state` into `model`; any key missing, unexpected or of another shape is an error naming them."""
    problems, unexpected = state_dict_mismatch(model, state)
    if problems:
        hint = " (label_emb: a class-conditional checkpoint)" if "label_emb.weight" in unexpected else ""
        raise TeacherError(
            f"ADM checkpoint '{source}' does not match the teacher.adm flags: {problems}{hint}; set "
            "teacher.adm.preset or the flags (named as guided-diffusion's MODEL_FLAGS) to the checkpoint's"
        )
    model.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)


def adm_scheduler(cfg: ADMConfig):
    """guided-diffusion's forward process as a `DDPMScheduler`: its linear betas (scaled by 1000 / steps, as
    guided-diffusion does) or its cosine schedule (diffusers' squaredcos_cap_v2, the same alpha-bar)."""
    from diffusers import DDPMScheduler

    scale = 1000 / cfg.diffusion_steps
    return DDPMScheduler(
        num_train_timesteps=cfg.diffusion_steps,
        beta_schedule=NOISE_SCHEDULES[cfg.noise_schedule],
        beta_start=0.0001 * scale,
        beta_end=0.02 * scale,
    )


class ADMTeacher(NoisingTeacher):
    """A frozen ADM U-Net read at `teacher.blocks` (indices of `output_blocks`) at step `teacher.timestep`."""

    def __init__(self, unet: ADMUNet, scheduler: object, cfg):
        super().__init__(unet, scheduler, cfg)
        self.before_upsample = cfg.feature_point == "before_upsample"
        count = len(unet.output_blocks)
        blocks = self.resolve_blocks(unet.levels(list(range(count)), self.before_upsample), count, "output block")
        self.levels = unet.levels(blocks, self.before_upsample)

    @property
    def total_stride(self) -> int:
        return self.unet.total_stride

    def features(self, x_t: Tensor, timesteps: Tensor) -> list[Tensor]:
        features, _ = self.unet.run(x_t, timesteps, self.cfg.blocks, self.before_upsample)
        return features


def build_adm_teacher(cfg, device: torch.device | str = "cpu", load_weights: bool = True) -> ADMTeacher:
    """The ADM teacher `cfg` (a `TeacherConfig` of kind "adm") describes, on `device`.

    Args:
        load_weights: False builds the architecture only (on the meta device it costs no memory), for
            describing the teacher without reading its checkpoint.
    """
    flags = cfg.adm.resolved()
    if load_weights and cfg.weights == "trained":
        if cfg.path in ("", "builtin"):
            raise ConfigError(
                "teacher.kind=adm needs teacher.path=FILE, a guided-diffusion checkpoint (e.g. "
                "256x256_diffusion_uncond.pt), or teacher.weights=untrained"
            )
        state = load_adm_state_dict(cfg.path)
        unet = ADMUNet(flags)
        load_strict(unet, state, cfg.path)
    else:
        with seeded(cfg.untrained_seed):
            unet = ADMUNet(flags)
    return ADMTeacher(unet, adm_scheduler(flags), cfg).to(device)
