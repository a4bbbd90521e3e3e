"""The default schedules: the sm_90a forward's config follows the keys a query row keeps, measured by evaluating the
mask, and at head dim 64 the work per element; a cuda op without a GPU dispatches a call by it, and building ahead
builds every config it may pick."""

import pytest
import torch

import attnc
from attnc import mods
from attnc.codegen.build import Target
from attnc.runtime.kernels import Kernel
from attnc.schedules import heuristics
from attnc.schedules.config import KernelConfig
from attnc.schedules.heuristics import SHORT_LOOP_KEYS, default_config, kept_keys_per_row

TWO_BLOCKS = KernelConfig(block_m=64, block_n=64, stages=2, threads=128)
D128_MASKED = KernelConfig(block_m=128, block_n=128, stages=2, threads=256)
D64_LIGHT = KernelConfig(block_m=192, block_n=128, stages=2, threads=384)
DEFAULT_CPU = KernelConfig(block_m=16, block_n=32, stages=1, threads=1)


def doc_ids(length: int, docs: int = 8) -> torch.Tensor:
    return torch.arange(length) * docs // length


def test_kept_keys_per_row_counts_the_mask():
    assert kept_keys_per_row(attnc.Attention(4).ir, 300, 700) == 700
    causal = kept_keys_per_row(attnc.Attention(4, mask_mod=mods.causal()).ir, 1024, 1024)
    assert causal == pytest.approx(512.5, rel=0.01)  # 64 rows sampled
    window = kept_keys_per_row(attnc.Attention(4, mask_mod=mods.sliding_window(100)).ir, 4096, 4096)
    assert 95 < window <= 101  # the key itself and the 100 before it, fewer in the first rows
    document = attnc.Attention(4, mask_mod=mods.document(doc_ids(4096)))
    assert kept_keys_per_row(document.ir, 4096, 4096, document.captured_tensors()) == pytest.approx(512, rel=0.01)


def test_kept_keys_per_row_is_unknown_without_the_tensors_the_mask_reads():
    docs = attnc.Input("docs", (4096,), torch.int64)
    ir = attnc.Attention(4, mask_mod=lambda b, h, q, kv: docs[q] == docs[kv], inputs=[docs]).ir
    assert kept_keys_per_row(ir, 4096, 4096) is None
    assert kept_keys_per_row(ir, 8192, 8192, {"docs": doc_ids(4096)}) is None  # shorter than the call
    assert kept_keys_per_row(ir, 4096, 4096, {"docs": doc_ids(4096)}) == pytest.approx(512, rel=0.01)
    bias = torch.randn(4096)  # a tensor only the score reads is not needed
    scored = attnc.Attention(4, mask_mod=mods.causal(), score_mod=lambda s, b, h, q, kv: s + bias[kv]).ir
    assert kept_keys_per_row(scored, 64, 64, {}) == pytest.approx(32.5)


def test_short_kv_loops_get_the_two_block_forward_on_sm90a_at_head_dims_64_and_128():
    for dim in (64, 128):
        ir = attnc.Attention(8, qk_dim=dim, mask_mod=mods.sliding_window(512)).ir
        assert default_config("fwd", "sm_90a", ir, "bfloat16") == D128_MASKED  # unknown: the long-loop default
        assert default_config("fwd", "sm_90a", ir, "bfloat16", SHORT_LOOP_KEYS) == TWO_BLOCKS
        assert default_config("fwd", "sm_90a", ir, "bfloat16", SHORT_LOOP_KEYS + 1) == D128_MASKED
        dense = attnc.Attention(8, qk_dim=dim).ir  # no mask: 128 x 128 tiles for short loops
        assert default_config("fwd", "sm_90a", dense, "bfloat16", SHORT_LOOP_KEYS) == D128_MASKED
    wide = attnc.Attention(8, qk_dim=256, mask_mod=mods.causal()).ir  # two blocks do not fit: unchanged
    assert default_config("fwd", "sm_90a", wide, "bfloat16", 100) == default_config("fwd", "sm_90a", wide, "bfloat16")
    ir = attnc.Attention(8, qk_dim=128, mask_mod=mods.causal()).ir
    for family, arch in (("fwd", "sm_80"), ("cpu_fwd", "cpu")):
        assert default_config(family, arch, ir, "bfloat16", 100) == default_config(family, arch, ir, "bfloat16")


@pytest.mark.parametrize("mask_mod, score_mod, is_light", [
    (None, None, True),
    (mods.causal(), None, True),
    (mods.causal(), mods.softcap(30.0), True),
    (lambda b, h, q, kv: q >= kv, None, True),
    (mods.prefix_lm(64), None, False),
    (mods.sliding_window(64), None, False),
    (mods.causal(), mods.alibi(mods.alibi_slopes(8)), False),
    (None, lambda s, b, h, q, kv: s + q - kv, False),
    (mods.document(doc_ids(256)), None, False),
])
def test_long_loops_at_head_dim_64_take_three_warpgroups_only_for_light_elements(mask_mod, score_mod, is_light):
    ir = attnc.Attention(8, qk_dim=64, mask_mod=mask_mod, score_mod=score_mod).ir
    assert heuristics.light(ir) is is_light
    assert default_config("fwd", "sm_90a", ir, "bfloat16") == (D64_LIGHT if is_light else D128_MASKED)


@pytest.mark.parametrize("mask_mod, score_mod, reads", [
    (mods.causal(), None, False),
    (mods.prefix_lm(64), None, False),
    (mods.sliding_window(64), mods.softcap(30.0), False),
    (mods.document(doc_ids(256)), None, True),
    (mods.causal(), mods.alibi(mods.alibi_slopes(8)), True),
    (None, mods.relative_bias(torch.zeros(8, 511)), True),
])
def test_head_dim_256_takes_shorter_kv_tiles_when_an_element_reads_a_tensor(mask_mod, score_mod, reads):
    ir = attnc.Attention(8, qk_dim=256, mask_mod=mask_mod, score_mod=score_mod).ir
    assert heuristics.reads_tensors(ir) is reads
    block_n = default_config("fwd", "sm_90a", ir, "bfloat16").block_n
    assert block_n == (64 if reads else 80)
    narrow = attnc.Attention(8, qk_dim=128, mask_mod=mask_mod, score_mod=score_mod).ir
    assert default_config("fwd", "sm_90a", narrow, "bfloat16").block_n == (128 if mask_mod else 160)  # unchanged


def test_a_cuda_op_without_a_gpu_dispatches_by_the_keys_a_row_keeps():
    if torch.cuda.is_available():
        pytest.skip("with a GPU, dispatch reads the tuning database first")
    document = attnc.compile(attnc.Attention(8, qk_dim=128, mask_mod=mods.document(doc_ids(4096)) & mods.causal()),
                             target="cuda")
    assert document.config_for(torch.bfloat16, 2, 4096, 4096) == (TWO_BLOCKS, "heuristic")
    causal = attnc.compile(attnc.Attention(8, qk_dim=128, mask_mod=mods.causal()), target="cuda")
    assert causal.config_for(torch.bfloat16, 2, 1024, 1024) == (TWO_BLOCKS, "heuristic")
    assert causal.config_for(torch.bfloat16, 2, 4096, 4096) == (D128_MASKED, "heuristic")


def test_building_ahead_builds_every_config_the_heuristic_may_dispatch_to(monkeypatch):
    built = []
    monkeypatch.setattr(Kernel, "build", lambda self: built.append(self.config) or self)
    attnc.compile(attnc.Attention(8, qk_dim=128, mask_mod=mods.causal()), target=Target("cuda", "sm_90a")).build()
    assert built == [D128_MASKED, TWO_BLOCKS]
    built.clear()
    attnc.compile(attnc.Attention(8, qk_dim=64, mask_mod=mods.causal()), target=Target("cuda", "sm_90a")).build()
    assert built == [D64_LIGHT, TWO_BLOCKS]
    built.clear()
    attnc.compile(attnc.Attention(8, qk_dim=256, mask_mod=mods.causal()), target=Target("cuda", "sm_90a")).build()
    assert len(built) == 1  # one config at head dim 256
    built.clear()
    pinned = KernelConfig(block_m=64, block_n=128, stages=2, threads=128)
    attnc.compile(attnc.Attention(8, qk_dim=128), target=Target("cuda", "sm_90a"), config=pinned).build()
    assert built == [pinned]


def test_a_calls_config_evaluates_the_mask_only_where_the_default_depends_on_it(monkeypatch):
    evaluated = []
    monkeypatch.setattr(heuristics, "kept_keys_per_row", lambda *args: evaluated.append(args) or 100.0)
    d128 = attnc.Attention(8, qk_dim=128, mask_mod=mods.causal()).ir
    d256 = attnc.Attention(8, qk_dim=256, mask_mod=mods.causal()).ir
    assert heuristics.call_config("cpu_fwd", "cpu", d128, "float32", 4096, 4096) == DEFAULT_CPU
    assert heuristics.call_config("fwd", "sm_90a", d256, "bfloat16", 4096, 4096) == default_config(
        "fwd", "sm_90a", d256, "bfloat16")
    assert not evaluated
    assert heuristics.call_config("fwd", "sm_90a", d128, "bfloat16", 4096, 4096) == TWO_BLOCKS
    assert len(evaluated) == 1
