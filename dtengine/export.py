"""Export the pretrained student backbone as a timm-loadable safetensors file.

The file holds the state dict of `timm.create_model(name, num_classes=0)` (the headless model), so both

    timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path))
    timm.create_model(name, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=path))

load it with every key matched. `features_only` models rename the first level of nested `nn.Sequential`
children (`stages.0` -> `stages_0`); the mapping back is checked key by key. Weights the feature extractor
does not contain (e.g. a ConvNeXt's head norm) are taken from a fresh initialisation and listed in the file's
metadata under "untrained_keys".

timm's loader matches keys leniently: a resnet18 file given to `resnet34` loads what fits and leaves the rest
random without a word. The file records its architecture (metadata "timm_model", and `backbone.json`), and
`load_backbone` builds exactly that model and loads every key strictly, refusing any other architecture.
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import nn

from dtengine.runtime.errors import StudentError
from dtengine.runtime.io import atomic_write


def _features_key(full_key: str, feature_keys: set[str]) -> str | None:
    if full_key in feature_keys:
        return full_key
    parts = full_key.split(".")
    if len(parts) > 2:
        flattened = f"{parts[0]}_{parts[1]}." + ".".join(parts[2:])
        if flattened in feature_keys:
            return flattened
    return None


def backbone_state_dict(backbone: nn.Module, model_name: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Map a `features_only` backbone's weights onto the headless timm model's keys.

    Returns:
        (state dict in headless-model keys, keys filled from a fresh init because the backbone lacks them).
    Raises:
        RuntimeError: a backbone weight has no place in the headless model (the file would silently lose it).
    """
    feature_state = backbone.state_dict()
    headless = timm.create_model(model_name, pretrained=False, num_classes=0).state_dict()
    exported, untrained, used = {}, [], set()
    for key, fresh in headless.items():
        source = _features_key(key, set(feature_state))
        if source is None:
            exported[key] = fresh.clone()
            untrained.append(key)
        else:
            exported[key] = feature_state[source].detach().cpu().clone()
            used.add(source)
    unmapped = sorted(set(feature_state) - used)
    if unmapped:
        raise RuntimeError(f"cannot map backbone weights {unmapped[:5]} onto timm '{model_name}' keys")
    return exported, untrained


def export_backbone(backbone: nn.Module, model_name: str, path: Path) -> Path:
    """Write the backbone to `path` (.safetensors, atomically) and a `.json` note on how to load it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state, untrained = backbone_state_dict(backbone, model_name)
    state = {k: v.contiguous() for k, v in state.items()}
    metadata = {"format": "pt", "timm_model": model_name, "untrained_keys": json.dumps(untrained)}
    atomic_write(path, save(state, metadata=metadata))
    note = {
        "timm_model": model_name,
        "file": path.name,
        "untrained_keys": untrained,
        "load": f"dtengine.load_backbone('{path.name}', model_name='{model_name}')",
        "load_with_timm": f"timm.create_model('{model_name}', pretrained=True, num_classes=0, "
        f"pretrained_cfg_overlay=dict(file='{path.name}'))  # with this exact model name: timm does not check it",
    }
    atomic_write(path.with_suffix(".json"), json.dumps(note, indent=2))
    return path


def load_backbone(path: str | Path, model_name: str | None = None, features_only: bool = False, **timm_kwargs):
    """The timm model an exported file holds, every weight loaded (see the module docstring).

    Args:
        path: a `backbone.safetensors` written by `export_backbone`.
        model_name: the architecture you expect; a file of another one is refused. None: the file's own.
        features_only: a `features_only=True` model (multi-scale feature maps) instead of the headless one.
        timm_kwargs: passed to `timm.create_model` (e.g. out_indices).
    Raises:
        StudentError: a missing or unreadable file, one without a recorded architecture, or another architecture.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise StudentError(f"backbone file '{path}' does not exist; pass the backbone.safetensors a run exported")
    try:
        with safe_open(path, framework="pt") as handle:
            recorded = (handle.metadata() or {}).get("timm_model")
        state = load_file(path)
    except (SafetensorError, OSError) as err:
        raise StudentError(f"'{path}' is not a readable safetensors file ({err}); pass an exported backbone") from None
    if recorded is None:
        raise StudentError(f"'{path}' records no timm architecture (not a dtengine export); load it with timm itself")
    if model_name is not None and model_name != recorded:
        raise StudentError(
            f"'{path}' holds a {recorded} backbone, not {model_name}; load it as {recorded} (or leave model_name out)"
        )
    headless = timm.create_model(recorded, pretrained=False, num_classes=0, **timm_kwargs)
    missing, unexpected = headless.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise StudentError(
            f"'{path}' does not fit timm '{recorded}' ({len(missing)} missing, {len(unexpected)} unexpected keys, "
            f"e.g. {(missing or unexpected)[0]}); export it again with this timm version"
        )
    if not features_only:
        return headless
    features = timm.create_model(recorded, features_only=True, pretrained=False, **timm_kwargs)
    feature_keys = set(features.state_dict())
    mapped = {target: state[key] for key in state if (target := _features_key(key, feature_keys)) is not None}
    features.load_state_dict(mapped, strict=True)
    return features
