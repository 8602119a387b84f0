"""Student: regressor output shapes for two timm families, stride matching, name errors."""

from __future__ import annotations

import pytest
import torch

from dtengine.runtime.errors import StudentError
from dtengine.students import DistillationStudent, PyramidPoolingModule, StudentConfig, create_backbone
from dtengine.teachers import TeacherLevel

LEVELS = [TeacherLevel(block=0, stride=16, channels=48), TeacherLevel(1, 8, 40), TeacherLevel(2, 4, 24)]


@pytest.mark.parametrize("model", ["resnet18", "convnext_atto"])
@pytest.mark.parametrize("size", [(64, 64), (72, 56)])
def test_regressed_maps_have_teacher_shapes(model, size):
    student = DistillationStudent(StudentConfig(model=model, regressor_channels=32), LEVELS)
    h, w = size
    out_sizes = [(h // lvl.stride, w // lvl.stride) for lvl in LEVELS]
    preds = student(torch.rand(2, 3, h, w), out_sizes).features
    assert [p.shape for p in preds] == [(2, lvl.channels, *s) for lvl, s in zip(LEVELS, out_sizes)]
    preds[0].mean().backward()  # gradients reach the backbone through the regressor
    assert student.backbone.state_dict(keep_vars=True)[next(iter(student.backbone.state_dict()))].grad is not None


def test_odd_teacher_sizes_are_resized():
    student = DistillationStudent(StudentConfig(regressor_channels=16), [TeacherLevel(0, 8, 5)])
    (pred,) = student(torch.rand(2, 3, 36, 44), [(5, 6)]).features  # teacher rounded differently than the student
    assert pred.shape == (2, 5, 5, 6)


def test_fpn_spans_from_finest_matched_level_to_last_stage():
    student = DistillationStudent(StudentConfig(model="resnet18", regressor_channels=16), [TeacherLevel(0, 8, 4)])
    assert student.regressor.student_strides == [8, 16, 32]
    assert student.regressor.source_level == [0]


def test_stride_mismatch_is_a_clear_error():
    with pytest.raises(StudentError, match=r"stride \[2\].*convnext_atto.*\[4, 8, 16, 32\]"):
        DistillationStudent(StudentConfig(model="convnext_atto"), [TeacherLevel(3, 2, 8)])


def test_unknown_model_suggests_close_names():
    with pytest.raises(StudentError, match="resnet_18.*did you mean.*resnet18"):
        create_backbone("resnet_18")
    with pytest.raises(StudentError, match="not a timm model"):
        create_backbone("definitely-not-a-model")


def test_pyramid_pooling_keeps_resolution():
    ppm = PyramidPoolingModule(12, 8, (1, 2, 3, 6))
    assert ppm(torch.rand(2, 12, 7, 5)).shape == (2, 8, 7, 5)
