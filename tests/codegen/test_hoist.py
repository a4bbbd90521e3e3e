"""Hoisting tensor reads out of the element loop: which reads move, to which level, and what stays."""

import sympy
import torch

import attnc
from attnc import mods
from attnc.codegen.hoist import hoist
from attnc.dsl import symbols as s


def test_reads_move_to_the_level_of_the_indices_they_use():
    doc = torch.zeros(8, dtype=torch.int64)
    spec = attnc.Attention(4, score_mod=mods.alibi(torch.ones(4)), mask_mod=mods.document(doc) & mods.causal())
    (score, mask), reads, names = hoist(spec.ir.score, spec.ir.mask)
    levels = {str(r.read): r.level for r in reads}
    assert levels == {"slopes[h]": "block", "doc_ids[q_idx]": "row", "doc_ids[kv_idx]": "column"}
    assert not score.atoms(sympy.Indexed) and not mask.atoms(sympy.Indexed)
    assert sorted(names.values()) == ["block_cache2", "column_cache0[j]", "row_cache1[i]"]
    assert all(r.integer for r in reads if "doc_ids" in str(r.read))


def test_reads_that_need_both_positions_stay_in_the_loop():
    spec = attnc.Attention(4, score_mod=mods.relative_bias(torch.randn(4, 9)))
    (score,), reads, _ = hoist(spec.ir.score)
    assert reads == () and score == spec.ir.score
    nested = sympy.IndexedBase("a")[sympy.IndexedBase("b", integer=True)[s.h]]
    assert [str(r.read) for r in hoist(nested)[1]] == ["b[h]"]  # the inner read hoists, the outer stays


def test_cuda_contexts_fill_caches_and_cpu_contexts_do_not():
    from attnc.codegen.context import make_context
    from attnc.dsl.tilemap import analyse
    from attnc.schedules.config import KernelConfig

    spec = attnc.Attention(4, score_mod=mods.alibi(torch.ones(4)), mask_mod=mods.causal())
    config = KernelConfig(128, 128, 2, 256)
    tilemap = analyse(spec.ir.mask, 128, 128)
    cuda = make_context("fwd", "k", spec.ir, tilemap, config, "bfloat16", "sm_90a")
    assert [(c.cache, c.level) for c in cuda.caches] == [("block_cache0", "block"), ("score_row", "row"),
                                                         ("score_column", "block_column"),
                                                         ("score_tile_row", "tile_row")]
    assert cuda.caches[0].value == "in_slopes[h]" and "block_cache0" in cuda.caches[2].value
    assert "block_cache0" in cuda.score_expr and cuda.dtype == "bfloat16" and not cuda.score_guard
    cpu = make_context("cpu_fwd", "k", spec.ir, tilemap, config, "float32")
    assert cpu.caches == () and "in_slopes[h]" in cpu.score_expr
