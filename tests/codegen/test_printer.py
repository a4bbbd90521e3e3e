"""The sympy → TileLang printer: text for each construct, casts where ints meet floats, clear refusals."""

import pytest
import sympy
import torch

import attnc
from attnc.codegen.context import KERNEL_NAMES
from attnc.codegen.printer import print_expr
from attnc.dsl import symbols as s
from attnc.errors import UnsupportedError


def show(expr, tensors=None):
    return print_expr(expr, KERNEL_NAMES, tensors or {})


@pytest.mark.parametrize("expr, text", [
    (s.score * 2, "(2.0 * score)"),
    (s.q_idx - s.kv_idx, "(q_idx + (-kv_idx))"),
    (s.score + s.q_idx, "(score + T.cast(q_idx, \"float32\"))"),
    (30 * sympy.tanh(s.score / 30), "(30.0 * T.tanh((0.03333333333333333 * score)))"),
    (sympy.floor(s.q_idx / 64), "T.floordiv(q_idx, 64)"),
    (sympy.ceiling(s.kv_len / 32), "T.floordiv(kv_len + 31, 32)"),
    (sympy.Mod(s.q_idx, 4), "T.floormod(q_idx, 4)"),
    (sympy.Max(s.q_idx - 2, s.kv_idx - 1, 0), "T.max(T.max(0, (-1 + kv_idx)), (-2 + q_idx))"),
    (sympy.Lt(s.kv_idx, s.q_idx + 1), "(kv_idx < (1 + q_idx))"),
    (sympy.And(s.q_idx >= s.kv_idx, sympy.Ne(s.h, 0)), "T.And((q_idx >= kv_idx), (h != 0))"),
    (sympy.Not(sympy.Eq(s.b, s.h)), "(b != h)"),
    (sympy.ITE(s.q_idx > 3, s.kv_idx < 2, s.kv_idx > 5), "T.if_then_else((q_idx > 3), (kv_idx < 2), (kv_idx > 5))"),
    (sympy.Piecewise((s.score, s.q_idx >= s.kv_idx), (-sympy.oo, True)),
     "T.if_then_else((kv_idx <= q_idx), score, (-T.infinity(\"float32\")))"),
    (s.score ** 2, "(score * score)"),
    (sympy.exp(s.score) / (1 + sympy.exp(s.score)), "(T.exp(score) / (1.0 + T.exp(score)))"),
    (sympy.sqrt(s.score), "T.sqrt(score)"),
    (sympy.Abs(s.q_idx - s.kv_idx), "T.abs((kv_idx + (-q_idx)))"),
])
def test_prints_each_construct(expr, text):
    assert show(expr) == text


def test_tensor_reads_print_as_buffer_loads_with_casts():
    table = sympy.IndexedBase("table", real=True)
    ids = sympy.IndexedBase("ids", integer=True)
    assert show(s.score + table[s.h, s.q_idx - s.kv_idx], {"table": "in_table"}) == \
        "(score + in_table[h, (q_idx + (-kv_idx))])"
    assert show(s.score * ids[s.q_idx], {"ids": "in_ids"}) == "(score * T.cast(in_ids[q_idx], \"float32\"))"
    assert show(sympy.Eq(ids[s.q_idx], ids[s.kv_idx]), {"ids": "in_ids"}) == "(in_ids[q_idx] == in_ids[kv_idx])"


def test_library_mods_print():
    spec = attnc.Attention(4, score_mod=attnc.mods.alibi(torch.ones(4)), mask_mod=attnc.mods.sliding_window(8))
    assert show(spec.ir.score, {"slopes": "in_slopes"}) == \
        "(score + (T.cast((kv_idx + (-q_idx)), \"float32\") * in_slopes[h]))"
    assert "T.And(" in show(spec.ir.mask)


@pytest.mark.parametrize("expr, message", [
    (sympy.Symbol("x"), "no value for the symbol `x`"),
    (sympy.IndexedBase("t")[s.h], "no buffer for the tensor `t`"),
    (sympy.erf(s.score), "cannot compute"),
    (sympy.Piecewise((s.score, s.q_idx > 1), (0, s.q_idx > 0)), "default branch"),
])
def test_refuses_what_kernels_cannot_compute(expr, message):
    with pytest.raises(UnsupportedError, match=message):
        show(expr)
