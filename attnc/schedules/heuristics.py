"""Default schedules: a good config per (template family, arch, head dims, dtype) without tuning."""

from __future__ import annotations

from attnc.dsl.ir import AttentionIR
from attnc.schedules.config import KernelConfig


def default_config(family: str, arch: str, ir: AttentionIR, dtype: str) -> KernelConfig:
    """The config a kernel gets when no tuning result exists for it."""
    if family.startswith("cpu_"):
        return KernelConfig(block_m=16, block_n=32, stages=1, threads=1)
    return KernelConfig(block_m=128, block_n=128, stages=2, threads=256)
