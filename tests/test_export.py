"""Exported backbone loads into timm with every key matched and every value equal."""

from __future__ import annotations

import json
import logging
import os
import stat

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

from dtengine.export import export_backbone, load_backbone
from dtengine.runtime.errors import StudentError
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


def test_load_backbone_loads_every_weight_and_refuses_another_architecture(tmp_path):
    torch.manual_seed(0)
    backbone = create_backbone("resnet18")
    path = export_backbone(backbone, "resnet18", tmp_path / "backbone.safetensors")
    headless = load_backbone(path)
    for key, value in load_file(path).items():
        torch.testing.assert_close(headless.state_dict()[key], value, rtol=0, atol=0, msg=key)
    features = load_backbone(path, model_name="resnet18", features_only=True)
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(features.state_dict()[key], value, rtol=0, atol=0, msg=key)

    with pytest.raises(StudentError, match="holds a resnet18 backbone, not resnet34; load it as resnet18"):
        load_backbone(path, model_name="resnet34")
    foreign = tmp_path / "foreign.safetensors"
    save_file(timm.create_model("resnet18", num_classes=0).state_dict(), foreign)
    with pytest.raises(StudentError, match="records no timm architecture"):
        load_backbone(foreign)
    (tmp_path / "text.safetensors").write_text("not a tensor file")
    with pytest.raises(StudentError, match="not a readable safetensors file"):
        load_backbone(tmp_path / "text.safetensors")
    with pytest.raises(StudentError, match="does not exist"):
        load_backbone(tmp_path / "missing.safetensors")


def test_exports_and_checkpoints_follow_the_umask(tmp_path):
    from dtengine.runtime.checkpoint import write_checkpoint

    previous = os.umask(0o022)
    try:
        path = export_backbone(create_backbone("resnet18"), "resnet18", tmp_path / "backbone.safetensors")
        checkpoint = write_checkpoint(tmp_path / "step_00000001.pt", {"step": 1})
    finally:
        os.umask(previous)
    for written in (path, path.with_suffix(".json"), checkpoint):
        assert stat.S_IMODE(written.stat().st_mode) == 0o644, written
