"""Diffusion teacher: feature shapes and strides, early exit == full forward, loading errors."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import DDPMScheduler

from dtengine.runtime.errors import ConfigError, TeacherError
from dtengine.teachers import DiffusionTeacher, TeacherConfig, build_diffusion_teacher
from dtengine.teachers.unet import UNetArchConfig, build_unet

from tiny import TINY_IMAGE, tiny_unet_arch


def unet_a():
    torch.manual_seed(0)
    return build_unet(TINY_IMAGE, tiny_unet_arch())


def unet_b():
    """A second family: 3 levels, 2 resnets per block, attention everywhere, resnet upsamplers."""
    from diffusers import UNet2DModel

    torch.manual_seed(1)
    return UNet2DModel(
        sample_size=TINY_IMAGE,
        block_out_channels=(8, 16, 24),
        layers_per_block=2,
        norm_num_groups=8,
        attention_head_dim=8,
        down_block_types=("AttnDownBlock2D",) * 3,
        up_block_types=("AttnUpBlock2D",) * 3,
        upsample_type="resnet",
        downsample_type="resnet",
    )


def full_forward_taps(unet, sample, timesteps):
    """Every up block's output before and after its upsampler, from an unmodified full forward (hooks)."""
    before, after = {}, {}
    handles = []
    for index, block in enumerate(unet.up_blocks):
        handles.append(block.register_forward_hook(lambda m, i, o, index=index: after.__setitem__(index, o)))
        if block.upsamplers is not None:
            handles.append(
                block.upsamplers[0].register_forward_pre_hook(
                    lambda m, args, kwargs, index=index: before.__setitem__(
                        index, args[0] if args else kwargs["hidden_states"]
                    ),
                    with_kwargs=True,
                )
            )
    with torch.no_grad():
        unet(sample, timesteps)
    for handle in handles:
        handle.remove()
    for index in after:
        before.setdefault(index, after[index])  # no upsampler: before == after
    return before, after


@pytest.mark.parametrize("make_unet", [unet_a, unet_b], ids=["4-level", "3-level-attn-resnet-up"])
@pytest.mark.parametrize("feature_point", ["before_upsample", "after_upsample"])
def test_early_exit_equals_full_forward(make_unet, feature_point):
    unet = make_unet()
    n_up = len(unet.up_blocks)
    for blocks in ([0], [0, 1], list(range(n_up))):
        teacher = DiffusionTeacher(unet, DDPMScheduler(), TeacherConfig(blocks=blocks, feature_point=feature_point))
        sample = torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE)
        timesteps = torch.full((2,), 50)
        with torch.no_grad():
            ours = teacher.features(sample, timesteps)
        before, after = full_forward_taps(unet, sample, timesteps)
        taps = before if feature_point == "before_upsample" else after
        assert len(ours) == len(blocks)
        for block, feature in zip(blocks, ours):
            torch.testing.assert_close(feature, taps[block], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make_unet", [unet_a, unet_b], ids=["4-level", "3-level-attn-resnet-up"])
@pytest.mark.parametrize("feature_point", ["before_upsample", "after_upsample"])
def test_feature_shapes_match_declared_levels(make_unet, feature_point):
    unet = make_unet()
    blocks = list(range(len(unet.up_blocks)))
    teacher = DiffusionTeacher(unet, DDPMScheduler(), TeacherConfig(blocks=blocks, feature_point=feature_point))
    images = torch.rand(2, 3, TINY_IMAGE, TINY_IMAGE)
    out = teacher(images)
    assert out.images is images
    for level, feature in zip(teacher.levels, out.features):
        size = TINY_IMAGE // level.stride
        assert feature.shape == (2, level.channels, size, size)


def test_declared_strides_of_the_4_level_unet():
    teacher = DiffusionTeacher(unet_a(), DDPMScheduler(), TeacherConfig(blocks=[0, 1, 2, 3]))
    assert [lvl.stride for lvl in teacher.levels] == [8, 4, 2, 1]
    after = DiffusionTeacher(unet_a(), DDPMScheduler(), TeacherConfig(blocks=[0, 3], feature_point="after_upsample"))
    assert [lvl.stride for lvl in after.levels] == [4, 1]


def test_early_exit_skips_later_blocks_and_output_head():
    unet = unet_a()
    called = []
    unet.up_blocks[2].register_forward_hook(lambda *a: called.append("up2"))
    unet.conv_out.register_forward_hook(lambda *a: called.append("conv_out"))
    teacher = DiffusionTeacher(unet, DDPMScheduler(), TeacherConfig(blocks=[0, 1]))
    teacher(torch.rand(1, 3, TINY_IMAGE, TINY_IMAGE))
    assert called == []


def test_teacher_is_frozen_stochastic_and_stays_in_eval():
    teacher = DiffusionTeacher(unet_a(), DDPMScheduler(), TeacherConfig(blocks=[0]))
    teacher.train()
    assert not teacher.unet.training
    assert not any(p.requires_grad for p in teacher.parameters())
    images = torch.rand(2, 3, TINY_IMAGE, TINY_IMAGE)
    first, second = teacher(images).features[0], teacher(images).features[0]
    assert not first.requires_grad
    assert not torch.equal(first, second), "each call must draw fresh noise"
    torch.manual_seed(5)
    a = teacher(images).features[0]
    torch.manual_seed(5)
    torch.testing.assert_close(teacher(images).features[0], a)


def test_loads_from_pipeline_folder_and_bare_unet_folder(tiny_teacher_dir, tmp_path):
    cfg = TeacherConfig(path=str(tiny_teacher_dir), blocks=[0, 1])
    teacher = build_diffusion_teacher(cfg)
    assert [lvl.stride for lvl in teacher.levels] == [8, 4]
    bare = tmp_path / "bare"
    teacher.unet.save_pretrained(bare)
    assert build_diffusion_teacher(TeacherConfig(path=str(bare), blocks=[0])).levels[0].channels == 32


def test_bad_teacher_inputs_are_clear_errors(tiny_teacher_dir, tmp_path):
    with pytest.raises(TeacherError, match="does not exist"):
        build_diffusion_teacher(TeacherConfig(path=str(tmp_path / "nope")))
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "weights.bin").write_bytes(b"x")
    with pytest.raises(TeacherError, match="not a diffusers model"):
        build_diffusion_teacher(TeacherConfig(path=str(tmp_path / "junk")))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(TeacherError, match="AutoencoderKL"):
        build_diffusion_teacher(TeacherConfig(path=str(tmp_path / "other")))
    (tmp_path / "broken" / "unet").mkdir(parents=True)
    (tmp_path / "broken" / "unet" / "config.json").write_text((tiny_teacher_dir / "unet" / "config.json").read_text())
    (tmp_path / "broken" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(TeacherError, match="cannot load teacher weights"):
        build_diffusion_teacher(TeacherConfig(path=str(tmp_path / "broken")))
    with pytest.raises(TeacherError, match=r"out of range.*4 up blocks"):
        build_diffusion_teacher(TeacherConfig(path=str(tiny_teacher_dir), blocks=[0, 7]))
    with pytest.raises(TeacherError, match="timestep"):
        build_diffusion_teacher(TeacherConfig(path=str(tiny_teacher_dir), timestep=1000))


def test_unet_arch_config_validation():
    from dtengine.runtime.errors import ConfigError

    with pytest.raises(ConfigError):
        UNetArchConfig(block_out_channels=[30, 64], norm_num_groups=32)


def test_untrained_weights_are_a_seeded_fresh_init(tiny_teacher_dir):
    def params(**overrides):
        cfg = TeacherConfig(path=str(tiny_teacher_dir), blocks=[0, 1], **overrides)
        return torch.cat([p.flatten() for p in build_diffusion_teacher(cfg).unet.parameters()])

    # The fixture teacher is itself a seed-0 init, so compare against other seeds.
    trained, untrained = params(), params(weights="untrained", untrained_seed=7)
    assert trained.shape == untrained.shape and not torch.equal(trained, untrained)
    assert torch.equal(untrained, params(weights="untrained", untrained_seed=7))
    assert not torch.equal(untrained, params(weights="untrained", untrained_seed=8))
    with pytest.raises(ConfigError, match="teacher.weights"):
        TeacherConfig(weights="random")
