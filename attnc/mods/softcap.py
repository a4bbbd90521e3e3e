"""Logit soft-capping (Gemma 2, Grok)."""

import math

import torch

from attnc.errors import SpecError
from attnc.mods.mod import Mod, score_mod


def softcap(cap: float) -> Mod:
    """``cap * tanh(score / cap)``: scores squashed smoothly into (-cap, cap)."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not math.isfinite(cap) or cap <= 0:
        raise SpecError(f"softcap `cap` must be a positive finite number; got {cap!r}")
    cap = float(cap)

    @score_mod(f"softcap_{cap:g}", softcap.__doc__.replace("cap", f"{cap:g}", 2))
    def mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return mod
