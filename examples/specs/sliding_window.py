"""Causal sliding-window attention (Mistral-style): each query sees its 48 most recent keys, itself included."""

import attnc
from attnc import mods

spec = attnc.Attention(q_heads=8, qk_dim=64, mask_mod=mods.sliding_window(48))
