"""Exported backbone loads into timm with every key matched and every value equal."""

from __future__ import annotations

import json
import logging

import pytest
import timm
import torch
from safetensors.torch import load_file

from dtengine.export import export_backbone
from dtengine.students import create_backbone


@pytest.mark.parametrize("model", ["resnet18", "convnext_atto"])
def test_export_loads_strictly_into_timm(model, tmp_path, caplog):
    torch.manual_seed(0)
    backbone = create_backbone(model)
    with torch.no_grad():  # make the weights differ from any fresh init
        for tensor in backbone.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn_like(tensor) * 0.1)
    path = export_backbone(backbone, model, tmp_path / "backbone.safetensors")

    headless = timm.create_model(model, pretrained=False, num_classes=0)
    result = headless.load_state_dict(load_file(path), strict=True)
    assert not result.missing_keys and not result.unexpected_keys

    caplog.set_level(logging.INFO, logger="timm")
    loaded = timm.create_model(model, features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert "Unexpected keys" not in caplog.text
    want, got = backbone.state_dict(), loaded.state_dict()
    assert set(want) == set(got)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)

    note = json.loads(path.with_suffix(".json").read_text())
    assert note["timm_model"] == model
    if model == "convnext_atto":  # the head norm is not part of the feature extractor
        assert "head.norm.weight" in note["untrained_keys"]
