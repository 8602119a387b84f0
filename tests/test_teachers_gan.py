"""GAN teachers: generated images and tapped features, z keyed per sample (ranks never share images), weights
read without unpickling, clear errors, and a 2-step distillation that reads no dataset."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from dtengine import Distiller, load_config
from dtengine.runtime.device import SampleKeys
from dtengine.runtime.errors import ConfigError, TeacherError
from dtengine.students import StudentConfig
from dtengine.teachers import build_teacher
from dtengine.teachers.gan import TinyGenerator
from dtengine.train.distillation import run_distillation

SIZE = 64
SMALL = ["teacher.kind=gan", "teacher.gan.kwargs={z_dim: 16, channels: [32, 16, 16, 8]}", f"data.image_size={SIZE}"]


def gan_config(*extra):
    return load_config(None, [*SMALL, *extra])


def saved_generator(path: Path) -> tuple[Path, TinyGenerator]:
    torch.manual_seed(1)
    generator = TinyGenerator(z_dim=16, channels=(32, 16, 16, 8))
    save_file(generator.state_dict(), path)
    return path, generator


@torch.no_grad()
def test_features_are_the_tapped_stage_outputs_of_the_generated_images(tmp_path):
    weights, generator = saved_generator(tmp_path / "g.safetensors")
    teacher = build_teacher(gan_config(f"teacher.path={weights}").teacher)
    assert [(lv.block, lv.stride, lv.channels) for lv in teacher.levels] == [(0, 8, 32), (1, 4, 16)]
    noise = torch.randn(2, 3, SIZE, SIZE)
    out = teacher(torch.zeros(2, 3, SIZE, SIZE), noise)
    z = noise.flatten(1)[:, :16]
    h, stages = generator.project(z).view(2, -1, 4, 4), []
    for stage in generator.stages:
        h = stage(h)
        stages.append(h)
    torch.testing.assert_close(out.images, (torch.tanh(generator.to_rgb(h)) + 1) / 2)
    for got, want in zip(out.features, stages[:2]):
        torch.testing.assert_close(got, want)
    assert out.images.min() >= 0 and out.images.max() <= 1


@torch.no_grad()
def test_every_sample_and_rank_gets_its_own_z():
    teacher = build_teacher(gan_config("teacher.weights=untrained").teacher)
    distiller = Distiller(teacher, "resnet18", student_cfg=StudentConfig(regressor_channels=16))
    batch = torch.zeros(2, 3, SIZE, SIZE, dtype=torch.uint8)

    def generated(first_index):
        images, noise = distiller.inputs(batch, SampleKeys(seed=0, step=3, first_index=first_index))
        return distiller.teacher_targets(images, noise).images

    rank0, rank1, again = generated(0), generated(2), generated(0)
    torch.testing.assert_close(rank0, again)
    assert not torch.allclose(rank0[0], rank0[1]) and not torch.allclose(rank0, rank1)


def test_generator_weights_load_strictly_and_never_unpickle(tmp_path):
    weights, _ = saved_generator(tmp_path / "g.safetensors")
    with pytest.raises(TeacherError, match="do not fit TinyGenerator"):
        build_teacher(load_config(None, ["teacher.kind=gan", f"teacher.path={weights}"]).teacher)  # default widths

    class Payload:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    (tmp_path / "g.pt").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(TeacherError, match="cannot read generator weights"):
        build_teacher(gan_config(f"teacher.path={tmp_path / 'g.pt'}").teacher)
    assert not (tmp_path / "pwned").exists()
    with pytest.raises(TeacherError, match="do not exist"):
        build_teacher(gan_config(f"teacher.path={tmp_path / 'none.safetensors'}").teacher)
    with pytest.raises(ConfigError, match="teacher.path=FILE"):
        build_teacher(gan_config().teacher)


@pytest.mark.parametrize(
    "override, error, match",
    [
        ("teacher.gan.generator=nomodule", ConfigError, "must be 'module:Class'"),
        ("teacher.gan.generator=dtengine.nothing:G", ConfigError, "cannot be imported"),
        ("teacher.gan.generator=pathlib:Path", ConfigError, "not a torch.nn.Module"),
        ("teacher.gan.kwargs={depth: 3}", ConfigError, "kwargs do not fit"),
        ("teacher.gan.taps=[stages.9]", TeacherError, r"\['stages.9'\] are not modules"),
        ("teacher.blocks=[4]", TeacherError, r"blocks \[4\] out of range.*3 taps"),
    ],
)
def test_bad_generator_settings_are_one_line_errors(override, error, match):
    with pytest.raises(error, match=match):
        build_teacher(load_config(None, ["teacher.kind=gan", "teacher.weights=untrained", override]).teacher)


def test_a_gan_run_reads_no_dataset_and_needs_the_generators_size():
    assert gan_config().data.loader == "synthetic"
    with pytest.raises(ConfigError, match="data.loader=wds has nothing to do"):
        gan_config("data.loader=wds")
    teacher = build_teacher(gan_config("teacher.weights=untrained").teacher)
    with pytest.raises(ConfigError, match="data.image_size 32 differs from the 64 px"):
        teacher.check_image_size(32)


def test_two_step_distillation_from_a_generator(tiny_run_overrides):
    keep = [o for o in tiny_run_overrides if not o.startswith(("teacher.", "train.steps", "checkpoint.", "data."))]
    cfg = load_config(None, [*keep, *SMALL, "teacher.weights=untrained", "data.batch_size=4",
                             "train.steps=2", "checkpoint.every=2"])  # fmt: skip
    result = run_distillation(cfg)
    assert result.steps == 2 and torch.isfinite(torch.tensor(result.final_loss))


@torch.no_grad()
def test_the_tap_hooks_survive_torch_compile():
    """On CUDA the engine compiles the teacher pass; dynamo must trace the hooks that collect the features."""
    teacher = build_teacher(gan_config("teacher.weights=untrained").teacher)
    images, noise = torch.rand(2, 3, SIZE, SIZE), torch.randn(2, 3, SIZE, SIZE)
    want = teacher(images, noise)
    got = torch.compile(teacher, backend="eager", dynamic=False)(images, noise)
    torch.testing.assert_close(got.images, want.images)
    for a, b in zip(got.features, want.features, strict=True):
        torch.testing.assert_close(a, b)
