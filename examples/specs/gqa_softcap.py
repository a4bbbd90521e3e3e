"""Grouped-query attention (8 q heads share 2 kv heads) with Gemma-2-style logit soft-capping at 30, causal."""

import attnc
from attnc import mods

spec = attnc.Attention(q_heads=8, kv_heads=2, qk_dim=64, score_mod=mods.softcap(30.0), mask_mod=mods.causal())
