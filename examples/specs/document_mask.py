"""Document masking for packed sequences: tokens attend causally within their own document of random length."""

import torch

import attnc
from attnc import mods


def random_doc_ids(length: int, generator: torch.Generator | None = None, max_doc: int = 48) -> torch.Tensor:
    """Document ids (int32, (length,)) of consecutive documents with random lengths in [1, max_doc]."""
    sizes = torch.randint(1, max_doc + 1, (length,), generator=generator)
    ids = torch.repeat_interleave(torch.arange(length), sizes)[:length]
    return ids.to(torch.int32)


# Captured at spec time (this tensor is the op's default `doc_ids`); `inputs` gives fresh ones for any length.
doc_ids = random_doc_ids(1024, torch.Generator().manual_seed(0))
spec = attnc.Attention(q_heads=8, qk_dim=64, mask_mod=mods.document(doc_ids) & mods.causal())


def inputs(q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
    """Fresh random documents covering both sequences (the mask reads doc_ids[q_idx] and doc_ids[kv_idx])."""
    return {"doc_ids": random_doc_ids(max(q_len, kv_len, 1))}
