"""torch.compile of the Distiller step: where it applies, no graph breaks, no recompiles, same losses as eager."""

from __future__ import annotations

import json
import os

import pytest
import torch
from torch._dynamo.utils import counters

from dtengine import Distiller, load_config
from dtengine.losses import objective
from dtengine.ops.feature_loss import fused_feature_regression_loss
from dtengine.parallel.compile import CompileConfig, apply_compile
from dtengine.runtime.device import seed_everything
from dtengine.train.distillation import run_distillation
from dtengine.train.optim import build_optimizer, build_scheduler, optimizer_step

from tiny import TINY_IMAGE


@pytest.fixture
def loss_through_the_custom_op(monkeypatch):
    """On CPU the loss would run the reference; route it through the fused custom op (its torch implementation),
    so the compiled graph contains the op exactly as a CUDA run does."""

    def through_op(student, teacher, *, at_weight, whiten, backend):
        return fused_feature_regression_loss(student, teacher, at_weight=at_weight, whiten=whiten, impl="torch")

    monkeypatch.setattr(objective, "feature_regression_loss", through_op)


@pytest.fixture
def tiny_compile_overrides(tiny_run_overrides):
    return [*tiny_run_overrides, "student.model=test_resnet", "optim.warmup_steps=2"]


def images(step: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(step)
    return torch.randint(0, 256, (4, 3, TINY_IMAGE, TINY_IMAGE), dtype=torch.uint8, generator=generator)


def train_steps(distiller, cfg, steps: range) -> list[dict[str, float]]:
    optimizer = build_optimizer(distiller, cfg.optim)
    scheduler = build_scheduler(optimizer, cfg.optim, 10)
    seen = []
    for step in steps:
        losses = distiller(images(step), step=step)
        losses["loss"].backward()
        optimizer_step(distiller, optimizer, scheduler, cfg.optim.grad_clip)
        seen.append({name: value.item() for name, value in losses.items()})
    return seen


def test_compile_is_off_on_cpu_unless_asked(tiny_compile_overrides):
    distiller = Distiller.from_config(load_config(None, tiny_compile_overrides))
    assert apply_compile(distiller, CompileConfig()) == []
    assert apply_compile(distiller, CompileConfig(enabled=True, backend="eager")) == ["teacher"]  # student: CUDA only
    assert apply_compile(distiller, CompileConfig(enabled=True, backend="eager", teacher=False, student=True)) == [
        "student"
    ]


def test_whole_step_traces_in_two_graphs_and_never_recompiles(tiny_compile_overrides, loss_through_the_custom_op):
    """fullgraph=True fails on a graph break; error_on_recompile fails on a recompile. Neither a learning-rate
    change (warmup) nor loading a checkpoint into the same modules (a resume) may cause one."""
    cfg = load_config(None, tiny_compile_overrides)
    distiller = Distiller.from_config(cfg).train()
    assert apply_compile(distiller, CompileConfig(enabled=True, backend="aot_eager", student=True)) == [
        "teacher",
        "student",
    ]
    counters.clear()
    train_steps(distiller, cfg, range(2))
    assert counters["stats"]["unique_graphs"] == 2  # the teacher pass and the student pass, each whole
    state = {name: value.clone() for name, value in distiller.student.state_dict().items()}
    with torch._dynamo.config.patch(error_on_recompile=True):
        distiller.student.load_state_dict(state)
        train_steps(distiller, cfg, range(2, 5))
    assert counters["stats"]["unique_graphs"] == 2


def test_the_trainer_compiles_and_times_the_first_step_apart(tiny_compile_overrides, tmp_path):
    overrides = [*tiny_compile_overrides, "compile.enabled=true", "compile.student=true", "compile.backend=aot_eager"]
    overrides.append("train.steps=2")
    result = run_distillation(load_config(None, overrides))
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["compiled"] == "teacher,student" and rows[0]["first_step_s"] > 0
    assert "first_step_s" not in rows[1] and rows[1]["img_per_s"] > 0


@pytest.mark.slow
def test_inductor_compiled_and_eager_losses_match_over_three_steps(tiny_compile_overrides, loss_through_the_custom_op):
    """Same seed, same keyed noise and flips: the losses of 3 training steps agree to 1e-3 (relative).

    The first step's losses agree to ~1e-7 (fp32 reordering by inductor's fused kernels). Adam then divides
    each gradient by its running RMS, which turns those last-bit differences in near-zero gradients into updates
    of full learning-rate size, so later steps drift further: 2e-4 relative by step 3 here."""
    cfg = load_config(None, tiny_compile_overrides)
    seed_everything(0)
    eager = train_steps(Distiller.from_config(cfg).train(), cfg, range(3))
    compiled_distiller = Distiller.from_config(cfg).train()
    apply_compile(compiled_distiller, CompileConfig(enabled=True, student=True))
    compiled = train_steps(compiled_distiller, cfg, range(3))
    assert compiled[0]["loss"] == pytest.approx(eager[0]["loss"], rel=1e-5)
    for step, (want, got) in enumerate(zip(eager, compiled)):
        for name in want:
            assert got[name] == pytest.approx(want[name], rel=1e-3, abs=1e-6), (step, name)


@pytest.mark.gpu
def test_cuda_graph_teacher_with_gradient_accumulation(tiny_compile_overrides):
    """The teacher pass replays a CUDA graph whose outputs the next replay overwrites: at grad_accum=2 every
    micro-batch must still see its own teacher features (checked against the eager step)."""
    base = [*tiny_compile_overrides, "train.device=cuda", "train.grad_accum=2", "train.steps=3", "train.log_every=1"]
    runs = {}
    for name, enabled in (("eager", "false"), ("compiled", "true")):
        cfg = load_config(
            None, [*base, f"compile.enabled={enabled}", f"out_dir={cfg_dir(tiny_compile_overrides)}-{name}"]
        )
        runs[name] = [json.loads(line)["loss"] for line in (run_distillation(cfg).run_dir / "metrics.jsonl").open()]
    assert runs["compiled"] == pytest.approx(runs["eager"], rel=2e-2)  # bf16 autocast on both sides


def cfg_dir(overrides: list[str]) -> str:
    return next(item.partition("=")[2] for item in overrides if item.startswith("out_dir="))


def test_the_inductor_cache_folder_changes_when_an_op_source_changes(tmp_path, monkeypatch):
    """Inductor's cache keys do not see a custom op's fake, so graphs compiled against an old op must live apart."""
    import importlib.util
    from types import SimpleNamespace

    from dtengine.parallel import compile as compile_module

    for package in ("ops", "kernels"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("VERSION = 1\n")
    roots = {"dtengine.ops": tmp_path / "ops", "dtkernels": tmp_path / "kernels"}
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: SimpleNamespace(origin=str(roots[name] / "__init__.py"))
    )
    before = compile_module.ops_fingerprint()
    assert compile_module.ops_fingerprint() == before
    (tmp_path / "kernels" / "launcher.py").write_text("BLOCK = 64\n")
    assert compile_module.ops_fingerprint() != before

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("DTENGINE_CACHE", str(tmp_path / "cache"))
    compile_module.use_dtengine_inductor_cache()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(
        tmp_path / "cache" / "inductor" / compile_module.ops_fingerprint()
    )
