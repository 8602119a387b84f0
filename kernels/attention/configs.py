"""The launch configurations the attention kernels ship with: small tables, chosen by head dim.

The backward kernels pad the head dim D inside the kernels to BLOCK_D = max(16, next power of two of D) (tl.dot
needs a power-of-two inner dimension of at least 16); the padded lanes are masked, never stored in memory. The
forward splits a D that would pad much into two power-of-two chunks instead (`head_dim_chunks`). Block
sizes shrink as BLOCK_D grows so the tiles fit shared memory and the fp32 accumulators fit registers on both
A100 (sm_80) and H100 (sm_90); every row is AOT-compiled for both by tests/test_kernels_attention_aot.py.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD_DIM = 160
HEAD_DIMS = (32, 40, 64, 72, 80, 128, 160)  # the head dims the teachers use; all AOT-checked
SUPPORTED_DTYPES = ("float16", "bfloat16")  # on GPU; fp32 runs only in Triton's interpreter (tests)


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes and launch parameters of one kernel at one padded head dim."""

    block_m: int  # query rows per program
    block_n: int  # key/value rows per inner-loop step
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class AttentionConfigs:
    """Configurations of the three kernels (forward, backward dK/dV, backward dQ) for one BLOCK_D."""

    forward: KernelConfig
    backward_dkdv: KernelConfig  # block_n: key rows owned by a program; block_m: query rows per step
    backward_dq: KernelConfig  # block_m: query rows owned by a program; block_n: key rows per step


# Forward: large query tiles amortise the K/V loads (FlashAttention-2's layout); at BLOCK_D = 256 eight warps
# share the 64 x 256 fp32 accumulator (four spill on sm_80 when compiled as a real launch specialises it).
# Backward dK/dV: each program owns a key tile and keeps two fp32 accumulators (dK, dV) of block_n x BLOCK_D, so
# block_n shrinks with BLOCK_D.
CONFIGS: dict[int, AttentionConfigs] = {
    16: AttentionConfigs(KernelConfig(128, 64, 4, 3), KernelConfig(32, 64, 4, 3), KernelConfig(64, 32, 4, 3)),
    32: AttentionConfigs(KernelConfig(128, 64, 4, 3), KernelConfig(32, 128, 4, 3), KernelConfig(128, 32, 4, 3)),
    64: AttentionConfigs(KernelConfig(128, 64, 4, 3), KernelConfig(32, 128, 8, 3), KernelConfig(128, 32, 4, 3)),
    128: AttentionConfigs(KernelConfig(128, 64, 8, 3), KernelConfig(32, 128, 8, 2), KernelConfig(128, 32, 8, 2)),
    256: AttentionConfigs(KernelConfig(64, 32, 8, 2), KernelConfig(16, 64, 8, 2), KernelConfig(64, 16, 8, 2)),
}


# The forward of head dims processed in two power-of-two chunks (see `head_dim_chunks`), keyed by the chunks: its
# accumulators are BLOCK_D + BLOCK_T wide, between the padded table's rows.
CHUNKED_FORWARD: dict[tuple[int, int], KernelConfig] = {
    (32, 16): KernelConfig(128, 64, 4, 3),  # D = 40: 48 wide instead of 64
    (64, 16): KernelConfig(128, 64, 8, 3),  # D = 72, 80: 80 wide instead of 128
    (64, 32): KernelConfig(128, 64, 8, 3),  # D = 96
    (128, 16): KernelConfig(64, 32, 8, 2),  # D = 129..144
    (128, 32): KernelConfig(64, 32, 8, 2),  # D = 160: 160 wide instead of 256
}


# The backward of D = 129..160 (128 + 16 or 32 lanes): four warps, so that no warpgroup's share of a 16-row tile
# is an n8 wgmma (eight warps split it in two); the padded table's 256 row would.
CHUNKED_BACKWARD: dict[tuple[int, int], tuple[KernelConfig, KernelConfig]] = {
    (128, 16): (KernelConfig(16, 64, 4, 2), KernelConfig(64, 16, 4, 2)),
    (128, 32): (KernelConfig(16, 64, 4, 2), KernelConfig(64, 16, 4, 2)),
}


# dK/dV with dQ added by atomics: the fifth GEMM's tile needs registers, so where the plain configuration would
# spill (checked ahead of time), fewer query rows per step. Beyond 128 lanes no tile fits both accumulators, K, V
# and the dQ tile without spilling: those head dims keep the two-kernel backward (`atomic_dq_fits`).
ATOMIC_DKDV: dict[tuple[int, int], KernelConfig] = {
    (64, 16): KernelConfig(16, 64, 4, 2),  # D = 72, 80
    (64, 32): KernelConfig(16, 64, 4, 2),  # D = 96
    (128, 0): KernelConfig(32, 64, 8, 2),
}
ATOMIC_DQ_MAX_LANES = 128


def atomic_dq_fits(head_dim: int) -> bool:
    """Whether the dK/dV kernel can also accumulate dQ (with atomics) at `head_dim` without spilling."""
    return sum(head_dim_chunks(head_dim)) <= ATOMIC_DQ_MAX_LANES


def backward_configs(head_dim: int, atomic_dq: bool = False) -> tuple[KernelConfig, KernelConfig]:
    """(dK/dV, dQ) kernel configurations at `head_dim`; `atomic_dq`: the dK/dV kernel adds dQ too."""
    configs, chunks = configs_for(head_dim), head_dim_chunks(head_dim)
    dkdv, dq = CHUNKED_BACKWARD.get(chunks, (configs.backward_dkdv, configs.backward_dq))
    return (ATOMIC_DKDV.get(chunks, dkdv) if atomic_dq else dkdv), dq


def head_dim_chunks(head_dim: int) -> tuple[int, int]:
    """(BLOCK_D, BLOCK_T): the forward processes the head dim as a chunk of BLOCK_D lanes and, when that leaves
    some, a tail chunk of BLOCK_T lanes (0: none), both powers of two of at least 16 (tl.dot's limits), padded by
    masked loads only within the tail. 72 = 64 + 16 (8 padded), 80 = 64 + 16, 160 = 128 + 32, 40 = 32 + 16:
    0.6-0.8x the MMA work of padding to the next power of two. A tail that would pad as much is not split off."""
    whole = padded_head_dim(head_dim)
    head = max(16, 1 << (head_dim.bit_length() - 1))  # the largest power of two <= D
    if head >= head_dim:
        return whole, 0
    tail = padded_head_dim(head_dim - head)
    return (head, tail) if head + tail < whole else (whole, 0)


def forward_config(head_dim: int) -> KernelConfig:
    """The forward kernel's configuration at `head_dim` (chunked as `head_dim_chunks` says)."""
    configs_for(head_dim)  # raises for an unsupported head dim
    chunks = head_dim_chunks(head_dim)
    return CHUNKED_FORWARD[chunks] if chunks[1] else CONFIGS[chunks[0]].forward


# The forward's autotuning space (opt-in; the tables above are the default): query tile, key tile,
# pipeline stages and warps, as FlashAttention-2's Triton tutorial searches them. Pruned per launch by
# `forward_configs_that_fit`, then timed once per (D, N, dtype) and cached on disk by Triton.
FORWARD_TUNING_SPACE = [
    KernelConfig(block_m, block_n, num_warps, num_stages)
    for block_m in (64, 128)
    for block_n in (32, 64, 128)
    for num_stages in (2, 3, 4)
    for num_warps in (4, 8)
]


def forward_shared_bytes(config: KernelConfig, head_dim: int, element_bytes: int = 2) -> int:
    """An upper estimate of the forward's shared memory: the query tile and `num_stages` buffered K and V tiles,
    all as wide as the head dim's chunks."""
    width = sum(head_dim_chunks(head_dim))
    return element_bytes * width * (config.block_m + 2 * config.num_stages * config.block_n)


def forward_configs_that_fit(
    configs: list[KernelConfig], head_dim: int, seq_len: int, shared_limit: int
) -> list[KernelConfig]:
    """The tiles worth timing: within `shared_limit` bytes (a launch beyond it fails), and no key tile longer than
    the sequence rounded up to 32 (it would mostly compute masked scores). Never empty: the first config stays."""
    longest_key_tile = max(32, 1 << (seq_len - 1).bit_length())
    kept = [c for c in configs if forward_shared_bytes(c, head_dim) <= shared_limit and c.block_n <= longest_key_tile]
    return kept or configs[:1]


def padded_head_dim(head_dim: int) -> int:
    """BLOCK_D for a head dim: the next power of two, at least 16."""
    return max(16, 1 << (head_dim - 1).bit_length())


def configs_for(head_dim: int) -> AttentionConfigs:
    if not 1 <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"Triton attention supports head dims 1..{MAX_HEAD_DIM}, got {head_dim}")
    return CONFIGS[padded_head_dim(head_dim)]
