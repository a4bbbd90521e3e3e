"""A learned relative-position bias table (T5-style, per head)."""

import torch

from attnc.errors import SpecError
from attnc.mods.mod import Mod, score_mod


def relative_bias(table: torch.Tensor) -> Mod:
    """``score + table[h, kv_idx - q_idx + (table.shape[1] - 1) // 2]`` (``table``: float, (heads, 2 L - 1) for
    distances in (-L, L))."""
    if not isinstance(table, torch.Tensor) or table.ndim != 2 or not table.is_floating_point():
        raise SpecError(f"relative_bias `table` must be a 2-D float tensor (heads, 2 L - 1); got {table!r:.80}")
    offset = (table.shape[1] - 1) // 2

    @score_mod("relative_bias", relative_bias.__doc__)
    def mod(score, b, h, q_idx, kv_idx):
        return score + table[h, kv_idx - q_idx + offset]

    return mod
