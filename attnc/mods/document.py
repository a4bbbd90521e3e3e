"""Document masking for packed sequences."""

import torch

from attnc.errors import SpecError
from attnc.mods.mod import Mod, mask_mod


def document(doc_ids: torch.Tensor) -> Mod:
    """``doc_ids[q_idx] == doc_ids[kv_idx]``: tokens attend within their own document (``doc_ids``: int, (S,))."""
    if not isinstance(doc_ids, torch.Tensor) or doc_ids.ndim != 1 or doc_ids.is_floating_point():
        raise SpecError(f"document `doc_ids` must be a 1-D integer tensor; got {doc_ids!r:.80}")

    @mask_mod("document", document.__doc__)
    def mod(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx]

    return mod
