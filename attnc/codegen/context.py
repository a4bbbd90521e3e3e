"""`KernelContext`: the one typed object every template renders from.

It is made from the IR, the tile map and the config; every expression in it is already TileLang text, printed by
`printer.print_expr`, so templates only place text. A field a template names but the context lacks fails the
render (jinja2's StrictUndefined), never renders empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from attnc.codegen.printer import print_expr
from attnc.dsl import symbols
from attnc.dsl.ir import AttentionIR
from attnc.dsl.tilemap import Q_TILE, TileMap
from attnc.schedules.config import KernelConfig

# Kernel variable names the templates bind, for each symbol of the IR and the tile map.
KERNEL_NAMES = {
    symbols.score: "score",
    symbols.b: "b",
    symbols.h: "h",
    symbols.q_idx: "q_idx",
    symbols.kv_idx: "kv_idx",
    symbols.q_len: "q_len",
    symbols.kv_len: "kv_len",
    Q_TILE: "q_tile",
}


@dataclass(frozen=True)
class InputBuffer:
    """An extra tensor as the kernel sees it: buffer name, dtype, rank."""

    name: str
    buffer: str
    dtype: str
    ndim: int


@dataclass(frozen=True)
class KernelContext:
    kernel_name: str
    family: str
    description: tuple[str, ...]
    dtype: str
    layout: str
    q_heads: int
    kv_heads: int
    group: int
    qk_dim: int
    v_dim: int
    scale: float
    scale_log2: float
    score_expr: str
    mask_expr: str
    has_score_mod: bool
    kv_begin: str
    kv_end: str
    full_begin: str
    full_end: str
    inputs: tuple[InputBuffer, ...]
    sinks: bool
    block_m: int
    block_n: int
    stages: int
    threads: int
    pack_gqa: bool


def make_context(family: str, kernel_name: str, ir: AttentionIR, tilemap: TileMap, config: KernelConfig,
                 dtype: str) -> KernelContext:
    """Print the IR's expressions and the tile map into a context for ``family``'s template."""
    buffers = tuple(InputBuffer(t.name, f"in_{t.name}", t.dtype, len(t.shape)) for t in ir.inputs)
    tensors = {t.name: t.buffer for t in buffers}

    def text(expr) -> str:
        return print_expr(expr, KERNEL_NAMES, tensors)

    return KernelContext(
        kernel_name=kernel_name,
        family=family,
        description=tuple(ir.describe().splitlines()) + (f"config: {config.short()}",),
        dtype=dtype,
        layout=ir.layout,
        q_heads=ir.q_heads,
        kv_heads=ir.kv_heads,
        group=ir.group,
        qk_dim=ir.qk_dim,
        v_dim=ir.v_dim,
        scale=ir.scale,
        scale_log2=ir.scale * math.log2(math.e),
        score_expr=text(ir.score),
        mask_expr=text(ir.mask) if ir.has_mask else "",
        has_score_mod=ir.has_score_mod,
        kv_begin=text(tilemap.kv_begin),
        kv_end=text(tilemap.kv_end),
        full_begin=text(tilemap.full_begin),
        full_end=text(tilemap.full_end),
        inputs=buffers,
        sinks=ir.sinks,
        block_m=config.block_m,
        block_n=config.block_n,
        stages=config.stages,
        threads=config.threads,
        pack_gqa=config.pack_gqa,
    )
