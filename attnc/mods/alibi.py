"""ALiBi: a per-head linear bias on the distance between query and key."""

import torch

from attnc.errors import SpecError
from attnc.mods.mod import Mod, score_mod


def alibi_slopes(heads: int) -> torch.Tensor:
    """The geometric slopes of the ALiBi paper, ``2 ** (-8 (i + 1) / heads)`` for head ``i``."""
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)], dtype=torch.float32)


def alibi(slopes: torch.Tensor) -> Mod:
    """``score + slopes[h] * (kv_idx - q_idx)`` (``slopes``: float, (q_heads,))."""
    if not isinstance(slopes, torch.Tensor) or slopes.ndim != 1 or not slopes.is_floating_point():
        raise SpecError(f"alibi `slopes` must be a 1-D float tensor; got {slopes!r:.80}")

    @score_mod("alibi", alibi.__doc__)
    def mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return mod
