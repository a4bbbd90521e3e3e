"""Attention sinks as in gpt-oss: a learned per-head logit joins the softmax denominator; GQA 8/2, causal."""

import attnc
from attnc import mods

# The op takes the sinks at call time: op(q, k, v, sinks=torch.Tensor of shape (8,)).
spec = attnc.Attention(q_heads=8, kv_heads=2, qk_dim=64, mask_mod=mods.causal(), sinks=True)
