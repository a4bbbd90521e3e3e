"""T5-style learned relative-position bias: a (heads, 2 L - 1) table indexed by kv_idx - q_idx, bidirectional."""

import torch

import attnc
from attnc import mods

MAX_LEN = 8192  # the table covers distances in (-MAX_LEN, MAX_LEN): q_len and kv_len up to MAX_LEN

table = 0.5 * torch.randn(8, 2 * MAX_LEN - 1, generator=torch.Generator().manual_seed(0))
spec = attnc.Attention(q_heads=8, qk_dim=64, score_mod=mods.relative_bias(table))
