"""The tile map: which kv tiles each q tile visits, and which of those are full, decided at compile time.

The kernel splits queries into tiles of ``block_m`` rows and keys into tiles of ``block_n`` columns. For q tile
``q_tile`` it loops over kv tiles ``[kv_begin, kv_end)``; tiles in ``[full_begin, full_end)`` are FULL (the mask
holds on every in-bounds element: no predicate is evaluated), the other visited tiles are PARTIAL, and tiles outside
``[kv_begin, kv_end)`` are EMPTY (the mask is false on them). The bounds are sympy expressions in `Q_TILE`, ``q_len``
and ``kv_len`` (one build serves every length) made of ``+``, ``*`` by numbers, ``floor``/``ceiling`` of rational
affine arguments (print them as floor division: numerators can be negative), ``Min``/``Max``, and ``Piecewise`` only
where ``Or`` joins two full ranges that need not touch.

Only in-bounds elements count: a ragged last q or kv tile is full when the mask holds on its in-bounds part (the
kernel bounds-checks rows and columns on its own).

Method. ``Not`` is pushed onto the relations (De Morgan). ``e OP 0`` with a ``Max``/``Min``/``Abs``/``Piecewise`` term
is split into relations without it (``Max(x, y) <= 0`` is ``x <= 0 & y <= 0``); ``==`` / ``!=`` are two
inequalities; ``x % n`` is ``x - n floor(x / n)``. A relation linear in one nondecreasing function of ``kv_idx``
(``kv_idx``, ``floor(a kv_idx + c)``, ``ceiling(...)``) and in monotone functions of ``q_idx`` solves to
``kv_idx <= U(q)`` or ``kv_idx >= L(q)``: the tile's last / first row gives the tiles visited, the other row the full
ones. ``And`` intersects visit and full ranges. ``Or`` takes the hull of the visits, and for the full range the
union when the two touch, else the longer one. Anything else (``b``, ``h``, tensor reads, products of indices,
floats) is unknown: every tile visited, none full, and the map is not `exact`. Exact (the visit range is the hull of
the non-empty tiles, the full range the set of full tiles) for one bound, for a band of two parallel bounds (sliding
windows, chunks) and for ``Or`` of nested full ranges (prefix-LM); conservative where ``And`` meets bounds of
different slopes or ``Or`` leaves a gap.
"""

from __future__ import annotations

import contextvars
import math
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache, partial, reduce

import sympy
from sympy.printing.pycode import PythonCodePrinter

from attnc.dsl.symbols import kv_idx, kv_len, q_idx, q_len

Q_TILE = sympy.Symbol("q_tile", integer=True, nonnegative=True)
_LENGTHS = {q_len, kv_len}
_FLIP = {"<": ">", "<=": ">=", ">": "<", ">=": "<="}
_BLOCK_M = contextvars.ContextVar("attnc_tilemap_block_m", default=0)  # the tile height being analysed


@lru_cache(maxsize=8192)
def _range(e: sympy.Expr, block_m: int) -> tuple:
    """Numeric bounds ``(low, high)`` of ``e`` (None where unknown): interval logic on the symbols' signs, and on
    ``block_m * q_tile <= q_len - 1`` (a q tile starts in bounds)."""
    if e.is_Number:
        return e, e
    if e.is_Symbol:
        return (1 if e.is_positive else 0 if e.is_nonnegative else None), None
    if isinstance(e, (sympy.floor, sympy.ceiling)):
        return tuple(None if v is None else type(e)(v) for v in _range(e.args[0], block_m))
    parts = [_range(arg, block_m) for arg in e.args]
    lows, highs = [p[0] for p in parts], [p[1] for p in parts]
    if isinstance(e, sympy.Add):
        low, high = (None if None in lows else sum(lows)), (None if None in highs else sum(highs))
        k = e.coeff(Q_TILE)
        if block_m and k.is_Number and k != 0 and not (e - k * Q_TILE).has(Q_TILE):
            top = _range(sympy.expand(e.subs(Q_TILE, (q_len - 1) / block_m)), block_m)[1 if k > 0 else 0]
            if top is not None and k > 0:
                high = top if high is None else min(high, top)
            elif top is not None:
                low = top if low is None else max(low, top)
        return low, high
    if isinstance(e, sympy.Mul) and len(e.args) == 2 and e.args[0].is_Number:
        c, (lo, hi) = e.args[0], parts[1]
        lo, hi = (None if lo is None else c * lo), (None if hi is None else c * hi)
        return (lo, hi) if c > 0 else (hi, lo)
    known_lows, known_highs = [v for v in lows if v is not None], [v for v in highs if v is not None]
    if isinstance(e, sympy.Min):
        return (None if None in lows else min(lows)), (min(known_highs) if known_highs else None)
    if isinstance(e, sympy.Max):
        return (max(known_lows) if known_lows else None), (None if None in highs else max(highs))
    return None, None


@lru_cache(maxsize=8192)
def _le(x: sympy.Expr, y: sympy.Expr, block_m: int) -> bool:
    """Whether ``x <= y`` is known for every length and in-bounds tile (False: unknown)."""
    high = _range(x - y, block_m)[1]
    if x == y or (high is not None and high <= 0):
        return True
    if isinstance(x, (sympy.Min, sympy.Max)) and (all if isinstance(x, sympy.Max) else any)(
            _le(a, y, block_m) for a in x.args):
        return True
    return isinstance(y, (sympy.Min, sympy.Max)) and (all if isinstance(y, sympy.Min) else any)(
        _le(x, c, block_m) for c in y.args)


def _extreme(cls, *args: sympy.Expr) -> sympy.Expr:
    """``cls(*args)`` (Min or Max) without the arguments known to be dominated. sympy's own simplification asks the
    assumptions system about every pair: seconds on these expressions."""
    block_m, kept = _BLOCK_M.get(), []
    flat = [part for a in map(sympy.sympify, args) for part in (a.args if isinstance(a, cls) else (a,))]
    for a in flat:
        below = (lambda u, v: _le(u, v, block_m)) if cls is sympy.Max else (lambda u, v: _le(v, u, block_m))
        if not any(below(a, k) for k in kept):
            kept = [k for k in kept if not below(k, a)] + [a]
    return kept[0] if len(kept) == 1 else cls(*kept, evaluate=False)


_min, _max = partial(_extreme, sympy.Min), partial(_extreme, sympy.Max)


@dataclass(frozen=True)
class _Span:
    """Per-q-tile kv tile ranges before clamping: ``visit`` and ``full`` are ``(begin, end)`` or None (empty)."""

    visit: tuple | None
    full: tuple | None
    exact: bool = True


class _Tile:
    """The symbolic q tile: first and last in-bounds rows, and the number of kv tiles."""

    def __init__(self, block_m: int, block_n: int):
        self.bn = block_n
        self.q0 = block_m * Q_TILE
        self.q1 = (block_m * Q_TILE + block_m - 1, q_len - 1)  # the last row is the smaller
        self.nt = sympy.ceiling(kv_len / block_n)
        self.all = _Span((sympy.S.Zero, self.nt), (sympy.S.Zero, self.nt))
        self.none = _Span(None, None)
        self.unknown = _Span((sympy.S.Zero, self.nt), None, exact=False)

    def or_(self, x: _Span, y: _Span) -> _Span:
        return _or(x, y, self.nt)


def _and(x: _Span, y: _Span) -> _Span:
    def meet(r, s):
        return None if r is None or s is None else (_max(r[0], s[0]), _min(r[1], s[1]))

    return _Span(meet(x.visit, y.visit), meet(x.full, y.full), x.exact and y.exact)


def _or(x: _Span, y: _Span, nt: sympy.Expr) -> _Span:
    visit = x.visit or y.visit
    if x.visit and y.visit:
        visit = _union(x.visit, y.visit)
    r, s = x.full, y.full
    if r is None or s is None:
        full = r or s
    elif r[0] == s[0]:
        full = (r[0], _max(r[1], s[1]))
    elif r[1] == s[1]:
        full = (_min(r[0], s[0]), r[1])
    else:  # the hull when the ranges overlap or touch (an empty one then lies inside the other), else the longer
        # one. A comparison with a range anchored at 0 or at the last tile only fails when the other is empty and
        # out of [0, nt), where the hull stays right once clamped: skip it.
        touch = sympy.And(*(lo <= hi for lo, hi in ((r[0], s[1]), (s[0], r[1])) if lo != 0 and hi != nt))
        hull = (_min(r[0], s[0]), _max(r[1], s[1]))
        if touch == sympy.true:
            full = hull
        else:  # unevaluated: sympy would rewrite the conditions into ITE, which kernels cannot print
            longer = r[1] - r[0] >= s[1] - s[0]
            full = tuple(sympy.Piecewise((u, touch), (a, longer), (b, True), evaluate=False)
                         for u, a, b in zip(hull, r, s))
    return _Span(visit, full, x.exact and y.exact)


def _union(r: tuple, s: tuple) -> tuple:
    """The hull of two visit ranges, either of which may be empty at run time (``begin >= end``): a range a row
    condition switches off (``(0, nt·flag)``) must not stretch the other one down to 0."""
    if r[0] == s[0]:
        return r[0], _max(r[1], s[1])
    if r[1] == s[1]:
        return _min(r[0], s[0]), r[1]
    hull = (_min(r[0], s[0]), _max(r[1], s[1]))
    r_empty, s_empty = r[0] >= r[1], s[0] >= s[1]
    if r_empty == sympy.false and s_empty == sympy.false:
        return hull
    return tuple(sympy.Piecewise((b, r_empty), (a, s_empty), (h, True), evaluate=False)
                 for a, b, h in zip(r, s, hull))


def _bool(expr: sympy.Basic, negate: bool, tile: _Tile) -> _Span:
    """The span of ``expr`` (of ``~expr`` when ``negate``)."""
    if expr in (sympy.true, sympy.false):
        return tile.all if (expr == sympy.true) != negate else tile.none
    if isinstance(expr, sympy.Not):
        return _bool(expr.args[0], not negate, tile)
    if isinstance(expr, (sympy.And, sympy.Or)):
        parts = [_bool(arg, negate, tile) for arg in expr.args]
        return reduce(_and if isinstance(expr, sympy.And) != negate else tile.or_, parts)
    if isinstance(expr, sympy.Rel) and all(isinstance(arg, sympy.Expr) for arg in expr.args):
        rel = expr.negated if negate else expr
        return _compare(sympy.expand(rel.lhs - rel.rhs), rel.rel_op, tile)
    if isinstance(expr, sympy.Piecewise):  # boolean-valued
        return _cases(expr, tile, lambda value: _bool(value, negate, tile))
    if isinstance(expr, sympy.logic.boolalg.BooleanFunction):  # Xor, Implies, ITE, ...
        nnf = sympy.logic.boolalg.to_nnf(expr, simplify=False)
        if nnf != expr:
            return _bool(nnf, negate, tile)
    return tile.unknown


def _compare(e: sympy.Expr, op: str, tile: _Tile) -> _Span:
    """The span of ``e OP 0``."""
    if op == "==":
        return _and(_compare(e, "<=", tile), _compare(e, ">=", tile))
    if op == "!=":
        return tile.or_(_compare(e, "<", tile), _compare(e, ">", tile))
    for term in sympy.Add.make_args(e):
        coef, core = term.as_coeff_Mul()
        rest = e - term if isinstance(core, (sympy.Abs, sympy.Max, sympy.Min, sympy.Piecewise)) else None
        if isinstance(core, sympy.Abs):
            core = sympy.Max(core.args[0], -core.args[0], evaluate=False)
        if isinstance(core, (sympy.Max, sympy.Min)):
            parts = [_compare(sympy.expand(coef * arg + rest), op, tile) for arg in core.args]
            is_max = isinstance(core, sympy.Max) == bool(coef > 0)
            return reduce(_and if is_max == (op in ("<", "<=")) else tile.or_, parts)
        if isinstance(core, sympy.Piecewise):
            return _cases(core, tile, lambda value: _compare(sympy.expand(coef * value + rest), op, tile))
    return _linear(e, op, tile)


def _cases(piecewise: sympy.Piecewise, tile: _Tile, span) -> _Span:
    """Or over the branches of (this condition, no earlier one, ``span(value)``)."""
    branches, before = [], tile.all
    for value, cond in piecewise.args:
        branches.append(_and(_and(before, _bool(cond, False, tile)), span(value)))
        before = _and(before, _bool(cond, True, tile))
    return reduce(tile.or_, branches)


def _unit(core: sympy.Expr, var: sympy.Symbol):
    """``core`` as ``(kind, a, c)`` meaning ``kind(a var + c)``, kind one of 'id', 'floor', 'ceiling'; else None."""
    if core == var:
        return "id", sympy.S.One, sympy.S.Zero
    if isinstance(core, (sympy.floor, sympy.ceiling)):
        arg = sympy.expand(core.args[0])
        a, c = arg.coeff(var), arg - arg.coeff(var) * var
        if a.is_Rational and a != 0 and not c.has(var, q_idx, kv_idx):
            return type(core).__name__, a, c
    return None


def _direction(r: sympy.Expr):
    """+1 / -1 / 0 when ``r`` rises / falls with ``q_idx`` / does not depend on it; None when mixed or unknown."""
    seen = set()
    for term in sympy.Add.make_args(r):
        if term.has(q_idx):
            coef, core = term.as_coeff_Mul()
            unit = _unit(core, q_idx)
            if unit is None:
                return None
            seen.add(1 if bool(coef > 0) == bool(unit[1] > 0) else -1)
    return 0 if not seen else seen.pop() if len(seen) == 1 else None


def _extremes(r: sympy.Expr, tile: _Tile):
    """Lower and upper bounds of ``r`` over the tile's rows, term by term (sound for terms that vary apart)."""
    lo, hi = [], []
    for term in sympy.Add.make_args(r):
        coef, core = term.as_coeff_Mul()
        unit = _unit(core, q_idx) if term.has(q_idx) else ("id", 1, 0)
        if unit is None:
            return None
        rising = bool(coef > 0) == bool(unit[1] > 0)
        at_row = lambda row, term=term: term.subs(q_idx, row)  # noqa: E731
        lo.append(_at(at_row, tile, last=not rising, rising=rising) if term.has(q_idx) else term)
        hi.append(_at(at_row, tile, last=rising, rising=rising) if term.has(q_idx) else term)
    return sympy.Add(*lo), sympy.Add(*hi)


def _at(value, tile: _Tile, last: bool, rising: bool) -> sympy.Expr:
    """``value(row)`` at the tile's first or last row. The last row is ``Min(q0 + block_m - 1, q_len - 1)``; it is
    pushed out of ``value`` (monotone in the row: ``rising`` or not) so that the unragged case simplifies alone."""
    if not last:
        return value(tile.q0)
    ends = [value(row) for row in tile.q1]
    return _min(*ends) if rising else _max(*ends)


def _linear(e: sympy.Expr, op: str, tile: _Tile) -> _Span:
    """The span of ``e OP 0`` for ``e`` a sum of one monotone kv term, monotone q terms and length terms."""
    if not e.free_symbols <= _LENGTHS | {q_idx, kv_idx} or e.has(sympy.Float):  # floats: compared as written
        return tile.unknown
    kv_terms = [t for t in sympy.Add.make_args(e) if t.has(kv_idx)]
    if not kv_terms:
        return _rows(e, op, tile)
    if len(kv_terms) > 1 or kv_terms[0].has(q_idx):
        return tile.unknown
    coef, core = kv_terms[0].as_coeff_Mul()
    unit = _unit(core, kv_idx)
    if unit is None:
        return tile.unknown
    kind, a, c = unit
    if a < 0:  # floor(a k + c) == -ceiling(-a k - c): make the kv function nondecreasing
        kind, a, c, coef = {"id": "id", "floor": "ceiling", "ceiling": "floor"}[kind], -a, -c, -coef
    if coef < 0:
        op = _FLIP[op]
    r = sympy.expand(-(e - kv_terms[0]) / coef)  # f(kv) OP r(q)
    rising = _direction(r)
    if rising is None:  # terms that vary apart: bound r over the rows term by term
        lo_r, hi_r = _extremes(r, tile) or (None, None)
        if lo_r is None:
            return tile.unknown
    upper = op in ("<", "<=")

    def solve(r):  # f(kv) <= T  <=>  kv <= U(T);  f(kv) >= T  <=>  kv >= L(T); nondecreasing in r
        t = {"<=": sympy.floor(r), "<": sympy.ceiling(r) - 1, ">=": sympy.ceiling(r), ">": sympy.floor(r) + 1}[op]
        if kind == "id":
            return t
        if kind == "floor":
            return sympy.ceiling((t + 1 - c) / a) - 1 if upper else sympy.ceiling((t - c) / a)
        return sympy.floor((t - c) / a) if upper else sympy.floor((t - 1 - c) / a) + 1

    def at(fn, high):  # fn(bound) (nondecreasing) at the row where the bound is highest / lowest
        if rising is None:
            return fn(solve(hi_r if high else lo_r))
        return _at(lambda row: fn(solve(r.subs(q_idx, row))), tile, last=(rising >= 0) == high, rising=rising >= 0)

    bn, nt = tile.bn, tile.nt

    def tiles_below(x):  # kv tiles lying wholly below column x: all of them (a ragged last one too) once x >= kv_len
        return sympy.floor(x / bn) + (0 if (x / bn).is_integer else _step(x, kv_len))

    if upper:  # kv <= U: visit up to the tile holding max U; full: the tiles below column min U + 1
        return _Span((sympy.S.Zero, at(lambda u: sympy.ceiling((u + 1) / bn), True)),
                     (sympy.S.Zero, at(lambda u: _min(nt, tiles_below(u + 1)), False)))
    # kv >= L: visit from the tile holding min L (none once L passes the last column); full from the first tile
    # starting at or after max L.
    return _Span((at(tiles_below, False), nt), (at(lambda u: sympy.ceiling(u / bn), True), nt))


def _step(x: sympy.Expr, y: sympy.Expr) -> sympy.Expr:
    """``1 if x >= y else 0`` for integers, as Min/Max (no Piecewise to grow through And / Or)."""
    return _max(0, _min(1, sympy.expand(x - y + 1)))


def _rows(e: sympy.Expr, op: str, tile: _Tile) -> _Span:
    """A relation on the row alone: every kv tile full where all rows pass, visited where some may."""
    bounds = _extremes(e, tile)
    if bounds is None:
        return tile.unknown
    lo, hi = bounds

    def passes(x):  # 1 if ``x OP 0`` else 0, through an integer comparison
        if op in ("<", "<="):
            return _step(0, sympy.ceiling(x) if op == "<=" else sympy.floor(x) + 1)
        return _step(sympy.floor(x) if op == ">=" else sympy.ceiling(x) - 1, 0)

    def whole(flag):
        return None if flag == 0 else (sympy.S.Zero, tile.nt if flag == 1 else tile.nt * flag)

    upper = op in ("<", "<=")
    return _Span(whole(passes(lo if upper else hi)), whole(passes(hi if upper else lo)))


class _Printer(PythonCodePrinter):
    """Python source with exact rationals, so evaluating a bound never rounds."""

    def _print_Rational(self, expr):
        return f"Fraction({expr.p}, {expr.q})"


@lru_cache(maxsize=256)
def _compile(exprs: tuple) -> callable:
    """``exprs`` as one Python function of ``(q_tile, q_len, kv_len)``, evaluated exactly."""
    source = ", ".join(_Printer().doprint(x) for x in exprs)
    code = compile(f"lambda q_tile, q_len, kv_len: ({source},)", "<tilemap>", "eval")
    return eval(code, {"math": math, "Fraction": Fraction})  # noqa: S307 - our own printed expressions


@dataclass(frozen=True)
class TileMap:
    """Per q tile: kv tiles ``[kv_begin, kv_end)`` visited, ``[full_begin, full_end)`` of them full.

    ``kv_begin <= full_begin <= full_end <= kv_end``, all within ``[0, ceil(kv_len / block_n)]``. ``exact``: the mask
    was fully analysed (False when part of it is data-dependent: conservative there). ``has_mask``: False for no mask.
    """

    block_m: int
    block_n: int
    kv_begin: sympy.Expr
    kv_end: sympy.Expr
    full_begin: sympy.Expr
    full_end: sympy.Expr
    exact: bool
    has_mask: bool

    def bounds(self, q_tile: int, q_len: int, kv_len: int) -> tuple[int, int, int, int]:
        """``(kv_begin, kv_end, full_begin, full_end)`` of one q tile at concrete lengths."""
        fn = _compile((self.kv_begin, self.kv_end, self.full_begin, self.full_end))
        return tuple(int(v) for v in fn(q_tile, q_len, kv_len))

    def grid(self, q_len: int, kv_len: int) -> list[str]:
        """One row per q tile, one character per kv tile: '█' full, '░' partial, '·' skipped."""
        rows, cols = -(-q_len // self.block_m), -(-kv_len // self.block_n)
        out = []
        for qt in range(rows):
            kb, ke, fb, fe = self.bounds(qt, q_len, kv_len)
            out.append("".join("█" if fb <= j < fe else "░" if kb <= j < ke else "·" for j in range(cols)))
        return out

    def __str__(self) -> str:
        n = min(8 * max(self.block_m, self.block_n), 32 * min(self.block_m, self.block_n))
        lines = [f"TileMap(block_m={self.block_m}, block_n={self.block_n}, exact={self.exact}, "
                 f"has_mask={self.has_mask})"]
        lines += [f"  {name} = {getattr(self, name)}" for name in ("kv_begin", "kv_end", "full_begin", "full_end")]
        lines.append(f"  q_len = kv_len = {n} (█ full, ░ partial, · skipped):")
        lines += ["    " + row for row in self.grid(n, n)]
        return "\n".join(lines)


def analyse(mask: sympy.Basic, block_m: int, block_n: int) -> TileMap:
    """The tile map of the keep-predicate ``mask`` for ``block_m x block_n`` tiles."""
    for name, value in (("block_m", block_m), ("block_n", block_n)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"analyse `{name}` must be a positive int; got {value!r}")
    tile = _Tile(block_m, block_n)
    mask = sympy.sympify(mask)
    mask = mask.replace(lambda x: isinstance(x, sympy.Mod) and x.args[1].is_Integer,
                        lambda x: x.args[0] - x.args[1] * sympy.floor(x.args[0] / x.args[1]))
    token = _BLOCK_M.set(block_m)
    try:
        return _finish(_bool(mask, False, tile), tile, block_m, block_n, mask != sympy.true)
    finally:
        _BLOCK_M.reset(token)


def _finish(span: _Span, tile: _Tile, block_m: int, block_n: int, has_mask: bool) -> TileMap:
    """Clamp the ranges into ``0 <= kv_begin <= full_begin <= full_end <= kv_end <= ceil(kv_len / block_n)``."""
    zero, nt = sympy.S.Zero, tile.nt
    if span.visit is None:
        return TileMap(block_m, block_n, zero, zero, zero, zero, span.exact, has_mask)
    kv_begin = _min(_max(span.visit[0], zero), nt)
    kv_end = _min(_max(span.visit[1], kv_begin), nt)
    if span.full is None:
        full_begin = full_end = kv_end
    else:
        full_begin = _min(_max(span.full[0], kv_begin), kv_end)
        full_end = _max(_min(span.full[1], kv_end), full_begin)
    return TileMap(block_m, block_n, kv_begin, kv_end, full_begin, full_end, span.exact, has_mask)
