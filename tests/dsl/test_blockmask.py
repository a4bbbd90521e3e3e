"""Which masks need a run-time block mask (they read a tensor), and which of batch and head it varies with."""

import sympy
import torch

import attnc
from attnc import mods
from attnc.dsl.blockmask import BlockMaskLayout, block_mask_layout

DOCS = torch.zeros(64, dtype=torch.int32)
PER_BATCH = torch.zeros(2, 64, dtype=torch.int32)


def layout(mask_mod, inputs=()):
    return block_mask_layout(attnc.Attention(4, qk_dim=16, mask_mod=mask_mod, inputs=inputs).ir.mask)


def test_masks_in_indices_and_lengths_need_no_block_mask():
    for mod in (mods.causal(), mods.sliding_window(7), mods.prefix_lm(5) | mods.chunked(16),
                lambda b, h, q, k: (h % 2 == 0) | (q >= k), lambda b, h, q, k: q * k < 100):
        assert layout(mod) is None
    assert block_mask_layout(sympy.true) is None and block_mask_layout(sympy.false) is None


def test_a_mask_that_reads_a_tensor_needs_one_shared_by_every_batch_entry_and_head():
    assert layout(mods.document(DOCS)) == BlockMaskLayout(per_batch=False, per_head=False)
    assert layout(mods.document(DOCS) & mods.causal()) == BlockMaskLayout(False, False)


def test_reading_b_or_h_gives_the_block_mask_a_plane_per_batch_entry_or_head():
    assert layout(lambda b, h, q, k: PER_BATCH[b, q] == PER_BATCH[b, k]) == BlockMaskLayout(True, False)
    assert layout(lambda b, h, q, k: (DOCS[q] == DOCS[k]) | (h == 1)) == BlockMaskLayout(False, True)
    assert layout(lambda b, h, q, k: (PER_BATCH[b, q] == PER_BATCH[b, k]) & (h >= k)) == BlockMaskLayout(True, True)
    assert BlockMaskLayout(True, False).planes(3, 8) == (3, 1)
    assert BlockMaskLayout(False, True).planes(3, 8) == (1, 8)


def test_a_declared_input_read_by_the_mask_needs_one():
    table = attnc.Input("keep", (64,), torch.int32)
    assert layout(lambda b, h, q, k: table[k] > 0, inputs=[table]) == BlockMaskLayout(False, False)
