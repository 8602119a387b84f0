"""Latent teachers: a VAE encodes the image, the latent is noised to step t, one network pass reads features.

Two kinds share this: `latent_unet`, a Stable-Diffusion-style `UNet2DConditionModel` read at its up blocks with
the empty-prompt text embedding, and `dit`, a `DiTTransformer2DModel` read at its transformer blocks with the
null class label. Both load from a local pipeline folder (`vae/`, `unet/` or `transformer/`, `scheduler/`).

Strides are reported relative to the input image (the VAE's stride, 8 for SD and DiT, times the network's), so
level matching with the student works as for pixel teachers. The latent is the VAE posterior's mean (scaled by
the VAE's `scaling_factor`): sampling it would add a second, unkeyed noise on top of the diffusion noise.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dtengine.levels import TeacherLevel
from dtengine.runtime.device import seeded
from dtengine.runtime.errors import ConfigError, TeacherError
from dtengine.runtime.io import atomic_write, cache_dir
from dtengine.teachers.attention_processor import use_dtengine_attention
from dtengine.teachers.diffusion import SUPPORTED_UP_BLOCKS, decoder_taps, unet_levels
from dtengine.teachers.noising import NoisingTeacher

EMPTY_PROMPT_FILE = "empty_prompt_embedding.safetensors"
LATENT_UP_BLOCKS = (*SUPPORTED_UP_BLOCKS, "CrossAttnUpBlock2D")


def _component(root: Path, name: str, cls_name: str):
    """diffusers model `cls_name` from `root/name`, offline, with one-line errors naming the folder."""
    import diffusers

    folder = root / name
    if not (folder / "config.json").is_file():
        raise TeacherError(
            f"teacher folder '{root}' has no {name}/config.json; a latent teacher needs a local pipeline folder "
            f"with vae/ and {name}/ (as saved by diffusers' save_pretrained)"
        )
    found = json.loads((folder / "config.json").read_text()).get("_class_name")
    if found != cls_name:
        raise TeacherError(f"teacher folder '{folder}' holds a {found}, expected a {cls_name}")
    try:
        return getattr(diffusers, cls_name).from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise TeacherError(f"cannot load {cls_name} from '{folder}': {first_line}") from err


def _architecture(root: Path, name: str, cls_name: str):
    """The same model from its config alone (random weights; free on the meta device)."""
    import diffusers

    cls = getattr(diffusers, cls_name)
    if not (root / name / "config.json").is_file():
        raise TeacherError(f"teacher folder '{root}' has no {name}/config.json")
    return cls.from_config(cls.load_config(root / name))


def _scheduler(root: Path):
    """The folder's forward process as a DDPMScheduler (any diffusers scheduler config carries the betas)."""
    from diffusers import DDPMScheduler

    folder = root / "scheduler"
    if (folder / "scheduler_config.json").is_file():
        return DDPMScheduler.from_config(DDPMScheduler.load_config(folder))
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


class LatentTeacher(NoisingTeacher):
    """A frozen VAE + latent diffusion network; `features` sees latents, strides count input pixels."""

    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler: object, cfg):
        super().__init__(unet, scheduler, cfg)
        self.vae = vae.eval().requires_grad_(False)
        self.latent_stride = 2 ** (len(vae.config.block_out_channels) - 1)
        self.latent_channels = vae.config.latent_channels
        self.scaling_factor = vae.config.scaling_factor
        if cfg.attention == "dtengine":
            use_dtengine_attention(self.unet)

    def encode(self, pixels: Tensor) -> Tensor:
        return self.vae.encode(pixels).latent_dist.mean * self.scaling_factor

    def noise_for(self, x0: Tensor, noise: Tensor) -> Tensor:
        # The caller's noise has the image's shape (keyed per sample); its pixels regrouped per latent pixel are
        # still independent standard normals, so the latent takes the first `latent_channels` of them.
        if self.latent_stride**2 * noise.shape[1] < x0.shape[1]:
            raise TeacherError(f"image noise {tuple(noise.shape)} cannot fill a latent of {tuple(x0.shape)}")
        return F.pixel_unshuffle(noise, self.latent_stride)[:, : x0.shape[1]]


class LatentUNetTeacher(LatentTeacher):
    """Stable-Diffusion-style: `UNet2DConditionModel` up blocks, conditioned on a fixed prompt embedding."""

    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler: object, cfg, prompt_embedding: Tensor):
        super().__init__(unet, vae, scheduler, cfg)
        if unet.config.addition_embed_type is not None or unet.class_embedding is not None:
            raise TeacherError(
                "latent U-Nets with added conditions (SDXL-style text_time embeddings, class embeddings) are not "
                "supported as teachers; use a Stable-Diffusion-1.x/2.x-style UNet2DConditionModel"
            )
        count = len(unet.up_blocks)
        every_level = unet_levels(unet, range(count), cfg.feature_point, self.latent_stride)
        blocks = self.resolve_blocks(every_level, count, "up block")
        for index, block in enumerate(unet.up_blocks[: max(blocks) + 1]):
            if type(block).__name__ not in LATENT_UP_BLOCKS:
                raise TeacherError(
                    f"teacher up block {index} is a {type(block).__name__}; supported: {LATENT_UP_BLOCKS}"
                )
        self.register_buffer("prompt_embedding", prompt_embedding.float(), persistent=False)
        self.levels = unet_levels(unet, blocks, cfg.feature_point, self.latent_stride)

    @property
    def total_stride(self) -> int:
        return self.latent_stride * 2 ** sum(block.downsamplers is not None for block in self.unet.down_blocks)

    def features(self, x_t: Tensor, timesteps: Tensor) -> list[Tensor]:
        """`UNet2DConditionModel.forward` up to the last requested up block, with the fixed prompt embedding."""
        unet = self.unet
        context = self.prompt_embedding.expand(x_t.shape[0], -1, -1).to(x_t.dtype)
        emb = unet.time_embedding(unet.get_time_embed(sample=x_t, timestep=timesteps), None)
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        sample = unet.conv_in(x_t)
        skips: tuple[Tensor, ...] = (sample,)
        for block in unet.down_blocks:
            if getattr(block, "has_cross_attention", False):
                sample, res = block(hidden_states=sample, temb=emb, encoder_hidden_states=context)
            else:
                sample, res = block(hidden_states=sample, temb=emb)
            skips += res
        if unet.mid_block is not None:
            cross = getattr(unet.mid_block, "has_cross_attention", False)
            sample = (
                unet.mid_block(sample, emb, encoder_hidden_states=context) if cross else unet.mid_block(sample, emb)
            )
        return decoder_taps(unet, sample, skips, emb, self.cfg.blocks, self.cfg.feature_point, context)


class DiTTeacher(LatentTeacher):
    """`DiTTransformer2DModel`: the tokens after chosen transformer blocks, as (B, C, H / p, W / p) maps."""

    def __init__(self, unet: nn.Module, vae: nn.Module, scheduler: object, cfg):
        super().__init__(unet, vae, scheduler, cfg)
        self.patch_size = unet.config.patch_size
        count = len(unet.transformer_blocks)
        if cfg.blocks is None:  # every block has the same stride: four spread over the depth, the last included
            self.cfg = dataclasses.replace(cfg, blocks=sorted({max(0, count * q // 4 - 1) for q in (1, 2, 3, 4)}))
        blocks = self.resolve_blocks([], count, "transformer block")
        labels = unet.transformer_blocks[0].norm1.emb.class_embedder.embedding_table.num_embeddings
        null_class = unet.config.num_embeds_ada_norm
        label = null_class if cfg.dit.class_label == -1 else cfg.dit.class_label
        if not 0 <= label < labels:
            raise ConfigError(
                f"teacher.dit.class_label {cfg.dit.class_label} out of range: this DiT has {labels} label embeddings "
                f"(-1 = the null class {null_class}"
                + ("" if null_class < labels else ", which it lacks: it was trained without label dropout")
                + ")"
            )
        self.class_label = label
        self.levels = [TeacherLevel(block=b, stride=self.total_stride, channels=unet.inner_dim) for b in blocks]

    @property
    def total_stride(self) -> int:
        return self.latent_stride * self.patch_size

    def features(self, x_t: Tensor, timesteps: Tensor) -> list[Tensor]:
        """`DiTTransformer2DModel.forward` up to the last requested block; tokens reshaped to maps."""
        net = self.unet
        batch, height, width = x_t.shape[0], x_t.shape[-2] // self.patch_size, x_t.shape[-1] // self.patch_size
        labels = torch.full((batch,), self.class_label, device=x_t.device, dtype=torch.long)
        hidden = net.pos_embed(x_t)  # (B, N, C)
        wanted, features = set(self.cfg.blocks), []
        for index, block in enumerate(net.transformer_blocks[: max(self.cfg.blocks) + 1]):
            hidden = block(hidden, timestep=timesteps, class_labels=labels)
            if index in wanted:
                features.append(hidden.transpose(1, 2).reshape(batch, -1, height, width))
        return features


def empty_prompt_embedding(root: Path, unet: nn.Module, setting: str) -> Tensor:
    """The (1, tokens, cross_attention_dim) embedding `teacher.latent_unet.prompt_embedding` names."""
    from safetensors.torch import save

    width = unet.config.cross_attention_dim
    if setting == "zeros":
        return torch.zeros(1, 77, width)
    if setting != "auto":
        return _read_embedding(Path(setting).expanduser(), width)
    stored = [root / EMPTY_PROMPT_FILE, _cached_embedding_file(root)]
    for file in stored:
        if file.is_file():
            return _read_embedding(file, width)
    embedding = _encode_empty_prompt(root)
    if embedding.shape[-1] != width:
        raise TeacherError(f"the text encoder in '{root}' gives width {embedding.shape[-1]}, the U-Net wants {width}")
    for target in stored:  # beside the weights when the folder is writable, else in dtengine's cache
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(target, save({"embedding": embedding.contiguous()}))
            break
        except OSError:
            continue
    return embedding


def _read_embedding(file: Path, width: int) -> Tensor:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not file.is_file():
        raise TeacherError(f"prompt embedding '{file}' does not exist (teacher.latent_unet.prompt_embedding)")
    try:
        embedding = load_file(file).get("embedding")
    except (SafetensorError, OSError) as err:
        raise TeacherError(f"cannot read prompt embedding '{file}': {err}") from None
    if embedding is None or embedding.dim() != 3 or embedding.shape[-1] != width:
        got = None if embedding is None else tuple(embedding.shape)
        raise TeacherError(f"prompt embedding '{file}' holds {got}, expected 'embedding' of shape (1, tokens, {width})")
    return embedding


def _cached_embedding_file(root: Path) -> Path:
    import hashlib

    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    return cache_dir() / "prompt-embeddings" / f"{key}-{EMPTY_PROMPT_FILE}"


def _encode_empty_prompt(root: Path) -> Tensor:
    """The text encoder's last hidden state for "" padded to its max length, as SD pipelines condition on it."""
    if not (root / "text_encoder").is_dir() or not (root / "tokenizer").is_dir():
        raise TeacherError(
            f"teacher folder '{root}' has no {EMPTY_PROMPT_FILE} and no text_encoder/ + tokenizer/ to compute it; "
            "add them, or set teacher.latent_unet.prompt_embedding=zeros (degrades the features) or =FILE"
        )
    try:
        from transformers import AutoTokenizer, CLIPTextModel
    except ImportError:
        raise TeacherError(
            "computing the empty-prompt embedding needs `transformers` (pip install 'dtengine[latent]'); or store "
            f"it once as {root / EMPTY_PROMPT_FILE}"
        ) from None
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer", local_files_only=True)
    encoder = CLIPTextModel.from_pretrained(root / "text_encoder", local_files_only=True).eval()
    tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return encoder(tokens.input_ids).last_hidden_state.float()


def build_latent_teacher(cfg, device: torch.device | str = "cpu", load_weights: bool = True) -> LatentTeacher:
    """The `latent_unet` or `dit` teacher `cfg` describes, from its local pipeline folder."""
    root = Path(cfg.path).expanduser()
    if cfg.path in ("", "builtin") or not root.is_dir():
        raise TeacherError(
            f"teacher.path '{cfg.path}' is not a folder; teacher.kind={cfg.kind} needs a local pipeline folder with "
            "vae/ and " + ("unet/" if cfg.kind == "latent_unet" else "transformer/")
        )
    name, cls_name = (
        ("unet", "UNet2DConditionModel") if cfg.kind == "latent_unet" else ("transformer", "DiTTransformer2DModel")
    )
    if load_weights and cfg.weights == "trained":
        vae, net = _component(root, "vae", "AutoencoderKL"), _component(root, name, cls_name)
    else:
        vae = _component(root, "vae", "AutoencoderKL") if load_weights else _architecture(root, "vae", "AutoencoderKL")
        with seeded(cfg.untrained_seed):
            net = _architecture(root, name, cls_name)
    scheduler = _scheduler(root)
    if cfg.kind == "dit":
        return DiTTeacher(net, vae, scheduler, cfg).to(device)
    prompt = torch.zeros(1, 77, net.config.cross_attention_dim)
    if load_weights:
        prompt = empty_prompt_embedding(root, net, cfg.latent_unet.prompt_embedding)
    return LatentUNetTeacher(net, vae, scheduler, cfg, prompt).to(device)
