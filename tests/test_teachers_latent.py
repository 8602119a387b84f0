"""Latent teachers (Stable-Diffusion-style U-Net, DiT): early exit equals a hooked full forward, strides count
input pixels, the empty-prompt embedding, the null class, bad folders, and a short distillation with each."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from dtengine import load_config
from dtengine.runtime.errors import ConfigError, TeacherError
from dtengine.teachers import build_teacher, describe_teacher
from dtengine.teachers.latent import EMPTY_PROMPT_FILE
from dtengine.train.distillation import run_distillation

from tiny import TINY_IMAGE, save_tiny_latent_pipelines

BLOCKS = {"latent_unet": [0, 1], "dit": [0, 2]}


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    return save_tiny_latent_pipelines(tmp_path_factory.mktemp("latent"))


def teacher_config(pipelines, kind, *extra):
    blocks = ",".join(map(str, BLOCKS[kind]))
    return load_config(None, [f"teacher.kind={kind}", f"teacher.path={pipelines[kind]}", f"teacher.blocks=[{blocks}]",
                              f"data.image_size={TINY_IMAGE}", *extra]).teacher  # fmt: skip


def hooked(modules, inputs_of=()):
    """Forward hooks recording each module's output (and, for `inputs_of`, its first input) by position."""
    outputs, inputs = {}, {}

    def record(store, index, value):
        store[index] = value  # returns None: the hook must not replace the module's output

    handles = [m.register_forward_hook(lambda m, a, out, i=i: record(outputs, i, out)) for i, m in enumerate(modules)]
    handles += [m.register_forward_hook(lambda m, a, out, i=i: record(inputs, i, a[0])) for i, m in inputs_of]
    return outputs, inputs, handles


@torch.no_grad()
@pytest.mark.parametrize("feature_point", ["before_upsample", "after_upsample"])
def test_latent_unet_early_exit_equals_a_hooked_full_forward(pipelines, feature_point):
    teacher = build_teacher(teacher_config(pipelines, "latent_unet", f"teacher.feature_point={feature_point}"))
    unet = teacher.unet
    x_t, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 500])
    ours = teacher.features(x_t, t)
    upsamplers = [(i, block.upsamplers[0]) for i, block in enumerate(unet.up_blocks) if block.upsamplers]
    outputs, inputs, handles = hooked(unet.up_blocks, upsamplers)
    context = teacher.prompt_embedding.expand(2, -1, -1)
    unet(x_t, t, encoder_hidden_states=context)
    for handle in handles:
        handle.remove()
    theirs = [
        inputs.get(b, outputs[b]) if feature_point == "before_upsample" else outputs[b] for b in BLOCKS["latent_unet"]
    ]
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    strides = [16, 8] if feature_point == "before_upsample" else [8, 8]
    assert [lv.stride for lv in teacher.levels] == strides and [lv.channels for lv in teacher.levels] == [32, 16]


@torch.no_grad()
def test_dit_early_exit_equals_a_hooked_full_forward_with_the_null_class(pipelines):
    teacher = build_teacher(teacher_config(pipelines, "dit"))
    net = teacher.unet
    assert teacher.class_label == 10  # num_embeds_ada_norm: the null class of a 10-class DiT
    x_t, t = torch.randn(2, 4, 4, 4), torch.tensor([10, 500])
    ours = teacher.features(x_t, t)
    outputs, _, handles = hooked(net.transformer_blocks)
    net(x_t, t, class_labels=torch.full((2,), 10))
    for handle in handles:
        handle.remove()
    for a, block in zip(ours, BLOCKS["dit"]):
        assert a.shape == (2, 16, 2, 2)
        torch.testing.assert_close(a, outputs[block].transpose(1, 2).reshape(2, 16, 2, 2))
    assert [(lv.block, lv.stride) for lv in teacher.levels] == [(0, 16), (2, 16)]
    with pytest.raises(ConfigError, match="class_label 11 out of range.*11 label embeddings"):
        build_teacher(teacher_config(pipelines, "dit", "teacher.dit.class_label=11"))


@torch.no_grad()
@pytest.mark.parametrize("kind", ["latent_unet", "dit"])
def test_images_are_encoded_by_the_vae_and_noised_by_the_callers_noise(pipelines, kind):
    teacher = build_teacher(teacher_config(pipelines, kind))
    images = torch.rand(2, 3, TINY_IMAGE, TINY_IMAGE)
    torch.testing.assert_close(teacher.encode(images * 2 - 1), teacher.encode(images * 2 - 1))  # posterior mean
    assert teacher.encode(images).shape == (2, 4, 4, 4)
    noise = torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE)
    first, again = teacher(images, noise), teacher(images, noise.clone())
    other = teacher(images, torch.randn(2, 3, TINY_IMAGE, TINY_IMAGE))
    assert first.images is images
    for a, b, c, level in zip(first.features, again.features, other.features, teacher.levels):
        assert a.shape[-1] == TINY_IMAGE // level.stride
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, c)
    latent_noise = teacher.noise_for(torch.zeros(2, 4, 4, 4), noise)
    assert latent_noise.shape == (2, 4, 4, 4) and set(latent_noise.flatten().tolist()) <= set(noise.flatten().tolist())


def test_the_empty_prompt_embedding_is_computed_once_and_stored_beside_the_weights(pipelines, tmp_path):
    from transformers import AutoTokenizer, CLIPTextModel

    folder = tmp_path / "sd"
    shutil.copytree(pipelines["latent_unet"], folder, ignore=shutil.ignore_patterns(EMPTY_PROMPT_FILE))
    cfg = teacher_config({"latent_unet": folder}, "latent_unet")
    teacher = build_teacher(cfg)
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    tokens = tokenizer([""], padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        expected = CLIPTextModel.from_pretrained(folder / "text_encoder")(tokens.input_ids).last_hidden_state
    torch.testing.assert_close(teacher.prompt_embedding, expected)
    torch.testing.assert_close(load_file(folder / EMPTY_PROMPT_FILE)["embedding"], expected)
    shutil.rmtree(folder / "text_encoder")  # from now on the stored file is what is read
    torch.testing.assert_close(build_teacher(cfg).prompt_embedding, expected)

    (folder / EMPTY_PROMPT_FILE).unlink()
    with pytest.raises(TeacherError, match="prompt_embedding=zeros"):
        build_teacher(cfg)
    zeros = build_teacher(
        teacher_config({"latent_unet": folder}, "latent_unet", "teacher.latent_unet.prompt_embedding=zeros")
    )
    assert not zeros.prompt_embedding.any()
    with pytest.raises(TeacherError, match="does not exist"):
        build_teacher(
            teacher_config(
                {"latent_unet": folder}, "latent_unet", f"teacher.latent_unet.prompt_embedding={tmp_path / 'x'}"
            )
        )


def test_unset_blocks_pick_backbone_strides_or_spread_over_a_dits_depth(pipelines):
    unet = build_teacher(
        load_config(None, ["teacher.kind=latent_unet", f"teacher.path={pipelines['latent_unet']}"]).teacher
    )
    assert [(lv.block, lv.stride) for lv in unet.levels] == [(0, 16), (1, 8)]
    dit = build_teacher(load_config(None, ["teacher.kind=dit", f"teacher.path={pipelines['dit']}"]).teacher)
    assert dit.cfg.blocks == [0, 1, 2]  # 3 blocks: quarters round to these


def test_bad_latent_folders_are_one_line_errors(pipelines, tmp_path):
    with pytest.raises(TeacherError, match="needs a local pipeline folder with vae/ and transformer/"):
        build_teacher(teacher_config({"dit": tmp_path / "missing"}, "dit"))
    shutil.copytree(pipelines["dit"], tmp_path / "mixed")
    shutil.rmtree(tmp_path / "mixed" / "transformer")
    shutil.copytree(pipelines["latent_unet"] / "unet", tmp_path / "mixed" / "transformer")
    with pytest.raises(TeacherError, match="holds a UNet2DConditionModel, expected a DiTTransformer2DModel"):
        build_teacher(teacher_config({"dit": tmp_path / "mixed"}, "dit"))
    with pytest.raises(TeacherError, match=r"blocks \[5\] out of range.*3 transformer blocks"):
        build_teacher(
            load_config(None, ["teacher.kind=dit", f"teacher.path={pipelines['dit']}", "teacher.blocks=[5]"]).teacher
        )


@pytest.mark.parametrize("kind", ["latent_unet", "dit"])
def test_two_step_distillation_from_a_latent_teacher(pipelines, kind, tiny_run_overrides):
    blocks = ",".join(map(str, BLOCKS[kind]))
    overrides = [o for o in tiny_run_overrides if not o.startswith(("teacher.", "train.steps", "checkpoint."))]
    cfg = load_config(None, [*overrides, f"teacher.kind={kind}", f"teacher.path={pipelines[kind]}",
                             f"teacher.blocks=[{blocks}]", "train.steps=2", "checkpoint.every=2"])  # fmt: skip
    info = describe_teacher(cfg.teacher, cfg.data.image_size)
    assert info.flops_per_image > 0 and len(info.levels) == 2
    result = run_distillation(cfg)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))
