"""FlexAttention's documented score_mods and mask_mods, written as FlexAttention users write them, for attnc.

Nothing here imports attnc: these are the plain ``score_mod(score, b, h, q_idx, kv_idx)`` and
``mask_mod(b, h, q_idx, kv_idx)`` functions one passes to ``torch.nn.attention.flex_attention``. attnc takes them
unchanged::

    spec = attnc.Attention(q_heads=8, qk_dim=64, score_mod=flex_mods.alibi, mask_mod=flex_mods.causal_mask)

Like FlexAttention's own examples, causal masks here are aligned top-left (``q_idx >= kv_idx``); attnc's
`attnc.mods.causal` aligns bottom-right as FlashAttention does, which only differs when q_len != kv_len.
"""

import torch
from torch.nn.attention.flex_attention import or_masks

HEADS = 8  # the captured tensors below are sized for this many query heads
MAX_SEQ_LEN = 256  # and for sequences up to this long


# --- mask_mods -------------------------------------------------------------------------------------------------

def causal_mask(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


SLIDING_WINDOW = 32


def sliding_window_causal(b, h, q_idx, kv_idx):
    causal_mask = q_idx >= kv_idx
    window_mask = q_idx - kv_idx <= SLIDING_WINDOW
    return causal_mask & window_mask


prefix_length = 24


def prefix_mask(b, h, q_idx, kv_idx):
    return kv_idx <= prefix_length


# FlexAttention's documentation composes the prefix-LM mask with its `or_masks` helper.
prefix_lm_causal = or_masks(prefix_mask, causal_mask)


def prefix_lm_causal_inline(b, h, q_idx, kv_idx):
    return (kv_idx <= prefix_length) | (q_idx >= kv_idx)


# Packed documents of 64, 32, 96 and 64 tokens; a document id per position.
document_id = torch.zeros(MAX_SEQ_LEN, dtype=torch.int)
document_id[:64] = 0
document_id[64:96] = 1
document_id[96:192] = 2
document_id[192:] = 3


def document_causal_mask(b, h, q_idx, kv_idx):
    causal_mask = q_idx >= kv_idx
    document_mask = document_id[q_idx] == document_id[kv_idx]
    return causal_mask & document_mask


# --- score_mods ------------------------------------------------------------------------------------------------

def relative_positional(score, b, h, q_idx, kv_idx):
    return score + (q_idx - kv_idx)


def generate_alibi_bias(heads=HEADS):
    return torch.tensor([2.0 ** (-8.0 * (i + 1) / heads) for i in range(heads)])


alibi_bias = generate_alibi_bias()  # [num_heads]


def alibi(score, b, h, q_idx, kv_idx):
    bias = alibi_bias[h] * (q_idx - kv_idx)
    return score + bias


softcap = 20


def soft_cap(score, b, h, q_idx, kv_idx):
    score = score / softcap
    score = torch.tanh(score)
    score = score * softcap
    return score


# A learned bias per head and relative distance, as T5 keeps it (distances in (-MAX_SEQ_LEN, MAX_SEQ_LEN)).
rel_bias_table = 0.1 * torch.randn(HEADS, 2 * MAX_SEQ_LEN - 1, generator=torch.Generator().manual_seed(0))


def relative_bias(score, b, h, q_idx, kv_idx):
    return score + rel_bias_table[h, q_idx - kv_idx + MAX_SEQ_LEN - 1]


# An arbitrary (q, kv) bias, indexed as FlexAttention's documentation does.
bias = 0.1 * torch.randn(MAX_SEQ_LEN, MAX_SEQ_LEN, generator=torch.Generator().manual_seed(1))


def bias_mod(score, b, h, q_idx, kv_idx):
    return score + bias[q_idx][kv_idx]


MASK_MODS = {
    "causal_mask": causal_mask,
    "sliding_window_causal": sliding_window_causal,
    "prefix_lm_causal": prefix_lm_causal,
    "prefix_lm_causal_inline": prefix_lm_causal_inline,
    "document_causal_mask": document_causal_mask,
}
SCORE_MODS = {
    "relative_positional": relative_positional,
    "alibi": alibi,
    "soft_cap": soft_cap,
    "relative_bias": relative_bias,
    "bias_mod": bias_mod,
}
