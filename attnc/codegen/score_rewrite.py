"""Rewriting the score expression for the element loop of the GPU forward.

The forward stores one value per score element in ``acc_s``, takes its row maximum and exponentiates
``exp2(acc_s * FOLD - max * FOLD)``. Two rewrites of ``score_mod(scale · qk)`` (``qk``: the q·k product) cut the
per-element work without changing the softmax:

- **Folding a positive factor.** When the expression is ``c · g`` with a positive number ``c`` (softcap:
  ``cap · tanh(qk · scale / cap)``; no score_mod: ``scale · qk``), ``acc_s`` holds ``g`` and ``c · log2(e)`` is
  FOLD: the row maximum and exp2 both scale by ``c > 0``, ``-inf`` stays ``-inf``, and the log-sum-exp
  ``(max · FOLD + log2(sum)) · ln 2`` is still that of the true scores. The constants multiplying ``qk`` inside
  ``g`` are one number (sympy combines them). With additive terms (``scale · qk + bias``), ``c`` is the positive
  coefficient of the one term that holds ``qk``, and the other terms are divided by it.
- **Splitting additive terms.** Terms that depend only on the row (``q_idx``, per-row caches) move into a
  per-row vector computed once per q tile, terms that depend only on the column (``kv_idx``, per-column caches)
  into a per-column vector; the element loop adds ``row[i] + column[j]``.
- **Affine columns.** A column term ``c · kv_idx`` (``c`` constant in the block, e.g. ALiBi's ``slope[h]``) is
  ``c · j + c · kv_base`` (``j``: the column in the kv tile; ``kv_base``: the kv tile's first kv_idx). ``c · j``
  goes into a column vector filled once per q tile; the per-tile offset ``c · kv_base`` is added to the row vector
  once per kv tile (a few registers per thread, instead of refilling a column vector on the softmax's critical
  path). Row terms ``k · q_idx`` then become ``k · i`` (row) and ``k · q_base`` in that offset (``q_base``: the
  q tile's first row), so ALiBi's ``slope · (kv_idx - q_idx)`` is computed as ``slope · j - slope · i +
  slope · (kv_base - q_base)`` on small integers, never as the difference of two large products. Column terms that
  are not affine in ``kv_idx`` (``bias[h, kv_idx]``) need a column vector refilled per kv tile, which then also
  takes ``c · j``.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attnc.dsl import symbols

QK = sympy.Symbol("qk", real=True)  # the q·k product of one element, before any scale
ROW = sympy.Symbol("score_row", real=True)  # the element's entry of the per-row vector (plus the tile offset)
COLUMN = sympy.Symbol("score_column", real=True)  # the element's entry of the per-column vector
ROW_OFFSET = sympy.Symbol("i", integer=True, nonnegative=True)  # q_idx - q_base
Q_BASE = sympy.Symbol("q_base", integer=True, nonnegative=True)  # the first q_idx of the q tile
COLUMN_OFFSET = sympy.Symbol("j", integer=True, nonnegative=True)  # kv_idx - kv_base
KV_BASE = sympy.Symbol("kv_base", integer=True, nonnegative=True)  # the first kv_idx of the kv tile


@dataclass(frozen=True)
class RewrittenScore:
    """``score_mod(scale · qk) == fold · element`` with ``ROW = row + tile`` and ``COLUMN = column``.

    ``fold``: a positive number. ``element``: in ``QK``, ``ROW`` and ``COLUMN`` (when those are nonzero) and any
    index symbol. ``row``: in ``q_idx``, ``ROW_OFFSET`` and per-row symbols (0 when there is none), once per q tile.
    ``tile``: in ``KV_BASE``, ``Q_BASE`` and block constants (0 when there is none), once per kv tile.
    ``column``: in ``COLUMN_OFFSET``, and when ``column_per_tile`` also ``kv_idx`` and per-column symbols (0 when
    there is none): filled once per kv tile if ``column_per_tile``, else once per q tile.
    """

    fold: sympy.Expr
    element: sympy.Expr
    row: sympy.Expr
    column: sympy.Expr
    tile: sympy.Expr = sympy.S.Zero
    column_per_tile: bool = False


def _positive_factor(terms: tuple[sympy.Expr, ...]) -> sympy.Expr:
    """The positive numeric coefficient of the one term that holds ``QK``; 1 when there is none to take."""
    with_qk = [t for t in terms if t.has(QK)]
    if len(with_qk) != 1:
        return sympy.S.One
    coeff, _ = with_qk[0].as_coeff_Mul()
    return coeff if coeff.is_Number and coeff.is_finite and coeff.is_positive else sympy.S.One


def _divide(term: sympy.Expr, number: sympy.Expr) -> sympy.Expr:
    """``term / number`` with the numbers combined into one coefficient, and none left when it is 1."""
    coeff, rest = term.as_coeff_Mul()
    coeff = coeff / number
    return rest if float(coeff) == 1.0 else coeff * rest  # sympy's Float(1.0) != 1


def _place(term: sympy.Expr, row_symbols: set, column_symbols: set) -> str:
    """'element', 'row', 'column' or 'number' (a constant that costs nothing inside the element's arithmetic)."""
    if term.has(QK) or term.atoms(sympy.Indexed):
        return "element"
    used = term.free_symbols
    on_row, on_column = bool(used & row_symbols), bool(used & column_symbols)
    if on_row and on_column:
        return "element"
    if on_column:
        return "column"
    return "row" if on_row or used else "number"


def rewrite_score(score: sympy.Expr, scale: float, row_symbols=(), column_symbols=()) -> RewrittenScore:
    """Fold and split ``score`` (in ``symbols.score``) for the element loop.

    ``row_symbols`` / ``column_symbols``: the symbols, besides ``q_idx`` / ``kv_idx``, whose value depends on the
    row / column (the per-row and per-column caches of `codegen.hoist`); every other symbol is constant in a block.
    """
    row_symbols = {symbols.q_idx, *row_symbols}
    column_symbols = {symbols.kv_idx, *column_symbols}
    expr = sympy.sympify(score).xreplace({symbols.score: QK * sympy.Float(scale)})
    terms = sympy.Add.make_args(expr)
    fold = _positive_factor(terms)
    placed = {"element": [], "row": [], "column": [], "number": []}
    for term in terms:
        term = _divide(term, fold)
        level = _place(term, row_symbols, column_symbols)
        parts = sympy.Add.make_args(sympy.expand_mul(term)) if level == "element" else (term,)
        levels = [_place(p, row_symbols, column_symbols) for p in parts]
        if "element" in levels:  # distributing would not take it out of the element loop: keep it whole
            placed["element"].append(term)
            continue
        for part, part_level in zip(parts, levels):
            placed[part_level].append(part)
    per_tile, slope, constants = _split_columns(placed["column"], row_symbols | column_symbols)
    row, tile = _split_rows(placed["row"], row_symbols) if slope != 0 else (sympy.Add(*placed["row"]), sympy.S.Zero)
    tile = sympy.factor_terms(tile + slope * KV_BASE + constants)
    column = sympy.Add(*per_tile) + slope * COLUMN_OFFSET
    element = sympy.Add(*placed["element"], *placed["number"])
    element += (ROW if row != 0 or tile != 0 else 0) + (COLUMN if column != 0 else 0)
    return RewrittenScore(fold, element, row, column, tile, bool(per_tile))


def _split_columns(column_terms: list, varying: set) -> tuple[list, sympy.Expr, sympy.Expr]:
    """The column terms as (terms kept per kv tile, the total slope ``c`` of the terms ``c · kv_idx``, the block
    constants those terms carry). A term is split only when all of its parts are affine or constant."""
    per_tile, slopes, constants = [], [], []
    for term in column_terms:
        affine, constant = [], []
        for part in sympy.Add.make_args(sympy.expand_mul(term)):
            coeff, rest = part.as_independent(symbols.kv_idx, as_Add=False)
            if coeff.free_symbols & varying:
                break
            if rest == symbols.kv_idx:
                affine.append(coeff)
            elif rest == 1:
                constant.append(coeff)
            else:
                break
        else:
            slopes += affine
            constants += constant
            continue
        per_tile.append(term)
    return per_tile, sympy.Add(*slopes), sympy.Add(*constants)


def _split_rows(row_terms: list, row_symbols: set) -> tuple[sympy.Expr, sympy.Expr]:
    """The row vector and its part of the tile offset: row terms ``k · q_idx`` (``k`` constant in the block) are
    split into ``k · ROW_OFFSET`` (row) and ``k · Q_BASE`` (offset); block constants (``slope · (kv_len - q_len)``)
    join the offset, where they meet the other integers before a float."""
    rows, offset = [], []
    for term in row_terms:
        coeff, rest = term.as_independent(symbols.q_idx, as_Add=False)
        if not term.free_symbols & row_symbols:
            offset.append(term)
        elif rest == symbols.q_idx and not coeff.free_symbols & row_symbols:
            rows.append(coeff * ROW_OFFSET)
            offset.append(coeff * Q_BASE)
        else:
            rows.append(term)
    return sympy.Add(*rows), sympy.Add(*offset)
