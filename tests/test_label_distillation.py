"""Label / mixed distillation: soft CE against an independent formula, per-mode terms, short runs, resume rules."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from dtengine import load_config
from dtengine.losses import LossConfig, distillation_terms, soft_cross_entropy
from dtengine.losses.objective import DistillConfig
from dtengine.ops import feature_regression_loss
from dtengine.runtime.checkpoint import load_checkpoint
from dtengine.runtime.errors import CheckpointError, ConfigError
from dtengine.students import DistillationStudent, StudentConfig
from dtengine.teachers import TeacherLevel
from dtengine.train.distillation import run_distillation


def kl_reference(student: torch.Tensor, teacher: torch.Tensor, tau: float) -> torch.Tensor:
    """tau^2 * (KL(p_t || p_s) + H(p_t)) per pixel: cross-entropy written through torch's KL divergence."""
    log_p_t = F.log_softmax(teacher / tau, dim=1)
    kl = F.kl_div(F.log_softmax(student / tau, dim=1), log_p_t, reduction="none", log_target=True).sum(1)
    entropy = -(log_p_t.exp() * log_p_t).sum(1)
    return tau**2 * (kl + entropy)  # (B, H, W)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_soft_cross_entropy_matches_kl_formula_with_gradients(tau):
    torch.manual_seed(0)
    student = torch.randn(3, 5, 7, 11, dtype=torch.float64, requires_grad=True)  # odd shape
    teacher = torch.randn(3, 5, 7, 11, dtype=torch.float64) * 3
    upstream = torch.randn(3, 7, 11, dtype=torch.float64)
    got = soft_cross_entropy(student, teacher, tau, reduction="none")
    want = kl_reference(student.float().double(), teacher, tau)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(got, student, upstream)
    (want_grad,) = torch.autograd.grad(kl_reference(student, teacher, tau), student, upstream)
    torch.testing.assert_close(grad, want_grad, rtol=1e-5, atol=1e-6)
    # Closed form of the same gradient: tau * (softmax(z_s / tau) - softmax(z_t / tau)) * upstream.
    closed = tau * ((student / tau).softmax(1) - (teacher / tau).softmax(1)) * upstream.unsqueeze(1)
    torch.testing.assert_close(grad, closed.detach(), rtol=1e-5, atol=1e-6)
    assert soft_cross_entropy(student, teacher, tau).item() == pytest.approx(want.mean().item(), rel=1e-5)


def test_soft_cross_entropy_resizes_student_and_stops_teacher_gradient():
    student = torch.randn(2, 4, 4, 5, requires_grad=True)
    teacher = torch.randn(2, 4, 8, 10, requires_grad=True)
    loss = soft_cross_entropy(student, teacher, 4.0)
    loss.backward()
    assert student.grad is not None and teacher.grad is None
    resized = F.interpolate(student.detach(), size=(8, 10), mode="bilinear", align_corners=False)
    assert loss.item() == pytest.approx(kl_reference(resized, teacher.detach(), 4.0).mean().item(), rel=1e-5)


def test_terms_per_mode():
    torch.manual_seed(0)
    student_feats, teacher_feats = [torch.randn(2, 6, 4, 4)], [torch.randn(2, 6, 4, 4)]
    student_logits, teacher_logits = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    loss_cfg = LossConfig()
    feat = feature_regression_loss(student_feats, teacher_feats, at_weight=loss_cfg.at_weight)
    ld = soft_cross_entropy(student_logits, teacher_logits, 4.0)

    def terms(mode, **kw):
        cfg = DistillConfig(mode=mode, interpreter="x" if mode != "feature" else "", **kw)
        return distillation_terms(student_feats, teacher_feats, student_logits, teacher_logits, loss_cfg, cfg)

    assert terms("feature").keys() == {"loss", "mse", "at"} and terms("feature")["loss"] == feat.loss
    assert terms("label").keys() == {"loss", "ld"} and terms("label")["loss"] == ld
    mixed = terms("mixed", label_weight=0.5)
    assert mixed.keys() == {"loss", "mse", "at", "ld"}
    assert mixed["loss"].item() == pytest.approx((feat.loss + 0.5 * ld).item())


def test_student_logit_head_shapes():
    levels = [TeacherLevel(0, 8, 6), TeacherLevel(1, 4, 5)]
    student = DistillationStudent(StudentConfig(regressor_channels=16), levels, num_classes=3)
    out = student(torch.rand(2, 3, 36, 44), [(5, 6), (9, 11)])
    assert [f.shape for f in out.features] == [(2, 6, 5, 6), (2, 5, 9, 11)]
    assert out.logits.shape == (2, 3, 9, 11)  # FPN's finest level: stride 4
    label_only = DistillationStudent(StudentConfig(regressor_channels=16), levels, 3, predict_features=False)
    assert label_only(torch.rand(2, 3, 32, 32), [(4, 4), (8, 8)]).features == []
    assert len(label_only.regressor.project) == 0


@pytest.mark.parametrize("mode", ["label", "mixed"])
def test_mode_without_interpreter_is_a_config_error(mode):
    with pytest.raises(ConfigError, match="needs distill.interpreter") as info:
        load_config(None, [f"distill.mode={mode}"])
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="distill.mode must be one of"):
        load_config(None, ["distill.mode=labels", "distill.interpreter=x"])


def rows_of(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_mixed_run_logs_ld_and_refuses_resume_in_another_mode(tiny_run_overrides, tiny_interpreter_dir):
    mixed = [*tiny_run_overrides, "distill.mode=mixed", f"distill.interpreter={tiny_interpreter_dir}", "train.steps=2"]
    mixed.append("train.tensorboard=false")
    result = run_distillation(load_config(None, mixed))
    rows = rows_of(result.run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        assert {"loss", "mse", "at", "ld"} <= set(row) and all(map(torch.isfinite, torch.tensor([row["ld"]])))
        assert row["loss"] == pytest.approx(row["mse"] + 10 * row["at"] + row["ld"], rel=1e-5)
    state = load_checkpoint(result.run_dir)
    assert state["architecture"]["distill_mode"] == "mixed" and state["architecture"]["logit_head_classes"] == 5
    assert any(key.startswith("logit_head.") for key in state["student"])
    assert result.backbone_path.is_file()
    with pytest.raises(CheckpointError, match="written for"):
        run_distillation(load_config(None, [*tiny_run_overrides, "train.steps=4"]), resume=True)
    label = [*tiny_run_overrides, "distill.mode=label", f"distill.interpreter={tiny_interpreter_dir}", "train.steps=4"]
    with pytest.raises(CheckpointError, match="written for"):
        run_distillation(load_config(None, label), resume=True)


def test_label_run_trains_head_without_projections(tiny_run_overrides, tiny_interpreter_dir):
    label = [*tiny_run_overrides, "distill.mode=label", f"distill.interpreter={tiny_interpreter_dir}", "train.steps=2"]
    result = run_distillation(load_config(None, [*label, "train.tensorboard=false"]))
    rows = rows_of(result.run_dir)
    assert all("ld" in r and "mse" not in r and r["loss"] == pytest.approx(r["ld"]) for r in rows)
    keys = load_checkpoint(result.run_dir)["student"]
    assert not any(k.startswith("regressor.project") for k in keys) and any(k.startswith("logit_head") for k in keys)


def test_interpreter_for_other_teacher_levels_is_refused(tiny_run_overrides, tiny_interpreter_dir):
    overrides = [*tiny_run_overrides, "teacher.blocks=[1]", "distill.mode=mixed"]
    with pytest.raises(CheckpointError, match="trained on teacher levels"):
        run_distillation(load_config(None, [*overrides, f"distill.interpreter={tiny_interpreter_dir}"]))


def test_demo_mixed_config_loads():
    from pathlib import Path

    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "demo_mixed.yaml")
    assert cfg.distill.mode == "mixed" and cfg.distill.temperature == 4.0 and cfg.distill.label_weight == 1.0
