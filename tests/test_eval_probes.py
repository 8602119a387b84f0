"""The probes learn what is linearly there, and only that, reproducibly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dtengine.eval.config import ProbeConfig
from dtengine.eval.probes import CachedFeatures, dense_linear_probe, global_linear_probe

K, S = 4, 12


def synthetic(n: int, informative: bool, seed: int):
    """Label maps of random rectangles; features are a noisy one-hot of the label (or pure noise)."""
    g = torch.Generator().manual_seed(seed)
    seg = torch.zeros(n, S, S, dtype=torch.int64)
    for i in range(n):
        y, x = torch.randint(0, S - 4, (2,), generator=g).tolist()
        seg[i, y : y + 5, x : x + 5] = 1 + i % (K - 1)
    cls = torch.tensor([1 + i % (K - 1) for i in range(n)])
    noise = 0.1 * torch.randn(n, K, S, S, generator=g)  # small: the Bayes error stays ~0
    signal = F.one_hot(seg, K).permute(0, 3, 1, 2).float() if informative else torch.zeros(n, K, S, S)
    coarse = torch.randn(n, 3, S // 4, S // 4, generator=g)  # an uninformative second level at stride 4
    pooled = (F.one_hot(cls, K).float() if informative else 0) + 0.3 * torch.randn(n, K, generator=g)
    return CachedFeatures([(signal + noise).half(), coarse.half()], pooled), seg, cls


CFG = ProbeConfig(epochs=20, batch_size=8, lr=0.05, global_steps=100, global_lr=0.1)


def test_probes_read_features_that_encode_the_label():
    train, train_seg, train_cls = synthetic(32, True, 0)
    val, val_seg, val_cls = synthetic(16, True, 1)
    dense = dense_linear_probe(train, train_seg, val, val_seg, K, CFG, seed=0, progress=False)
    assert dense["miou"] > 0.95 and dense["pixel_acc"] > 0.98
    assert global_linear_probe(train, train_cls, val, val_cls, K, CFG, seed=0)["top1"] == 1.0


def test_probes_find_nothing_in_noise_and_are_seeded():
    train, train_seg, train_cls = synthetic(32, False, 0)
    val, val_seg, val_cls = synthetic(16, False, 1)
    first = dense_linear_probe(train, train_seg, val, val_seg, K, CFG, seed=3, progress=False)
    again = dense_linear_probe(train, train_seg, val, val_seg, K, CFG, seed=3, progress=False)
    assert first == again
    assert first["miou"] < 0.5
    assert global_linear_probe(train, train_cls, val, val_cls, K, CFG, seed=0)["top1"] < 0.7


def test_coarse_logit_grid_is_still_scored_at_full_resolution():
    train, train_seg, _ = synthetic(32, True, 0)
    val, val_seg, _ = synthetic(16, True, 1)
    coarse = ProbeConfig(**{**CFG.__dict__, "resolution": 3})
    full = dense_linear_probe(train, train_seg, val, val_seg, K, CFG, seed=0, progress=False)
    low = dense_linear_probe(train, train_seg, val, val_seg, K, coarse, seed=0, progress=False)
    assert low["miou"] < full["miou"] - 0.1  # 5-pixel squares cannot be drawn on a 3x3 grid


@pytest.mark.parametrize("bad", ["epochs=0", "lr=-1", "resolution=-2"])
def test_probe_config_range_checks(bad):
    from dtengine import load_config
    from dtengine.eval.config import EvalConfig
    from dtengine.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match="probe"):
        load_config(None, [f"probe.{bad}"], schema=EvalConfig)
