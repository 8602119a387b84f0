"""What a run says and keeps: a resume takes the run's own config.yaml, refuses changes to what it computes
unless allowed, and lists what it changes; the start banner warns of unused samples and a run inside its warmup;
an image size the teacher cannot take is a one-line error."""

from __future__ import annotations

import yaml

from dtengine.cli import main


def distill(capsys, *argv):
    code = main(["distill", "--config", "configs/demo.yaml", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def resume(capsys, run_dir, *argv):
    code = main(["distill", "--resume", f"out_dir={run_dir}", *argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    (line,) = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    return line


def test_resume_keeps_the_runs_config_and_lists_what_it_changes(capsys, tiny_run_overrides, tmp_path):
    run_dir = tmp_path / "run"
    code, _, err = distill(capsys, *tiny_run_overrides, "optim.lr=0.0007", "data.shuffle_buffer=5")
    assert code == 0, err
    saved = (run_dir / "config.yaml").read_text()

    # The interrupt message's command: no --config, so the run's own settings, not the defaults.
    code, out, err = resume(capsys, run_dir, "train.steps=4")
    assert code == 2
    line = one_line(err)
    assert "would change what the run computes (train.steps: 3 -> 4)" in line and "--allow-change train.steps" in line
    assert (run_dir / "config.yaml").read_text() == saved  # nothing written by the refused resume

    code, out, err = resume(capsys, run_dir, "train.steps=5", "train.log_every=2", "--allow-change", "train.steps")
    assert code == 0, err
    assert "resumed with train.steps: 3 -> 5" in out and "resumed with train.log_every: 1 -> 2" in out
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["optim"]["lr"] == 0.0007 and config["data"]["shuffle_buffer"] == 5 and config["train"]["steps"] == 5


def test_resume_of_a_run_without_config_yaml_is_a_clear_error(capsys, tmp_path):
    code, _, err = resume(capsys, tmp_path / "nothing")
    assert code == 2
    assert "has no config.yaml to resume with" in one_line(err)


def test_banner_warns_of_unused_samples_and_a_run_inside_its_warmup(capsys, tiny_run_overrides):
    # 48 images at batch 5: 9 full batches, 3 images never used; 3 steps inside a 5-step warmup.
    code, out, err = distill(capsys, *tiny_run_overrides, "data.batch_size=5", "optim.warmup_steps=5")
    assert code == 0, err
    assert "images: 32 px" in out
    assert "note: 3 samples per epoch are not used" in out
    assert "ends within its warmup (5 steps)" in out


def test_an_image_size_the_teacher_cannot_take_is_one_line(capsys, tiny_run_overrides):
    code, _, err = distill(capsys, *tiny_run_overrides, "data.image_size=36")
    assert code == 2
    line = one_line(err)
    assert (
        "data.image_size 36 is not a multiple of the teacher's total stride 8" in line and "use e.g. 32 or 40" in line
    )


def test_deterministic_runs_only_deterministic_algorithms_and_restores_the_settings(tiny_run_overrides, monkeypatch):
    import torch

    from dtengine import load_config
    from dtengine.train import distillation

    seen, train_loop = [], distillation.train_loop

    def recording_loop(*args, **kwargs):
        seen.append((torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark))
        return train_loop(*args, **kwargs)

    monkeypatch.setattr(distillation, "train_loop", recording_loop)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", True)
    cfg = load_config(None, [*tiny_run_overrides, "train.deterministic=true"])
    distillation.run_distillation(cfg)
    assert seen == [(True, False)]
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
