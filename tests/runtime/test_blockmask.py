"""Run-time block masks on the CPU target: the classifier's tile kinds and lists against brute force, the forward
with a block mask (computed per call or made ahead) against the reference, errors, printing, torch.compile."""

import math

import pytest
import torch

import attnc
from attnc import mods
from attnc.runtime.blockmask import EMPTY, BlockMask, reference_tile_kinds
from attnc.runtime.reference import attention_reference
from attnc.schedules.config import KernelConfig

TOL = 1e-4  # DESIGN.md: fp32 CPU kernels, max abs error
LENGTHS = [(1, 1), (17, 17), (70, 45), (45, 70), (100, 100), (129, 33)]
TALL = KernelConfig(block_m=32, block_n=16, stages=1, threads=1)


def random_docs(length: int, generator: torch.Generator, max_doc: int = 24) -> torch.Tensor:
    """Ids (int32) of consecutive documents of random lengths in [1, max_doc]."""
    sizes = torch.randint(1, max_doc + 1, (length,), generator=generator)
    return torch.repeat_interleave(torch.arange(length), sizes)[:length].to(torch.int32)


GEN = torch.Generator().manual_seed(7)
DOCS = random_docs(160, GEN)
BATCH_DOCS = torch.stack([random_docs(160, GEN, 40) for _ in range(3)])
KEEP = (torch.rand(160, generator=GEN) < 0.3).to(torch.int32)
KEEP_INPUT = attnc.Input("keep", (160,), torch.int32)


def per_batch_window(b, h, q_idx, kv_idx):
    return (BATCH_DOCS[b, q_idx] == BATCH_DOCS[b, kv_idx]) & (abs(q_idx - kv_idx) <= 20)


def per_head(b, h, q_idx, kv_idx):
    return (DOCS[q_idx] == DOCS[kv_idx]) | (h == 1)


def per_batch_and_head(b, h, q_idx, kv_idx):
    return (BATCH_DOCS[b, q_idx] == BATCH_DOCS[b, kv_idx]) & ((q_idx >= kv_idx) | (h == 2))


SPECS = {
    "document": dict(mask_mod=mods.document(DOCS)),
    "document_causal": dict(mask_mod=mods.document(DOCS) & mods.causal()),
    "per_batch_window": dict(mask_mod=per_batch_window),
    "per_head_gqa_bhsd": dict(kv_heads=2, layout="bhsd", mask_mod=per_head),
    "per_batch_and_head": dict(mask_mod=per_batch_and_head),
    "declared_keep_sinks": dict(mask_mod=lambda b, h, q_idx, kv_idx: (KEEP_INPUT[kv_idx] > 0) | (q_idx == kv_idx),
                                inputs=[KEEP_INPUT], sinks=True),
}
OPS = {}


def op_for(name: str, config: KernelConfig | None = None) -> attnc.CompiledAttention:
    if (name, config) not in OPS:
        OPS[name, config] = attnc.compile(attnc.Attention(4, qk_dim=16, v_dim=8, **SPECS[name]), target="cpu",
                                          config=config)
    return OPS[name, config]


def mask_inputs(name: str) -> dict:
    return {"keep": KEEP} if name == "declared_keep_sinks" else {}


def brute_force_kinds(op, q_len: int, kv_len: int, batch: int, tensors: dict, tiles: tuple[int, int]):
    return reference_tile_kinds(op.ir, op.block_mask_layout, batch, q_len, kv_len, tensors, *tiles)


@pytest.mark.parametrize("config", [None, TALL], ids=["default_tiles", "tall_tiles"])
@pytest.mark.parametrize("name", sorted(SPECS))
def test_tile_kinds_and_lists_match_brute_force(name, config):
    op = op_for(name, config)
    for q_len, kv_len in LENGTHS:
        batch = 3 if name.startswith("per_batch") else 2
        bm = op.block_mask(q_len, kv_len, batch=batch, **mask_inputs(name))
        tensors = {**op.spec.captured_tensors(), **mask_inputs(name)}
        want = brute_force_kinds(op, q_len, kv_len, batch, tensors, bm.tiles)
        assert torch.equal(bm.tile_kind, want), (name, q_len, kv_len)
        listed = want != EMPTY
        assert torch.equal(bm.kv_count, listed.sum(-1).int())
        for plane in range(listed.shape[0] * listed.shape[1]):
            for q_tile in range(listed.shape[2]):
                row = listed.flatten(0, 1)[plane, q_tile]
                count = int(row.sum())
                got = bm.kv_list.flatten(0, 1)[plane, q_tile, :count]
                assert torch.equal(got, torch.nonzero(row).flatten().int())  # ascending


def check(op, q, k, v, block_mask=None, **inputs):
    sinks = torch.randn(op.ir.q_heads) if op.ir.sinks else None
    out, lse = op(q, k, v, sinks=sinks, return_lse=True, block_mask=block_mask, **inputs)
    ref_out, ref_lse = attention_reference(op.ir, q, k, v, {**op.spec.captured_tensors(), **inputs}, sinks)
    assert (out.double() - ref_out).abs().max() <= TOL
    assert torch.equal(torch.isfinite(lse), torch.isfinite(ref_lse))
    finite = torch.isfinite(ref_lse)
    if finite.any():
        assert (lse.double()[finite] - ref_lse[finite]).abs().max() <= TOL
    return out, lse


def qkv(op, batch, q_len, kv_len):
    ir = op.ir
    shape = (lambda s, hh, d: (batch, s, hh, d)) if ir.layout == "bshd" else (lambda s, hh, d: (batch, hh, s, d))
    return (torch.randn(shape(q_len, ir.q_heads, ir.qk_dim)), torch.randn(shape(kv_len, ir.kv_heads, ir.qk_dim)),
            torch.randn(shape(kv_len, ir.kv_heads, ir.v_dim)))


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_forward_with_a_block_mask_matches_the_reference(name):
    op = op_for(name)
    for q_len, kv_len in LENGTHS:
        batch = 3 if name.startswith("per_batch") else 2
        q, k, v = qkv(op, batch, q_len, kv_len)
        check(op, q, k, v, **mask_inputs(name))  # computed in the call
        bm = op.block_mask(q_len, kv_len, batch=batch, **mask_inputs(name))
        check(op, q, k, v, block_mask=bm, **mask_inputs(name))  # made ahead


def test_the_block_mask_follows_the_mask_tensors_of_each_call():
    op = op_for("document_causal")
    q, k, v = qkv(op, 1, 90, 90)
    for seed in range(3):
        docs = random_docs(90, torch.Generator().manual_seed(seed), max_doc=30)
        check(op, q, k, v, doc_ids=docs)
        check(op, q, k, v, block_mask=op.block_mask(90, doc_ids=docs), doc_ids=docs)


def test_rows_whose_tiles_are_all_empty_give_zero_and_minus_infinity():
    never = torch.zeros(64, dtype=torch.int32)
    op = attnc.compile(attnc.Attention(2, qk_dim=8, mask_mod=lambda b, h, q_idx, kv_idx: never[q_idx] > 0),
                       target="cpu")
    bm = op.block_mask(40)
    assert (bm.kv_count == 0).all() and (bm.tile_kind == EMPTY).all()
    q, k, v = qkv(op, 1, 40, 40)
    out, lse = check(op, q, k, v, block_mask=bm)
    assert (out == 0).all() and (lse == -math.inf).all()


def test_the_config_of_a_block_mask_is_the_one_its_call_runs():
    op = op_for("document")
    bm = op.block_mask(50)
    assert bm.config == op.config(torch.float32) and bm.tiles == (16, 32)
    assert bm.tile_kind.shape == (1, 1, 4, 2) and bm.kv_count.shape == (1, 1, 4) and bm.kv_list.shape == (1, 1, 4, 2)
    assert bm.tile_kind.dtype == torch.int8 and bm.kv_count.dtype == bm.kv_list.dtype == torch.int32


def test_a_block_mask_for_other_sizes_or_another_op_is_rejected():
    op = op_for("per_batch_window")
    bm = op.block_mask(70, 45, batch=3)
    q, k, v = qkv(op, 3, 70, 45)
    with pytest.raises(attnc.InputError, match=r"`block_mask` was made for q_len 70, kv_len 45; this call has "
                                               r"q_len 45, kv_len 70"):
        op(*qkv(op, 3, 45, 70), block_mask=bm)
    with pytest.raises(attnc.InputError, match=r"`block_mask` was made for batch 3 \(the mask reads `b`\); this "
                                               r"call has batch 2"):
        op(q[:2], k[:2], v[:2], block_mask=bm)
    with pytest.raises(attnc.InputError, match=r"`block_mask` was made for another op .*expected one of this op"):
        op_for("document")(*qkv(op_for("document"), 3, 70, 45), block_mask=bm)
    with pytest.raises(attnc.InputError, match=r"`block_mask` must be a BlockMask made by op.block_mask"):
        op(q, k, v, block_mask=bm.tile_kind)
    with pytest.raises(attnc.InputError, match=r"`block_mask` has tiles of 16x32; this op runs 32x16 tiles"):
        op_for("per_batch_window", TALL)(q, k, v, block_mask=bm)
    causal = attnc.compile(attnc.Attention(4, qk_dim=16, v_dim=8, mask_mod=mods.causal()), target="cpu")
    with pytest.raises(attnc.InputError, match=r"`block_mask` was passed, but this op's mask reads no tensor"):
        causal(q, k, v, block_mask=bm)
    with pytest.raises(attnc.InputError, match=r"this op's mask reads no tensor"):
        causal.block_mask(70, 45)
    with pytest.raises(attnc.InputError, match=r"block_mask `q_len` must be a non-negative int; got -1"):
        op.block_mask(-1)
    with pytest.raises(attnc.InputError, match=r"`BATCH_DOCS\[b, kv_idx\]` reads `BATCH_DOCS` at dimension 1 from 0 "
                                               r"to 199"):
        op.block_mask(200, batch=3)


def test_a_block_mask_made_for_batch_1_serves_any_batch_when_the_mask_ignores_b():
    op = op_for("document_causal")
    bm = op.block_mask(70, 45)
    check(op, *qkv(op, 4, 70, 45), block_mask=bm)


def test_a_block_mask_prints_as_a_grid():
    op = op_for("document_causal")
    docs = torch.tensor([0] * 40 + [1] * 24, dtype=torch.int32)
    text = str(op.block_mask(64, doc_ids=docs))
    assert text.splitlines()[0] == ("BlockMask(q_len=64, kv_len=64, batch=1, tiles=16x32, shape=(1, 1, 4, 2), "
                                    "target=cpu, config=m16n32s1t1)")
    assert text.splitlines()[-4:] == ["    ░·", "    ░·", "    ░░", "    ·░"]
    assert "5 of 8 tiles visited (0 full), sparsity 37.5%" in text
    full = attnc.compile(attnc.Attention(2, qk_dim=8, mask_mod=mods.document(torch.zeros(2000, dtype=torch.int32))),
                         target="cpu")
    big = full.block_mask(2000)
    assert "one glyph per 3x2 tiles" in str(big) and big.grid()[0] == "█" * 31 + "░"
    assert len(big.grid()) == 42 and repr(big) == str(big)


def test_torch_compile_fullgraph_with_and_without_a_block_mask():
    op = op_for("document_causal")
    q, k, v = qkv(op, 2, 70, 70)
    bm = op.block_mask(70)
    with_mask = torch.compile(lambda q, k, v, bm: op(q, k, v, block_mask=bm) * 2, fullgraph=True,
                              backend="aot_eager")
    per_call = torch.compile(lambda q, k, v: op(q, k, v) * 2, fullgraph=True, backend="aot_eager")
    want = op(q, k, v, block_mask=bm) * 2
    torch.testing.assert_close(with_mask(q, k, v, bm), want)
    torch.testing.assert_close(per_call(q, k, v), want)


def test_gradients_flow_through_a_call_with_a_block_mask():
    op = op_for("document_causal")
    q, k, v = qkv(op, 1, 45, 45)
    bm = op.block_mask(45)
    grads = []
    for mask in (bm, None):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        op(*leaves, block_mask=mask).square().sum().backward()
        grads.append([t.grad for t in leaves])
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    attention_reference(op.ir, *leaves, op.spec.captured_tensors())[0].square().sum().backward()
    for got in grads:
        for g, want in zip(got, leaves):
            assert (g.double() - want.grad).abs().max() <= TOL


def test_block_mask_is_a_block_mask():
    assert isinstance(op_for("document").block_mask(5), BlockMask)
