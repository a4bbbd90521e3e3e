"""The tile map against brute force: every tile of every mask, tile size and length pair is checked.

Soundness: a skipped tile holds no kept element; a full tile keeps every in-bounds element. Exactness (affine
library masks): the visit range is the hull of the non-empty tiles and the full range is the set of full tiles.
"""

import math
from functools import lru_cache

import numpy as np
import pytest
import sympy
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import attnc.mods as mods
from attnc.dsl import Attention
from attnc.dsl.symbols import b, h, kv_idx, kv_len, q_idx, q_len
from attnc.dsl.tilemap import Q_TILE, TileMap, analyse

DOC_IDS = torch.tensor([i // 37 for i in range(512)])  # documents of 37 tokens
TILES = [(16, 16), (64, 32), (32, 64), (128, 128), (64, 128)]
LENGTHS = [(1, 1), (17, 17), (100, 100), (128, 128), (129, 129), (300, 300), (17, 300), (300, 17), (100, 129),
           (129, 100), (1, 300), (300, 1), (128, 300), (300, 128)]


def trace(mod) -> sympy.Basic:
    return Attention(4, mask_mod=mod).ir.mask


def diff(q, k):
    return q - k


MASKS = {
    "causal": trace(mods.causal()),
    "causal_top_left": trace(lambda b, h, q, k: q >= k),
    "sliding_window_1": trace(mods.sliding_window(1)),
    "sliding_window_7": trace(mods.sliding_window(7)),
    "sliding_window_64": trace(mods.sliding_window(64)),
    "sliding_window_100": trace(mods.sliding_window(100)),
    "prefix_lm_0": trace(mods.prefix_lm(0)),
    "prefix_lm_5": trace(mods.prefix_lm(5)),
    "prefix_lm_64": trace(mods.prefix_lm(64)),
    "chunked_16": trace(mods.chunked(16)),
    "chunked_50": trace(mods.chunked(50)),
    "not_causal": trace(~mods.causal()),
    "kv_from_10": trace(lambda b, h, q, k: k >= 10),
    "no_mask": sympy.true,
    "causal_and_sliding": trace(mods.causal() & mods.sliding_window(64)),
    "prefix_or_sliding": trace(mods.prefix_lm(64) | mods.sliding_window(100)),
    "chunked_and_causal": trace(mods.chunked(16) & mods.causal()),
    "not_chunked": trace(~mods.chunked(50)),
    "not_sliding": trace(~mods.sliding_window(40)),
    "distance_100": trace(lambda b, h, q, k: diff(q, k) <= 100),
    "document_and_causal": trace(mods.document(DOC_IDS) & mods.causal()),
    "last_50_keys": kv_idx >= kv_len - 50,
    "nothing": sympy.false,
    "abs_window": sympy.Abs(q_idx - kv_idx) <= 20,
    "max_bound": sympy.Max(q_idx, kv_idx) < 150,
    "diagonal": sympy.Eq(q_idx, kv_idx),
    "off_diagonal": sympy.Ne(q_idx, kv_idx),
    "every_4th_key": sympy.Eq(sympy.Mod(kv_idx, 4), 0),
    "half_slope": 2 * kv_idx <= q_idx,
    "block_slopes": sympy.floor(kv_idx / 8) <= sympy.floor(q_idx / 32),
    "rows_from_50": q_idx >= 50,
    "early_rows_or_upper": sympy.Or(q_idx < 40, kv_idx >= q_idx),  # a row condition must not widen the other range
    "piecewise_bound": kv_idx <= sympy.Piecewise((q_idx, q_idx < 100), (q_idx + 50, True)),
    "xor": sympy.Xor(kv_idx <= q_idx, kv_idx < 10),
    "per_head": kv_idx <= q_idx + h,
    "negative_slope": kv_idx + q_idx <= 150,
    "ceiling_kv": sympy.ceiling(kv_idx / 3) >= q_idx - 40,
    "float_slope": kv_idx <= sympy.Float(0.5) * q_idx,
    "boolean_piecewise": sympy.Piecewise((kv_idx <= q_idx, q_idx < 100), (kv_idx >= 50, True)),
}
EXACT = {"causal", "causal_top_left", "sliding_window_1", "sliding_window_7", "sliding_window_64",
         "sliding_window_100", "prefix_lm_0", "prefix_lm_5", "prefix_lm_64", "chunked_16", "chunked_50", "not_causal",
         "kv_from_10", "no_mask", "causal_and_sliding", "distance_100", "last_50_keys",
         "nothing", "abs_window", "diagonal", "half_slope", "negative_slope", "block_slopes", "ceiling_kv", "max_bound",
         "rows_from_50", "xor", "early_rows_or_upper"}
NOT_ANALYSED = {"document_and_causal", "every_4th_key", "per_head", "float_slope"}  # exact=False


def _evaluate(expr, env):
    """Exact numpy evaluation: numbers come back as (integer array, positive denominator), booleans as arrays."""
    ev = lambda e: _evaluate(e, env)  # noqa: E731
    if expr in env:
        return env[expr]
    if isinstance(expr, (sympy.Rational, sympy.Float)):
        value = sympy.Rational(expr)
        return np.int64(value.p), int(value.q)
    if expr is sympy.true or expr is sympy.false:
        return np.bool_(bool(expr))
    if isinstance(expr, (sympy.Add, sympy.Min, sympy.Max)):
        parts = [ev(a) for a in expr.args]
        den = math.lcm(*(d for _, d in parts))
        nums = [n * (den // d) for n, d in parts]
        op = {sympy.Add: np.add, sympy.Min: np.minimum, sympy.Max: np.maximum}[type(expr)]
        out = nums[0]
        for n in nums[1:]:
            out = op(out, n)
        return out, den
    if isinstance(expr, sympy.Mul):
        num, den = np.int64(1), 1
        for n, d in map(ev, expr.args):
            num, den = num * n, den * d
        return num, den
    if isinstance(expr, (sympy.floor, sympy.ceiling)):
        n, d = ev(expr.args[0])
        return (n // d if isinstance(expr, sympy.floor) else -((-n) // d)), 1
    if isinstance(expr, sympy.Abs):
        n, d = ev(expr.args[0])
        return np.abs(n), d
    if isinstance(expr, sympy.Mod):
        (x, dx), (y, dy) = ev(expr.args[0]), ev(expr.args[1])
        assert dx == dy == 1
        return np.mod(x, y), 1
    if isinstance(expr, sympy.Piecewise):
        out = None
        for value, cond in reversed(expr.args):
            v = ev(value)
            if not isinstance(v, tuple):  # boolean-valued
                out = v if out is None else np.where(ev(cond), v, out)
            else:
                out = v if out is None else (np.where(ev(cond), v[0] * out[1], out[0] * v[1]), v[1] * out[1])
        return out
    if isinstance(expr, sympy.Indexed):
        index = [ev(i) for i in expr.indices]
        return env[expr.base.label.name][tuple(n for n, _ in index)], 1
    if isinstance(expr, sympy.Rel):
        (a, da), (c, dc) = ev(expr.lhs), ev(expr.rhs)
        ops = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal,
               "!=": np.not_equal}
        return ops[expr.rel_op](a * dc, c * da)
    if isinstance(expr, (sympy.And, sympy.Or, sympy.Xor)):
        op = {sympy.And: np.logical_and, sympy.Or: np.logical_or, sympy.Xor: np.logical_xor}[type(expr)]
        out = ev(expr.args[0])
        for a in expr.args[1:]:
            out = op(out, ev(a))
        return out
    if isinstance(expr, sympy.Not):
        return np.logical_not(ev(expr.args[0]))
    raise NotImplementedError(f"{type(expr).__name__}: {expr}")


@lru_cache(maxsize=None)
def dense(name: str, ql: int, kl: int, mask=None) -> np.ndarray:
    """The (q_len, kv_len) keep matrix of a mask, by brute force."""
    mask = MASKS[name] if mask is None else mask
    env = {q_idx: (np.arange(ql, dtype=np.int64)[:, None], 1), kv_idx: (np.arange(kl, dtype=np.int64)[None, :], 1),
           q_len: (np.int64(ql), 1), kv_len: (np.int64(kl), 1), b: (np.int64(1), 1), h: (np.int64(3), 1),
           "doc_ids": DOC_IDS.numpy()}
    return np.broadcast_to(_evaluate(mask, env), (ql, kl))


@lru_cache(maxsize=None)
def tile_map(name: str, bm: int, bn: int) -> TileMap:
    return analyse(MASKS[name], bm, bn)


def tile_classes(keep: np.ndarray, bm: int, bn: int):
    """Per tile: any element kept, and every in-bounds element kept."""
    ql, kl = keep.shape
    rows, cols = -(-ql // bm), -(-kl // bn)
    pad_any = np.zeros((rows * bm, cols * bn), bool)
    pad_all = np.ones((rows * bm, cols * bn), bool)
    pad_any[:ql, :kl] = pad_all[:ql, :kl] = keep
    shape = (rows, bm, cols, bn)
    return pad_any.reshape(shape).any(axis=(1, 3)), pad_all.reshape(shape).all(axis=(1, 3))


def check(tm: TileMap, keep: np.ndarray, exact: bool, where: str) -> None:
    ql, kl = keep.shape
    bm, bn = tm.block_m, tm.block_n
    nonempty, full = tile_classes(keep, bm, bn)
    cols = np.arange(nonempty.shape[1])
    for qt in range(nonempty.shape[0]):
        kb, ke, fb, fe = tm.bounds(qt, ql, kl)
        at = f"{where} q_tile={qt}: bounds {(kb, ke, fb, fe)}"
        assert 0 <= kb <= fb <= fe <= ke <= len(cols), at
        visited, marked_full = (kb <= cols) & (cols < ke), (fb <= cols) & (cols < fe)
        assert not (nonempty[qt] & ~visited).any(), f"{at}: skips kept tiles {cols[nonempty[qt] & ~visited]}"
        assert not (marked_full & ~full[qt]).any(), f"{at}: marks non-full tiles full {cols[marked_full & ~full[qt]]}"
        if exact:
            hit = cols[nonempty[qt]]
            if len(hit):
                assert (kb, ke) == (hit[0], hit[-1] + 1), f"{at}: visit is not the hull of {hit}"
            else:
                assert kb == ke, f"{at}: visits an empty row of tiles"
            whole = cols[full[qt]]
            if len(whole):
                assert (fb, fe) == (whole[0], whole[-1] + 1), f"{at}: full range is not {whole}"
            else:
                assert fb == fe, at


@pytest.mark.parametrize("name", sorted(MASKS))
def test_brute_force(name):
    for bm, bn in TILES:
        tm = tile_map(name, bm, bn)
        assert tm.exact == (name not in NOT_ANALYSED)
        assert tm.has_mask == (name != "no_mask")
        for ql, kl in LENGTHS:
            check(tm, dense(name, ql, kl), name in EXACT, f"{name} {bm}x{bn} q_len={ql} kv_len={kl}")


@pytest.mark.parametrize("name", ["causal", "sliding_window_64", "prefix_or_sliding", "document_and_causal"])
def test_expressions_use_only_tile_and_lengths(name):
    tm = tile_map(name, 64, 32)
    for expr in (tm.kv_begin, tm.kv_end, tm.full_begin, tm.full_end):
        assert expr.free_symbols <= {Q_TILE, q_len, kv_len}


def test_no_mask_and_empty_mask():
    tm = analyse(sympy.true, 128, 64)
    assert (tm.kv_begin, tm.full_begin) == (0, 0)
    assert tm.kv_end == tm.full_end == sympy.ceiling(kv_len / 64)
    assert analyse(sympy.false, 128, 64).bounds(3, 1000, 1000) == (0, 0, 0, 0)


def test_causal_expressions_are_compact():
    tm = tile_map("causal", 128, 128)
    assert tm.kv_begin == 0 and tm.full_begin == 0
    assert len(str(tm.kv_end)) < 120 and len(str(tm.full_end)) < 250
    assert not tm.kv_end.has(sympy.Piecewise)


def test_grid_causal():
    tm = analyse(MASKS["causal"], 16, 16)
    assert tm.grid(64, 64) == ["░···", "█░··", "██░·", "███░"]
    assert tm.grid(40, 40) == ["░··", "█░·", "██░"]
    # bottom-right aligned: of 2 queries the first misses the last key (ragged tile partial); 1 query sees all
    assert tm.grid(2, 40) == ["██░"]
    assert tm.grid(1, 40) == ["███"]
    assert tm.grid(40, 2) == ["·", "·", "░"]
    text = str(tm)
    assert "kv_end" in text and "full_end" in text and "█" in text


def test_grid_chunked_and_document():
    assert analyse(MASKS["chunked_16"], 32, 16).grid(64, 64) == ["░░··", "··░░"]
    assert analyse(MASKS["chunked_50"], 25, 25).grid(100, 100) == ["██··", "██··", "··██", "··██"]
    assert analyse(MASKS["document_and_causal"], 16, 16).grid(48, 48) == ["░··", "░░·", "░░░"]


def test_bad_tile_sizes():
    with pytest.raises(ValueError, match="block_n"):
        analyse(sympy.true, 64, 0)


@settings(max_examples=10, deadline=None)
@given(window=st.integers(1, 300), bm=st.sampled_from([16, 32, 64, 128]), bn=st.sampled_from([16, 32, 64, 128]),
       ql=st.integers(1, 400), kl=st.integers(1, 400), prefix=st.integers(0, 200))
def test_property_windows_and_prefixes(window, bm, bn, ql, kl, prefix):
    for mod, exact in ((mods.sliding_window(window), True), (mods.prefix_lm(prefix), True),
                       (mods.prefix_lm(prefix) | mods.sliding_window(window), False)):
        mask = trace(mod)
        check(analyse(mask, bm, bn), dense(mod.name, ql, kl, mask), exact, f"{mod.name} {bm}x{bn} {ql}x{kl}")


@settings(max_examples=10, deadline=None)
@given(chunk=st.integers(1, 200), bm=st.sampled_from([16, 32, 64, 128]), bn=st.sampled_from([16, 32, 64, 128]),
       ql=st.integers(1, 400), kl=st.integers(1, 400), offset=st.integers(-150, 150))
def test_property_chunks_and_offset_diagonals(chunk, bm, bn, ql, kl, offset):
    for name, mask, exact in (
        (f"chunked_{chunk}", trace(mods.chunked(chunk)), True),
        (f"diagonal_{offset}", kv_idx <= q_idx + offset, True),
        (f"band_{offset}_{chunk}", (kv_idx <= q_idx + offset) & (kv_idx >= q_idx + offset - chunk), True),
        (f"chunk_causal_{chunk}", trace(mods.chunked(chunk) & mods.causal()), False),
    ):
        check(analyse(mask, bm, bn), dense(name, ql, kl, mask), exact, f"{name} {bm}x{bn} {ql}x{kl}")
