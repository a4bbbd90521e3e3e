"""Every bad input gets an InputError naming the argument, the expectation and what came."""

import pytest
import torch

import attnc
from attnc.errors import InputError, SpecError, UnsupportedError


@pytest.fixture(scope="module")
def op():
    doc = torch.zeros(64, dtype=torch.int64)
    spec = attnc.Attention(4, 2, qk_dim=16, v_dim=8, mask_mod=attnc.mods.document(doc),
                           score_mod=attnc.mods.relative_bias(torch.randn(4, 63)), sinks=True)
    return attnc.compile(spec, target="cpu")


def args(q_len=8, kv_len=8, **over):
    base = dict(q=torch.randn(1, q_len, 4, 16), k=torch.randn(1, kv_len, 2, 16), v=torch.randn(1, kv_len, 2, 8),
                sinks=torch.randn(4))
    base.update(over)
    return base


def call(op, **over):
    a = args(**over)
    return op(a.pop("q"), a.pop("k"), a.pop("v"), **a)


@pytest.mark.parametrize("over, message", [
    ({"q": torch.randn(1, 8, 64)}, r"`q` must have 4 dimensions \(B, S, H, D\) for layout 'bshd', but got shape "
                                    r"\(1, 8, 64\). Pass layout='bhsd'"),
    ({"k": [1, 2]}, "`k` must be a torch.Tensor; got list"),
    ({"v": torch.randn(1, 8, 2, 8, dtype=torch.float64)}, "`v` must have dtype float32 on the cpu target; got float64"),
    ({"q": torch.randn(1, 8, 3, 16)}, r"`q` must have 4 heads \(the spec's\)"),
    ({"k": torch.randn(1, 8, 4, 16)}, r"`k` must have 2 heads"),
    ({"k": torch.randn(1, 8, 2, 32)}, "`k` must have 16 head dim"),
    ({"v": torch.randn(1, 8, 2, 16)}, "`v` must have 8 head dim"),
    ({"k": torch.randn(2, 8, 2, 16), "v": torch.randn(2, 8, 2, 8)}, "must share the batch size"),
    ({"v": torch.randn(1, 9, 2, 8)}, "same sequence length; got 8 and 9"),
    ({"q": torch.randn(1, 4, 8, 16).transpose(1, 2)}, r"`q` must be contiguous .* Call .contiguous\(\) first"),
    ({"sinks": None}, r"missing `sinks`: this spec takes op\(q, k, v, sinks=tensor\) with shape \(4,\)"),
    ({"sinks": torch.randn(2)}, r"`sinks` must have shape \(4,\), one logit per q head; got \(2,\)"),
    ({"sinks": torch.ones(4, dtype=torch.int64)}, "`sinks` must be a floating-point torch.Tensor"),
    ({"bogus": torch.ones(3)}, "unexpected input `bogus`; this spec takes: `table`, `doc_ids`"),
    ({"doc_ids": torch.zeros(8, dtype=torch.int32)}, r"input `doc_ids` must have dtype int64 .*\.to\(torch.int64\)"),
    ({"doc_ids": torch.zeros(8, 1, dtype=torch.int64)}, "input `doc_ids` must have 1 dimensions; got shape"),
    ({"doc_ids": torch.zeros(5, dtype=torch.int64)}, r"`doc_ids\[kv_idx\]` reads `doc_ids` at dimension 0 from 0 to 7 "
                                                     r"for batch 1, q_len 8, kv_len 8, but `doc_ids` has size 5"),
    ({"q_len": 70, "kv_len": 70}, r"reads `doc_ids` at dimension 0 from 0 to 69 .* has size 64"),
    ({"return_lse": "yes"}, "`return_lse` must be True or False; got 'yes'"),
    ({"block_mask": "causal"}, "`block_mask` must be"),
])
def test_bad_inputs_raise_input_errors(op, over, message):
    with pytest.raises(InputError, match=message):
        call(op, **over)


def test_sinks_on_a_spec_without_sinks():
    op = attnc.compile(attnc.Attention(2, qk_dim=8), target="cpu")
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(InputError, match="the spec has no sinks"):
        op(q, q, q, sinks=torch.zeros(2))


def test_missing_declared_input():
    table = attnc.Input("table", (2, 16))
    op = attnc.compile(attnc.Attention(2, qk_dim=8, score_mod=lambda s, b, h, q, k: s + table[h, k], inputs=[table]),
                       target="cpu")
    q = torch.randn(1, 3, 2, 8)
    with pytest.raises(InputError, match=r"missing input `table`: pass it as op\(q, k, v, table=tensor\)"):
        op(q, q, q)


def test_compile_time_rejections():
    with pytest.raises(UnsupportedError, match="head dims .* qk_dim 96"):
        attnc.compile(attnc.Attention(4, qk_dim=96), target="cuda")
    with pytest.raises(UnsupportedError, match="`target` must be"):
        attnc.compile(attnc.Attention(4), target="tpu")
    with pytest.raises(SpecError, match="takes an attnc.Attention"):
        attnc.compile("causal")


def test_wrong_device_for_the_target():
    op = attnc.compile(attnc.Attention(2, qk_dim=64), target="cuda")
    q = torch.randn(1, 3, 2, 64)
    with pytest.raises(InputError, match="must have dtype bfloat16, float16 on the cuda target"):
        op(q, q, q)
