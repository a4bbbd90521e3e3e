"""The reference against torch SDPA and the closed forms it must satisfy (sinks, masked rows, lse)."""

import math

import torch
import torch.nn.functional as F

import attnc
from attnc.runtime.reference import attention_reference


def rand(*shape):
    return torch.randn(*shape, dtype=torch.float64)


def test_matches_sdpa_for_gqa_with_bottom_right_causal():
    q, k, v = rand(2, 33, 8, 16), rand(2, 50, 2, 16), rand(2, 50, 2, 16)
    spec = attnc.Attention(8, 2, qk_dim=16, mask_mod=attnc.mods.causal())
    out, lse = attention_reference(spec.ir, q, k, v)
    keep = torch.ones(33, 50, dtype=torch.bool).tril(50 - 33)
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2).repeat_interleave(4, 1), v.transpose(1, 2).repeat_interleave(4, 1)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(qt, kt, vt, attn_mask=keep).transpose(1, 2))
    scores = (qt @ kt.transpose(-1, -2) / 4).masked_fill(~keep, -math.inf)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1))


def test_bhsd_layout_and_separate_value_dim():
    q, k, v = rand(1, 4, 9, 16), rand(1, 4, 12, 16), rand(1, 4, 12, 8)
    spec = attnc.Attention(4, qk_dim=16, v_dim=8, layout="bhsd", scale=0.3)
    out, _ = attention_reference(spec.ir, q, k, v)
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, scale=0.3))


def test_sinks_join_the_denominator_and_carry_no_value():
    q, k, v = rand(1, 5, 2, 8), rand(1, 7, 2, 8), rand(1, 7, 2, 8)
    sinks = torch.tensor([0.5, -1.0])
    spec = attnc.Attention(2, qk_dim=8, sinks=True)
    out, lse = attention_reference(spec.ir, q, k, v, sinks=sinks)
    plain_out, plain_lse = attention_reference(attnc.Attention(2, qk_dim=8).ir, q, k, v)
    total = torch.logaddexp(plain_lse, sinks.double().view(1, 2, 1))
    torch.testing.assert_close(lse, total)
    torch.testing.assert_close(out, plain_out * torch.exp(plain_lse - total).transpose(1, 2).unsqueeze(-1))


def test_fully_masked_rows_give_zero_and_minus_infinity_never_nan():
    q, k, v = rand(1, 6, 2, 8), rand(1, 6, 2, 8), rand(1, 6, 2, 8)
    spec = attnc.Attention(2, qk_dim=8, mask_mod=lambda b, h, q_idx, kv_idx: (q_idx % 2 == 0) & (kv_idx <= q_idx))
    out, lse = attention_reference(spec.ir, q, k, v)
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    assert (out[:, 1::2] == 0).all() and (lse[..., 1::2] == -math.inf).all()
    assert torch.isfinite(lse[..., 0::2]).all()


def test_score_mod_and_captured_tensor_are_applied():
    q, k, v = rand(1, 5, 2, 8), rand(1, 5, 2, 8), rand(1, 5, 2, 8)
    table = torch.randn(2, 9)
    spec = attnc.Attention(2, qk_dim=8, score_mod=attnc.mods.relative_bias(table))
    out, _ = attention_reference(spec.ir, q, k, v, spec.captured_tensors())
    idx = torch.arange(5)
    bias = table.double()[:, (idx[None, :] - idx[:, None]) + 4]
    want = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=bias)
    torch.testing.assert_close(out, want.transpose(1, 2))
