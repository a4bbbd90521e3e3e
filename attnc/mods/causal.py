"""Causal mask, aligned to the bottom-right corner as in FlashAttention."""

from attnc.dsl.lengths import KV_LEN, Q_LEN
from attnc.mods.mod import Mod, mask_mod


def causal() -> Mod:
    """``kv_idx <= q_idx + (KV_LEN - Q_LEN)``: each query sees keys up to its own position, counted from the end."""

    @mask_mod("causal", causal.__doc__)
    def mod(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + (KV_LEN - Q_LEN)

    return mod
