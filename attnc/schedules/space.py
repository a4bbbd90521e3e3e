"""Config spaces: every schedule a template family may be built with on an architecture, pruned by the resource
model before anything is built.

``space(family, arch, qk_dim, v_dim, group, dtype_bytes)`` enumerates the product of the axes below, in a fixed
order (block_m, then block_n, stages, threads, pack_gqa, split, each ascending), and keeps the configs
`resources.check` admits. The same arguments always give the same list.

CUDA axes (``fwd``, ``bwd``, ``decode``):
    block_m  64, 128, 192, 256 — for ``decode``, the q-head rows of one kv group: the smallest of these that holds
             ``group`` rows (all of them when ``group`` exceeds 256, the rows then being tiled)
    block_n  32, 64, 128, 256; for ``fwd`` on sm_90a also 80, 96, 160 and 176 (the tiles that fill Hopper's shared
             memory at head dims 256, 192, 128 with 128-row Q tiles; measured best on the H200)
    stages   1, 2, 3
    threads  128, 256, 384 — on sm_90a, for ``fwd`` and ``bwd``, the consumer warpgroups' threads (a producer
             warpgroup is added at launch)
    pack_gqa always ``group > 1`` for ``decode`` (the rows are the group's
             q heads); False for ``bwd``
    split    1, 2, 4, 8, 16 for ``decode``; 1 otherwise
CPU axes (``cpu_fwd``, ``cpu_bwd``): block_m and block_n in 16, 32, 64; stages 1; threads 1 (ignored by the C
target); no packing, no split.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter

from attnc.errors import UnsupportedError
from attnc.schedules.config import KernelConfig
from attnc.schedules.resources import CPU_FAMILIES, FAMILIES, Arch, check, get_arch

BLOCK_M = (64, 128, 192, 256)
BLOCK_N = (32, 64, 128, 256)
BLOCK_N_HOPPER_FWD = (32, 64, 80, 96, 128, 160, 176, 256)
STAGES = (1, 2, 3)
THREADS = (128, 256, 384)
SPLITS = (1, 2, 4, 8, 16)
CPU_BLOCKS = (16, 32, 64)


def decode_rows(group: int) -> tuple[int, ...]:
    """The ``block_m`` candidates of the decode template for ``group`` q heads per kv head."""
    holding = [m for m in BLOCK_M if m >= group]
    return (holding[0],) if holding else BLOCK_M


def _axes(family: str, arch: Arch, group: int) -> dict[str, tuple]:
    if family in CPU_FAMILIES:
        return dict(
            block_m=CPU_BLOCKS, block_n=CPU_BLOCKS, stages=(1,), threads=(1,), pack_gqa=(False,), split=(1,)
        )
    axes = dict(
        block_m=BLOCK_M,
        block_n=BLOCK_N_HOPPER_FWD if (family == "fwd" and arch.wgmma) else BLOCK_N,
        stages=STAGES,
        threads=THREADS,
        pack_gqa=(False,),
        split=(1,),
    )
    if family == "decode":
        axes["block_m"] = decode_rows(group)
        axes["pack_gqa"] = (group > 1,)
        axes["split"] = SPLITS
    return axes


def candidates(family: str, arch: Arch | str, group: int = 1) -> list[KernelConfig]:
    """The unpruned product of the axes, in the space's order (for inspection and tests)."""
    if family not in FAMILIES:
        supported = ", ".join(repr(f) for f in FAMILIES)
        raise UnsupportedError(f"unknown template family {family!r}; supported: {supported}")
    axes = _axes(family, get_arch(arch), group)
    names = list(axes)
    return [KernelConfig(**dict(zip(names, values))) for values in itertools.product(*axes.values())]


def space(
    family: str, arch: Arch | str, qk_dim: int, v_dim: int, group: int = 1, dtype_bytes: int = 2
) -> list[KernelConfig]:
    """Every config of ``family`` that fits ``arch`` for these head dims, GQA group and input dtype size.

    Raises `UnsupportedError` when none fits (e.g. a head dim that is not a multiple of 16, or too large for the
    architecture's shared memory), saying why the candidates were refused.
    """
    arch = get_arch(arch)
    dims = dict(qk_dim=qk_dim, v_dim=v_dim, group=group, dtype_bytes=dtype_bytes)
    kept: list[KernelConfig] = []
    refused: Counter[str] = Counter()
    example: dict[str, str] = {}
    total = 0
    for config in candidates(family, arch, group):
        total += 1
        reasons = check(family, arch, config, **dims)
        if not reasons:
            kept.append(config)
            continue
        for reason in reasons:
            example.setdefault(_reason_kind(reason), f"{config.short()}: {reason}")
        refused.update({_reason_kind(reason) for reason in reasons})
    if not kept:
        common = "; ".join(f"{example[kind]} ({n} of {total} candidates)" for kind, n in refused.most_common(3))
        raise UnsupportedError(
            f"no {family!r} config fits {arch.name} for qk_dim {qk_dim}, v_dim {v_dim}, group {group}, "
            f"{dtype_bytes}-byte inputs; refused because of: {common}"
        )
    return kept


def _reason_kind(reason: str) -> str:
    """The rule a reason invokes, without the config's numbers, to count refusals by cause."""
    if "memory" in reason and "exceeds" in reason:
        return "memory"
    if reason.startswith("registers"):
        return "registers"
    if "warp" in reason:
        return "warps"
    return re.sub(r"\d+", "N", reason)
