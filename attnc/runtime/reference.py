"""The reference implementation: eager torch, materialised scores, the ground truth of every test.

``attention_reference(ir, q, k, v, inputs, sinks)`` computes what every attnc kernel must compute for the same
arguments, in float64 by default: scores ``scale · q kᵀ``, the traced score_mod, the mask (False → -inf), sinks
joining the softmax denominator, the output and the natural-log log-sum-exp. Fully masked rows give output 0 and
lse -inf, never NaN.
"""

from __future__ import annotations

from typing import Mapping

import torch

from attnc.dsl import symbols
from attnc.dsl.ir import AttentionIR
from attnc.runtime.evaluate import evaluate, index_env


def attention_reference(
    ir: AttentionIR,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    inputs: Mapping[str, torch.Tensor] | None = None,
    sinks: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Output (q's layout, v_dim) and lse (batch, q_heads, q_len), both in ``dtype``."""
    inputs = dict(inputs or {})
    if ir.layout == "bshd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    if ir.group > 1:
        k = k.repeat_interleave(ir.group, dim=1)
        v = v.repeat_interleave(ir.group, dim=1)
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * ir.scale
    device = q.device
    env = {symbols.score: scores, **index_env(batch, heads, q_len, kv_len, device)}
    if ir.has_score_mod:
        scores = torch.as_tensor(evaluate(ir.score, env, inputs, dtype)).to(dtype).expand(batch, heads, q_len, kv_len)
    if ir.has_mask:
        keep = torch.as_tensor(evaluate(ir.mask, env, inputs, dtype)).expand(batch, heads, q_len, kv_len)
        scores = scores.masked_fill(~keep, float("-inf"))
    if sinks is not None:
        sink = sinks.to(dtype).view(1, heads, 1, 1).expand(batch, heads, q_len, 1)
        scores = torch.cat([scores, sink], dim=-1)
    lse = torch.logsumexp(scores, dim=-1)
    safe = torch.where(torch.isinf(lse) & (lse < 0), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - safe.unsqueeze(-1))
    if sinks is not None:
        probs = probs[..., :-1]
    out = torch.einsum("bhqk,bhkd->bhqd", probs, v)
    if ir.layout == "bshd":
        out = out.transpose(1, 2)
    return out.contiguous(), lse
