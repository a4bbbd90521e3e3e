"""`KernelContext`: the one typed object every template renders from.

It is made from the IR, the tile map and the config; every expression in it is already TileLang text, printed by
`printer.print_expr`, so templates only place text. A field a template names but the context lacks fails the
render (jinja2's StrictUndefined), never renders empty.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass

import sympy

from attnc.codegen.hoist import hoist
from attnc.codegen.printer import print_expr
from attnc.codegen.score_rewrite import (
    COLUMN,
    COLUMN_OFFSET,
    KV_BASE,
    Q_BASE,
    QK,
    ROW,
    ROW_OFFSET,
    rewrite_score,
)
from attnc.dsl import symbols
from attnc.dsl.blockmask import BlockMaskLayout
from attnc.dsl.derivative import backward_tiles, read_gradients, score_derivative
from attnc.dsl.ir import AttentionIR
from attnc.dsl.tilemap import Q_TILE, TileMap, analyse
from attnc.schedules.config import KernelConfig
from attnc.schedules.resources import SM90A, consumer_regs, forward_blocks_per_sm

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
class CacheFill:
    """A value hoisted out of the element loop as the template fills it: the cache variable, its level, its dtype,
    the value (TileLang text, in ``b``, ``h``, ``q_idx``, ``kv_idx``, ``i``, ``j``, ``kv_base`` and the caches filled
    before it) and a zero of its dtype for out-of-range rows / columns. A tensor read (`codegen.hoist`) or a score
    vector (`codegen.score_rewrite`). Levels: 'block' (a scalar), 'row' (over ``i``) and 'block_column' (over ``j``)
    filled once per q tile; 'column' (over ``j``) and 'tile_row' (over ``i``, given the kv tile's ``kv_base``)
    filled once per kv tile."""

    cache: str
    level: str
    dtype: str
    value: str
    zero: str


@dataclass(frozen=True)
class BlockMaskContext:
    """The run-time block mask as a kernel indexes it (`attnc.dsl.blockmask`): the extents of its batch and head
    dims (``batch`` / the head count, or ``1``) and the kernel text of their index (``b`` / ``h``, or ``0``)."""

    batch_extent: str
    head_extent: str
    batch_index: str
    head_index: str

    @classmethod
    def of(cls, layout: BlockMaskLayout, q_heads: int) -> BlockMaskContext:
        return cls("batch" if layout.per_batch else "1", str(q_heads) if layout.per_head else "1",
                   "b" if layout.per_batch else "0", "h" if layout.per_head else "0")


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
    score_expr: str
    mask_expr: str
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
    arch: str = ""  # "sm_90a" / "sm_80" for cuda families, "" for the cpu
    warp_specialized: bool = False  # sm_90a: producer warpgroup + consumer warpgroups (``threads`` consumers)
    blocks_per_sm: int = 1  # sm_90a: blocks one SM is built to hold (`resources.forward_blocks_per_sm`)
    consumer_regs: int = 0  # sm_90a: registers per consumer thread (setmaxnreg; `resources.consumer_regs`)
    producer_regs: int = 0  # sm_90a: registers the producer warpgroup keeps (setmaxnreg; `Arch.producer_regs`)
    fast_tanh: bool = False  # the score expression calls attnc_fast_tanh; the template defines it
    score_guard: bool = False  # the score reads tensors: evaluate it only for in-bounds (q_idx, kv_idx)
    caches: tuple[CacheFill, ...] = ()  # cuda: values hoisted out of the element loop, in the order they fill
    # cuda forward (codegen.score_rewrite): score = score_fold * acc_s, where the element loop stores score_element
    # (in ``qk``, the q·k product, ``score_row[i]`` and ``score_column[j]``) into acc_s; "": acc_s keeps qk itself.
    score_fold: float = 1.0
    score_element: str = ""
    block_mask: BlockMaskContext | None = None  # the forward visits the kv tiles a run-time block mask lists
    bwd: BackwardContext | None = None  # set for the backward families (cpu_bwd, bwd) by make_bwd_context


def make_context(family: str, kernel_name: str, ir: AttentionIR, tilemap: TileMap, config: KernelConfig,
                 dtype: str, arch: str = "", block_mask: BlockMaskLayout | None = None,
                 plain: bool = False) -> KernelContext:
    """Print the IR's expressions and the tile map into a context for ``family``'s template (on ``arch``); with
    ``block_mask``, the kernel takes a run-time block mask of that layout. ``plain`` (cuda): no reads hoisted out of
    the element loop and no score rewrite (`score_rewrite`): each element computes ``score_mod(scale · qk)`` as
    written, the fallback for a kernel tilelang fails to build with them."""
    buffers = tuple(InputBuffer(t.name, f"in_{t.name}", t.dtype, len(t.shape)) for t in ir.inputs)
    tensors = {t.name: t.buffer for t in buffers}
    dtypes = {t.name: t.dtype for t in ir.inputs}
    cuda = bool(arch)
    optimised = cuda and not plain
    (score, mask), hoisted, cache_names = hoist(ir.score, ir.mask) if optimised else ((ir.score, ir.mask), (), {})

    def text(expr) -> str:
        return print_expr(expr, {**KERNEL_NAMES, **cache_names}, tensors, fast_tanh=cuda)

    caches = list(_cache_fills(hoisted, dtypes, tensors))
    fold, element = 1.0, ""
    if optimised:
        fold, element, vectors = _element_loop(score, ir.scale, hoisted, {**KERNEL_NAMES, **cache_names}, tensors,
                                               config.block_m)
        caches += vectors
    elif cuda:
        element = print_expr(score.subs(symbols.score, ir.scale * QK), {**KERNEL_NAMES, QK: "qk"}, tensors,
                             fast_tanh=True)

    blocks_per_sm = 1
    if family == "fwd" and arch == "sm_90a":
        blocks_per_sm = forward_blocks_per_sm(config, qk_dim=ir.qk_dim, v_dim=ir.v_dim)
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
        score_expr=text(score),
        mask_expr=text(mask) if ir.has_mask else "",
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
        arch=arch,
        warp_specialized=arch == "sm_90a",
        blocks_per_sm=blocks_per_sm,
        consumer_regs=consumer_regs(config.threads, blocks_per_sm) if arch == "sm_90a" else 0,
        producer_regs=SM90A.producer_regs if arch == "sm_90a" else 0,
        fast_tanh=cuda and ir.score.has(sympy.tanh),
        score_guard=bool(score.atoms(sympy.Indexed)),
        caches=tuple(caches),
        score_fold=fold,
        score_element=element,
        block_mask=BlockMaskContext.of(block_mask, ir.q_heads) if block_mask else None,
    )


def _element_loop(score: sympy.Expr, scale: float, hoisted, names: dict, tensors: dict,
                  block_m: int) -> tuple[float, str, list[CacheFill]]:
    """The cuda forward's element loop (`score_rewrite`): the folded factor, the text of what acc_s stores ("" for
    qk itself) and the score vectors to fill, after the caches they read: ``score_row`` ('row', in ``i``),
    ``score_column`` ('column' per kv tile in ``kv_idx`` and ``j``, or 'block_column' once per q tile in ``j``) and
    ``score_tile_row`` ('tile_row': ``score_row`` plus the per-kv-tile offset, in ``kv_base``)."""
    rewritten = rewrite_score(score, scale, [r.symbol for r in hoisted if r.level == "row"],
                              [r.symbol for r in hoisted if r.level == "column"])
    positions = {ROW_OFFSET: "i", COLUMN_OFFSET: "j", Q_BASE: f"(q_tile * {block_m})", KV_BASE: "kv_base"}

    def text(expr, extra=()) -> str:
        out = print_expr(expr, {**names, **positions, **dict(extra)}, tensors, fast_tanh=True)
        return f'T.cast({out}, "float32")' if expr.is_integer else out

    vectors = []
    for cache, level, expr in (("score_row", "row", rewritten.row),
                               ("score_column", "column" if rewritten.column_per_tile else "block_column",
                                rewritten.column),
                               ("score_tile_row", "tile_row", rewritten.tile)):
        if expr != 0:
            value = text(expr)  # the tile offset is cast whole: q_base - kv_base before it meets a float
            value = f"(score_row[i] + {value})" if level == "tile_row" and rewritten.row != 0 else value
            vectors.append(CacheFill(cache, level, "float32", value, 'T.cast(0, "float32")'))
    row = "score_tile_row[i]" if rewritten.tile != 0 else "score_row[i]"
    element = "" if rewritten.element == QK else text(rewritten.element,
                                                      {QK: "qk", ROW: row, COLUMN: "score_column[j]"})
    return float(rewritten.fold), element, vectors


def make_block_mask_context(family: str, kernel_name: str, ir: AttentionIR, tilemap: TileMap, config: KernelConfig,
                            layout: BlockMaskLayout, arch: str = "") -> KernelContext:
    """The context of the kernel that classifies tiles for a run-time block mask of ``layout``: the mask printed
    as it reads (no hoisting: a thread evaluates a whole row of a tile), the tile map's visit range."""
    ctx = make_context(family, kernel_name, ir, tilemap, config, "int8", block_mask=layout)
    return dataclasses.replace(ctx, arch=arch)


@dataclass(frozen=True)
class GradTerm:
    """One term of a captured tensor's gradient: ``target += dS * derivative`` (TileLang text; ``dS`` is the
    gradient of the modified score)."""

    target: str
    derivative: str
    per_element: bool = True  # the read's index depends on q_idx or kv_idx (else: one address per (b, h))
    diagonal: str = ""  # additive read indexed by q_idx - kv_idx only: the target at ``diag`` = q_idx - kv_idx


@dataclass(frozen=True)
class BackwardContext:
    """What the backward templates need beyond the forward's context.

    ``stage``: which kernel of the family to render ('main', and on cuda 'pre', 'dq', 'post'). ``dq_mode``: 'atomic'
    (the main kernel adds dQ into an fp32 buffer) or 'separate' (a dQ kernel per q tile, no atomics). ``dkv_mode``
    (cuda main): 'direct' (one q head per kv head: dK, dV written once in the input dtype), 'atomic' (GQA: fp32 dK,
    dV accumulators per kv head, added to by every q head's block) or 'partial' (GQA, deterministic: fp32 dK, dV per
    q head, summed over the group afterwards). ``warp_specialized``: sm_90a's main kernel (a TMA producer warpgroup,
    asynchronous wgmma); ``dq_tma_reduce``: it adds each dQ tile with one TMA reduce-add from shared memory instead
    of per-thread atomics; ``dq_first_store`` (with it): the first block to reach a dQ tile stores it and the others
    add to it, counted in a ticket per tile that 'pre' zeroes, so the accumulator needs no zero fill. ``mask_guard``:
    the mask reads tensors in the element loop (on sm_90a, after hoisting), so partial tiles test q_idx < q_len
    before it. ``score_grad``:
    d score_mod / d score ("" when it is 1). ``grad_buffers`` / ``grad_terms``: gradients of float tensor inputs.
    ``q_begin`` ... ``full_end``: per kv tile (``kv_tile``), the q tiles visited and full (transposed tile map).
    ``mask_expr`` / ``score_expr`` / ``caches`` (sm_90a main kernel): the mask and the score with their hoistable
    tensor reads (`codegen.hoist`) replaced by caches the kernel fills outside the element loop: 'block' once per
    block, 'column' (a kv row's, over ``j``) once per block too (its kv tile is fixed), 'row' (a q row's, over ``i``)
    per q tile into a shared ring slot beside the tile's lse, filled by the producer. Elsewhere the context's own.
    """

    stage: str
    dq_mode: str
    dkv_mode: str
    warp_specialized: bool
    dq_tma_reduce: bool
    dq_first_store: bool
    mask_guard: bool
    score_grad: str
    grad_buffers: tuple[InputBuffer, ...]
    grad_terms: tuple[GradTerm, ...]
    q_begin: str
    q_end: str
    full_begin: str
    full_end: str
    mask_expr: str = ""
    score_expr: str = ""
    caches: tuple[CacheFill, ...] = ()


DIAGONAL = sympy.Symbol("diag", integer=True)


def diagonal_target(read: sympy.Indexed, tensors: Mapping[str, str], name: str) -> str:
    """The gradient target of ``read`` printed in ``diag`` = q_idx - kv_idx, when its indices depend on q_idx and
    kv_idx through that difference only (a relative-position table): the kernel then sums dS along each diagonal
    of a tile (when the read is added to the score). "" otherwise."""
    indices = [i.subs(symbols.q_idx, symbols.kv_idx + DIAGONAL) for i in read.indices]
    if not any(i.has(DIAGONAL) for i in indices) or any(i.has(symbols.kv_idx) for i in indices):
        return ""
    return print_expr(read.base[tuple(indices)], {**KERNEL_NAMES, DIAGONAL: "diag"},
                      {**tensors, name: f"grad_{name}"})


def dkv_mode(ir: AttentionIR, dq_mode: str) -> str:
    """How the cuda main kernel writes dK and dV (see `BackwardContext`)."""
    if ir.group == 1:
        return "direct"
    return "partial" if dq_mode == "separate" else "atomic"


def make_bwd_context(family: str, kernel_name: str, ir: AttentionIR, config: KernelConfig, dtype: str,
                     stage: str = "main", dq_mode: str = "atomic", grads: tuple[str, ...] = (),
                     warp_specialized: bool = False, dq_tma_reduce: bool = False, dq_first_store: bool = False,
                     block_mask: BlockMaskLayout | None = None) -> KernelContext:
    """The context of a backward kernel: the forward's (tile map included, for the dQ pass) and `BackwardContext`.
    ``grads`` names the float inputs whose gradients the kernel computes; ``warp_specialized``, ``dq_tma_reduce`` and
    ``dq_first_store``: see `BackwardContext`. ``block_mask`` (stages 'main' and 'dq'): the kernel takes a run-time
    block mask of that layout at its tiles and visits only the tiles it lists (main: per kv tile, the q tiles)."""
    ctx = make_context(family, kernel_name, ir, analyse(ir.mask, config.block_m, config.block_n), config, dtype,
                       block_mask=block_mask)
    inputs = {t.name: t for t in ctx.inputs}
    tensors = {t.name: t.buffer for t in ctx.inputs}
    kv_names = {**KERNEL_NAMES, Q_TILE: "kv_tile"}
    cuda = family == "bwd"  # P is recomputed with the forward's tanh (tanh.approx.f32 on cuda), so it matches its lse

    def text(expr, names=KERNEL_NAMES, buffers=tensors) -> str:
        out = print_expr(expr, names, buffers, fast_tanh=cuda)
        return f'T.cast({out}, "float32")' if sympy.sympify(expr).is_integer else out

    if cuda:
        ctx = dataclasses.replace(ctx, score_expr=text(ir.score), fast_tanh=ir.score.has(sympy.tanh))

    buffers, terms = [], []
    for name in grads:
        source = inputs[name]
        buffers.append(InputBuffer(name, f"grad_{name}", "float32", source.ndim))
    d_score = score_derivative(ir)
    for term in read_gradients(ir, set(grads)):
        target = print_expr(term.read, KERNEL_NAMES, {**tensors, term.name: f"grad_{term.name}"})
        varies = any(i.has(symbols.q_idx, symbols.kv_idx) for i in term.read.indices)
        additive = term.derivative == 1 and d_score == 1  # its gradient is dS, which the kernel keeps
        diagonal = diagonal_target(term.read, tensors, term.name) if additive else ""
        terms.append(GradTerm(target, text(term.derivative), varies, diagonal))
    tiles = backward_tiles(ir.mask, config.block_m, config.block_n)
    mask_expr, score_expr, caches, mask_guard = ctx.mask_expr, ctx.score_expr, (), bool(ctx.inputs)
    if cuda and stage == "main" and warp_specialized:
        mask_expr, score_expr, caches, score_guard, mask_guard = _hoisted_main(ir, config.stages, tensors, text)
        ctx = dataclasses.replace(ctx, score_guard=score_guard, consumer_regs=consumer_regs(config.threads),
                                  producer_regs=SM90A.producer_regs)
    bwd = BackwardContext(
        stage=stage,
        dq_mode=dq_mode,
        dkv_mode=dkv_mode(ir, dq_mode),
        warp_specialized=warp_specialized,
        dq_tma_reduce=dq_tma_reduce,
        dq_first_store=dq_first_store,
        mask_guard=mask_guard,
        score_grad="" if d_score == 1 else text(d_score),
        grad_buffers=tuple(buffers),
        grad_terms=tuple(terms),
        q_begin=print_expr(tiles.q_begin, kv_names),
        q_end=print_expr(tiles.q_end, kv_names),
        full_begin=print_expr(tiles.full_begin, kv_names),
        full_end=print_expr(tiles.full_end, kv_names),
        mask_expr=mask_expr,
        score_expr=score_expr,
        caches=caches,
    )
    return dataclasses.replace(ctx, bwd=bwd)


def _hoisted_main(ir: AttentionIR, stages: int, tensors: dict, text) -> tuple[str, str, tuple[CacheFill, ...], bool,
                                                                               bool]:
    """The sm_90a backward main kernel's mask and score texts with hoistable reads replaced by caches, the caches
    (see `BackwardContext`; a q row's cache is read from its ring slot, ``t % stages``, as the lse is) and whether
    the score still needs the bounds test on full tiles: while it reads a tensor in the loop, or a q row's cache (a
    row past q_len holds a zero there, and a score_mod that divides by it would put a NaN into dV through P), and
    whether the mask still reads a tensor in the loop (partial tiles then test q_len before it)."""
    (score, mask), hoisted, names = hoist(ir.score, ir.mask)
    names = {**KERNEL_NAMES, **names, **{read.symbol: f"{read.cache}_ring[t % {stages}, i]"
                                         for read in hoisted if read.level == "row"}}
    caches = _cache_fills(hoisted, {t.name: t.dtype for t in ir.inputs}, tensors)
    mask_text = print_expr(mask, names, tensors, fast_tanh=True) if ir.has_mask else ""
    row_caches = {read.symbol for read in hoisted if read.level == "row"}
    guard = bool(score.atoms(sympy.Indexed)) or bool(score.free_symbols & row_caches)
    return mask_text, text(score, names), caches, guard, bool(mask.atoms(sympy.Indexed))


def _cache_fills(hoisted, dtypes: Mapping[str, str], tensors: Mapping[str, str]) -> tuple[CacheFill, ...]:
    """The fills of hoisted reads (`codegen.hoist`): an integer read cached in its tensor's dtype, a float one in
    float32."""
    caches = []
    for read in hoisted:
        source = dtypes[str(read.read.base)]
        cache_dtype = source if read.integer else "float32"
        value = print_expr(read.read, KERNEL_NAMES, tensors)
        value = value if source == cache_dtype else f'T.cast({value}, "float32")'
        caches.append(CacheFill(read.cache, read.level, cache_dtype, value, f'T.cast(0, "{cache_dtype}")'))
    return tuple(caches)
