"""Chunked attention: fixed-size blocks that do not see each other."""

from attnc.errors import SpecError
from attnc.mods.mod import Mod, mask_mod


def chunked(chunk: int) -> Mod:
    """``q_idx // chunk == kv_idx // chunk``: tokens attend within their own chunk of ``chunk`` positions."""
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk <= 0:
        raise SpecError(f"chunked `chunk` must be a positive int; got {chunk!r}")

    @mask_mod(f"chunked_{chunk}", chunked.__doc__.replace("``chunk``", str(chunk)))
    def mod(b, h, q_idx, kv_idx):
        return q_idx // chunk == kv_idx // chunk

    return mod
