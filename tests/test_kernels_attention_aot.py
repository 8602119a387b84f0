"""Every shipped attention configuration compiles for A100 (sm_80) and H100 (sm_90) in bf16, without a GPU.

Checked per kernel, head dim and arch: compiles, fits shared memory, no register spills. On sm_90 the report
says whether tl.dot lowered to wgmma (it must: without it Hopper runs the kernels at Ampere speed).
"""

from __future__ import annotations

import pytest

pytest.importorskip("triton")

from dtkernels.aot import ARCHES, compile_kernel  # noqa: E402
from dtkernels.attention import HEAD_DIMS, configs_for, flash, padded_head_dim  # noqa: E402

KERNELS = {
    "forward": flash._attention_fwd_kernel,
    "backward_dkdv": flash._attention_bwd_dkdv_kernel,
    "backward_dq": flash._attention_bwd_dq_kernel,
}


def signature(kernel, dtype: str = "*bf16") -> tuple[dict[str, str], dict[str, int], tuple[str, ...]]:
    """(types, constexprs, 16-divisible args) of a launch with contiguous (B, H, N, D) tensors, D innermost."""
    types, constants = {}, {}
    for name in kernel.arg_names:
        if name in ("LSE", "DELTA"):
            types[name] = "*fp32"
        elif name.startswith("stride") and name.endswith("d"):  # the JIT specialises a stride of 1 to a constant
            types[name], constants[name] = "constexpr", 1
        elif name.startswith("stride") or name in ("num_heads", "seq_len"):
            types[name] = "i32"
        elif name.startswith("scale"):
            types[name] = "fp32"
        elif name.isupper() and not name.startswith(("HEAD_DIM", "BLOCK")):
            types[name] = dtype
        else:
            types[name] = "constexpr"
    # torch allocations are 16-byte aligned, and (B, H, N) strides are multiples of D: divisible by 16 for
    # D in {32, 64, 80, 128, 160}, which the 16-divisible-head-dim launches see.
    aligned = tuple(n for n, t in types.items() if t.startswith("*") or n.startswith("stride") and t == "i32")
    return types, constants, aligned


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("head_dim", (8, *HEAD_DIMS))
def test_every_shipped_config_compiles_fits_and_does_not_spill(head_dim, arch):
    configs, report = configs_for(head_dim), []
    for name, kernel in KERNELS.items():
        cfg = getattr(configs, name)
        types, constants, aligned = signature(kernel)
        constants.update(HEAD_DIM=head_dim, BLOCK_D=padded_head_dim(head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n)
        result = compile_kernel(
            kernel, types, constants, arch=arch, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            divisible_by_16=aligned,
        )  # fmt: skip
        print(f"D={head_dim} {name}: {result.summary()}")
        assert result.problems() == [], f"D={head_dim} {name}: {result.problems()}"
        report.append(result.uses_wgmma)
    assert all(report) if arch == 90 else not any(report)


@pytest.mark.parametrize("arch", ARCHES)
def test_delta_preprocess_compiles(arch):
    types, constants, aligned = signature(flash._attention_bwd_delta_kernel)
    constants.update(HEAD_DIM=80, BLOCK_D=128, BLOCK_M=128)
    result = compile_kernel(flash._attention_bwd_delta_kernel, types, constants, arch=arch, divisible_by_16=aligned)
    assert result.problems() == []
