"""Feature interpreter: shapes, CE + 3 * Dice against independent formulas, train-interpreter end to end."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from dtengine import load_config
from dtengine.cli import main
from dtengine.data import write_shards
from dtengine.losses.segmentation import IGNORE_INDEX, interpreter_loss, soft_dice_loss
from dtengine.runtime.errors import CheckpointError, DataError
from dtengine.teachers import TeacherLevel, build_diffusion_teacher
from dtengine.teachers.interpreter import FeatureInterpreter, load_interpreter
from dtengine.train.interpreter_training import InterpreterTrainingConfig, train_interpreter

LEVELS = [TeacherLevel(0, 8, 16), TeacherLevel(1, 4, 8)]


def test_interpreter_shapes_and_gradients():
    torch.manual_seed(0)
    interpreter = FeatureInterpreter(LEVELS, num_classes=5, channels=32)
    features = [torch.randn(3, 16, 5, 6), torch.randn(3, 8, 9, 11)]  # odd sizes, as from a 36 x 44 image
    logits = interpreter(features)
    assert logits.shape == (3, 5, 9, 11)  # fused at the finest level
    assert interpreter(features, out_size=(36, 44)).shape == (3, 5, 36, 44)
    logits.backward(torch.randn_like(logits))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in interpreter.parameters())
    finer = FeatureInterpreter(LEVELS, num_classes=5, channels=32, output_stride=2)
    assert finer(features).shape == (3, 5, 18, 22)
    assert interpreter.norm.num_groups == 32 and isinstance(interpreter.act, torch.nn.SiLU)
    assert interpreter.depthwise.groups == 2 * 32


def test_dice_and_combined_loss_by_hand():
    # Uniform predictions over 2 classes, one pixel of each: dice_c = (2 * 0.5 + 1) / (1 + 1 + 1) = 2/3.
    logits, labels = torch.zeros(1, 2, 1, 2), torch.tensor([[[0, 1]]])
    assert soft_dice_loss(logits, labels).item() == pytest.approx(1 / 3)
    terms = interpreter_loss(logits, labels)
    assert terms["ce"].item() == pytest.approx(math.log(2))
    assert terms["loss"].item() == pytest.approx(math.log(2) + 1.0)


def reference_dice(logits: np.ndarray, labels: np.ndarray, smooth: float = 1.0) -> float:
    b, k, h, w = logits.shape
    dices = []
    for c in range(k):
        inter = p_sum = y_sum = 0.0
        for n in range(b):
            for i in range(h):
                for j in range(w):
                    if labels[n, i, j] == IGNORE_INDEX:
                        continue
                    z = logits[n, :, i, j]
                    p = math.exp(z[c] - z.max()) / np.exp(z - z.max()).sum()
                    y = float(labels[n, i, j] == c)
                    inter, p_sum, y_sum = inter + p * y, p_sum + p, y_sum + y
        dices.append((2 * inter + smooth) / (p_sum + y_sum + smooth))
    return 1 - sum(dices) / k


def test_dice_and_combined_loss_against_loops():
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 7, 9, dtype=torch.float64)
    labels = torch.randint(0, 4, (3, 7, 9))  # class 4 absent: its dice is the smoothed one
    labels[0, :2, :3] = IGNORE_INDEX
    want = reference_dice(logits.numpy(), labels.numpy())
    assert soft_dice_loss(logits, labels).item() == pytest.approx(want, rel=1e-5)
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX).item()
    assert interpreter_loss(logits, labels)["loss"].item() == pytest.approx(ce + 3 * want, rel=1e-5)


def test_train_interpreter_saves_loads_and_evaluates(tiny_interpreter_dir, tiny_teacher_dir):
    info = json.loads((tiny_interpreter_dir / "interpreter.json").read_text())
    assert info["num_classes"] == 5 and info["channels"] == 32 and info["dropout"] == 0.1
    assert [lvl[0] for lvl in info["teacher_levels"]] == [0, 1]
    assert 0.0 <= info["val"]["miou"] <= 1.0 and info["val"]["images"] == 8
    rows = [json.loads(line) for line in (tiny_interpreter_dir / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "ce", "dice"} <= set(rows[0]) and "val_miou" in rows[-1]

    cfg = load_config(None, [f"teacher.path={tiny_teacher_dir}", "teacher.blocks=[0,1]"])
    teacher = build_diffusion_teacher(cfg.teacher)
    interpreter = load_interpreter(tiny_interpreter_dir, teacher.levels)
    assert not interpreter.training and not any(p.requires_grad for p in interpreter.parameters())
    logits = interpreter(teacher(torch.rand(2, 3, 32, 32)).features)
    assert logits.shape == (2, 5, 8, 8)  # finest tiny level: stride 4

    other = build_diffusion_teacher(
        load_config(None, [f"teacher.path={tiny_teacher_dir}", "teacher.blocks=[0,1,2]"]).teacher
    )
    with pytest.raises(CheckpointError, match="trained on teacher levels"):
        load_interpreter(tiny_interpreter_dir, other.levels)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_interpreter(tiny_interpreter_dir / "nowhere", teacher.levels)


def test_train_interpreter_cli(capsys, tiny_interpreter_overrides, tmp_path):
    code = main(["train-interpreter", "--out", str(tmp_path / "interp"), *tiny_interpreter_overrides, "steps=1"])
    out = capsys.readouterr().out
    assert code == 0
    assert "held-out mIoU:" in out and "distill.interpreter=" in out
    assert (tmp_path / "interp" / "interpreter.safetensors").is_file()


def test_shards_without_labels_are_refused(capsys, tiny_interpreter_overrides, tmp_path):
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(buffer, format="JPEG")
    write_shards([{"__key__": f"img{i}", "jpg": buffer.getvalue()} for i in range(4)], tmp_path, "plain", 4)
    overrides = [*tiny_interpreter_overrides, f"data.shards={tmp_path}/plain-000000.tar", f"out_dir={tmp_path / 'o'}"]
    with pytest.raises(DataError, match="no 'seg.png' label maps"):
        train_interpreter(load_config(None, overrides, schema=InterpreterTrainingConfig))
    code = main(["train-interpreter", *overrides])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1 and "label maps" in err
