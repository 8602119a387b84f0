"""Feature sources: modules mapping images in [0, 1] to a list of multi-scale maps, and how to build each one.

- the student backbone from a run directory, a step_*.pt checkpoint or an exported backbone.safetensors;
- `random`: the same architecture with seeded random weights;
- `teacher`: the diffusion teacher's whitened decoder features, with seeded noise;
- `supervised` is built in `supervised.py` (it needs training).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
import yaml
from torch import Tensor, nn

from dtengine.ops import whiten_channels
from dtengine.runtime.checkpoint import list_checkpoints, load_checkpoint
from dtengine.runtime.config import config_from_dict
from dtengine.runtime.device import seeded
from dtengine.runtime.errors import CheckpointError
from dtengine.students.backbone import InputNormalization, create_backbone
from dtengine.teachers.build import build_teacher
from dtengine.teachers.config import TeacherConfig
from dtengine.teachers.noising import NoisingTeacher


class BackboneSource(nn.Module):
    """A timm `features_only` backbone with the input normalisation `DistillationStudent` uses.

    Args:
        backbone: timm model built with `features_only=True`.
    """

    finetunable = True

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.normalize = InputNormalization(backbone)
        self.channels: list[int] = list(backbone.feature_info.channels())

    def forward(self, images: Tensor) -> list[Tensor]:
        """Args: images (B, 3, H, W) in [0, 1]. Returns: [(B, C_l, H / stride_l, W / stride_l)], every level."""
        return self.backbone(self.normalize(images))


class TeacherSource(nn.Module):
    """The teacher's decoder features, whitened as distillation sees them, noised with a seeded generator.

    Probed frozen only (`finetunable = False`): fine-tuning a U-Net is not the student protocol.
    """

    finetunable = False

    def __init__(self, teacher: NoisingTeacher, seed: int):
        super().__init__()
        self.teacher = teacher
        self.channels: list[int] = [level.channels for level in teacher.levels]
        self.generator = torch.Generator().manual_seed(seed)

    def reseed(self, seed: int) -> None:
        """Restart the noise stream, so the train and held-out extractions are reproducible on their own."""
        self.generator.manual_seed(seed)

    @torch.no_grad()
    def forward(self, images: Tensor) -> list[Tensor]:
        """Args: images (B, 3, H, W) in [0, 1]. Returns: [(B, C_l, H_l, W_l)] whitened, fp32."""
        # Noise from our own CPU generator (not the global RNG), so extraction is the same on every device.
        noise = torch.randn(images.shape, generator=self.generator).to(images.device)
        return [whiten_channels(f) for f in self.teacher(images, noise).features]


@dataclass
class StudentCheckpoint:
    """What eval needs from a distillation output: the backbone, its name, and the run's teacher config."""

    source: BackboneSource
    model_name: str
    teacher: TeacherConfig
    run_dir: Path
    """Folder the default `--out` goes under (`<run_dir>/eval`)."""
    description: str
    """Which file the weights came from."""
    info: dict[str, Any] = field(default_factory=dict)


def _teacher_config(section: dict | None) -> TeacherConfig:
    return config_from_dict(section, schema=TeacherConfig, what="the run's teacher config")


def _read_run_config(path: Path) -> dict:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise CheckpointError(f"cannot read run config '{path}' ({type(err).__name__}); re-create the run") from None
    if not isinstance(loaded, dict) or "student" not in loaded:
        raise CheckpointError(f"'{path}' is not a dtengine run config (no 'student' section)")
    return loaded


def _from_state(state: dict, path: Path) -> nn.Module:
    config = state.get("config") or {}
    name = (config.get("student") or {}).get("model")
    weights = {k.removeprefix("backbone."): v for k, v in state.get("student", {}).items() if k.startswith("backbone.")}
    if not name or not weights:
        raise CheckpointError(f"'{path}' is not a dtengine distillation checkpoint (no student config or backbone)")
    backbone = create_backbone(name)
    try:
        backbone.load_state_dict(weights)
    except RuntimeError as err:
        raise CheckpointError(f"'{path}' does not fit a '{name}' backbone: {str(err).splitlines()[0]}") from None
    return backbone


def _from_safetensors(path: Path) -> tuple[nn.Module, str]:
    note = path.with_suffix(".json")
    if not note.is_file():
        raise CheckpointError(f"'{path}' has no '{note.name}' beside it saying which timm model it holds")
    try:
        name = json.loads(note.read_text())["timm_model"]
    except (OSError, ValueError, KeyError):
        raise CheckpointError(f"'{note}' is unreadable or has no 'timm_model'; re-export the backbone") from None
    create_backbone(name)  # a bad name becomes a one-line StudentError
    try:
        overlay = dict(file=str(path))
        backbone = timm.create_model(name, features_only=True, pretrained=True, pretrained_cfg_overlay=overlay)
    except Exception as err:  # safetensors / timm raise many kinds for foreign or truncated files
        raise CheckpointError(f"cannot load '{path}' as a '{name}' backbone ({type(err).__name__})") from None
    return backbone, name


def load_student_checkpoint(path: str | Path) -> StudentCheckpoint:
    """The student backbone of a run directory, a step_*.pt checkpoint, or an exported backbone.safetensors.

    A run directory needs its config.yaml; its newest checkpoint is used, or backbone.safetensors if it has none.

    Raises:
        CheckpointError: the path is missing, a run directory has no config.yaml or no weights, or a file is not a
            dtengine checkpoint / exported backbone.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"checkpoint '{path}' does not exist; pass a run directory, step_*.pt or .safetensors")
    if path.is_dir():
        if not (path / "config.yaml").is_file():
            raise CheckpointError(f"run directory '{path}' has no config.yaml; pass a dtengine distill run directory")
        config = _read_run_config(path / "config.yaml")
        found = list_checkpoints(path / "checkpoints")
        if found:
            backbone, weights = _from_state(load_checkpoint(found[-1]), found[-1]), found[-1]
        elif (path / "backbone.safetensors").is_file():
            weights = path / "backbone.safetensors"
            backbone, _ = _from_safetensors(weights)
        else:
            raise CheckpointError(f"run directory '{path}' holds no checkpoint and no backbone.safetensors")
        name, teacher, run_dir = config["student"]["model"], _teacher_config(config.get("teacher")), path
    elif path.suffix == ".safetensors":
        backbone, name = _from_safetensors(path)
        weights, run_dir = path, path.parent
        sibling = path.parent / "config.yaml"
        teacher = _teacher_config(_read_run_config(sibling).get("teacher") if sibling.is_file() else None)
    else:
        state = load_checkpoint(path)
        backbone, weights = _from_state(state, path), path
        name, teacher = state["config"]["student"]["model"], _teacher_config(state["config"].get("teacher"))
        run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return StudentCheckpoint(BackboneSource(backbone).eval(), name, teacher, run_dir, str(weights))


def random_source(model_name: str, seed: int) -> BackboneSource:
    """The student architecture with timm's random initialisation, drawn under `torch.manual_seed(seed)`."""
    with seeded(seed):
        return BackboneSource(create_backbone(model_name)).eval()


def teacher_source(cfg: TeacherConfig, seed: int, device: torch.device | str = "cpu") -> TeacherSource:
    """The frozen teacher (`build_teacher`) as a feature source whose noise is drawn from `seed`."""
    return TeacherSource(build_teacher(cfg, device), seed)
