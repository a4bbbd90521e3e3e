"""Prefix-LM: a bidirectional prefix, causal after it."""

from attnc.dsl.lengths import KV_LEN, Q_LEN
from attnc.errors import SpecError
from attnc.mods.mod import Mod, mask_mod


def prefix_lm(prefix: int) -> Mod:
    """``(kv_idx < prefix) | (kv_idx <= q_idx + (KV_LEN - Q_LEN))``: every query sees the prefix, then causal."""
    if isinstance(prefix, bool) or not isinstance(prefix, int) or prefix < 0:
        raise SpecError(f"prefix_lm `prefix` must be a non-negative int; got {prefix!r}")

    @mask_mod(f"prefix_lm_{prefix}", prefix_lm.__doc__.replace("``prefix``", str(prefix)))
    def mod(b, h, q_idx, kv_idx):
        return (kv_idx < prefix) | (kv_idx <= q_idx + (KV_LEN - Q_LEN))

    return mod
