"""The ADM teacher against the original guided-diffusion code (golden fixtures), its checkpoint loading, its
config and a short distillation with it."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
import torch

from dtengine import load_config
from dtengine.runtime.errors import ConfigError, TeacherError
from dtengine.teachers import ADMConfig, ADMUNet, TeacherConfig, build_teacher, describe_teacher
from dtengine.teachers.adm import load_strict
from dtengine.train.distillation import run_distillation

FIXTURES = Path(__file__).parent / "fixtures" / "adm"
GOLDEN = ["updown_scaleshift", "conv_resample", "new_attention_order"]
TOLERANCE = dict(rtol=1e-4, atol=5e-5)
# A 4-level ADM at 32 px: output blocks 1 and 3, read before their upsamplers, sit at strides 8 and 4.
TINY_FLAGS = [
    "teacher.kind=adm",
    "teacher.weights=untrained",
    "teacher.blocks=[1,3]",
    "teacher.adm.image_size=32",
    "teacher.adm.num_channels=32",
    "teacher.adm.num_res_blocks=1",
    "teacher.adm.channel_mult='1,1,1,1'",
    "teacher.adm.attention_resolutions='8'",
    "teacher.adm.num_head_channels=16",
]


def golden(name: str) -> dict:
    return torch.load(FIXTURES / f"{name}.pt", weights_only=True)


def adm_config(fixture: dict, **changes) -> ADMConfig:
    flags = {k: v for k, v in fixture["flags"].items() if k in ADMConfig.__dataclass_fields__}
    return ADMConfig(**{**flags, **changes})


def loaded_unet(fixture: dict, **changes) -> ADMUNet:
    unet = ADMUNet(adm_config(fixture, **changes)).eval()
    load_strict(unet, fixture["state_dict"], "fixture")
    return unet


def write_checkpoint(fixture: dict, path: Path, state: dict | None = None) -> Path:
    # Released checkpoints are fp32 state dicts saved with torch.save.
    torch.save({k: v.float() for k, v in (state or fixture["state_dict"]).items()}, path)
    return path


@pytest.mark.parametrize("name", GOLDEN)
@torch.no_grad()
def test_every_output_block_and_the_output_match_guided_diffusion(name):
    fixture = golden(name)
    unet = loaded_unet(fixture)
    x_t, t = fixture["x_t"], fixture["t"]
    torch.testing.assert_close(unet(x_t, t), fixture["output"], **TOLERANCE)
    every_block = range(len(unet.output_blocks))
    features, _ = unet.run(x_t, t, every_block, before_upsample=False)
    assert len(features) == len(fixture["output_blocks"])
    for ours, theirs in zip(features, fixture["output_blocks"]):
        torch.testing.assert_close(ours, theirs, **TOLERANCE)
    taps = sorted(fixture["before_upsample"])
    features, _ = unet.run(x_t, t, taps, before_upsample=True)
    for ours, tap in zip(features, taps):
        torch.testing.assert_close(ours, fixture["before_upsample"][tap], **TOLERANCE)


@torch.no_grad()
def test_the_golden_test_sees_the_attention_layout():
    """Reading a legacy-layout checkpoint as the new layout must visibly change the features."""
    fixture = golden("updown_scaleshift")
    wrong = loaded_unet(fixture, use_new_attention_order=True)
    assert not torch.allclose(wrong(fixture["x_t"], fixture["t"]), fixture["output"], atol=1e-2)


def test_the_imagenet256_preset_has_the_released_checkpoint_format():
    recorded = json.loads((FIXTURES / "imagenet256_uncond_format.json").read_text())["shapes"]
    with torch.device("meta"):
        unet = ADMUNet(ADMConfig(preset="imagenet256-uncond"))
    ours = {key: list(value.shape) for key, value in unet.state_dict().items()}
    assert ours == recorded
    assert sum(p.numel() for p in unet.parameters()) == 552_814_086


@torch.no_grad()
def test_teacher_from_a_checkpoint_taps_blocks_with_their_strides(tmp_path):
    fixture = golden("updown_scaleshift")
    ckpt = write_checkpoint(fixture, tmp_path / "adm.pt")
    cfg = TeacherConfig(kind="adm", path=str(ckpt), blocks=[1, 3], adm=adm_config(fixture))
    teacher = build_teacher(cfg)
    assert [(lv.block, lv.stride, lv.channels) for lv in teacher.levels] == [(1, 4, 64), (3, 2, 32)]
    for ours, tap in zip(teacher.features(fixture["x_t"], fixture["t"]), [1, 3]):
        torch.testing.assert_close(ours, fixture["before_upsample"][tap], **TOLERANCE)
    after = build_teacher(dataclasses.replace(cfg, feature_point="after_upsample"))
    assert [lv.stride for lv in after.levels] == [2, 1]
    for ours, tap in zip(after.features(fixture["x_t"], fixture["t"]), [1, 3]):
        torch.testing.assert_close(ours, fixture["output_blocks"][tap], **TOLERANCE)
    images = torch.rand(2, 3, 16, 16)
    out = teacher(images)
    assert out.images is images and [f.shape[-1] for f in out.features] == [4, 8]


def test_checkpoint_mismatches_are_one_line_errors_naming_the_keys(tmp_path):
    fixture = golden("conv_resample")
    unet = ADMUNet(adm_config(fixture))
    state = dict(fixture["state_dict"])
    del state["out.2.bias"]
    state["label_emb.weight"] = torch.zeros(1000, 128)
    state["input_blocks.0.0.weight"] = torch.zeros(16, 3, 3, 3)
    with pytest.raises(TeacherError) as err:
        load_strict(unet, state, "ckpt.pt")
    message = str(err.value)
    assert "\n" not in message
    for part in ("1 missing", "out.2.bias", "1 unexpected", "label_emb.weight", "class-conditional",
                 "input_blocks.0.0.weight (16, 3, 3, 3) vs (32, 3, 3, 3)", "teacher.adm.preset"):  # fmt: skip
        assert part in message, part
    wrong_flags = ADMUNet(adm_config(fixture, num_res_blocks=1))
    with pytest.raises(TeacherError, match="missing"):
        load_strict(wrong_flags, fixture["state_dict"], "ckpt.pt")


def test_unreadable_checkpoints_are_clear_errors_and_run_no_code(tmp_path):
    base = ["teacher.kind=adm", "teacher.blocks=[0]", "teacher.adm.image_size=16", "teacher.adm.channel_mult=1,1"]
    with pytest.raises(TeacherError, match="does not exist"):
        build_teacher(load_config(None, [*base, f"teacher.path={tmp_path / 'none.pt'}"]).teacher)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TeacherError, match="cannot read ADM checkpoint"):
        build_teacher(load_config(None, [*base, f"teacher.path={tmp_path / 'junk.pt'}"]).teacher)

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(TeacherError, match="cannot read ADM checkpoint"):
        build_teacher(load_config(None, [*base, f"teacher.path={tmp_path / 'evil.pt'}"]).teacher)
    assert not (tmp_path / "pwned").exists()
    torch.save([torch.zeros(1)], tmp_path / "list.pt")
    with pytest.raises(TeacherError, match="not a state dict"):
        build_teacher(load_config(None, [*base, f"teacher.path={tmp_path / 'list.pt'}"]).teacher)
    with pytest.raises(ConfigError, match="teacher.path=FILE"):
        build_teacher(load_config(None, base).teacher)
    with pytest.raises(TeacherError, match=r"blocks \[9\] out of range.*0\.\.5"):
        build_teacher(load_config(None, [*base, "teacher.blocks=[9]", "teacher.weights=untrained"]).teacher)


def test_flags_come_from_the_preset_then_guided_diffusions_defaults():
    cfg = load_config(None, ["teacher.kind=adm", "teacher.adm.preset=lsun256", "teacher.adm.num_channels=64"])
    resolved = cfg.teacher.adm.resolved()
    assert (resolved.num_channels, resolved.image_size, resolved.num_head_channels) == (64, 256, 64)
    assert resolved.multipliers() == [1, 1, 2, 2, 4, 4] and resolved.attention_strides() == {8, 16, 32}
    plain = ADMConfig().resolved()
    assert (plain.image_size, plain.num_channels, plain.resblock_updown) == (64, 128, False)
    for bad, match in [
        ("teacher.adm.preset=imagenet512", "teacher.adm.preset"),
        ("teacher.adm.class_cond=true", "class-conditional"),
        ("teacher.adm.noise_schedule=sigmoid", "noise_schedule"),
        ("teacher.kind=sd", "teacher.kind"),
    ]:
        with pytest.raises(ConfigError, match=match):
            load_config(None, ["teacher.kind=adm", bad])
    with pytest.raises(ConfigError, match="applies to diffusers models"):
        load_config(None, ["teacher.kind=adm", "teacher.attention=diffusers"])
    with pytest.raises(ConfigError, match="no default for image_size 48"):
        ADMConfig(image_size=48).resolved()


def test_the_schedule_is_guided_diffusions():
    import numpy as np

    from dtengine.teachers.adm import adm_scheduler

    betas = np.linspace(0.0001, 0.02, 1000, dtype=np.float64)  # guided-diffusion's "linear"
    theirs = np.cumprod(1.0 - betas)
    ours = adm_scheduler(ADMConfig().resolved()).alphas_cumprod.double().numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-5)
    cosine = adm_scheduler(ADMConfig(noise_schedule="cosine").resolved()).alphas_cumprod.double().numpy()
    alpha_bar = (
        np.cos((np.arange(1, 1001) / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2 / np.cos(0.008 / 1.008 * np.pi / 2) ** 2
    )
    np.testing.assert_allclose(cosine[:990], alpha_bar[:990], rtol=1e-3)


def test_teacher_info_of_the_paper_teacher_from_its_architecture_alone(capsys):
    from dtengine.cli import main

    assert main(["teacher-info", "--config", "configs/imagenet_resnet50.yaml", "teacher.path=/not/read.pt"]) == 0
    out = capsys.readouterr().out
    assert "552.8 M parameters, 1.13 TFLOPs per 256 px image" in out
    for stride, channels in [(32, 1024), (16, 1024), (8, 512), (4, 512)]:
        assert f"stride {stride}, {channels} channels" in out


@pytest.mark.parametrize("config", sorted(Path("configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_describes_its_teacher(config):
    cfg = load_config(config, [])
    info = describe_teacher(cfg.teacher, cfg.data.image_size)
    assert info.levels and info.flops_per_image > 0


def test_two_step_distillation_from_an_adm_teacher(tiny_run_overrides, capsys):
    overrides = [o for o in tiny_run_overrides if not o.startswith(("teacher.", "train.steps", "checkpoint."))]
    cfg = load_config(None, [*overrides, *TINY_FLAGS, "train.steps=2", "checkpoint.every=2"])
    info = describe_teacher(cfg.teacher, cfg.data.image_size)
    assert [(lv.block, lv.stride) for lv in info.levels] == [(1, 8), (3, 4)]
    result = run_distillation(cfg)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))
    printed = capsys.readouterr().out  # the run starts by saying what teacher-info says
    assert "\n".join(info.lines()) in printed


@torch.no_grad()
def test_attention_runs_through_dtengine_ops_on_views_of_one_projection(monkeypatch):
    from dtengine.teachers import adm

    calls, real = [], adm.attention

    def counted(q, k, v, **kwargs):
        calls.append((q.shape, q.stride(-1), q.is_contiguous()))
        return real(q, k, v, **kwargs)

    monkeypatch.setattr(adm, "attention", counted)
    fixture = golden("updown_scaleshift")
    unet = loaded_unet(fixture)
    unet(fixture["x_t"], fixture["t"])
    blocks = sum(isinstance(m, adm.AttentionBlock) for m in unet.modules())
    assert len(calls) == blocks > 0
    assert all(stride == 1 and not contiguous for _, stride, contiguous in calls)  # (B, N, h, d) views, no copy
    assert {shape[-1] for shape, _, _ in calls} == {16}  # num_head_channels


def test_an_adm_teacher_is_frozen_and_stays_in_eval_mode():
    teacher = build_teacher(load_config(None, TINY_FLAGS).teacher)
    teacher.train()
    assert not teacher.training and not any(m.training for m in teacher.modules())
    assert not any(p.requires_grad for p in teacher.parameters())


def test_unset_blocks_take_the_last_block_at_each_backbone_stride(tiny_teacher_dir):
    adm = describe_teacher(TeacherConfig(kind="adm", adm=ADMConfig(preset="imagenet256-uncond")), 256)
    assert [(lv.block, lv.stride) for lv in adm.levels] == [(2, 32), (5, 16), (8, 8), (11, 4)]
    after = describe_teacher(
        TeacherConfig(kind="adm", feature_point="after_upsample", adm=ADMConfig(preset="imagenet256-uncond")), 256
    )
    assert [(lv.block, lv.stride) for lv in after.levels] == [(1, 32), (4, 16), (7, 8), (10, 4)]
    builtin = describe_teacher(TeacherConfig(), 64)
    assert [(lv.block, lv.stride) for lv in builtin.levels] == [(0, 16), (1, 8), (2, 4)]


@torch.no_grad()
def test_the_adm_teacher_pass_traces_under_torch_compile():
    teacher = build_teacher(load_config(None, TINY_FLAGS).teacher)
    images, noise = torch.rand(2, 3, 32, 32), torch.randn(2, 3, 32, 32)
    want = teacher(images, noise).features
    got = torch.compile(teacher, backend="eager", dynamic=False)(images, noise).features
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
