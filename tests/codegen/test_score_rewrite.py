"""The forward's score rewrite: folding a positive factor into exp2 and splitting row / column terms into vectors.

Every rewrite is checked numerically: ``fold · element`` with ``ROW = row + tile`` and ``COLUMN = column`` against
the traced score expression, on random values, with the reference's evaluator."""

import importlib.util
from pathlib import Path

import pytest
import sympy
import torch

import attnc
from attnc import mods
from attnc.codegen import render
from attnc.codegen.context import make_context
from attnc.codegen.hoist import hoist
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
from attnc.dsl import symbols as s
from attnc.dsl.blockmask import block_mask_layout
from attnc.dsl.tilemap import analyse
from attnc.runtime.evaluate import evaluate
from attnc.schedules.config import KernelConfig

SCALE = 128 ** -0.5
BLOCK_M = 64
BLOCK_N = 96
HEADS = 8
FLEX = Path(__file__).resolve().parents[2] / "examples" / "flex_mods.py"
SLOPES = mods.alibi_slopes(HEADS)
BIAS = torch.randn(HEADS, 4096)


def _flex_score_mods():
    spec = importlib.util.spec_from_file_location("attnc_examples_flex_mods_rewrite", FLEX)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SCORE_MODS


def _library_mods():
    return {
        "softcap": mods.softcap(30),
        "alibi": mods.alibi(mods.alibi_slopes(HEADS)),
        "relative_bias": mods.relative_bias(torch.randn(HEADS, 2 * 300 - 1)),
        **_flex_score_mods(),
        "biased_softcap": lambda score, b, h, q_idx, kv_idx: 20 * torch.tanh(score / 20) + 0.25 * (q_idx - kv_idx),
        "half_position": lambda score, b, h, q_idx, kv_idx: 2 * score + q_idx / 2 - kv_idx * 3,
        "squared": lambda score, b, h, q_idx, kv_idx: score * score,
        "shifted_alibi": lambda score, b, h, q_idx, kv_idx: score + SLOPES[h] * (kv_idx + 1 - q_idx),
        "bottom_right_alibi": lambda score, b, h, q_idx, kv_idx:
            score + SLOPES[h] * (kv_idx - q_idx + attnc.KV_LEN - attnc.Q_LEN),
        "alibi_and_column_bias": lambda score, b, h, q_idx, kv_idx:
            score + BIAS[h, kv_idx % 4096] + SLOPES[h] * (q_idx - kv_idx),
        "column_scaled_position": lambda score, b, h, q_idx, kv_idx: score + BIAS[h, kv_idx] * kv_idx - q_idx,
    }


def _rewritten_value(score, tensors, q_len=200, kv_len=250, dtype=torch.float64, qk=None, offset=0):
    """(original, rewritten) values over a (q_len, kv_len) grid of one head, on the hoisted expression."""
    (hoisted,), reads, _ = hoist(score)
    rows = [r.symbol for r in reads if r.level == "row"]
    columns = [r.symbol for r in reads if r.level == "column"]
    rewritten = rewrite_score(hoisted, SCALE, rows, columns)
    q_idx = torch.arange(offset, offset + q_len)[:, None]
    kv_idx = torch.arange(offset, offset + kv_len)[None, :]
    env = {s.b: 0, s.h: 3, s.q_idx: q_idx, s.kv_idx: kv_idx, s.q_len: offset + q_len, s.kv_len: offset + kv_len,
           Q_BASE: q_idx // BLOCK_M * BLOCK_M, ROW_OFFSET: q_idx % BLOCK_M,
           KV_BASE: kv_idx // BLOCK_N * BLOCK_N, COLUMN_OFFSET: kv_idx % BLOCK_N}
    env[QK] = torch.randn(q_len, kv_len, dtype=dtype) * 30 if qk is None else qk
    env[s.score] = env[QK] * SCALE
    for read in reads:
        env[read.symbol] = evaluate(read.read, env, tensors, dtype)
    want = torch.as_tensor(evaluate(score, env, tensors, dtype))
    folded = rewritten.element.xreplace({ROW: rewritten.row + rewritten.tile, COLUMN: rewritten.column})
    got = float(rewritten.fold) * torch.as_tensor(evaluate(folded, env, tensors, dtype))
    return want.expand(q_len, kv_len), got.expand(q_len, kv_len), rewritten


@pytest.mark.parametrize("name", sorted(_library_mods()))
def test_the_rewrite_equals_the_score_expression_for_random_values(name):
    spec = attnc.Attention(HEADS, score_mod=_library_mods()[name])
    want, got, rewritten = _rewritten_value(spec.ir.score, spec.captured)
    assert rewritten.fold.is_Number and rewritten.fold > 0
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


def test_softcap_folds_cap_out_and_multiplies_qk_once():
    rewritten = rewrite_score(attnc.Attention(HEADS, score_mod=mods.softcap(30)).ir.score, SCALE)
    assert float(rewritten.fold) == 30 and rewritten.row == rewritten.column == 0
    (inner,) = rewritten.element.args
    assert isinstance(rewritten.element, sympy.tanh) and inner == inner.as_coeff_Mul()[0] * QK
    assert float(inner.as_coeff_Mul()[0]) == pytest.approx(SCALE / 30, rel=1e-15)


def test_no_score_mod_folds_the_scale_and_leaves_qk_alone():
    rewritten = rewrite_score(s.score, SCALE)
    assert float(rewritten.fold) == SCALE and rewritten.element == QK


def _rewrite_mod(name):
    score_mod = mods.alibi(SLOPES) if name == "alibi" else _library_mods()[name]  # not flex_mods' alibi
    (score,), reads, _ = hoist(attnc.Attention(HEADS, score_mod=score_mod).ir.score)
    rows = [r.symbol for r in reads if r.level == "row"]
    columns = [r.symbol for r in reads if r.level == "column"]
    return rewrite_score(score, SCALE, rows, columns), {r.level: r.symbol for r in reads}


def test_alibi_splits_into_a_column_vector_per_q_tile_and_a_row_offset_per_kv_tile():
    rewritten, caches = _rewrite_mod("alibi")
    assert float(rewritten.fold) == SCALE and rewritten.element == QK + ROW + COLUMN
    assert rewritten.row.free_symbols == {ROW_OFFSET, caches["block"]}
    assert rewritten.column.free_symbols == {COLUMN_OFFSET, caches["block"]} and not rewritten.column_per_tile
    assert rewritten.tile.free_symbols == {KV_BASE, Q_BASE, caches["block"]}
    assert (KV_BASE - Q_BASE) in rewritten.tile.args  # the integer difference comes first


@pytest.mark.parametrize("offset", [0, 10 ** 6, 10 ** 6 + 37])
@pytest.mark.parametrize("name", ["alibi", "shifted_alibi", "bottom_right_alibi", "alibi_and_column_bias"])
def test_the_alibi_split_keeps_float32_accuracy_at_long_positions(name, offset):
    """Near the diagonal at position 10⁶ the split is as accurate as ``slope · (kv_idx - q_idx)`` in float32: the
    large products ``slope · kv_idx`` and ``slope · q_idx`` are never formed."""
    spec = attnc.Attention(HEADS, score_mod=_library_mods()[name])
    qk = torch.randn(200, 250, dtype=torch.float32)
    _, got, _ = _rewritten_value(spec.ir.score, spec.captured, dtype=torch.float32, qk=qk, offset=offset)
    want, _, _ = _rewritten_value(spec.ir.score, spec.captured, dtype=torch.float64, qk=qk.double(), offset=offset)
    assert (got.double() - want).abs().max() < 1e-4


def test_a_constant_of_an_affine_column_term_joins_the_tile_offset():
    rewritten, caches = _rewrite_mod("shifted_alibi")
    assert not rewritten.column_per_tile and rewritten.column.free_symbols == {COLUMN_OFFSET, caches["block"]}
    assert rewritten.tile.free_symbols == {KV_BASE, Q_BASE, caches["block"]}


def test_a_column_read_keeps_a_vector_per_kv_tile_that_also_takes_the_affine_part():
    rewritten, caches = _rewrite_mod("alibi_and_column_bias")
    assert rewritten.column_per_tile and rewritten.element == QK + ROW + COLUMN
    assert rewritten.column.free_symbols == {COLUMN_OFFSET, caches["block"], caches["column"]}
    assert s.kv_idx not in rewritten.column.free_symbols
    assert (Q_BASE - KV_BASE) in rewritten.tile.args


def test_a_position_scaled_by_a_column_read_is_not_affine():
    rewritten, caches = _rewrite_mod("column_scaled_position")
    assert rewritten.column_per_tile and rewritten.tile == 0
    assert rewritten.column.free_symbols == {s.kv_idx, caches["column"]}
    assert rewritten.row == -s.q_idx / SCALE  # no affine column term to cancel: the row keeps q_idx


def test_terms_on_one_side_only_make_one_vector():
    rewritten = rewrite_score(s.score + s.q_idx / 2, SCALE)
    assert rewritten.element == QK + ROW and rewritten.column == rewritten.tile == 0
    assert ROW_OFFSET not in rewritten.row.free_symbols
    rewritten = rewrite_score(s.score + 3 * s.kv_idx + 1, SCALE)
    assert rewritten.element.has(QK, COLUMN, ROW) and rewritten.row == 0 and not rewritten.column_per_tile
    assert rewritten.column.free_symbols == {COLUMN_OFFSET} and rewritten.tile.free_symbols == {KV_BASE}


def test_terms_that_need_both_positions_stay_in_the_element():
    table = sympy.IndexedBase("table", real=True)
    rewritten = rewrite_score(s.score + table[s.h, s.kv_idx - s.q_idx] + (s.kv_idx - s.q_idx) ** 2, SCALE)
    assert rewritten.row == rewritten.column == 0 and rewritten.element.has(table[s.h, s.kv_idx - s.q_idx])


@pytest.mark.parametrize("score", [
    -30 * sympy.tanh(s.score / 30),  # a negative factor would turn the row maximum into the minimum
    sympy.IndexedBase("w", real=True)[s.h] * sympy.tanh(s.score),  # a factor of unknown sign
    sympy.exp(s.score),  # score not a factor
    s.score + sympy.tanh(s.score),  # score in two terms
    sympy.Piecewise((s.score, s.q_idx >= s.kv_idx), (-sympy.oo, True)),  # -inf for masked elements
], ids=["negative", "symbolic", "exp", "two-terms", "masked"])
def test_folding_does_not_apply(score):
    rewritten = rewrite_score(score, SCALE)
    assert rewritten.fold == 1
    want, got, _ = _rewritten_value(score, {"w": torch.rand(HEADS) - 0.5})
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


def test_minus_infinity_stays_minus_infinity_when_folded():
    masked = 30 * sympy.Piecewise((sympy.tanh(s.score / 30), s.q_idx >= s.kv_idx), (-sympy.oo, True))
    rewritten = rewrite_score(masked, SCALE)
    assert float(rewritten.fold) == 30
    want, got, _ = _rewritten_value(masked, {})
    assert torch.equal(torch.isneginf(got), torch.isneginf(want)) and torch.isneginf(want).any()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)


def _cuda_source(spec, arch="sm_90a", block_mask=None):
    config = KernelConfig(128, 128, 2, 256)
    ctx = make_context("fwd", "k", spec.ir, analyse(spec.ir.mask, 128, 128), config, "bfloat16", arch,
                       block_mask=block_mask)
    source = render.render(ctx)
    compile(source, "<rendered>", "exec")
    return source


def test_the_cuda_forward_stores_the_folded_score():
    source = _cuda_source(attnc.Attention(HEADS, score_mod=mods.softcap(30), mask_mod=mods.causal()))
    assert "FOLD = 30.0 * LOG2E" in source
    assert 'acc_s[i, j] = T.call_extern("float32", "attnc_fast_tanh", (0.00294627825494394' in source
    spec = attnc.Attention(HEADS, mask_mod=mods.causal())
    dense = _cuda_source(spec, "sm_80")
    assert f"FOLD = {spec.ir.scale!r} * LOG2E" in dense and "qk = acc_s[i, j]" not in dense


def _kv_loop(source, arch):
    return source.index("for t in T.serial(1, tiles)" if arch == "sm_90a" else "T.Pipelined(")


@pytest.mark.parametrize("arch", ["sm_90a", "sm_80"])
def test_the_cuda_forward_fills_the_alibi_column_vector_before_the_kv_loop(arch):
    source = _cuda_source(attnc.Attention(HEADS, score_mod=mods.alibi(SLOPES), mask_mod=mods.causal()), arch)
    assert "acc_s[i, j] = (qk + score_column[j] + score_tile_row[i])" in source
    assert source.count("score_row[i] = ") == 1 and source.count("score_column[j] = ") == 1
    assert source.index("score_column[j] = ") < _kv_loop(source, arch)
    assert "score_column[j] = (11.313708498984761 * block_cache0 * T.cast(j, \"float32\"))" in source
    assert 'T.cast((kv_base + (-(q_tile * 128))), "float32")' in source
    refreshes = ["kv_base = kv_begin * 128", "kv_base = kv_tile * 128"] if arch == "sm_90a" else \
        ["kv_base = kv_tile * 128"]
    assert source.count("score_tile_row[i] = ") == len(refreshes) and all(r in source for r in refreshes)
    if arch == "sm_90a":  # refreshed before the wait for K, while QKᵀ of the previous tile or the load still runs
        loop = source[_kv_loop(source, arch):]
        assert loop.index("kv_base = kv_tile * 128") < loop.index("T.barrier_wait(k_full")


def test_with_a_block_mask_the_row_offset_follows_the_listed_kv_tiles():
    docs = torch.randint(0, 3, (4096,)).sort().values
    spec = attnc.Attention(HEADS, score_mod=mods.alibi(SLOPES), mask_mod=mods.document(docs))
    layout = block_mask_layout(spec.ir.mask)
    for arch, refreshes in (("sm_90a", ["kv_base = first_tile * 128", "kv_base = kv_tile * 128"]),
                            ("sm_80", ["kv_base = kv_tile * 128"])):
        source = _cuda_source(spec, arch, layout)
        assert "KvList[" in source and all(r in source for r in refreshes)
        assert source.count("score_tile_row[i] = ") == len(refreshes)
        assert source.index("score_column[j] = ") < _kv_loop(source, arch)


def test_a_column_read_keeps_the_column_vector_in_the_kv_loop():
    source = _cuda_source(attnc.Attention(HEADS, score_mod=_library_mods()["alibi_and_column_bias"]))
    assert source.count("score_column[j] = ") == 2  # first and later tiles
    assert "kv_idx = kv_tile * 128 + j\n" in source and "score_tile_row[i] = " in source


def test_integer_vectors_are_cast_to_float():
    source = _cuda_source(attnc.Attention(HEADS, score_mod=lambda score, b, h, q_idx, kv_idx:
                                          torch.exp(score) + (q_idx - kv_idx)))
    assert 'score_row[i] = T.if_then_else(q_idx < q_len, T.cast(i, "float32")' in source
    assert 'score_column[j] = T.cast((-j), "float32")' in source
    assert 'score_tile_row[i] = (score_row[i] + T.cast(((q_tile * 128) + (-kv_base)), "float32"))' in source
