"""The backward with a run-time block mask (masks that read tensors): its kv-side lists against brute force,
gradients against the float64 reference's autograd (CPU: ``max |g - g_ref| <= 1e-4 * max(1, max |g_ref|)``, as in
test_backward.py), deterministic mode, torch.compile, and the CUDA stages built (not run) for sm_90a and sm_80.
GPU (marker `gpu`): the same gradients in bf16/fp16 by DESIGN.md's rule."""

import os

import pytest
import torch

import attnc
import attnc.mods as mods
from attnc.codegen.build import Target
from attnc.runtime import autograd
from attnc.runtime.autograd import Backward, backward_for
from attnc.runtime.kernels import build_in_parallel
from attnc.runtime.blockmask import EMPTY, reference_tile_kinds
from attnc.runtime.reference import attention_reference
from attnc.schedules.heuristics import backward_config

TOL = 1e-4


def random_docs(length: int, generator: torch.Generator, max_doc: int) -> torch.Tensor:
    """Ids (int32) of consecutive documents of random lengths in [1, max_doc]."""
    sizes = torch.randint(1, max_doc + 1, (length,), generator=generator)
    return torch.repeat_interleave(torch.arange(length), sizes)[:length].to(torch.int32)


GEN = torch.Generator().manual_seed(11)
DOCS = random_docs(1100, GEN, 40)
BATCH_DOCS = torch.stack([random_docs(1100, GEN, 300) for _ in range(3)])
DECLARED = attnc.Input("docs", (200,), torch.int32)
SLOPES = mods.alibi_slopes(4)


def per_batch_causal(b, h, q_idx, kv_idx):
    return (BATCH_DOCS[b, q_idx] == BATCH_DOCS[b, kv_idx]) & (q_idx >= kv_idx)


def per_head(b, h, q_idx, kv_idx):
    return (DOCS[q_idx] == DOCS[kv_idx]) | (h == 1)


def declared_rows_masked(b, h, q_idx, kv_idx):  # the rows of every third document attend to nothing
    return (DECLARED[q_idx] == DECLARED[kv_idx]) & (DECLARED[q_idx] % 3 != 0)


SPECS = {
    "document_causal": dict(mask_mod=mods.document(DOCS) & mods.causal()),
    "per_batch_causal_gqa": dict(kv_heads=2, mask_mod=per_batch_causal),
    "per_head_gqa_bhsd_sinks": dict(kv_heads=2, layout="bhsd", mask_mod=per_head, sinks=True),
    "declared_rows_masked_alibi": dict(mask_mod=declared_rows_masked, inputs=[DECLARED],
                                       score_mod=mods.alibi(SLOPES)),
}
LENGTHS = [(1, 1), (45, 45), (70, 45), (45, 70), (129, 33)]  # cpu tiles: 16 q rows x 32 kv rows
OPS = {}


def op_for(name: str, deterministic: bool = False) -> attnc.CompiledAttention:
    if (name, deterministic) not in OPS:
        OPS[name, deterministic] = attnc.compile(attnc.Attention(4, qk_dim=16, v_dim=8, **SPECS[name]),
                                                 target="cpu", deterministic=deterministic)
    return OPS[name, deterministic]


def mask_inputs(name: str, seed: int = 0) -> dict:
    if name != "declared_rows_masked_alibi":
        return {}
    return {"docs": random_docs(200, torch.Generator().manual_seed(seed), 20)}


@pytest.mark.parametrize("name", sorted(SPECS))
def test_the_kv_side_lists_match_brute_force(name):
    op = op_for(name)
    backward = backward_for(op, torch.float32, ())
    assert backward.mask_stages() == ("main",)
    for q_len, kv_len in LENGTHS + [(300, 300)]:
        if name == "declared_rows_masked_alibi" and max(q_len, kv_len) > 200:
            continue
        batch = 3
        inputs = mask_inputs(name)
        tensors = {**op.spec.captured_tensors(), **inputs}
        extras = [tensors[t.name] for t in op.ir.inputs]
        tile_kind, q_count, q_list = backward.block_mask_tensors("main", extras, batch, q_len, kv_len,
                                                                 torch.device("cpu"))
        want = reference_tile_kinds(op.ir, op.block_mask_layout, batch, q_len, kv_len, tensors,
                                    backward.config.block_m, backward.config.block_n)
        assert torch.equal(tile_kind, want), (name, q_len, kv_len)
        listed = (want != EMPTY).transpose(-1, -2).flatten(0, 1)  # (planes, kv tiles, q tiles)
        assert torch.equal(q_count.flatten(0, 1), listed.sum(-1).int())
        assert q_list.shape == want.transpose(-1, -2).shape and q_list.is_contiguous()
        for plane in range(listed.shape[0]):
            for kv_tile in range(listed.shape[1]):
                row = listed[plane, kv_tile]
                got = q_list.flatten(0, 1)[plane, kv_tile, :int(row.sum())]
                assert torch.equal(got, torch.nonzero(row).flatten().int())  # ascending


def draw(ir, batch, q_len, kv_len):
    def one(seq, heads, dim):
        shape = (batch, seq, heads, dim) if ir.layout == "bshd" else (batch, heads, seq, dim)
        return torch.randn(shape, dtype=torch.float64)

    return one(q_len, ir.q_heads, ir.qk_dim), one(kv_len, ir.kv_heads, ir.qk_dim), one(kv_len, ir.kv_heads, ir.v_dim)


def gradients(op, q, k, v, inputs, sinks, d_out, d_lse, dtype, reference):
    """Gradients of <out, d_out> + <lse, d_lse> (finite lse only) by q, k, v, the float captured tensors, sinks."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    floats = {n: t.detach().to(dtype if reference else torch.float32).requires_grad_()
              for n, t in op.spec.captured_tensors().items() if t.is_floating_point()}
    sink = sinks.detach().to(dtype if reference else torch.float32).requires_grad_() if sinks is not None else None
    if reference:
        out, lse = attention_reference(op.ir, *leaves, {**op.spec.captured_tensors(), **inputs, **floats}, sink,
                                       dtype=dtype)
    else:
        out, lse = op(*leaves, sinks=sink, return_lse=True, **inputs, **floats)
    finite = torch.isfinite(lse.detach())
    ((out * d_out.to(out.dtype)).sum() + torch.where(finite, lse, 0).mul(d_lse.to(lse.dtype)).sum()).backward()
    named = {"q": leaves[0], "k": leaves[1], "v": leaves[2], **floats, **({"sinks": sink} if sinks is not None else {})}
    return {n: t.grad for n, t in named.items()}, out.detach()


def check_cpu(op, batch, q_len, kv_len, inputs):
    ir = op.ir
    q, k, v = draw(ir, batch, q_len, kv_len)
    sinks = torch.randn(ir.q_heads, dtype=torch.float64) if ir.sinks else None
    out_shape = (batch, q_len, ir.q_heads, ir.v_dim) if ir.layout == "bshd" else (batch, ir.q_heads, q_len, ir.v_dim)
    d_out, d_lse = torch.randn(out_shape, dtype=torch.float64), torch.randn(batch, ir.q_heads, q_len, dtype=torch.float64)
    want, ref_out = gradients(op, q, k, v, inputs, sinks, d_out, d_lse, torch.float64, True)
    got, out = gradients(op, q, k, v, inputs, sinks, d_out, d_lse, torch.float32, False)
    for name, ref in want.items():
        assert got[name] is not None and not got[name].isnan().any(), name
        err = (got[name].double() - ref).abs().max().item() if ref.numel() else 0.0
        assert err <= TOL * max(1.0, ref.abs().max().item() if ref.numel() else 0.0), (name, err)
    return got, ref_out


@pytest.mark.parametrize("name", sorted(SPECS))
def test_gradients_with_a_block_mask_match_the_reference(name):
    op = op_for(name)
    for q_len, kv_len in LENGTHS:
        check_cpu(op, 3, q_len, kv_len, mask_inputs(name, seed=q_len))


def test_fully_masked_rows_get_zero_gradients():
    op = op_for("declared_rows_masked_alibi")
    inputs = mask_inputs("declared_rows_masked_alibi", seed=3)
    got, ref_out = check_cpu(op, 2, 129, 129, inputs)
    masked = inputs["docs"][:129] % 3 == 0
    assert masked.any() and (got["q"][:, masked] == 0).all() and (ref_out[:, masked] == 0).all()


def test_the_backward_visits_only_the_listed_tiles(monkeypatch):
    """With every tile classified empty, no tile is visited: every gradient of q, k, v is zero."""
    op = op_for("document_causal")
    q, k, v = (t.float().requires_grad_() for t in draw(op.ir, 1, 45, 45))
    out = op(q, k, v)
    monkeypatch.setattr(autograd, "classify", lambda kernel, inputs, layout, batch, heads, q_len, kv_len, device:
                        torch.zeros((1, 1, -(-q_len // kernel.block_m), -(-kv_len // kernel.block_n)), dtype=torch.int8))
    out.sum().backward()
    assert out.abs().sum() > 0 and all((t.grad == 0).all() for t in (q, k, v))


@pytest.mark.parametrize("name", ["document_causal", "declared_rows_masked_alibi"])
def test_the_backward_reuses_the_lists_of_a_block_mask_made_ahead(monkeypatch, name):
    """As FlexAttention's: a block mask made by op.block_mask holds the backward's kv-side lists, and the backward
    of a call with it classifies nothing; its gradients are those of a call that classifies per call."""
    op, inputs = op_for(name), mask_inputs(name, seed=5)
    made = op.block_mask(70, 45, batch=2, **inputs)
    backward = backward_for(op, torch.float32, (), config=made.backward_config)
    assert made.backward_config == op.backward_config_for(torch.float32, 2, 70, 45)[0]
    extras = [inputs.get(t.name, op.spec.captured_tensors().get(t.name)) for t in op.ir.inputs]
    want = backward.block_mask_tensors("main", extras, 2, 70, 45, torch.device("cpu"))
    assert len(made.backward_lists) == 3 and all(torch.equal(a, b) for a, b in zip(made.backward_lists, want))
    assert f"with the backward's lists at its config {made.backward_config.short()}" in str(made)
    classified = []
    real = autograd.classify
    monkeypatch.setattr(autograd, "classify", lambda *args: classified.append(args[0]) or real(*args))
    q, k, v = (t.float() for t in draw(op.ir, 2, 70, 45))
    grads = []
    for block_mask in (made, None):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        op(*leaves, block_mask=block_mask, **inputs).square().sum().backward()
        grads.append([t.grad for t in leaves])
        assert len(classified) == (0 if block_mask is not None else 1)
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    inference = op.block_mask(70, 45, batch=2, backward=False, **inputs)  # no backward lists: it classifies
    assert inference.backward_config is None and len(inference.tensors()) == 3
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    op(*leaves, block_mask=inference, **inputs).square().sum().backward()
    assert len(classified) == 2 and all(torch.equal(t.grad, g) for t, g in zip(leaves, grads[1]))
    with pytest.raises(attnc.InputError, match="block_mask `backward` must be True or False; got 'yes'"):
        op.block_mask(70, backward="yes")


def test_deterministic_mode_repeats_bits_with_a_block_mask():
    op = op_for("per_batch_causal_gqa", deterministic=True)
    q, k, v = (t.float() for t in draw(op.ir, 3, 70, 70))
    runs = []
    for _ in range(2):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        op(*leaves).square().sum().backward()
        runs.append([t.grad for t in leaves])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_torch_compile_fullgraph_forward_and_backward_with_a_block_mask():
    op = op_for("declared_rows_masked_alibi")

    def loss(q, k, v, slopes, docs):
        out, lse = op(q, k, v, slopes=slopes, docs=docs, return_lse=True)
        return out.square().sum() + torch.where(torch.isfinite(lse), lse, 0).sum()

    def loss_with_mask(q, k, v, slopes, docs, block_mask):
        out = op(q, k, v, slopes=slopes, docs=docs, block_mask=block_mask)
        return out.square().sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    compiled_with_mask = torch.compile(loss_with_mask, fullgraph=True, backend="aot_eager")
    for length, seed in ((40, 1), (70, 2)):
        docs = mask_inputs("declared_rows_masked_alibi", seed)["docs"]
        args = [t.float().requires_grad_() for t in draw(op.ir, 2, length, length)] + [SLOPES.clone().requires_grad_()]
        eager = [t.detach().clone().requires_grad_() for t in args]
        compiled(*args, docs).backward()
        loss(*eager, docs).backward()
        for a, e in zip(args, eager):
            torch.testing.assert_close(a.grad, e.grad, rtol=0, atol=1e-5)
        made = op.block_mask(length, batch=2, docs=docs)  # the backward's lists made ahead, through the graph
        masked = [t.detach().clone().requires_grad_() for t in args]
        eager = [t.detach().clone().requires_grad_() for t in args]
        compiled_with_mask(*masked, docs, made).backward()
        loss_with_mask(*eager, docs, None).backward()
        for a, e in zip(masked, eager):
            torch.testing.assert_close(a.grad, e.grad, rtol=0, atol=1e-5)


# CUDA: built (not run) here. A per-batch document mask with GQA: the kv-side lists index per batch plane.

def cuda_backward(arch: str, dq_mode: str) -> Backward:
    spec = attnc.Attention(8, 2, qk_dim=64, mask_mod=per_batch_causal)
    return Backward(spec.ir, Target("cuda", arch), "bfloat16", (), dq_mode, backward_config(arch, spec.ir))


def test_cuda_backward_with_a_block_mask_builds_for_sm90a():
    atomic = cuda_backward("sm_90a", "atomic")
    assert atomic.mask_stages() == ("main",)
    main = atomic.kernel("main").device_source()
    assert "wgmma" in main and "tma_load" in main and "QList" in main and "TileKind" in main
    separate = cuda_backward("sm_90a", "separate")
    assert separate.mask_stages() == ("main", "dq")
    assert "QList" in separate.kernel("main").device_source()
    dq = separate.kernel("dq").device_source()
    assert "wgmma" in dq and "KvList" in dq and "AtomicAdd" not in dq
    for name in separate.kernel_names():
        separate.kernel(name).build()


def test_cuda_backward_with_a_block_mask_lowers_for_sm80():
    separate = cuda_backward("sm_80", "separate")
    main = separate.kernel("main").device_source()
    assert "wgmma" not in main and "mma" in main and "QList" in main
    assert "KvList" in separate.kernel("dq").device_source()


# GPU (marker `gpu`): bf16 / fp16 gradients against the float64 reference by DESIGN.md's rule (twice torch's own
# same-precision error, plus 1e-5), both dQ modes, lengths not multiples of the tiles.

GPU_SPECS = {name: spec for name, spec in SPECS.items() if name != "declared_rows_masked_alibi"}


@pytest.fixture(scope="module")
def gpu_ops():
    """Every op the GPU tests run, with its backward kernels (classifiers included) built in parallel first."""
    ops = {(name, det): attnc.compile(attnc.Attention(8, 2 if "gqa" in name else 8, qk_dim=128,
                                                      **{k: v for k, v in spec.items() if k != "kv_heads"}),
                                      target="cuda", deterministic=det)
           for name, spec in GPU_SPECS.items() for det in (False, True)}
    jobs = [job for op in ops.values() for dtype in (torch.bfloat16, torch.float16)
            for job in backward_for(op, dtype, ()).build_jobs()]
    errors = [e for e in build_in_parallel(jobs, min(16, os.cpu_count() or 1)) if e]
    assert not errors, errors[:3]
    return ops


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(GPU_SPECS))
def test_gpu_gradients_with_a_block_mask(gpu_ops, name, dtype, deterministic):
    op = gpu_ops[name, deterministic]
    ir = op.ir
    for q_len, kv_len in [(129, 129), (1000, 1000), (300, 1037)]:
        if name == "per_batch_causal_gqa" and kv_len != q_len:
            continue
        q, k, v = draw(ir, 3, q_len, kv_len)
        low = [t.to(dtype).double() for t in (q, k, v)]
        sinks = torch.randn(ir.q_heads, dtype=torch.float64) if ir.sinks else None
        out_shape = ((3, q_len, ir.q_heads, ir.v_dim) if ir.layout == "bshd" else (3, ir.q_heads, q_len, ir.v_dim))
        d_out, d_lse = torch.randn(out_shape, dtype=torch.float64), torch.randn(3, ir.q_heads, q_len, dtype=torch.float64)
        want, _ = gradients(op, *low, {}, sinks, d_out, d_lse, torch.float64, True)
        same, _ = gradients(op, *low, {}, sinks, d_out, d_lse, dtype, True)
        cuda = [t.to(dtype).cuda() for t in low]
        got, _ = gradients(op, *cuda, {}, sinks.cuda() if sinks is not None else None, d_out.cuda(), d_lse.cuda(),
                           dtype, False)
        for grad, ref in want.items():
            err = (got[grad].cpu().double() - ref).abs().max().item()
            bound = 2 * (same[grad].double() - ref).abs().max().item() + 1e-5
            assert err <= bound, (name, q_len, kv_len, grad, err, bound)
