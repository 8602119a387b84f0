"""GAN teachers ("dream" distillation): the generator makes the images the student trains on, and the features.

No dataset is read: the engine's per-sample noise (keyed by seed, step and global sample index, so ranks never
share images) supplies the latent z, the generator runs once, and the outputs of its declared tap modules are
the features. Any generator class can be used: `teacher.gan.generator` names it as `module:Class` (built with
`teacher.gan.kwargs`), `teacher.path` holds its weights (safetensors, or a state dict read with
`weights_only=True`: pickled generators such as StyleGAN's are converted to a state dict once, outside
dtengine, and never unpickled here), and `teacher.gan.taps` (or the class's `feature_taps`) names the modules
whose outputs are read. The generator takes z (B, z_dim) and returns images in [-1, 1].
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import Tensor, nn

from dtengine.levels import TeacherLevel
from dtengine.runtime.device import seeded
from dtengine.runtime.errors import ConfigError, TeacherError
from dtengine.teachers.interface import TeacherOutput
from dtengine.teachers.noising import NoisingTeacher, state_dict_mismatch

BUILTIN_GENERATOR = "dtengine.teachers.gan:TinyGenerator"


class TinyGenerator(nn.Module):
    """A small DCGAN-style generator: z -> 4x4 -> four nearest-upsample + conv stages -> 3 channels, tanh.

    At 64 px its stages give 8, 16, 32 and 64 px maps (strides 8, 4, 2, 1); `feature_taps` are the first three.
    """

    feature_taps = ("stages.0", "stages.1", "stages.2")

    def __init__(self, z_dim: int = 64, channels: tuple[int, ...] = (128, 64, 32, 16)):
        super().__init__()
        self.z_dim = z_dim
        self.project = nn.Linear(z_dim, channels[0] * 16)
        widths = [channels[0], *channels]
        self.stages = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(cin, cout, 3, padding=1),
                nn.GroupNorm(min(8, cout), cout),
                nn.SiLU(),
            )
            for cin, cout in zip(widths[:-1], widths[1:])
        )
        self.to_rgb = nn.Conv2d(channels[-1], 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.project(z).view(z.shape[0], -1, 4, 4)
        for stage in self.stages:
            h = stage(h)
        return torch.tanh(self.to_rgb(h))


class GANTeacher(NoisingTeacher):
    """A frozen generator whose tap modules' outputs are the features of the images it generates.

    Args:
        generator: takes z (B, z_dim), returns images (B, 3, S, S) in [-1, 1]; has `z_dim`.
        taps: names of its submodules whose outputs are read.
        cfg: the teacher config (blocks index `taps`).
    """

    def __init__(self, generator: nn.Module, taps: list[str], cfg):
        super().__init__(generator, scheduler=None, cfg=cfg)
        modules = dict(generator.named_modules())
        missing = [name for name in taps if name not in modules]
        if missing:
            raise TeacherError(
                f"teacher.gan.taps {missing} are not modules of the generator (e.g. {list(modules)[1:6]})"
            )
        self.z_dim = int(generator.z_dim)
        self.taps = list(taps)
        self._captured: dict[int, Tensor] = {}
        for index, name in enumerate(taps):
            modules[name].register_forward_hook(self._capture(index))
        every_level, self.image_size = self._dry_run()
        blocks = self.resolve_blocks(every_level, len(taps), "tap")
        self.levels = [every_level[b] for b in blocks]

    def _capture(self, index: int):
        def hook(module, inputs, output):
            self._captured[index] = output  # returns None: the output is left as it is

        return hook

    def _dry_run(self) -> tuple[list[TeacherLevel], int]:
        """Channels and strides of every tap, from one pass on the meta device (no compute, no memory)."""
        meta = [p for p in self.unet.parameters() if p.is_meta]
        device = "meta" if meta else next(self.unet.parameters()).device
        with torch.no_grad():
            images = self.generate(torch.zeros(1, self.z_dim, device=device))
        size = images.shape[-1]
        if images.dim() != 4 or images.shape[1] != 3 or images.shape[-2] != size:
            raise TeacherError(
                f"the generator returned {tuple(images.shape)}; it must return square (B, 3, S, S) images"
            )
        levels = [
            TeacherLevel(block=i, stride=size // self._captured[i].shape[-1], channels=self._captured[i].shape[1])
            for i in range(len(self.taps))
        ]
        self._captured.clear()
        return levels, size

    def generate(self, z: Tensor) -> Tensor:
        self._captured.clear()
        return self.unet(z)

    @property
    def total_stride(self) -> int:
        return 1

    def check_image_size(self, image_size: int, key: str = "data.image_size") -> None:
        if image_size != self.image_size:
            raise ConfigError(
                f"{key} {image_size} differs from the {self.image_size} px images the generator makes; set "
                f"{key}={self.image_size}"
            )

    def cost_inputs(self, image_size: int) -> tuple[Tensor, None]:
        return torch.zeros(1, self.z_dim), None

    def latents(self, noise: Tensor) -> Tensor:
        """z per sample: the first z_dim of the sample's keyed noise, so every rank and step draws its own."""
        flat = noise.flatten(1)
        if flat.shape[1] < self.z_dim:
            raise TeacherError(f"the per-sample noise ({flat.shape[1]} values) is smaller than z_dim {self.z_dim}")
        return flat[:, : self.z_dim]

    def features(self, z: Tensor, timesteps: Tensor | None = None) -> list[Tensor]:
        """The tapped features of the images generated from z (B, z_dim)."""
        self.generate(z)
        return [self._captured[b] for b in self.cfg.blocks]

    @torch.no_grad()
    def forward(self, images: Tensor, noise: Tensor | None = None) -> TeacherOutput:
        """Generate a batch and its features. `images` only gives the batch size and device (the run's loader
        is the synthetic one); `noise` (keyed per sample by the caller) gives z.

        Returns:
            TeacherOutput(images, features): the generated images in [0, 1] (what the student sees), one map
            per level.
        """
        noise = torch.randn(images.shape, device=images.device) if noise is None else noise
        dtype = self.compute_dtype
        with torch.autocast(device_type=images.device.type, dtype=dtype, enabled=dtype != torch.float32):
            generated = self.generate(self.latents(noise.float()))
            features = [self._captured[b] for b in self.cfg.blocks]
        return TeacherOutput(images=(generated.float() + 1) / 2, features=features)


def load_generator_class(spec: str) -> type[nn.Module]:
    module_name, _, class_name = spec.partition(":")
    if not module_name or not class_name:
        raise ConfigError(f"teacher.gan.generator {spec!r} must be 'module:Class', e.g. {BUILTIN_GENERATOR}")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ConfigError(f"teacher.gan.generator {spec!r} cannot be imported: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ConfigError(f"teacher.gan.generator {spec!r} is not a torch.nn.Module class")
    return cls


def load_generator_weights(generator: nn.Module, path: str) -> None:
    """Strictly load a state dict (safetensors, or torch.save read with weights_only=True) into `generator`."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise TeacherError(f"generator weights '{file}' do not exist; set teacher.path to a safetensors file")
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(file)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - corrupt or foreign files raise many types
        raise TeacherError(f"cannot read generator weights '{file}': {(str(err).splitlines() or [''])[0]}") from None
    if not isinstance(state, dict):
        raise TeacherError(f"generator weights '{file}' are not a state dict")
    problems, _ = state_dict_mismatch(generator, state)
    if problems:
        raise TeacherError(
            f"generator weights '{file}' do not fit {type(generator).__name__}: {problems}; check "
            "teacher.gan.generator and teacher.gan.kwargs"
        )
    generator.load_state_dict(state, strict=True)


def build_gan_teacher(cfg, device: torch.device | str = "cpu", load_weights: bool = True) -> GANTeacher:
    """The GAN teacher `cfg` (kind "gan") describes, on `device`."""
    cls = load_generator_class(cfg.gan.generator)
    with seeded(cfg.untrained_seed):
        try:
            generator = cls(**dict(cfg.gan.kwargs))
        except TypeError as err:
            raise ConfigError(f"teacher.gan.kwargs do not fit {cfg.gan.generator}: {err}") from None
    if not hasattr(generator, "z_dim"):
        raise ConfigError(f"teacher.gan.generator {cfg.gan.generator} has no z_dim attribute (the size of z)")
    if load_weights and cfg.weights == "trained":
        if cfg.path in ("", "builtin"):
            raise ConfigError(
                "teacher.kind=gan needs teacher.path=FILE (the generator's weights) or teacher.weights=untrained"
            )
        load_generator_weights(generator, cfg.path)
    taps = list(cfg.gan.taps) or list(getattr(generator, "feature_taps", ()))
    if not taps:
        raise ConfigError(f"no feature taps: set teacher.gan.taps to module names of {cfg.gan.generator}")
    return GANTeacher(generator.to(device), taps, cfg)
