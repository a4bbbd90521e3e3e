"""Derivatives of traced score_mods, checked numerically, and the kv-side tile map the backward loops over.

Derivatives are checked against torch autograd through the reference's evaluation of the same traced expression
(float64, random scores and tables), so a wrong rewrite (Max/Min/Abs to Piecewise, steps to 0) or a wrong
substitution of tensor reads shows up as a number, not as a string mismatch.
"""

import math

import pytest
import sympy
import torch

import attnc
import attnc.mods as mods
from attnc.codegen.context import KERNEL_NAMES
from attnc.codegen.printer import print_expr
from attnc.dsl import symbols
from attnc.dsl.derivative import (backward_tiles, differentiate, float_reads, read_gradients, score_derivative,
                                  transpose_mask)
from attnc.dsl.tilemap import Q_TILE
from attnc.runtime.evaluate import evaluate

H, QL, KL = 3, 7, 9


def env_for(score: torch.Tensor) -> dict:
    return {
        symbols.score: score,
        symbols.b: torch.arange(2).view(-1, 1, 1, 1),
        symbols.h: torch.arange(H).view(1, -1, 1, 1),
        symbols.q_idx: torch.arange(QL).view(1, 1, -1, 1),
        symbols.kv_idx: torch.arange(KL).view(1, 1, 1, -1),
        symbols.q_len: QL,
        symbols.kv_len: KL,
    }


def full(value, like):
    return torch.as_tensor(value, dtype=torch.float64).expand_as(like)


def check_gradients(spec, tensors, scale=3.0):
    """d score_mod / d score and d score_mod / d read against torch autograd of the evaluated expression."""
    ir = spec.ir
    score = (torch.randn(2, H, QL, KL, dtype=torch.float64) * scale).requires_grad_()
    leaves = {n: t.detach().double().requires_grad_() for n, t in tensors.items()}
    value = torch.as_tensor(evaluate(ir.score, env_for(score), leaves)).expand_as(score)
    upstream = torch.randn_like(score)
    want = torch.autograd.grad((value * upstream).sum(), [score, *leaves.values()], allow_unused=True)
    env = env_for(score.detach())
    d_score = full(evaluate(score_derivative(ir), env, leaves), score)
    assert torch.allclose(d_score * upstream, want[0], atol=1e-9), "d score_mod / d score"
    for (name, leaf), expected in zip(leaves.items(), want[1:]):
        got = torch.zeros_like(leaf)
        for term in read_gradients(ir):
            if term.name != name:
                continue
            contribution = full(evaluate(term.derivative, env, leaves), score) * upstream
            index = tuple(torch.as_tensor(evaluate(i, env, leaves)).long().expand_as(score).reshape(-1)
                          for i in term.read.indices)
            got.index_put_(index, contribution.reshape(-1), accumulate=True)
        expected = torch.zeros_like(leaf) if expected is None else expected
        assert torch.allclose(got, expected, atol=1e-9), f"gradient of `{name}`"
    for expr in [score_derivative(ir)] + [t.derivative for t in read_gradients(ir)]:
        tensors_map = {t.name: f"in_{t.name}" for t in ir.inputs}
        print_expr(expr, KERNEL_NAMES, tensors_map)  # printable: no Heaviside, DiracDelta, Derivative


def test_softcap():
    spec = attnc.Attention(H, qk_dim=8, score_mod=mods.softcap(5.0))
    assert read_gradients(spec.ir) == ()
    check_gradients(spec, {}, scale=10.0)
    for x in (-7.0, 0.3, 12.0):
        assert float(score_derivative(spec.ir).subs(symbols.score, x)) == pytest.approx(1 - math.tanh(x / 5) ** 2)


def test_alibi_slopes():
    slopes = mods.alibi_slopes(H)
    spec = attnc.Attention(H, qk_dim=8, score_mod=mods.alibi(slopes))
    (term,) = read_gradients(spec.ir)
    assert term.name == "slopes" and term.derivative == symbols.kv_idx - symbols.q_idx
    assert score_derivative(spec.ir) == 1
    check_gradients(spec, {"slopes": slopes})


def test_relative_bias_table():
    table = torch.randn(H, 2 * max(QL, KL) - 1)
    spec = attnc.Attention(H, qk_dim=8, score_mod=mods.relative_bias(table))
    (term,) = read_gradients(spec.ir)
    assert term.name == "table" and term.derivative == 1
    check_gradients(spec, {"table": table})


def test_torch_where_maximum_abs_and_clamp():
    def mod(score, b, h, q_idx, kv_idx):
        leaky = torch.where(q_idx >= kv_idx, score, 0.5 * score)
        return leaky + torch.maximum(score, 0.1 * torch.abs(score)) - torch.clamp(score, -1.0, 2.0)

    spec = attnc.Attention(H, qk_dim=8, score_mod=mod)
    assert not score_derivative(spec.ir).has(sympy.Heaviside, sympy.Max, sympy.Min, sympy.Abs)
    check_gradients(spec, {})


def test_two_reads_of_one_tensor_and_a_read_times_the_score():
    bias = torch.randn(H, 16)

    def mod(score, b, h, q_idx, kv_idx):
        return score * bias[h, q_idx] + bias[h, kv_idx] * bias[h, kv_idx] + torch.exp(bias[h, 0] * 0.1)

    spec = attnc.Attention(H, qk_dim=8, score_mod=mod)
    assert len(read_gradients(spec.ir)) == 3 and not any(
        t.derivative.has(sympy.KroneckerDelta) for t in read_gradients(spec.ir))
    check_gradients(spec, {"bias": bias})


def test_steps_have_zero_derivative_and_integer_reads_none():
    pos = torch.arange(16, dtype=torch.int32)
    gains = torch.rand(H, 16)

    def mod(score, b, h, q_idx, kv_idx):
        return score + torch.sign(score) + gains[h, pos[kv_idx]]

    spec = attnc.Attention(H, qk_dim=8, score_mod=mod)
    assert differentiate(sympy.floor(symbols.score), symbols.score) == 0
    assert score_derivative(spec.ir) == 1
    assert [str(r.base) for r in float_reads(spec.ir.score)] == ["gains"]
    check_gradients(spec, {"gains": gains, "pos": pos})


def test_no_score_mod():
    spec = attnc.Attention(H, qk_dim=8, mask_mod=mods.causal())
    assert score_derivative(spec.ir) == 1 and read_gradients(spec.ir) == ()


# The kv-side tile map: sound for every mask (no kept tile skipped, no partial tile called full), and as tight as
# the forward's for the affine library masks.

DOCS = torch.tensor([i // 23 for i in range(300)])
MASKS = {
    "causal": (mods.causal(), True),
    "sliding_window_20": (mods.sliding_window(20), True),
    "chunked_24": (mods.chunked(24), True),
    "prefix_lm_16": (mods.prefix_lm(16), True),
    "document_and_causal": (mods.document(DOCS) & mods.causal(), False),
    "causal_or_sliding": (mods.causal() & mods.sliding_window(50), True),
    "none": (None, True),
}
LENGTHS = [(1, 1), (17, 17), (129, 129), (17, 129), (129, 17), (100, 37)]


def keep_matrix(mask, ql, kl):
    env = {symbols.q_idx: torch.arange(ql).view(-1, 1), symbols.kv_idx: torch.arange(kl).view(1, -1),
           symbols.q_len: ql, symbols.kv_len: kl, symbols.b: 0, symbols.h: 0}
    return torch.as_tensor(evaluate(mask, env, {"doc_ids": DOCS})).expand(ql, kl)


@pytest.mark.parametrize("name", sorted(MASKS))
@pytest.mark.parametrize("bm, bn", [(16, 32), (64, 128), (32, 16)])
def test_backward_tiles_are_sound(name, bm, bn):
    mod, exact = MASKS[name]
    mask = attnc.Attention(2, qk_dim=8, mask_mod=mod).ir.mask
    tiles = backward_tiles(mask, bm, bn)
    printed = sympy.lambdify((Q_TILE, symbols.q_len, symbols.kv_len),
                             (tiles.q_begin, tiles.q_end, tiles.full_begin, tiles.full_end), "math")
    for ql, kl in LENGTHS:
        keep = keep_matrix(mask, ql, kl)
        nq, nk = -(-ql // bm), -(-kl // bn)
        for kt in range(nk):
            qb, qe, fb, fe = tiles.bounds(kt, ql, kl)
            assert (qb, qe, fb, fe) == tuple(int(v) for v in printed(kt, ql, kl)), "printed bounds differ"
            assert 0 <= qb <= fb <= fe <= qe <= nq
            hit, whole = [], []
            for qt in range(nq):
                block = keep[qt * bm:(qt + 1) * bm, kt * bn:(kt + 1) * bn]
                if block.any():
                    hit.append(qt)
                    assert qb <= qt < qe, f"{name} {ql}x{kl}: kv tile {kt} skips q tile {qt}"
                if block.all():
                    whole.append(qt)
                if fb <= qt < fe:
                    assert block.all(), f"{name} {ql}x{kl}: kv tile {kt} calls q tile {qt} full"
            if exact and hit:
                assert (qb, qe) == (hit[0], hit[-1] + 1)


def test_transpose_mask_swaps_roles():
    mask = attnc.Attention(2, qk_dim=8, mask_mod=mods.causal()).ir.mask
    s = symbols
    assert transpose_mask(mask) == (s.q_idx <= s.kv_idx + s.q_len - s.kv_len)
    assert transpose_mask(transpose_mask(mask)) == mask
    grid = backward_tiles(mask, 16, 16).grid(48, 48)
    assert grid == ["░██", "·░█", "··░"]  # per kv tile: its diagonal q tile partial, the later q tiles full
