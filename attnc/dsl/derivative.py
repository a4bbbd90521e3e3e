"""What the backward needs from the IR beyond what the forward uses: derivatives and the kv-side tile map.

Derivatives. The backward turns dL/d(modified score) into dL/d(raw score) with ``d score_mod / d score``, and into
the gradient of every float tensor the score_mod reads with ``d score_mod / d read``. sympy differentiates the
traced expression; before that, ``Max``/``Min`` become ``Piecewise`` (sympy would answer with ``Heaviside``, which
kernels cannot compute), and after it the derivatives of step functions (``floor``, ``ceiling``, ``sign``,
``Heaviside``) are zero almost everywhere and replaced by 0. Each tensor read is differentiated on its own: it is
replaced by a fresh real symbol, differentiated, and substituted back, so ``bias[h, q_idx] + bias[h, kv_idx]``
gives two reads with derivative 1 each (differentiating in ``Indexed`` directly would give ``KroneckerDelta``s).
Reads in the mask, in an index, or of integer tensors have no gradient.

The kv-side tile map. The forward visits, per q tile, a range of kv tiles; the FlashAttention-2 backward loops over
kv tiles outside and q tiles inside, so it needs, per kv tile, the range of q tiles. `backward_tiles` gets it from
the same analysis applied to the transposed mask (``q_idx <-> kv_idx`` and ``q_len <-> kv_len`` swapped): the
analysis is sound for any mask it accepts, so the transposed map is sound too, and exact where the forward's is.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sympy

from attnc.dsl import symbols
from attnc.dsl.ir import AttentionIR
from attnc.dsl.tilemap import TileMap, analyse

_STEPS = (sympy.floor, sympy.ceiling, sympy.sign, sympy.Heaviside)


@dataclass(frozen=True)
class ReadGradient:
    """One float tensor read of the score_mod: ``read`` (a ``sympy.Indexed``) and ``d score_mod / d read``."""

    name: str
    read: sympy.Indexed
    derivative: sympy.Expr


def _piecewise_minmax(expr: sympy.Expr) -> sympy.Expr:
    """``Max``/``Min``/``Abs`` rewritten as ``Piecewise``, which sympy differentiates branch by branch."""

    def minmax(e):
        keep = sympy.Ge if isinstance(e, sympy.Max) else sympy.Le
        value = e.args[0]
        for arg in e.args[1:]:
            value = sympy.Piecewise((value, keep(value, arg)), (arg, True))
        return value

    expr = expr.replace(lambda e: isinstance(e, (sympy.Max, sympy.Min)) and not e.is_integer, minmax)
    return expr.replace(lambda e: isinstance(e, sympy.Abs) and not e.is_integer,
                        lambda e: sympy.Piecewise((e.args[0], sympy.Ge(e.args[0], 0)), (-e.args[0], True)))


def differentiate(expr: sympy.Expr, var: sympy.Symbol) -> sympy.Expr:
    """``d expr / d var`` for a traced expression, in functions the kernels can compute."""
    expr = _piecewise_minmax(sympy.sympify(expr))
    result = sympy.diff(expr, var)
    result = result.replace(lambda e: isinstance(e, sympy.Derivative) and isinstance(e.expr, _STEPS),
                            lambda e: sympy.S.Zero)
    result = result.replace(lambda e: isinstance(e, sympy.DiracDelta), lambda e: sympy.S.Zero)
    return sympy.piecewise_fold(result) if result.has(sympy.Piecewise) else result


def score_derivative(ir: AttentionIR) -> sympy.Expr:
    """``d score_mod / d score``: 1 without a score_mod."""
    return differentiate(ir.score, symbols.score) if ir.has_score_mod else sympy.S.One


def float_reads(expr: sympy.Expr) -> list[sympy.Indexed]:
    """The reads of float tensors in ``expr`` outside of indices, in a stable order."""
    reads = {r for r in expr.atoms(sympy.Indexed) if not r.base.is_integer}
    nested = {r for outer in expr.atoms(sympy.Indexed) for index in outer.indices for r in index.atoms(sympy.Indexed)}
    return sorted(reads - nested, key=sympy.srepr)


def read_gradients(ir: AttentionIR, names: set[str] | None = None) -> tuple[ReadGradient, ...]:
    """``d score_mod / d read`` for every float read of the score_mod (of the tensors in ``names`` when given)."""
    if not ir.has_score_mod:
        return ()
    reads = [r for r in float_reads(ir.score) if names is None or str(r.base) in names]
    fresh = {read: sympy.Symbol(f"_attnc_read{i}", real=True) for i, read in enumerate(reads)}
    plain = ir.score.xreplace(fresh)
    back = {symbol: read for read, symbol in fresh.items()}
    out = []
    for read, symbol in fresh.items():
        derivative = differentiate(plain, symbol).xreplace(back)
        if derivative != 0:
            out.append(ReadGradient(str(read.base), read, derivative))
    return tuple(out)


def transpose_mask(mask: sympy.Basic) -> sympy.Basic:
    """The mask with the roles of queries and keys swapped: ``M(q, kv, Q, KV)`` becomes ``M(kv, q, KV, Q)``."""
    s = symbols
    return sympy.sympify(mask).xreplace({s.q_idx: s.kv_idx, s.kv_idx: s.q_idx, s.q_len: s.kv_len, s.kv_len: s.q_len})


@dataclass(frozen=True)
class BackwardTiles:
    """Per kv tile (``tilemap``'s ``Q_TILE`` symbol stands for it): q tiles ``[q_begin, q_end)`` visited,
    ``[full_begin, full_end)`` of them full. The expressions are in the true ``q_len``, ``kv_len``; ``tilemap`` is
    the transposed mask's map, in the transposed lengths."""

    block_m: int
    block_n: int
    q_begin: sympy.Expr
    q_end: sympy.Expr
    full_begin: sympy.Expr
    full_end: sympy.Expr
    tilemap: TileMap

    def bounds(self, kv_tile: int, q_len: int, kv_len: int) -> tuple[int, int, int, int]:
        """``(q_begin, q_end, full_begin, full_end)`` of one kv tile at concrete lengths."""
        return self.tilemap.bounds(kv_tile, kv_len, q_len)

    def grid(self, q_len: int, kv_len: int) -> list[str]:
        """One row per kv tile, one character per q tile: '█' full, '░' partial, '·' skipped."""
        return self.tilemap.grid(kv_len, q_len)


@functools.lru_cache(maxsize=256)  # the stages of one backward share it; sympy makes it costly (~0.7 s for prefix-LM)
def backward_tiles(mask: sympy.Basic, block_m: int, block_n: int) -> BackwardTiles:
    """The kv-side map for q tiles of ``block_m`` rows and kv tiles of ``block_n`` rows."""
    t = analyse(transpose_mask(mask), block_n, block_m)
    back = {symbols.q_len: symbols.kv_len, symbols.kv_len: symbols.q_len}
    q_begin, q_end, full_begin, full_end = (e.xreplace(back) for e in (t.kv_begin, t.kv_end, t.full_begin,
                                                                        t.full_end))
    return BackwardTiles(block_m, block_n, q_begin, q_end, full_begin, full_end, t)
