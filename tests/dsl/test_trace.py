"""Tracing FlexAttention-style mods into sympy: every supported operation, captured tensors, clear errors."""

import pytest
import torch

import attnc
from attnc.dsl import symbols as s
from attnc.errors import SpecError
from attnc.runtime.evaluate import evaluate


def traced(score_mod=None, mask_mod=None, **kw):
    return attnc.Attention(4, score_mod=score_mod, mask_mod=mask_mod, **kw).ir


def grid(q_len=9, kv_len=11, heads=4, batch=2):
    return {
        s.b: torch.arange(batch).view(-1, 1, 1, 1),
        s.h: torch.arange(heads).view(1, -1, 1, 1),
        s.q_idx: torch.arange(q_len).view(1, 1, -1, 1),
        s.kv_idx: torch.arange(kv_len).view(1, 1, 1, -1),
        s.q_len: q_len,
        s.kv_len: kv_len,
    }


SCORE_MODS = {
    "identity": lambda score, b, h, q, k: score,
    "scale": lambda score, b, h, q, k: score * 2 - 1,
    "tanh": lambda score, b, h, q, k: 30 * torch.tanh(score / 30),
    "exp_log": lambda score, b, h, q, k: torch.log(torch.exp(score) + 1),
    "sqrt_abs": lambda score, b, h, q, k: score + torch.sqrt(torch.abs(q - k) + 1.0),
    "sigmoid": lambda score, b, h, q, k: score * torch.sigmoid(score),
    "where": lambda score, b, h, q, k: torch.where(q >= k, score, score - 1.5),
    "minmax": lambda score, b, h, q, k: torch.minimum(score, torch.maximum(score * 0.5, (q - k) * 0.1)),
    "clamp": lambda score, b, h, q, k: torch.clamp(score, min=-1.0, max=2.0),
    "sign": lambda score, b, h, q, k: score + torch.sign(q - k) * 0.25,
    "pow": lambda score, b, h, q, k: score + (q - k) ** 2 / 100,
    "int_div": lambda score, b, h, q, k: score + (q // 3) - (k % 4) + h * b,
    "true_div": lambda score, b, h, q, k: score + q / 7,
    "neg_abs": lambda score, b, h, q, k: -abs(score) + 1,
    "methods": lambda score, b, h, q, k: score.tanh() + score.sigmoid(),
}


@pytest.mark.parametrize("name", SCORE_MODS)
def test_score_mod_traces_to_what_the_function_computes(name):
    fn = SCORE_MODS[name]
    ir = traced(score_mod=fn)
    env = grid()
    scores = torch.randn(2, 4, 9, 11, dtype=torch.float64)
    env[s.score] = scores
    got = torch.as_tensor(evaluate(ir.score, env, {})).expand_as(scores)
    b, h, q, k = (env[x] for x in (s.b, s.h, s.q_idx, s.kv_idx))
    want = fn(scores, b, h, q, k)
    torch.testing.assert_close(got.double(), torch.as_tensor(want).double().expand_as(scores))


MASK_MODS = {
    "causal_top_left": lambda b, h, q, k: q >= k,
    "window": lambda b, h, q, k: (q - k <= 3) & (q >= k),
    "or_not": lambda b, h, q, k: (k < 2) | ~(q < k),
    "eq_ne": lambda b, h, q, k: (q // 4 == k // 4) & (q != k + 100),
    "heads": lambda b, h, q, k: (h % 2 == 0) | (q > k),
    "logical": lambda b, h, q, k: torch.logical_and(q >= k, torch.logical_not(q - k > 5)),
    "always": lambda b, h, q, k: q >= 0,
}


@pytest.mark.parametrize("name", MASK_MODS)
def test_mask_mod_traces_to_what_the_function_computes(name):
    fn = MASK_MODS[name]
    ir = traced(mask_mod=fn)
    env = grid()
    got = torch.as_tensor(evaluate(ir.mask, env, {})).expand(2, 4, 9, 11)
    want = fn(*(env[x] for x in (s.b, s.h, s.q_idx, s.kv_idx)))
    assert torch.equal(got, torch.as_tensor(want).expand(2, 4, 9, 11))


def test_captured_tensors_become_named_inputs():
    doc_ids = torch.tensor([0, 0, 1, 1, 2])
    bias = torch.randn(4, 9)

    def mask(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx]

    def score(score, b, h, q_idx, kv_idx):
        return score + bias[h, q_idx - kv_idx + 4]

    spec = attnc.Attention(4, score_mod=score, mask_mod=mask)
    assert [(t.name, t.dtype, t.captured) for t in spec.ir.inputs] == [("bias", "float32", True),
                                                                       ("doc_ids", "int64", True)]
    assert spec.captured_tensors()["doc_ids"] is doc_ids
    assert str(spec.ir.mask) == "Eq(doc_ids[q_idx], doc_ids[kv_idx])"
    assert str(spec.ir.score) == "score + bias[h, -kv_idx + q_idx + 4]"


def test_declared_input_is_indexed_like_a_captured_tensor():
    table = attnc.Input("table", (4, 64), torch.float32)
    spec = attnc.Attention(4, score_mod=lambda score, b, h, q, k: score + table[h, k], inputs=[table])
    assert spec.ir.inputs[0].name == "table" and not spec.ir.inputs[0].captured
    assert spec.captured_tensors() == {}


def test_tensor_values_do_not_change_the_spec_hash():
    make = lambda t: attnc.Attention(4, score_mod=attnc.mods.alibi(t))
    assert make(torch.rand(4)) == make(torch.rand(4))
    assert hash(make(torch.rand(4))) == hash(make(torch.rand(4)))
    assert make(torch.rand(4)) != attnc.Attention(4, score_mod=attnc.mods.softcap(20))


@pytest.mark.parametrize("fn, message", [
    (lambda score, b, h, q, k: score if q > k else 0, "Python bool"),
    (lambda score, b, h, q, k: torch.erf(score), "torch.erf"),
    (lambda score, b, h, q, k: score + torch.ones(3), "captured tensor of shape"),
    (lambda score, b, h, q, k: score + float("nan"), "NaN"),
    (lambda score, b, h, q, k: q > k, "returned a boolean"),
    (lambda score, b, h, q, k: score + torch.ones(4)[score], "indices must be integers"),
    (lambda score, b, h, q, k: score + torch.ones(4, 4)[h], "2 dimensions with 1 indices; index every dimension"),
    (lambda score, b, h, q, k: score + torch.ones(4, 4)[h, :], "slice"),
    (lambda score, b, h, q: score, "must take 5 arguments"),
    (lambda score, b, h, q, k: score // 2, "integer operands"),
    (lambda score, b, h, q, k: score + undefined_name, "NameError"),  # noqa: F821
])
def test_untraceable_score_mods_raise_spec_errors_naming_the_problem(fn, message):
    with pytest.raises(SpecError, match=message):
        attnc.Attention(4, score_mod=fn)


@pytest.mark.parametrize("fn, message", [
    (lambda b, h, q, k: q - k, "must return a boolean"),
    (lambda b, h, q, k: (q - k) & (q > k), "boolean operands"),
    (lambda b, h, q, k: q >= k and k > 0, "Python bool"),
])
def test_bad_mask_mods_raise_spec_errors(fn, message):
    with pytest.raises((SpecError, NameError), match=message):
        attnc.Attention(4, mask_mod=fn)


def test_flex_attention_helpers_and_chained_indexing_trace():
    bias = torch.randn(6, 6)

    def or_masks(*mask_mods):  # as FlexAttention's or_masks / and_masks build their result
        def or_mask(b, h, q_idx, kv_idx):
            result = b.new_zeros((), dtype=torch.bool)
            for mask in mask_mods:
                result = result | mask(b, h, q_idx, kv_idx)
            return result
        return or_mask

    def and_masks(*mask_mods):
        def and_mask(b, h, q_idx, kv_idx):
            result = b.new_ones((), dtype=torch.bool)
            for mask in mask_mods:
                result = result & mask(b, h, q_idx, kv_idx)
            return result
        return and_mask

    spec = attnc.Attention(
        2, score_mod=lambda score, b, h, q_idx, kv_idx: score + bias[q_idx][kv_idx],
        mask_mod=or_masks(lambda b, h, q, k: k < 2, and_masks(lambda b, h, q, k: q >= k, lambda b, h, q, k: q < 5)))
    assert str(spec.ir.score) == "score + bias[q_idx, kv_idx]"
    env = grid(6, 6, heads=2)
    keep = torch.as_tensor(evaluate(spec.ir.mask, env, {})).expand(2, 2, 6, 6)
    q, k = env[s.q_idx], env[s.kv_idx]
    assert torch.equal(keep, ((k < 2) | ((q >= k) & (q < 5))).expand(2, 2, 6, 6))
    with pytest.raises(SpecError, match="only scalars trace"):
        attnc.Attention(2, mask_mod=lambda b, h, q, k: b.new_zeros((3,), dtype=torch.bool) | (q > k))
    with pytest.raises(SpecError, match="partly indexed"):
        attnc.Attention(2, score_mod=lambda score, b, h, q, k: score + bias[q].sum())


def test_tensors_reached_through_wrapped_mods_keep_their_names():
    alibi = attnc.mods.alibi(torch.rand(4))
    bias = attnc.mods.relative_bias(torch.randn(4, 31))
    spec = attnc.Attention(4, score_mod=lambda s, b, h, q, k: bias(alibi(s, b, h, q, k), b, h, q, k))
    assert [t.name for t in spec.ir.inputs] == ["slopes", "table"]
