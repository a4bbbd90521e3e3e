"""Causal sliding window of a fixed number of keys."""

from attnc.dsl.lengths import KV_LEN, Q_LEN
from attnc.errors import SpecError
from attnc.mods.mod import Mod, mask_mod


def sliding_window(window: int) -> Mod:
    """``0 <= q_idx + (KV_LEN - Q_LEN) - kv_idx < window``: the ``window`` most recent keys, the query's own included."""
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        raise SpecError(f"sliding_window `window` must be a positive int; got {window!r}")

    @mask_mod(f"sliding_window_{window}", sliding_window.__doc__.replace("``window``", str(window)))
    def mod(b, h, q_idx, kv_idx):
        distance = q_idx + (KV_LEN - Q_LEN) - kv_idx
        return (distance >= 0) & (distance < window)

    return mod
