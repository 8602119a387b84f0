"""Every shipped attention configuration, compiled ahead of time for A100 (sm_80) and H100 (sm_90) exactly as a
real launch compiles it: the launchers run on CPU bf16 tensors of the layouts the engine passes, the launches are
captured, and Triton's own binder specialises them (see dtkernels.aot).

Checked per head dim, layout, kernel and arch: compiles, fits shared memory, no register spills, tiles loaded as
128-bit vectors with cp.async (no 16-bit element loads), and on sm_90 tl.dot lowered to wgmma, never in n8 tiles.
A misaligned view takes the unhinted variant, which must still compile and fit.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from dtkernels.aot import ARCHES, capture_launches, compile_launch  # noqa: E402
from dtkernels.attention import HEAD_DIMS, attention_backward, attention_forward  # noqa: E402
from dtkernels.attention.configs import (  # noqa: E402
    FORWARD_TUNING_SPACE,
    atomic_dq_fits,
    forward_configs_that_fit,
    forward_shared_bytes,
)
from dtkernels.attention.flash import vector_aligned  # noqa: E402

LAYOUTS = ("bhnd", "bnhd")  # contiguous (B, H, N, D); the teacher's (B, N, H, D) projections viewed as (B, H, N, D)
TILE_KERNELS = ("_attention_fwd_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel")


def qkv(head_dim: int, layout: str, batch: int = 2, heads: int = 4, seq_len: int = 256) -> list[torch.Tensor]:
    if layout == "bhnd":
        return [torch.randn(batch, heads, seq_len, head_dim, dtype=torch.bfloat16) for _ in range(3)]
    return [torch.randn(batch, seq_len, heads, head_dim, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3)]


def launches_of(q, k, v):
    """The kernel launches of a forward and of both backward paths (atomic dQ, then the dQ kernel), as the
    launchers make them."""
    scale = q.shape[-1] ** -0.5
    with capture_launches() as launches:
        out, lse = attention_forward(q, k, v, scale)
        attention_backward(torch.randn_like(out), q, k, v, out, lse, scale, deterministic=False)
        attention_backward(torch.randn_like(out), q, k, v, out, lse, scale, deterministic=True)
    atomic = atomic_dq_fits(q.shape[-1])
    delta, dkdv, dq = "_attention_bwd_delta_kernel", "_attention_bwd_dkdv_kernel", "_attention_bwd_dq_kernel"
    assert [(launch.name, launch.kwargs.get("ATOMIC_DQ")) for launch in launches] == [
        ("_attention_fwd_kernel", None), (delta, None), (dkdv, atomic), *([] if atomic else [(dq, None)]),
        (delta, None), (dkdv, False), (dq, None),
    ]  # fmt: skip
    return launches


def test_torchs_deterministic_mode_selects_the_backward_without_atomics():
    q, k, v = qkv(64, "bhnd", seq_len=64)
    out, lse = torch.empty_like(q), torch.empty(q.shape[:3])
    for deterministic in (False, True):
        torch.use_deterministic_algorithms(deterministic)
        try:
            with capture_launches() as launches:
                attention_backward(torch.randn_like(out), q, k, v, out, lse, 0.125)
        finally:
            torch.use_deterministic_algorithms(False)
        names = [launch.name for launch in launches]
        assert ("_attention_bwd_dq_kernel" in names) == deterministic
        assert launches[1].kwargs["ATOMIC_DQ"] == (not deterministic)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_real_launches_compile_without_spills_and_load_vectors(head_dim, layout, arch):
    problems = []
    for launch in launches_of(*qkv(head_dim, layout)):
        assert launch.kwargs["ALIGNED"], "torch's dense bf16 layouts pass the launcher's alignment check"
        result = compile_launch(launch, arch)
        print(f"D={head_dim} {layout} {result.summary()}")
        problems += [f"{result.name}: {p}" for p in result.problems()]
        if result.narrow_loads:
            problems.append(f"{result.name}: {result.narrow_loads} global loads narrower than 32 bits")
        if result.name in TILE_KERNELS:
            if not result.cp_async:
                problems.append(f"{result.name}: tiles are not copied with cp.async")
            if result.uses_wgmma != (arch == 90):
                problems.append(f"{result.name}: wgmma {result.uses_wgmma} on sm_{arch}")
            if any(shape.split("n")[1].split("k")[0] == "8" for shape in result.wgmma_shapes):
                problems.append(f"{result.name}: n8 wgmma tiles {result.wgmma_shapes} (a quarter of an n32's work)")
    assert problems == [], f"D={head_dim} {layout} sm_{arch}: {problems}"


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("head_dim", (40, 72, 160))
def test_a_misaligned_view_takes_the_unhinted_variant_which_compiles_and_fits(head_dim, arch):
    # Every row one element further on: the pointer and the row stride lose their 16-byte alignment.
    base = torch.randn(2, 4, 64, head_dim + 1, dtype=torch.bfloat16)
    q = base[..., 1:]
    k, v = (torch.randn_like(q) for _ in range(2))
    for launch in launches_of(q, k, v):
        assert not launch.kwargs["ALIGNED"]
        result = compile_launch(launch, arch)
        print(f"D={head_dim} misaligned {result.summary()}")
        assert result.fits_shared_memory, result.summary()


def test_the_alignment_check_refuses_offset_views_and_odd_strides():
    dense = torch.randn(2, 4, 16, 72, dtype=torch.bfloat16)
    assert vector_aligned(dense) and vector_aligned(dense.transpose(1, 2))
    padded = torch.randn(2, 4, 16, 80, dtype=torch.bfloat16)
    assert vector_aligned(padded[..., :72])  # row stride 80: still whole 16-byte rows
    assert not vector_aligned(padded[..., 1:73])  # starts 2 bytes in
    assert not vector_aligned(torch.randn(2, 4, 16, 75, dtype=torch.bfloat16)[..., :72])  # row stride 75
    assert vector_aligned(dense[:, :, 1:])  # one row in: 144 bytes, still 16-aligned
    shifted = torch.randn(dense.numel() + 4, dtype=torch.bfloat16)[4:].view(dense.shape)  # 8 bytes in
    assert not vector_aligned(shifted)
    assert not vector_aligned(torch.randn(2, 4, 72, 16, dtype=torch.bfloat16).transpose(2, 3))  # D not innermost


@pytest.mark.slow
@pytest.mark.parametrize("head_dim, seq_len", [(160, 1024)])
def test_every_tile_the_forward_autotuner_would_time_compiles_and_fits(head_dim, seq_len):
    """With DTENGINE_ATTENTION_AUTOTUNE=1 the forward times the tiles its prune keeps: each must compile for an
    A100 (the smaller shared memory of the two targets) and fit; the prune must have dropped the ones that would
    not. Spills are allowed: the timing judges them. One shape, the widest (the prune drops most there); the whole
    matrix stays out of the suite (add shapes here to run it)."""
    q, k, v = qkv(head_dim, "bnhd", seq_len=seq_len)
    with capture_launches() as launches:
        attention_forward(q, k, v, head_dim**-0.5, autotune=True)
    assert 4 <= len(launches) <= len(FORWARD_TUNING_SPACE)
    for launch in launches:
        assert launch.kwargs["RAGGED_KEYS"] == (seq_len % launch.kwargs["BLOCK_N"] != 0)
        result = compile_launch(launch, 80)
        assert result.fits_shared_memory, f"{launch.options()}: {result.summary()}"


def test_the_forward_prune_keeps_tiles_that_fit_and_are_not_longer_than_n():
    space = FORWARD_TUNING_SPACE
    kept = forward_configs_that_fit(space, head_dim=160, seq_len=64, shared_limit=100_000)
    assert kept and all(c.block_n <= 64 for c in kept)
    assert all(forward_shared_bytes(c, 160) <= 100_000 for c in kept)
    assert len(forward_configs_that_fit(space, 64, 4096, 10**9)) == len(space)
    assert forward_configs_that_fit(space, 160, 4096, shared_limit=1) == space[:1]  # never empty


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_the_tma_forward_compiles_to_tensor_memory_copies_on_sm90(head_dim, layout):
    """DTENGINE_ATTENTION_TMA=1 (off by default until a GPU has run it): the forward reads q, k and v through TMA
    descriptors (UTMALDG), does not spill and fits; a misaligned view falls back to pointer loads."""
    q, k, v = qkv(head_dim, layout)
    with capture_launches() as launches:
        attention_forward(q, k, v, head_dim**-0.5, tma=True)
    (launch,) = launches
    assert launch.kwargs["USE_TMA"]
    result = compile_launch(launch, 90)
    print(f"D={head_dim} {layout} TMA {result.summary()}")
    assert result.tma and result.problems() == [], result.summary()
    base = torch.randn(2, 4, 64, head_dim + 1, dtype=torch.bfloat16)
    with capture_launches() as launches:
        attention_forward(base[..., 1:], base[..., 1:], base[..., 1:], 0.1, tma=True)
    assert not launches[0].kwargs["USE_TMA"]
