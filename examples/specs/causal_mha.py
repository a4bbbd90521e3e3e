"""Causal multi-head attention: 8 heads of dim 64, the causal diagonal aligned bottom-right as in FlashAttention."""

import attnc
from attnc import mods

spec = attnc.Attention(q_heads=8, qk_dim=64, mask_mod=mods.causal())
