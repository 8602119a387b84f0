"""Export the pretrained student backbone as a timm-loadable safetensors file.

The file holds the state dict of `timm.create_model(name, num_classes=0)` (the headless model), so both

    timm.create_model(name, pretrained=True, num_classes=0, pretrained_cfg_overlay=dict(file=path))
    timm.create_model(name, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=path))

load it with every key matched. `features_only` models rename the first level of nested `nn.Sequential`
children (`stages.0` -> `stages_0`); the mapping back is checked key by key. Weights the feature extractor
does not contain (e.g. a ConvNeXt's head norm) are taken from a fresh initialisation and listed in the file's
metadata under "untrained_keys".
"""

from __future__ import annotations

import json
from pathlib import Path

import timm
import torch
from safetensors.torch import save
from torch import nn

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
        "load": f"timm.create_model('{model_name}', pretrained=True, num_classes=0, "
        f"pretrained_cfg_overlay=dict(file='{path.name}'))",
    }
    atomic_write(path.with_suffix(".json"), json.dumps(note, indent=2))
    return path
