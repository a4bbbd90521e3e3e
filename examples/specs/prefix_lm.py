"""Prefix-LM attention: the first 32 keys are visible to every query (bidirectional prefix), causal after them."""

import attnc
from attnc import mods

spec = attnc.Attention(q_heads=8, qk_dim=64, mask_mod=mods.prefix_lm(32))
