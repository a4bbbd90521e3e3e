"""Training: gradients of the compiled op against the float64 reference's autograd.

Rule for the fp32 CPU kernels: for every gradient g (of q, k, v, sinks, captured or declared float tensors),
``max |g - g_ref| <= 1e-4 * max(1, max |g_ref|)``, g_ref from autograd through `attention_reference` in float64 on
the same inputs (the fp32 rule of DESIGN.md, scaled by the gradient's magnitude: a gradient summed over 129 rows
is larger than an output). The loss uses the output and, where finite, the log-sum-exp, with random weights, so
the lse's gradient path is checked too. bf16/fp16 on cuda (marker `gpu`): DESIGN.md's rule, twice torch's own
same-precision error plus 1e-5.

CUDA kernels are also built, not run, for sm_90a and sm_80 here.
"""

import functools
import importlib.util
import math
import os
from pathlib import Path

import re

import pytest
import torch

import attnc
import attnc.mods as mods
from attnc.cli import load_spec
from attnc.codegen.build import Target
from attnc.errors import UnsupportedError
from attnc.dsl.derivative import read_gradients
from attnc.runtime.autograd import Backward, backward_for
from attnc.runtime.kernels import KERNEL_DTYPES, Kernel, build_in_parallel
from attnc.runtime.reference import attention_reference
from attnc.schedules.heuristics import backward_config

TOL = 1e-4
DOC = torch.tensor([0] * 40 + [1] * 50 + [2] * 39)
SLOPES = mods.alibi_slopes(4)
TABLE = torch.randn(4, 257) * 0.5


def fully_masked_every_third_row(b, h, q_idx, kv_idx):
    return (q_idx % 3 != 0) & (kv_idx <= q_idx)


def learned_bias_mod(score, b, h, q_idx, kv_idx):
    return score + torch.where(kv_idx <= q_idx, BIAS[h, kv_idx], BIAS[h, kv_idx] * 0.5)


BIAS = attnc.Input("bias", (4, 129))

SPECS = {  # name: factory(qk_dim, v_dim), and the head dims of the CPU tests
    "causal_gqa": (lambda d, e: attnc.Attention(4, 2, qk_dim=d, v_dim=e, mask_mod=mods.causal()), (16, 16)),
    "softcap_sliding_mqa": (lambda d, e: attnc.Attention(4, 1, qk_dim=d, v_dim=e, layout="bhsd",
                                                         score_mod=mods.softcap(5.0),
                                                         mask_mod=mods.sliding_window(20)), (16, 8)),
    "document_causal": (lambda d, e: attnc.Attention(2, qk_dim=d, v_dim=e, mask_mod=mods.document(DOC) & mods.causal()),
                        (16, 16)),
    "alibi_prefix_sinks": (lambda d, e: attnc.Attention(4, qk_dim=d, v_dim=e, score_mod=mods.alibi(SLOPES),
                                                        mask_mod=mods.prefix_lm(16), sinks=True), (16, 8)),
    "relbias_chunked_gqa": (lambda d, e: attnc.Attention(4, 2, qk_dim=d, v_dim=e, score_mod=mods.relative_bias(TABLE),
                                                         mask_mod=mods.chunked(32)), (16, 16)),
    "input_bias_masked_rows": (lambda d, e: attnc.Attention(4, qk_dim=d, v_dim=e, score_mod=learned_bias_mod,
                                                            mask_mod=fully_masked_every_third_row, inputs=[BIAS]),
                               (16, 16)),
}
LENGTHS = [(1, 1), (17, 17), (129, 129), (17, 129), (129, 17)]
CASES = [(name, ql, kl) for name in SPECS for ql, kl in LENGTHS
         if not (name == "document_causal" and ql != kl) and not (name == "input_bias_masked_rows" and kl > 129)]


@pytest.fixture(scope="module")
def ops():
    """Compiled ops, built on first use and shared by the module's tests."""
    built = {}

    def get(name, **options):
        key = (name, tuple(sorted(options.items())))
        if key not in built:
            factory, dims = SPECS[name]
            built[key] = attnc.compile(factory(*dims), target="cpu", **options)
        return built[key]

    return get


def draw(ir, batch, q_len, kv_len, dtype=torch.float64, device="cpu"):
    def one(seq, heads, dim):
        shape = (batch, seq, heads, dim) if ir.layout == "bshd" else (batch, heads, seq, dim)
        return torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)

    return one(q_len, ir.q_heads, ir.qk_dim), one(kv_len, ir.kv_heads, ir.qk_dim), one(kv_len, ir.kv_heads, ir.v_dim)


def float_inputs(op, given=None):
    """Random values for every float input of the spec (captured or ``given`` ones perturbed), integer ones as
    captured or given."""
    values = {}
    for t in op.ir.inputs:
        captured = (given or {}).get(t.name, op.spec.captured_tensors().get(t.name))
        if t.is_integer:
            values[t.name] = captured
        elif captured is not None:
            values[t.name] = captured.double() + 0.1 * torch.randn(captured.shape, dtype=torch.float64)
        else:
            values[t.name] = torch.randn(t.shape, dtype=torch.float64)
    return values


def gradients(op, q, k, v, inputs, sinks, d_out, d_lse, dtype, reference=False):
    """Gradients of <out, d_out> + <lse, d_lse> (finite lse only) with respect to q, k, v, float inputs, sinks."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    declared = {t.name: t.torch_dtype for t in op.ir.inputs}  # the op takes its inputs as traced (float32)
    named = {n: (t.detach().to(dtype if reference else declared[n]).requires_grad_() if t.is_floating_point() else t)
             for n, t in inputs.items()}
    sink = sinks.detach().to(dtype if reference else torch.float32).requires_grad_() if sinks is not None else None
    if reference:
        out, lse = attention_reference(op.ir, *leaves, named, sink, dtype=dtype)
    else:
        kw = {"sinks": sink} if sink is not None else {}
        out, lse = op(*leaves, return_lse=True, **named, **kw)
    finite = torch.isfinite(lse.detach())
    loss = (out * d_out.to(out.dtype)).sum() + torch.where(finite, lse, 0).mul(d_lse.to(lse.dtype)).sum()
    loss.backward()
    floats = [t for t in named.values() if t.is_floating_point()]
    grads = [t.grad for t in leaves + floats + ([sink] if sink is not None else [])]
    labels = ["q", "k", "v"] + [n for n, t in named.items() if t.is_floating_point()] + (["sinks"] if sink is not None else [])
    return dict(zip(labels, grads)), out.detach()


def assert_close(got, want, rule):
    for name, ref in want.items():
        g = got[name]
        assert g is not None, f"no gradient for `{name}`"
        assert g.shape == ref.shape, name
        assert not g.isnan().any(), f"NaN in the gradient of `{name}`"
        err = (g.double() - ref.double()).abs().max().item() if ref.numel() else 0.0
        assert err <= rule(name), f"`{name}`: max error {err:.3g} > {rule(name):.3g}"


def check_cpu(op, q_len, kv_len, batch=2, given=None):
    ir = op.ir
    q, k, v = draw(ir, batch, q_len, kv_len)
    inputs = float_inputs(op, given)
    sinks = torch.randn(ir.q_heads, dtype=torch.float64) if ir.sinks else None
    out_shape = (batch, q_len, ir.q_heads, ir.v_dim) if ir.layout == "bshd" else (batch, ir.q_heads, q_len, ir.v_dim)
    d_out, d_lse = torch.randn(out_shape, dtype=torch.float64), torch.randn(batch, ir.q_heads, q_len, dtype=torch.float64)
    want, _ = gradients(op, q, k, v, inputs, sinks, d_out, d_lse, torch.float64, reference=True)
    got, _ = gradients(op, q, k, v, inputs, sinks, d_out, d_lse, torch.float32)
    assert_close(got, want, lambda name: TOL * max(1.0, want[name].abs().max().item() if want[name].numel() else 0))
    return got, want


@pytest.mark.parametrize("name, q_len, kv_len", CASES)
def test_gradients_match_the_reference(ops, name, q_len, kv_len):
    check_cpu(ops(name), q_len, kv_len)


EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("path", sorted((EXAMPLES / "specs").glob("*.py")), ids=lambda p: p.stem)
def test_example_specs_gradients(path):
    loaded = load_spec(path)
    op = attnc.compile(loaded.spec, target="cpu")
    for q_len, kv_len in [(37, 37), (19, 45)]:
        check_cpu(op, q_len, kv_len, batch=1, given=loaded.inputs(q_len, kv_len, seed=0))


def test_gradcheck_on_a_tiny_shape():
    """torch.autograd.gradcheck of out and lse with respect to q, k, v, a learned bias table and sinks (GQA, causal,
    softcap over a relative bias). The cpu target computes in float32: the wrapper takes and returns float64, and
    the tolerances allow float32's rounding in the finite differences."""
    table = torch.randn(2, 13, generator=torch.Generator().manual_seed(0)) * 0.5
    spec = attnc.Attention(2, 1, qk_dim=8, sinks=True, mask_mod=mods.causal(), score_mod=lambda s, b, h, q, k:
                           mods.softcap(5)(mods.relative_bias(table)(s, b, h, q, k), b, h, q, k))
    op = attnc.compile(spec, target="cpu")

    def attention(q, k, v, table, sinks):
        out, lse = op(q.float(), k.float(), v.float(), table=table.float(), sinks=sinks.float(), return_lse=True)
        return out.double(), lse.double()

    generator = torch.Generator().manual_seed(1)
    shapes = [(1, 5, 2, 8), (1, 7, 1, 8), (1, 7, 1, 8)]
    args = [torch.randn(s, dtype=torch.float64, generator=generator) for s in shapes]
    args += [table.double(), torch.randn(2, dtype=torch.float64, generator=generator)]
    assert torch.autograd.gradcheck(attention, [a.requires_grad_() for a in args], eps=1e-3, atol=2e-3, rtol=2e-2)


def test_fully_masked_rows_get_zero_gradients_and_no_nan(ops):
    op = ops("input_bias_masked_rows")
    got, want = check_cpu(op, 17, 17)
    assert (got["q"][:, ::3] == 0).all() and torch.isfinite(got["k"]).all() and torch.isfinite(got["bias"]).all()


def test_learnable_captured_tensors_and_sinks_receive_gradients():
    slopes = torch.nn.Parameter(mods.alibi_slopes(4))
    table = torch.nn.Parameter(torch.randn(4, 65))
    spec = attnc.Attention(4, 2, qk_dim=16, sinks=True, score_mod=lambda s, b, h, q, k: mods.alibi(slopes)(
        mods.relative_bias(table)(s, b, h, q, k), b, h, q, k), mask_mod=mods.causal())
    op = attnc.compile(spec, target="cpu")
    sinks = torch.nn.Parameter(torch.randn(4))
    q, k, v = (t.float().requires_grad_() for t in draw(spec.ir, 1, 20, 20))
    op(q, k, v, sinks=sinks).square().sum().backward()
    for p in (slopes, table, sinks, q, k, v):
        assert p.grad is not None and p.grad.abs().sum() > 0 and torch.isfinite(p.grad).all()
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, slopes, table, sinks)]
    out, _ = attention_reference(spec.ir, *ref_leaves[:3], {"slopes": ref_leaves[3], "table": ref_leaves[4]},
                                 ref_leaves[5])
    out.square().sum().backward()
    for p, r in zip((q, k, v, slopes, table, sinks), ref_leaves):
        assert (p.grad.double() - r.grad).abs().max() <= TOL * max(1.0, r.grad.abs().max().item())


def test_integer_and_frozen_inputs_get_no_gradient(ops):
    op = ops("document_causal")
    doc = DOC.clone()
    q, k, v = (t.float().requires_grad_() for t in draw(op.ir, 1, 129, 129))
    op(q, k, v, doc_ids=doc).sum().backward()
    assert doc.grad is None and q.grad is not None
    op = ops("alibi_prefix_sinks")
    frozen = SLOPES.clone()  # does not require grad: no gradient is computed for it
    q, k, v = (t.float().requires_grad_() for t in draw(op.ir, 1, 9, 9))
    op(q, k, v, slopes=frozen, sinks=torch.randn(4)).sum().backward()
    assert frozen.grad is None and v.grad is not None


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_forward_and_backward(ops, backend):
    op = ops("alibi_prefix_sinks")

    def loss(q, k, v, slopes, sinks):
        out, lse = op(q, k, v, slopes=slopes, sinks=sinks, return_lse=True)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    for length in (24, 40):
        q, k, v = draw(op.ir, 2, length, length, torch.float32)
        args = [t.requires_grad_() for t in (q, k, v, SLOPES.clone(), torch.randn(4))]
        eager = [t.detach().clone().requires_grad_() for t in args]
        compiled(*args).backward()
        loss(*eager).backward()
        for a, e in zip(args, eager):
            torch.testing.assert_close(a.grad, e.grad, rtol=0, atol=1e-5)


def test_deterministic_option_and_its_limits(ops):
    op = ops("causal_gqa", deterministic=True)
    assert op.deterministic and backward_for(op, torch.float32, ()).dq_mode == "separate"
    q, k, v = draw(op.ir, 2, 33, 33, torch.float32)
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        op(*leaves).sum().backward()
        runs.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    cuda = attnc.compile(attnc.Attention(8, qk_dim=64, score_mod=mods.relative_bias(torch.randn(8, 255))),
                         target=Target("cuda", "sm_90a"), deterministic=True)
    assert backward_for(cuda, torch.bfloat16, ()).dq_mode == "separate"
    with pytest.raises(UnsupportedError, match="deterministic cuda backward kernel cannot compute the gradients "
                                               "of `table`"):
        backward_for(cuda, torch.bfloat16, ("table",))


# CUDA: built (not run) here. The sm_90a spec exercises every feature of the template: GQA, a causal mask (partial and
# full tiles), ALiBi (a captured tensor read once per (b, h): reduced in the block, one atomic), a relative bias (a
# read per element: atomics), sinks (the pre stage), both dQ modes. sm_80 builds take minutes on 2 cores with all
# of that: there a plain causal GQA spec checks the mma path (the features are the same TileLang constructs).

def cuda_backward(arch, dq_mode, dims=(64, 64), layout="bshd", features=True):
    if features:
        slopes, table = mods.alibi_slopes(8), torch.randn(8, 1023)
        alibi, relative_bias = mods.alibi(slopes), mods.relative_bias(table)
        spec = attnc.Attention(8, 2, qk_dim=dims[0], v_dim=dims[1], layout=layout, sinks=True, mask_mod=mods.causal(),
                               score_mod=lambda s, b, h, q, k: alibi(relative_bias(s, b, h, q, k), b, h, q, k))
        assert [t.name for t in spec.ir.inputs] == ["table", "slopes"]
    else:
        spec = attnc.Attention(8, 2, qk_dim=dims[0], v_dim=dims[1], layout=layout, mask_mod=mods.causal())
    target = Target("cuda", arch)
    grads = ("slopes", "table") if features else ()
    return Backward(spec.ir, target, "bfloat16", grads, dq_mode, backward_config(target.arch or "cpu", spec.ir))


def test_cuda_backward_builds_for_sm90a():
    atomic = cuda_backward("sm_90a", "atomic")
    main = atomic.stage("main").device_source()
    assert "wgmma" in main and "AtomicAdd((&(grad_slopes" in main and "grad_table" in main and "dQacc" in main
    assert "tma_load" in main and "AtomicAddx2((&(dK[" in main  # warp-specialised; GQA: dK summed by atomics
    writer = main[main.index("dq_full[0].wait("):main.index("dq_empty[0].arrive()")]  # the producer's dQ writer warp
    assert "attnc_dq_tile_add((&(((float*)dq_shared)[0])), (&(dQacc[" in writer and "(&(dQTickets[" in writer
    assert main.count("attnc_dq_tile_add(") == 2 and "dq_full[0].arrive()" in main  # consumers only hand over
    assert "Sinks" in atomic.stage("pre").device_source()
    atomic.stage("post").build()
    separate = cuda_backward("sm_90a", "separate", layout="bhsd", features=False)
    dq = separate.stage("dq").device_source()
    assert "wgmma" in dq and "AtomicAdd" not in dq
    main = separate.stage("main").device_source()
    assert "AtomicAdd" not in main and "dQacc" not in main  # deterministic: per-q-head dK, dV partials, no atomics
    assert "wait_wgmma<1>" in main  # P computed while V dO^T is still on the tensor cores


def test_sm90a_main_kernel_syncs_its_consumers_once_a_tile_and_keeps_lse_in_log2():
    """tilelang's barrier insertion synced both consumer warpgroups four times a tile (non-causal 349 -> 466 TFLOP/s
    on the H200 without them); the kernel places the one it needs: dS in shared memory before the dQ gemm."""
    plain = cuda_backward("sm_90a", "atomic", dims=(128, 128), features=False).stage("main")
    assert 'PASS_CONFIGS = {"tl.disable_thread_storage_sync": True}' in plain.source
    main = plain.device_source()
    loop = main[main.index("kv_ready[0].wait(0);"):main.index("dq_full[0].arrive();")]  # one consumer tile
    assert loop.count("__sync_thread_partial") == 1 and loop.index("__sync_thread_partial(1, 256)") < loop.index(
        "dsT_shared)[0])))")  # before the gemm reading dS from shared memory (the dQ gemm)
    assert "exp2f" in loop and "expf(" not in loop and "CUDART_INF_F" not in loop  # +inf lse rows: no test per element
    reduced = cuda_backward("sm_90a", "atomic").stage("main")  # ALiBi's slope gradient: a block reduce_sum
    assert "PASS_CONFIGS" not in reduced.source
    wide = cuda_backward("sm_90a", "atomic", dims=(256, 256), features=False).stage("main")  # P, dS via shared memory
    assert 'PASS_CONFIGS = {"tl.disable_thread_storage_sync": True}' in wide.source


def test_sm90a_main_kernel_starts_each_head_groups_longest_kv_tiles_first():
    """The blocks of a group of q heads (8 where the heads divide by 8) are interleaved kv tile by kv tile, so a
    causal mask's longest kv tiles start in the group's first wave rather than the last head's near the end of the
    grid (causal backward 431 -> 446 TFLOP/s on the H200); every (kv tile, head) is still one block."""
    for heads, group in ((8, 8), (12, 4), (6, 2), (3, 1)):
        spec = attnc.Attention(heads, mask_mod=mods.causal())
        source = Backward(spec.ir, Target("cuda", "sm_90a"), "bfloat16", (), "atomic",
                          backward_config("sm_90a", spec.ir)).stage("main").source
        assert f"T.Kernel(T.ceildiv(kv_len, 128) * {group}, {heads // group}, batch" in source
        kv_tile = source.split("kv_tile = ", 1)[1].split("\n", 1)[0]
        head = source.split("\n            h = ", 1)[1].split("\n", 1)[0]
        kv_tiles = 5
        blocks = [(eval(kv_tile, {"group_block": x}), eval(head, {"group_block": x, "group": y}))
                  for y in range(heads // group) for x in range(kv_tiles * group)]
        assert sorted(blocks) == [(t, h) for t in range(kv_tiles) for h in range(heads)]
        assert blocks[:group] == [(0, h) for h in range(group)]


def test_cuda_backward_applies_the_scale_to_dk_and_dq_once_not_to_each_ds_element():
    """dS = P (dP - Delta) with no scale and, on sm_90a, no P > 0 select (rows past the lengths are zero-filled):
    the scale multiplies dK before its store and dQ in its cast, post stage or dq stage (two instructions fewer per
    element: backward +8-9% on the H200)."""
    def lines(source, start):
        return [line.strip() for line in source.splitlines() if line.strip().startswith(start)]

    split = cuda_backward("sm_90a", "atomic", dims=(128, 128), features=False)
    scale = repr(split.ir.scale)
    assert lines(split.stage("main").source, "dsT_cast[j, i] =") == \
        ["dsT_cast[j, i] = sT[j, i] * (dpT[j, i] - delta_shared[t % 2, i])"]
    assert lines(split.stage("main").source, "dk[j, d] =") == [f"dk[j, d] = dk[j, d] * {scale}"]
    assert f"] * {scale}, \"bfloat16\")" in split.stage("post").source
    fused = cuda_backward("sm_90a", "atomic", dims=(128, 128)).stage("main").source  # ALiBi, relative bias grads
    assert set(lines(fused, "ds =")) == {"ds = p * (dpT[j, i] - delta_shared[t % 2, i])"}
    assert set(lines(fused, "dsT_cast[j, i] =")) == {"dsT_cast[j, i] = ds"}
    separate = cuda_backward("sm_90a", "separate", features=False)
    assert lines(separate.stage("dq").source, "dq[i, d] =") == [f"dq[i, d] = dq[i, d] * {separate.ir.scale!r}"]
    sm80 = cuda_backward("sm_80", "atomic", features=False).stage("main").source  # no TMA: the select stays
    assert lines(sm80, "ds =") == ["ds = T.if_then_else(p > 0.0, p * (dpT[j, i] - delta_shared[i]), 0.0)"]


def test_sm90a_main_kernel_stores_the_dq_tile_while_the_dk_gemm_runs():
    """The dQ gemm is issued before dK's and waited for alone, so the dQ tile's shared store overlaps dK on the tensor
    cores (+4% non-causal, +10% causal on the H200); the Q/dO slot is released only after dK, which reads Q."""
    target = Target("cuda", "sm_90a")
    relative = attnc.Attention(8, 2, qk_dim=128, v_dim=128, mask_mod=mods.causal(),
                               score_mod=mods.relative_bias(torch.randn(8, 1023)))  # its table's gradient
    for spec, grads in ((attnc.Attention(8, 2, qk_dim=128, v_dim=128, mask_mod=mods.causal()), ()),
                        (relative, ("table",))):
        backward = Backward(spec.ir, target, "bfloat16", grads, "atomic", backward_config("sm_90a", spec.ir))
        source = backward.stage("main").source
        loop = source[source.index("T.barrier_wait(kv_ready, 0)"):]
        order = [loop.index(step) for step in (
            "T.sync_threads(1, 256)",
            "T.wgmma_gemm(dsT_shared[t % 2, :, :], K_shared, dq,",
            "T.wgmma_gemm(dsT_cast, q_shared[t % 2, :, :], dk,",
            "T.wait_wgmma(1)\n                    T.warpgroup_fence_operand(dq,",
            "dq_shared[((d // 8) * 64 + i) * 8 + d % 8] = dq[i, d]",
            "T.barrier_arrive(dq_full)",
            "T.wait_wgmma(0)\n                    T.warpgroup_fence_operand(dv,",
            "T.barrier_arrive(q_empty[t % 2])")]
        assert order == sorted(order), grads
        assert loop.count("T.wgmma_gemm(") == 5
    sm80 = cuda_backward("sm_80", "atomic", dims=(128, 128), features=False).stage("main").source
    assert sm80.index("dk, policy=") < sm80.index("K_shared, dq,")  # no writer warp: dK first, as before


def test_dq_accumulator_is_tile_by_tile_where_tma_adds_it():
    """With TMA reduce-add the main kernel adds each dQ tile with one bulk reduce-add to a (batch, heads, q tiles,
    block_m * qk_dim) accumulator, storing the tile in column groups of 8 rows; 'post' reads that layout and the
    runtime allocates it. Without TMA (sm_80) every stage keeps q's layout."""
    def dqacc_params(backward):
        return [re.search(r"dQacc: T\.Tensor\((\(.*\)), \"float32\"\)", backward.stage(stage).source).group(1)
                for stage in ("main", "post")]
    q = torch.empty(2, 8, 100, 128)  # bhsd
    tma = cuda_backward("sm_90a", "atomic", dims=(128, 128), layout="bhsd", features=False)
    assert tma.dq_tma_reduce and tma.config.block_m == 64
    assert dqacc_params(tma) == ["(batch, 8, dq_tiles, 8192)"] * 2
    assert tma.dq_acc_shape(q) == (2, 8, 2, 8192)
    bshd = cuda_backward("sm_90a", "atomic", dims=(128, 128), layout="bshd", features=False)
    assert bshd.dq_acc_shape(q.transpose(1, 2)) == (2, 8, 2, 8192)
    main = tma.stage("main").source
    assert "dq_shared[((d // 8) * 64 + i) * 8 + d % 8] = dq[i, d]" in main
    post = tma.stage("post").source
    assert "T.cast(dQacc[b, h, q_tile, ((d // 8) * 64 + i) * 8 + d % 8] * " in post
    writer = tma.stage("main").device_source()
    writer = writer[writer.index("dq_full[0].wait("):writer.index("dq_empty[0].arrive()")]
    assert "attnc_dq_tile_add((&(((float*)dq_shared)[0])), (&(dQacc[" in writer and ", 32768);" in writer
    sm80 = cuda_backward("sm_80", "atomic", dims=(128, 128), layout="bhsd", features=False)
    assert not sm80.dq_tma_reduce
    assert dqacc_params(sm80) == ["(batch, 8, q_len, 128)"] * 2
    assert sm80.dq_acc_shape(q) == (2, 8, 100, 128)


def test_sm90a_main_kernel_tests_the_mask_only_on_partial_tiles():
    """As the forward: P of every element first, the causal predicate only on the diagonal (and a ragged last kv)
    tiles, whose test reads the tile map's bounds from registers (inlined, they were re-evaluated per element)."""
    source = cuda_backward("sm_90a", "atomic", dims=(128, 128), features=False).stage("main").source
    consumer = source[source.index("T.barrier_wait(kv_ready, 0)"):]
    every, partial = consumer.split("if T.Or(T.Or(q_tile < full_lo, q_tile >= full_hi), kv_tile * 128 + 128 > kv_len):")
    assert "T.exp2(" in every and "kv_idx <=" not in every and "kv_len" not in every
    assert "kv_idx <= (q_idx" in partial.split("pT_cast[j, i]")[0]
    assert 'full_lo = T.alloc_var("int32")' in source
    fused = cuda_backward("sm_90a", "atomic", dims=(128, 128)).stage("main").source  # ALiBi, relative bias grads
    assert fused.count("if T.Or(T.Or(q_tile < full_lo, q_tile >= full_hi), kv_tile * 128 + 128 > kv_len):") == 1
    assert fused.count("kv_idx <= (q_idx") == 1  # in the partial tiles' loop only



def test_sm90a_full_tiles_test_the_bounds_only_when_the_score_reads_a_tensor():
    """A mask that reads a tensor (document) is evaluated on partial tiles only, so full tiles need no bounds test:
    their loop is unguarded (vectorised: 166 -> 169 TFLOP/s for the document backward on the H200). A score that reads
    a tensor keeps the test on every tile (a row past q_len would read past the tensor)."""
    target = Target("cuda", "sm_90a")

    def full_tile_loop(spec):
        backward = Backward(spec.ir, target, "bfloat16", (), "atomic", backward_config("sm_90a", spec.ir))
        source = backward.stage("main").source
        consumer = source[source.index("T.barrier_wait(kv_ready, 0)"):]
        return consumer[:consumer.index("if T.Or(")]

    doc_ids = torch.tensor([0] * 300 + [1] * 700, dtype=torch.int32)
    document = attnc.Attention(4, qk_dim=128, mask_mod=mods.document(doc_ids) & mods.causal())
    loop = full_tile_loop(document)
    assert "sT[j, i] = T.exp2(" in loop and "q_len" not in loop and "doc_ids" not in loop
    guarded = "T.if_then_else(T.And(q_idx < q_len, kv_idx < kv_len), T.exp2("
    bias = torch.randn(4, 1000, 1000)
    per_element = attnc.Attention(4, qk_dim=128, mask_mod=mods.causal(),
                                  score_mod=lambda s, b, h, q, kv: s + bias[h, q, kv])
    assert guarded in full_tile_loop(per_element)
    row = torch.randn(4, 1000)  # a q row's value, cached as 0 past q_len (where a division would make a NaN): tested
    per_row = attnc.Attention(4, qk_dim=128, mask_mod=mods.causal(), score_mod=lambda s, b, h, q, kv: s + row[h, q])
    assert guarded in full_tile_loop(per_row)
    column = torch.randn(4, 1000)  # cached per kv row (a full tile's rows are all in range): no test
    per_column = attnc.Attention(4, qk_dim=128, mask_mod=mods.causal(),
                                 score_mod=lambda s, b, h, q, kv: s + column[h, kv])
    loop = full_tile_loop(per_column)
    assert "T.exp2(" in loop and "q_len" not in loop and "in_column" not in loop


def test_sm90a_partial_tiles_test_the_kv_bound_only_on_the_ragged_tile_and_q_len_only_while_the_mask_reads():
    """Partial tiles test kv_idx < kv_len only on the ragged last kv tile, and q_idx < q_len only while the mask
    still reads a tensor in the loop: a hoisted read (document) comes from caches zero-filled past q_len, and those
    rows' P is already 0 (lse +inf). Both tests on every partial tile cost the document's main kernel 14%."""
    target = Target("cuda", "sm_90a")

    def partial_tiles(spec):
        backward = Backward(spec.ir, target, "bfloat16", (), "atomic", backward_config("sm_90a", spec.ir))
        source = backward.stage("main").source
        consumer = source[source.index("T.barrier_wait(kv_ready, 0)"):]
        partial = consumer[consumer.index("if T.Or("):]
        ragged, rest = partial[:partial.index("pT_cast[j, i]")].split("else:")
        return ragged, rest

    doc_ids = torch.tensor([0] * 300 + [1] * 700, dtype=torch.int32)
    document = attnc.Attention(4, qk_dim=128, mask_mod=mods.document(doc_ids) & mods.causal())
    ragged, rest = partial_tiles(document)
    assert "if kv_tile * 128 + 128 > kv_len:" in ragged and "kv_idx < kv_len" in ragged and "q_idx < q_len" not in ragged
    assert "kv_idx <= (q_idx" in rest and "row_cache" in rest
    assert "kv_idx < kv_len" not in rest and "q_idx < q_len" not in rest
    allowed = torch.randint(0, 2, (1000, 1000))  # read per element, in the loop: rows past q_len must not read it
    pairwise = attnc.Attention(4, qk_dim=128, mask_mod=lambda b, h, q, kv: allowed[q, kv] > 0)
    ragged, rest = partial_tiles(pairwise)
    assert "T.And(T.And(q_idx < q_len, kv_idx < kv_len), " in ragged
    assert "q_idx < q_len" in rest and "kv_idx < kv_len" not in rest and "in_allowed[q_idx, kv_idx]" in rest


def test_sm90a_main_kernel_reads_hoisted_tensor_values_outside_the_element_loop():
    """As the forward (`codegen.hoist`): a document mask's doc_ids[q_idx] lands in a ring slot the producer fills
    beside the tile's lse, doc_ids[kv_idx] in a register vector filled once per block (its kv tile is fixed), ALiBi's
    slopes[h] in a variable; the consumers' element loops read neither tensor. The dQ pass and sm_80 read in place."""
    doc_ids = torch.tensor([0] * 300 + [1] * 700, dtype=torch.int32)
    document = attnc.Attention(4, qk_dim=128, mask_mod=mods.document(doc_ids) & mods.causal())
    backward = Backward(document.ir, Target("cuda", "sm_90a"), "bfloat16", (), "atomic",
                        backward_config("sm_90a", document.ir))
    source = backward.stage("main").source
    producer, consumer = source.split("T.set_max_nreg(240, 1)")
    slot = f"[t % {backward.config.stages}, i]"
    ring = re.search(r"(row_cache\d+)_ring" + re.escape(slot) + r" = T.if_then_else\(q_idx < q_len, in_doc_ids\[q_idx\]",
                     producer)
    column = re.search(r"(column_cache\d+)\[j\] = T.if_then_else\(kv_idx < kv_len, in_doc_ids\[kv_idx\]", consumer)
    assert ring and column
    loops = consumer[consumer.index("T.barrier_wait(kv_ready, 0)"):]
    assert "in_doc_ids" not in loops and f"{ring[1]}_ring{slot} == {column[1]}[j]" in loops
    backward.stage("main").build()

    slopes = mods.alibi_slopes(4)
    alibi = attnc.Attention(4, qk_dim=128, mask_mod=mods.causal(), score_mod=mods.alibi(slopes))
    main = Backward(alibi.ir, Target("cuda", "sm_90a"), "bfloat16", ("slopes",), "atomic",
                    backward_config("sm_90a", alibi.ir)).stage("main").source
    loops = main[main.index("T.barrier_wait(kv_ready, 0)"):]
    assert re.search(r"block_cache\d+ = in_slopes\[h\]", main) and "in_slopes" not in loops

    separate = Backward(document.ir, Target("cuda", "sm_90a"), "bfloat16", (), "separate",
                        backward_config("sm_90a", document.ir))
    assert "cache" not in separate.stage("dq").source and "in_doc_ids[kv_idx]" in separate.stage("dq").source
    sm80 = Backward(document.ir, Target("cuda", "sm_80"), "bfloat16", (), "atomic", backward_config("sm_80", document.ir))
    assert "cache" not in sm80.stage("main").source

def test_sm90a_main_kernel_sums_a_relative_bias_gradient_per_diagonal():
    """One fp32 atomic per score element into the table ran the relative-bias backward at 116 TFLOP/s on the H200
    (per-diagonal sums by shared-memory atomics in the element loop: 89). After the consumers' barrier, each thread
    sums one diagonal of the tile's dS from shared memory and adds it to the table with one atomic."""
    spec = attnc.Attention(8, 2, qk_dim=128, mask_mod=mods.causal(), score_mod=mods.relative_bias(torch.randn(8, 1023)))
    target = Target("cuda", "sm_90a")
    backward = Backward(spec.ir, target, "bfloat16", ("table",), "atomic", backward_config("sm_90a", spec.ir))
    main = backward.stage("main").device_source()
    loop = main[main.index("kv_ready[0].wait(0);"):main.index("dq_full[0].arrive();")]  # one consumer tile
    assert loop.count("AtomicAdd((&(grad_table[") == 1 and "AtomicAdd((&(((float*)" not in loop
    sums = loop[loop.index("__sync_thread_partial(1, 256)"):loop.index("AtomicAdd((&(grad_table[")]
    assert "dsT_shared)[" in sums and "g0_diagonal[0] = (g0_diagonal[0] + " in sums
    reduced = cuda_backward("sm_90a", "atomic", dims=(128, 128)).stage("main").source  # with ALiBi: tilelang's barriers
    assert "_diagonal" not in reduced and "T.atomic_add(grad_table[h, " in reduced
    relative, softcap = mods.relative_bias(torch.randn(8, 1023)), mods.softcap(20.0)
    capped = attnc.Attention(8, 2, qk_dim=128, mask_mod=mods.causal(),
                             score_mod=lambda s, b, h, q, k: softcap(relative(s, b, h, q, k), b, h, q, k))
    source = Backward(capped.ir, target, "bfloat16", ("table",), "atomic",
                      backward_config("sm_90a", capped.ir)).stage("main").source
    assert "_diagonal" not in source and "T.atomic_add(grad_table[h, " in source  # its gradient is not dS


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
def test_gqa_dk_dv_partials_are_summed_over_each_group(layout):
    spec = attnc.Attention(8, 2, qk_dim=16, layout=layout, mask_mod=mods.causal())
    backward = Backward(spec.ir, Target("cuda", "sm_80"), "bfloat16", (), "separate",
                        backward_config("sm_80", spec.ir))
    k = torch.zeros((2, 5, 2, 16) if layout == "bshd" else (2, 2, 5, 16), dtype=torch.bfloat16)
    partial, _ = backward._dkv_buffers(k, k)
    assert partial.dtype == torch.float32 and partial.shape[2 if layout == "bshd" else 1] == 8
    partial.copy_(torch.randn(partial.shape))
    heads = 2 if layout == "bshd" else 1  # q heads 4j .. 4j + 3 share kv head j
    want = torch.stack([partial.narrow(heads, 4 * j, 4).sum(heads) for j in range(2)], dim=heads)
    torch.testing.assert_close(backward._finish_dkv(partial, k).float(), want, atol=0, rtol=1e-2)


def test_cuda_backward_builds_for_sm80():
    main = cuda_backward("sm_80", "atomic", features=False).stage("main").device_source()
    assert "wgmma" not in main and "AtomicAdd" in main and "mma" in main


def test_cuda_backward_renders_every_head_dim():
    """Head dims 64, 128, 256, 192/128 render to valid Python for every stage (building them all: GPU CI)."""
    for dims in [(64, 64), (128, 128), (256, 256), (192, 128)]:
        for mode in ("atomic", "separate"):
            backward = cuda_backward("sm_90a", mode, dims)
            for stage in backward.stage_names():
                compile(backward.stage(stage).source, f"<{dims} {mode} {stage}>", "exec")


def test_train_tiny_runs_and_agrees_with_sdpa():
    spec = importlib.util.spec_from_file_location("attnc_train_tiny", EXAMPLES / "train_tiny.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        result = module.main(["--steps", "3", "--target", "cpu"])
    finally:
        torch.set_num_threads(threads)
    assert result["max_diff"] < 1e-4 and result["max_same_weights_grad_diff"] < 1e-4
    _, op = module.attnc_attention(Target("cuda", "sm_90a"))  # its head dim is one the CUDA kernels serve
    assert op.target.kind == "cuda" and op.ir.qk_dim == 64


# GPU (marker `gpu`): the same checks in bf16/fp16 by DESIGN.md's rule, head dims 64, 128, 256, 192/128, and
# determinism.

def check_cuda(op, q_len, kv_len, dtype, batch=2):
    ir = op.ir
    q, k, v = draw(ir, batch, q_len, kv_len, torch.float64)
    inputs = float_inputs(op)
    sinks = torch.randn(ir.q_heads, dtype=torch.float64) if ir.sinks else None
    out_shape = (batch, q_len, ir.q_heads, ir.v_dim) if ir.layout == "bshd" else (batch, ir.q_heads, q_len, ir.v_dim)
    d_out, d_lse = torch.randn(out_shape, dtype=torch.float64), torch.randn(batch, ir.q_heads, q_len, dtype=torch.float64)
    low = [t.to(dtype).double() for t in (q, k, v)]  # the values the kernel sees
    want, _ = gradients(op, *low, inputs, sinks, d_out, d_lse, torch.float64, reference=True)
    torch_low, _ = gradients(op, *low, inputs, sinks, d_out, d_lse, dtype, reference=True)
    cuda = lambda t: t.cuda() if isinstance(t, torch.Tensor) else t  # noqa: E731
    got, _ = gradients(op, *(cuda(t.to(dtype)) for t in low), {n: cuda(t) for n, t in inputs.items()},
                       cuda(sinks), cuda(d_out), cuda(d_lse), dtype)
    got = {n: g.cpu() for n, g in got.items()}

    def rule(name):  # DESIGN.md's rule, torch's error floored at one ulp of the largest gradient: the kernel rounds
        # dS before its gemm and the gradient on output, up to an ulp at 1x1 (1.05 ulp seen), where torch's error
        # over a few elements can be a lucky fraction of one (sixteenth session: at half an ulp, 1 of 60 seeded
        # draws failed, 1x1 at head dim 128 in bf16)
        ulp = torch.finfo(dtype).eps * want[name].abs().max().item()
        return 2 * max((torch_low[name].double() - want[name]).abs().max().item(), ulp) + 1e-5

    assert_close(got, want, rule)


GPU_WORKERS = min(16, os.cpu_count() or 1)
GPU_DTYPES = [torch.bfloat16, torch.float16]
GPU_HEAD_DIMS = [(64, 64), (128, 128), (256, 256), (192, 128)]


def head_dim_spec(qk_dim, v_dim):
    return attnc.Attention(8, 2, qk_dim=qk_dim, v_dim=v_dim, mask_mod=mods.causal(), sinks=True,
                           score_mod=mods.alibi(mods.alibi_slopes(8)))


# Wide head dims without a tensor gradient: the sm_90a main kernel's element loop without the fused score derivative
# (head_dim_spec's learned ALiBi slopes take the fused one).
WIDE_HEAD_DIMS = [(256, 256), (192, 128)]


def wide_spec(qk_dim, v_dim):
    return attnc.Attention(8, 8, qk_dim=qk_dim, v_dim=v_dim, mask_mod=mods.causal(), sinks=True)


def test_the_first_block_to_reach_a_dq_tile_stores_it_and_no_zero_fill_is_needed():
    """With dq_first_store (the sm_90a default with TMA reduce-add), 'pre' zeroes a ticket per dQ tile; the writer
    warp takes a ticket, stores the tile when first (a bulk copy, then the ticket's top bit with release) or waits
    for that bit and reduce-adds; 'post' writes zero where the ticket is 0. Without it, one reduce-add per tile into
    a zero-filled accumulator, and no tickets."""
    first = cuda_backward("sm_90a", "atomic", dims=(128, 128), features=False)
    assert first.dq_first_store
    pre, post = first.stage("pre").source, first.stage("post").source
    assert "dQTickets[b, h, q_tile + z] = 0" in pre
    assert "T.if_then_else(dQTickets[b, h, q_tile] != 0, T.cast(dQacc[" in post
    main = first.stage("main").device_source()
    function = main[main.index("void attnc_dq_tile_add("):main.index("extern \"C\"")]
    store, add = function.index("cp.async.bulk.global.shared::cta"), function.index("cp.reduce.async.bulk")
    assert function.index("atom.acquire.gpu") < store < function.index("red.release.gpu.global.or.b32") < add
    assert function.index("cp.async.bulk.wait_group 0;") < function.index("red.release")  # landed, then released
    assert "tma_store_add" not in main
    fill = Backward(first.ir, first.target, "bfloat16", (), "atomic", first.config, dq_first_store=False)
    assert "dQTickets" not in fill.stage("pre").source + fill.stage("post").source + fill.stage("main").source
    assert "tl::tma_store_add((&(((float*)dq_shared)[0])), (&(dQacc[" in fill.stage("main").device_source()
    with pytest.raises(UnsupportedError, match=r"dq_first_store=True needs dQ added by TMA reduce-add"):
        Backward(first.ir, Target("cuda", "sm_80"), "bfloat16", (), "atomic", first.config, dq_first_store=True)


ATOMIC_SPEC = attnc.Attention(8, 2, qk_dim=128, mask_mod=mods.causal())


def first_rows_only(b, h, q_idx, kv_idx):
    return q_idx < 40


# Every kv tile visits the first q tile alone (block_m 64): no block reaches the dQ tiles of the later ones.
UNREACHED_SPEC = attnc.Attention(8, 2, qk_dim=128, mask_mod=first_rows_only)

# The relative bias alone: its table's gradient summed per diagonal (head dim 128: warps split the kv rows; 256: both
# dimensions, dS through shared memory).
RELATIVE_HEAD_DIMS = [(128, 128), (256, 256)]


def relative_spec(qk_dim, v_dim):
    return attnc.Attention(8, 2, qk_dim=qk_dim, v_dim=v_dim, mask_mod=mods.causal(),
                           score_mod=mods.relative_bias(torch.randn(8, 1023) * 0.5))


@pytest.fixture(scope="module")
def gpu_ops():
    """Every op the GPU tests run, with its forward and backward kernels built in parallel first (16 cores on the
    GPU machine): serial builds took most of the GPU session."""
    ops = {("dims", dims): attnc.compile(head_dim_spec(*dims), target="cuda") for dims in GPU_HEAD_DIMS}
    ops.update({("wide", dims): attnc.compile(wide_spec(*dims), target="cuda") for dims in WIDE_HEAD_DIMS})
    ops.update({("relative", dims): attnc.compile(relative_spec(*dims), target="cuda") for dims in RELATIVE_HEAD_DIMS})
    ops.update({("variant", name): attnc.compile(SPECS[name][0](64, 64), target="cuda") for name in SPECS})
    ops["fast"] = attnc.compile(ATOMIC_SPEC, target="cuda")
    ops["unreached"] = attnc.compile(UNREACHED_SPEC, target="cuda")
    ops["exact"] = attnc.compile(ATOMIC_SPEC, target="cuda", deterministic=True)
    ops["exact_relative"] = attnc.compile(relative_spec(64, 64), target="cuda", deterministic=True)
    forwards, backwards = {}, []
    for key, op in ops.items():
        differentiable = {g.name for g in read_gradients(op.ir)}
        grads = () if op.deterministic else tuple(t.name for t in op.ir.inputs if t.name in differentiable)
        for dtype in ([torch.bfloat16] if key in ("fast", "unreached", "exact", "exact_relative") else GPU_DTYPES):
            config = op.config_for(dtype, 2, 129, 129)[0]
            forwards[(op.ir.key, dtype)] = functools.partial(Kernel.render, "fwd", op.ir, config,
                                                             KERNEL_DTYPES[dtype], op.target)
            backwards += backward_for(op, dtype, grads).build_jobs()
    errors = [e for e in build_in_parallel([*forwards.values(), *backwards], GPU_WORKERS) if e]
    assert not errors, errors[:3]
    return ops


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("dims", GPU_HEAD_DIMS)
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (129, 129), (17, 300), (300, 17)])
def test_gpu_head_dims(gpu_ops, dtype, dims, q_len, kv_len):
    check_cuda(gpu_ops[("dims", dims)], q_len, kv_len, dtype)


# What each of these kernels' main source must show: the wide head dims place their own barriers; the relative
# bias's table gradient is summed per diagonal.
OWN_PATHS = {"wide": ((), "PASS_CONFIGS"), "relative": (("table",), "_diagonal[z]")}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("kind, dims", [("wide", d) for d in WIDE_HEAD_DIMS] +
                         [("relative", d) for d in RELATIVE_HEAD_DIMS])
@pytest.mark.parametrize("q_len, kv_len", [(129, 129), (17, 300), (300, 17)])
def test_gpu_wide_head_dims_and_the_relative_bias(gpu_ops, dtype, kind, dims, q_len, kv_len):
    op = gpu_ops[(kind, dims)]
    grads, shown = OWN_PATHS[kind]
    assert shown in backward_for(op, dtype, grads).stage("main").source
    check_cuda(op, q_len, kv_len, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("name", sorted(SPECS))
def test_gpu_variants(gpu_ops, name, dtype):
    op = gpu_ops[("variant", name)]
    lengths = [(129, 129)] if name in ("document_causal", "input_bias_masked_rows") else [(129, 129), (17, 129)]
    for q_len, kv_len in lengths:
        check_cuda(op, q_len, kv_len, dtype)


@pytest.mark.gpu
def test_gpu_atomic_and_separate_dq_agree_and_deterministic_mode_repeats_bits(gpu_ops):
    fast, exact = gpu_ops["fast"], gpu_ops["exact"]
    q, k, v = (t.cuda() for t in draw(ATOMIC_SPEC.ir, 2, 1000, 1000, torch.bfloat16))
    grads = []
    for op in (fast, exact, exact):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        op(*leaves).float().square().sum().backward()
        grads.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(grads[1], grads[2]))
    for a, b in zip(grads[0], grads[1]):
        assert (a.float() - b.float()).abs().max() <= 2e-2 * b.float().abs().max()
    assert math.isfinite(float(grads[0][0].float().sum()))


@pytest.mark.gpu
def test_gpu_post_writes_zero_where_no_block_reached_a_dq_tile(gpu_ops):
    """'post' reads a dQ tile only where its ticket is nonzero: the accumulator is not zero-filled."""
    backward = backward_for(gpu_ops["fast"], torch.bfloat16, ())
    assert backward.dq_first_store
    dq = torch.empty(2, 100, 8, 128, dtype=torch.bfloat16, device="cuda")  # bshd: two q tiles, the second ragged
    acc = torch.full(backward.dq_acc_shape(dq), float("nan"), device="cuda")
    acc[:, :, 1] = 3.0
    tickets = torch.zeros(acc.shape[:3], dtype=torch.int32, device="cuda")
    tickets[:, :, 1] = 5
    backward.stage("post")(acc, tickets, dq)
    assert (dq[:, :64] == 0).all()
    assert (dq[:, 64:] == torch.tensor(3.0 * 128 ** -0.5).to(torch.bfloat16)).all()


@pytest.mark.gpu
def test_gpu_gradients_where_no_block_reaches_some_dq_tiles(gpu_ops):
    """Rows past 40 attend nothing: their dQ tiles get no visit and their gradient is zero, though the memory the
    accumulator is allocated from held NaN."""
    op = gpu_ops["unreached"]
    junk = torch.full((1 << 28,), float("nan"), device="cuda")
    del junk
    check_cuda(op, 300, 300, torch.bfloat16)


@pytest.mark.gpu
def test_gpu_deterministic_mode_computes_a_learned_bias_gradient_in_torch_and_repeats_bits(gpu_ops):
    """The table's gradient comes from `tensor_gradients` (the kernel would add it with atomics): it matches the
    reference by the numerics rule, and two runs give the same bits for every gradient."""
    op = gpu_ops["exact_relative"]
    check_cuda(op, 300, 300, torch.bfloat16)
    q, k, v = (t.cuda() for t in draw(op.ir, 2, 300, 300, torch.bfloat16))
    table = op.spec.captured_tensors()["table"].cuda()
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, table)]
        op(*leaves[:3], table=leaves[3]).float().square().sum().backward()
        runs.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))
