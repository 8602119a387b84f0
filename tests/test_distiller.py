"""`Distiller`: the one step. What it owns, what it returns, how its randomness is keyed, how it is built."""

from __future__ import annotations

import pytest
import timm
import torch

from dtengine import Distiller, load_config
from dtengine.data import flip_where
from dtengine.losses import DistillConfig
from dtengine.runtime.device import SampleKeys, keyed_uniform
from dtengine.runtime.errors import StudentError
from dtengine.students import DistillationStudent, StudentConfig
from dtengine.teachers import TeacherConfig, build_diffusion_teacher

from tiny import TINY_IMAGE


@pytest.fixture
def teacher(tiny_teacher_dir):
    return build_diffusion_teacher(TeacherConfig(path=str(tiny_teacher_dir), blocks=[0, 1]))


@pytest.fixture
def distiller(teacher):
    return Distiller(teacher, "resnet18", student_cfg=StudentConfig(regressor_channels=32), seed=3)


def images(count=4, seed=0):
    return torch.randint(
        0, 256, (count, 3, TINY_IMAGE, TINY_IMAGE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed)
    )


def test_only_the_student_is_state_parameters_and_training_mode(distiller, teacher):
    assert all(key.startswith("student.") for key in distiller.state_dict())
    assert {id(p) for p in distiller.parameters()} == {id(p) for p in distiller.student.parameters()}
    assert not any(p.requires_grad for p in teacher.parameters())
    distiller.train()
    assert distiller.student.training and not teacher.training and not teacher.unet.training
    distiller.double()  # .to() and friends still reach the frozen teacher
    assert next(teacher.parameters()).dtype == torch.float64
    assert not hasattr(distiller, "_modules") or "teacher" not in distiller._modules


def test_forward_returns_named_losses_and_only_loss_has_gradient(distiller):
    losses = distiller(images(), step=0)
    assert set(losses) == {"loss", "mse", "at"} == set(distiller.term_names)
    assert all(v.ndim == 0 and v.dtype == torch.float32 for v in losses.values())
    assert losses["loss"].requires_grad and not losses["mse"].requires_grad and not losses["at"].requires_grad
    losses["loss"].backward()
    assert all(p.grad is not None for p in distiller.student.backbone.parameters())


def test_uint8_and_float_batches_are_the_same_batch(distiller):
    batch = images()
    a = distiller(batch, step=5)
    b = distiller(batch.float() / 255, step=5)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)


def test_nhwc_batches_are_converted_to_the_steps_layout(distiller):
    """A loader may hand NHWC memory (DALI does); the CPU step reads the same values in NCHW."""
    batch = images()
    nhwc = batch.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)
    got, _ = distiller.inputs(nhwc, SampleKeys(7, 11, 0))
    want, _ = distiller.inputs(batch, SampleKeys(7, 11, 0))
    assert got.is_contiguous() and not nhwc.is_contiguous()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(batch, images())  # the loader's batch is never written to


def test_randomness_is_keyed_by_step_and_global_sample_index(distiller):
    """Two micro-batches (or two ranks) of 2 draw exactly what one batch of 4 draws: flips and noise alike."""
    batch = images(4)
    whole_images, whole_noise = distiller.inputs(batch, SampleKeys(7, 11, 0))
    halves = [distiller.inputs(batch[i : i + 2], SampleKeys(7, 11, i)) for i in (0, 2)]
    torch.testing.assert_close(torch.cat([h[0] for h in halves]), whole_images, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([h[1] for h in halves]), whole_noise, rtol=0, atol=0)
    mask = keyed_uniform(SampleKeys(7, 11, 0).generators(4)) < 0.5  # each sample's own flip
    torch.testing.assert_close(whole_images, flip_where(mask, batch.float() / 255)[0], rtol=0, atol=0)
    other_step = distiller.inputs(batch, SampleKeys(7, 12, 0))[1]
    assert not torch.equal(other_step, whole_noise)
    # The noise does not depend on whether flips are on.
    distiller.hflip = False
    images_no_flip, noise_no_flip = distiller.inputs(batch, SampleKeys(7, 11, 0))
    torch.testing.assert_close(noise_no_flip, whole_noise, rtol=0, atol=0)
    torch.testing.assert_close(images_no_flip, batch.float() / 255, rtol=0, atol=0)


def test_the_two_parts_compose_to_forward(distiller):
    batch = images()
    want = distiller(batch, step=2, first_index=8)
    x, noise = distiller.inputs(batch, SampleKeys(distiller.seed, 2, 8))
    targets = distiller.teacher_targets(x, noise)
    assert not any(f.requires_grad for f in targets.features) and targets.soft_labels is None
    got = distiller.student_losses(targets.images, targets)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_built_from_objects_a_user_has(teacher):
    backbone = timm.create_model("resnet18", features_only=True)
    distiller = Distiller(teacher, backbone, student_cfg=StudentConfig(regressor_channels=32))
    assert distiller.student.backbone is backbone and distiller.student.model_name == "resnet18"
    ready = DistillationStudent(StudentConfig(regressor_channels=32), teacher.levels)
    assert Distiller(teacher, ready).student is ready
    with pytest.raises(StudentError, match="features_only"):
        Distiller(teacher, torch.nn.Linear(3, 3))
    # The student's initialisation follows the seed, not whatever the global generator holds.
    a = Distiller(teacher, "resnet18", student_cfg=StudentConfig(regressor_channels=32), seed=1)
    torch.manual_seed(123)
    b = Distiller(teacher, "resnet18", student_cfg=StudentConfig(regressor_channels=32), seed=1)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_from_config_and_label_modes(tiny_run_overrides, tiny_interpreter_dir):
    cfg = load_config(None, [*tiny_run_overrides, "distill.mode=mixed", f"distill.interpreter={tiny_interpreter_dir}"])
    distiller = Distiller.from_config(cfg)
    assert distiller.interpreter is not None and not any("interpreter" in k for k in distiller.state_dict())
    losses = distiller(images(), step=0)
    assert set(losses) == {"loss", "mse", "at", "ld"}
    label = Distiller(
        distiller.teacher, "resnet18", distill=DistillConfig(mode="label", interpreter=str(tiny_interpreter_dir))
    )
    assert set(label(images(), step=0)) == {"loss", "ld"} and label.student.logit_head is not None
