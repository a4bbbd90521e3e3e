"""Default schedules: a good config per (template family, arch, head dims, dtype) without tuning, and for the sm_90a
forward per kv loop length (the keys a query row keeps) and per element's work (`light`, `reads_tensors`).

The cuda forward figures come from measurements on the H200 (docs/performance.md): on sm_90a ``threads`` counts
the consumer warpgroups' threads (64 q rows each, so ``block_m == 64 * threads // 128``); a producer warpgroup
is added at launch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import sympy
import torch

from attnc.dsl import symbols
from attnc.dsl.ir import AttentionIR
from attnc.schedules.config import KernelConfig
from attnc.schedules.resources import fits
from attnc.schedules.timing import unmasked_elements

SHORT_LOOP_KEYS = 1024
"""Mean keys kept per query row at or below which the sm_90a forward at head dims 64 and 128 runs 64 x 64 tiles with
one consumer warpgroup, two blocks per SM (`resources.forward_blocks_per_sm`): one block's prologue and epilogue
overlap the other's loop. Measured on the H200 (docs/performance.md, seventh and eighth sessions), default -> two
blocks in TFLOP/s. d128: a causal document mask at 4k (340 keys a row) 169 -> 235, a 1k window at 4k (896) 425 ->
443, causal 1k (512) 350 -> 381; above it, causal 4k (2048) 575 -> 506, prefix-LM 1k at 4k (2176) 554 -> 507. d64:
document 63 -> 143, 1k window 146 -> 300, causal 1k 201 -> 249. Without a mask a short loop keeps the 128 x 128
tiles instead (non-causal 1k: d128 525 against 499 with two blocks, d64 340 against 329)."""

KEYS_SAMPLE_ROWS = 64
"""Query rows `kept_keys_per_row` evaluates the mask on (a stratified sample): a heuristic needs no more."""

_HOPPER_FWD = {  # (qk_dim, v_dim) -> (block_m, block_n, threads)
    (64, 64): (192, 128, 384),
    (128, 128): (128, 128, 256),
    (192, 128): (128, 96, 256),
    (256, 256): (128, 80, 256),
}

_LIGHT_ONLY = {(64, 64): (128, 128, 256)}
"""(qk_dim, v_dim) -> the (block_m, block_n, threads) replacing `_HOPPER_FWD`'s where the per-element work is not
`light`. At d64, three consumer warpgroups compile at 128 registers a thread (512 threads a block); ptxas spills there
for every mask or score that does more than one comparison (document 1500 B, prefix-LM 1000 B, a window 744 B,
ALiBi 368 B; causal, softcap and no mask: 0-8 B), and on the H200 prefix-LM at 4k ran at 180 TFLOP/s against 375 at
128 x 128 tiles (a 4k window at 16k: 199 against 338), while causal keeps 382 against 354."""

_TENSOR_READING = {(256, 256): (128, 64, 256)}
"""(qk_dim, v_dim) -> the (block_m, block_n, threads) replacing `_HOPPER_FWD`'s where a score element reads a tensor
(`reads_tensors`). At d256 the 128 x 80 tiles spill there (ptxas: document 248 B, ALiBi 160 B; 128 x 64: 120 B and
16 B). On the H200 (ninth session, TFLOP/s at 4k) 80 -> 64 kv rows: document 220 -> 258, ALiBi 520 -> 548; masks
without a tensor read lose at 64 (1k window 512 -> 461, 4k window at 16k 687 -> 562, prefix-LM 576 -> 565)."""


def light(ir: AttentionIR) -> bool:
    """Whether a score element's extra work is at most one comparison: the mask is none or a single relation over
    positions and lengths, and the score_mod reads neither positions nor tensors (softcap is light, ALiBi is not)."""
    mask = sympy.sympify(ir.mask)
    simple_mask = mask == sympy.true or (isinstance(mask, sympy.core.relational.Relational)
                                         and not mask.atoms(sympy.Indexed))
    return simple_mask and ir.score.free_symbols <= {symbols.score}


def reads_tensors(ir: AttentionIR) -> bool:
    """Whether the mask or the score_mod reads a captured tensor (document's ids, ALiBi's slopes, a bias table)."""
    return bool(sympy.sympify(ir.mask).atoms(sympy.Indexed) or ir.score.atoms(sympy.Indexed))


def kept_keys_per_row(ir: AttentionIR, q_len: int, kv_len: int,
                      inputs: Mapping[str, torch.Tensor] | None = None) -> float | None:
    """The mean number of keys a query row keeps in a call of these lengths (batch 0, every q head), from the mask
    evaluated on `KEYS_SAMPLE_ROWS` rows with the tensors it reads from ``inputs``; None when ``inputs`` lacks one
    of them or holds one too short for these lengths."""
    if q_len < 1 or kv_len < 1:
        return None
    tensors = dict(inputs or {})
    if any(str(read.base.label) not in tensors for read in sympy.sympify(ir.mask).atoms(sympy.Indexed)):
        return None
    try:
        kept = unmasked_elements(ir, 1, q_len, kv_len, tensors, sample_rows=KEYS_SAMPLE_ROWS)
    except IndexError:  # the tensors are shorter than these lengths: a call of them would be refused anyway
        return None
    return kept / (ir.q_heads * q_len)


def default_config(family: str, arch: str, ir: AttentionIR, dtype: str,
                   keys_per_row: float | None = None) -> KernelConfig:
    """The config a kernel gets when no tuning result exists for it. ``keys_per_row``: the mean number of keys a
    query row of the call keeps (`kept_keys_per_row`; None: unknown, as when building ahead of a call)."""
    if family.startswith("cpu_"):
        return KernelConfig(block_m=16, block_n=32, stages=1, threads=1)
    if family == "fwd" and arch == "sm_90a":
        dims = (ir.qk_dim, ir.v_dim)
        short = keys_per_row is not None and keys_per_row <= SHORT_LOOP_KEYS
        if short and dims in ((64, 64), (128, 128)):
            if ir.has_mask:
                return KernelConfig(block_m=64, block_n=64, stages=2, threads=128)
            return KernelConfig(block_m=128, block_n=128, stages=2, threads=256)
        block_m, block_n, threads = _HOPPER_FWD.get(dims, (128, 64, 256))
        if dims in _LIGHT_ONLY and not light(ir):
            block_m, block_n, threads = _LIGHT_ONLY[dims]
        if dims in _TENSOR_READING and reads_tensors(ir):
            block_m, block_n, threads = _TENSOR_READING[dims]
        if (ir.qk_dim, block_n) == (128, 128) and not ir.has_mask:
            block_n = 160  # dense: longer kv tiles measured 1–2% faster
        return KernelConfig(block_m=block_m, block_n=block_n, stages=2, threads=threads)
    if family == "fwd":
        return KernelConfig(block_m=64, block_n=64, stages=1, threads=128)
    return KernelConfig(block_m=128, block_n=128, stages=2, threads=256)


def default_configs(family: str, arch: str, ir: AttentionIR, dtype: str) -> tuple[KernelConfig, ...]:
    """Every config `default_config` may give a call of this kernel: long kv loops' (and unknown ones') first, then
    short ones' when they differ."""
    return tuple(dict.fromkeys(default_config(family, arch, ir, dtype, keys) for keys in (None, 0.0)))


def call_config(family: str, arch: str, ir: AttentionIR, dtype: str, q_len: int, kv_len: int,
                inputs: Mapping[str, torch.Tensor] | None = None) -> KernelConfig:
    """`default_config` for a call of these lengths (``inputs``: the tensors the mask reads). The mask is evaluated
    (`kept_keys_per_row`) only where the default depends on the loop length."""
    keys = None
    if len(default_configs(family, arch, ir, dtype)) > 1:
        keys = kept_keys_per_row(ir, q_len, kv_len, inputs)
    return default_config(family, arch, ir, dtype, keys)


def backward_config(arch: str, ir: AttentionIR, stage: str = "main") -> KernelConfig:
    """The schedule of one backward stage on ``arch`` ('cpu', 'sm_90a', 'sm_80'): ``block_m`` q rows, ``block_n``
    kv rows per tile.

    cuda ``main`` (and ``pre``, ``post``): kv tiles of 128 rows for head dims up to 128 (64 above, to fit the dK and
    dV accumulators in registers), q tiles of 64, 256 threads: on sm_90a two consumer warpgroups of 64 kv rows each
    (FlashAttention-3's shape for d128; the producer warpgroup is added at launch), with the Q / dO / lse / Delta
    tiles triple-buffered up to head dim 128 where shared memory allows (3 stages measured 1.5–2% faster than 2 on
    the H200), else double, else single (the deepest ring `resources.check` admits).
    cuda ``dq``: q tiles of 128 rows (the warps split the q rows), kv tiles of 64 (32 above head dim 128).
    sm_80 pipelines with one stage: tilelang 0.1.15 cannot lower a multi-stage pipeline with a run-time trip count
    around a gemm there ("Downcast from tirx.Sub to ir.IntImm failed").
    """
    if arch == "cpu":
        return KernelConfig(block_m=16, block_n=32, stages=1, threads=1)
    wide = max(ir.qk_dim, ir.v_dim) > 128
    stages = 2 if arch == "sm_90a" else 1
    if stage == "dq":
        return KernelConfig(block_m=128, block_n=32 if wide else 64, stages=stages, threads=256)
    main = KernelConfig(block_m=64, block_n=64 if wide else 128, stages=stages, threads=256)
    if stage != "main" or arch != "sm_90a":
        return main
    for stages in (3, 2, 1):  # the deepest Q / dO ring that fits (3 only up to head dim 128)
        config = dataclasses.replace(main, stages=stages)
        if (stages < 3 or not wide) and fits("bwd", arch, config, qk_dim=ir.qk_dim, v_dim=ir.v_dim, group=ir.group):
            return config
    return main
