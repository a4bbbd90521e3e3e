"""Default schedules: a good config per (template family, arch, head dims, dtype) without tuning.

The cuda forward figures come from measurements on the H200 (docs/performance.md): on sm_90a ``threads`` counts
the consumer warpgroups' threads (64 q rows each, so ``block_m == 64 * threads // 128``); a producer warpgroup
is added at launch.
"""

from __future__ import annotations

from attnc.dsl.ir import AttentionIR
from attnc.schedules.config import KernelConfig

_HOPPER_FWD = {  # (qk_dim, v_dim) -> (block_m, block_n, threads)
    (64, 64): (192, 128, 384),
    (128, 128): (128, 128, 256),
    (192, 128): (128, 96, 256),
    (256, 256): (128, 80, 256),
}


def default_config(family: str, arch: str, ir: AttentionIR, dtype: str) -> KernelConfig:
    """The config a kernel gets when no tuning result exists for it."""
    if family.startswith("cpu_"):
        return KernelConfig(block_m=16, block_n=32, stages=1, threads=1)
    if family == "fwd" and arch == "sm_90a":
        block_m, block_n, threads = _HOPPER_FWD.get((ir.qk_dim, ir.v_dim), (128, 64, 256))
        if (ir.qk_dim, block_n) == (128, 128) and not ir.has_mask:
            block_n = 160  # dense: longer kv tiles measured 1–2% faster
        return KernelConfig(block_m=block_m, block_n=block_n, stages=2, threads=threads)
    if family == "fwd":
        return KernelConfig(block_m=64, block_n=64, stages=1, threads=128)
    return KernelConfig(block_m=128, block_n=128, stages=2, threads=256)
