"""teacher.attention: "dtengine" puts dtengine's processor on each attention layer; "diffusers" keeps the default."""

from __future__ import annotations

import pytest
import torch
from diffusers.models.attention_processor import Attention

from dtengine.runtime.errors import ConfigError
from dtengine.teachers import TeacherConfig, build_diffusion_teacher
from dtengine.teachers.attention_processor import DTEngineAttnProcessor


def _processors(teacher):
    return [type(m.processor).__name__ for m in teacher.unet.modules() if isinstance(m, Attention)]


def test_switch_installs_or_keeps_processors(tiny_teacher_dir):
    ours = build_diffusion_teacher(TeacherConfig(path=str(tiny_teacher_dir), blocks=[0, 1]))
    default = build_diffusion_teacher(TeacherConfig(path=str(tiny_teacher_dir), blocks=[0, 1], attention="diffusers"))
    assert _processors(ours) and set(_processors(ours)) == {DTEngineAttnProcessor.__name__}
    assert DTEngineAttnProcessor.__name__ not in _processors(default)
    images = torch.rand(2, 3, 32, 32)
    torch.manual_seed(0)
    want = default(images).features
    torch.manual_seed(0)
    got = ours(images).features  # CPU: auto -> SDPA behind dtengine's op
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_unknown_attention_is_a_config_error():
    with pytest.raises(ConfigError, match="teacher.attention"):
        TeacherConfig(attention="flash")
