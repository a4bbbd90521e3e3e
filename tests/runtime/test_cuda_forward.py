"""The CUDA forward template: every example builds for sm_90a (wgmma, TMA) and lowers for sm_80 on any machine
with nvcc; on a GPU (marker `gpu`) every example and head dim matches the reference by DESIGN.md's rule."""

import functools
import math
import os

import pytest
import torch

import attnc
from attnc import mods
from attnc.cli import example_specs, load_spec
from attnc.codegen.build import Target, cuda_home
from attnc.runtime.check import check_op
from attnc.errors import BuildError
from attnc.runtime.kernels import BuiltKernel, Kernel, build_in_parallel
from attnc.schedules.heuristics import default_config

EXAMPLES = {path.stem: load_spec(path) for path in example_specs()}
GPU_WORKERS = min(16, os.cpu_count() or 1)

needs_nvcc = pytest.mark.skipif(cuda_home() is None, reason="building CUDA kernels needs nvcc (set CUDA_HOME)")


def forward_job(spec, arch, dtype="bfloat16"):
    return functools.partial(Kernel.render, "fwd", spec.ir, default_config("fwd", arch, spec.ir, dtype), dtype,
                             Target("cuda", arch))


@pytest.fixture(scope="module")
def built_examples():
    """Every example's forward for sm_90a and sm_80, built two at a time into the cache."""
    built = [(arch, e.spec.ir.key) for arch in ("sm_90a", "sm_80") for e in EXAMPLES.values()]
    errors = build_in_parallel([forward_job(e.spec, arch) for arch in ("sm_90a", "sm_80") for e in EXAMPLES.values()],
                               workers=2)
    return dict(zip(built, errors))


@needs_nvcc
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_example_builds_for_sm90a_with_wgmma_and_tma_and_lowers_for_sm80(built_examples, name):
    ir = EXAMPLES[name].spec.ir
    for arch in ("sm_90a", "sm_80"):
        assert built_examples[(arch, ir.key)] is None, built_examples[(arch, ir.key)]
        kernel = Kernel.render("fwd", ir, default_config("fwd", arch, ir, "bfloat16"), "bfloat16",
                               Target("cuda", arch)).build()
        source = kernel.device_source()
        if arch == "sm_90a":
            assert "wgmma" in source and "tma_load" in source
        else:
            assert "wgmma" not in source and "mma" in source


def branch_on_q_and_kv_spec():
    """A spec whose optimised d64 kernel tilelang 0.1.15 cannot lower ([ThreadSync]): a per-column read under a
    branch on q_idx and kv_idx, with this mask."""
    bias = torch.randn(4, 4096) * 0.1
    return attnc.Attention(4, qk_dim=64, mask_mod=lambda b, h, q, kv: (q % 3 != 0) & (kv <= q),
                           score_mod=lambda s, b, h, q, kv: s + torch.where(kv <= q, bias[h, kv], 0.5 * bias[h, kv]),
                           name="branch_on_q_and_kv")


def refuse_column_caches(monkeypatch):
    """Make every build of a source with a column cache fail as tilelang 0.1.15's ThreadSync refused the consumers'
    fill under a branch (before the producer filled the caches)."""
    build = BuiltKernel.build

    def refuse_hoisted_reads(self):
        if "column_cache" in self.source:
            raise BuildError("InternalError: [ThreadSync] Cannot lower a required shared-memory sync inside a "
                             "divergent region")
        return build(self)

    monkeypatch.setattr(BuiltKernel, "build", refuse_hoisted_reads)


@needs_nvcc
def test_a_kernel_tilelang_cannot_lower_optimised_is_built_plain(caplog, monkeypatch):
    """tilelang refusing the optimised loop is simulated: the spec that tripped it (a column cache filled by the
    consumers under the branch) builds since the producer fills the column caches (next test)."""
    spec = branch_on_q_and_kv_spec()
    kernel = Kernel.render("fwd", spec.ir, attnc.KernelConfig(192, 128, 2, 384), "bfloat16", Target("cuda", "sm_90a"))
    refuse_column_caches(monkeypatch)
    assert "column_cache" in kernel.source and not kernel.plain
    kernel.build()
    assert kernel.plain and "column_cache" not in kernel.source and "wgmma" in kernel.device_source()
    assert "building it plain" in caplog.text


@needs_nvcc
def test_sm90a_forward_with_one_consumer_warpgroup_is_built_for_two_blocks_per_sm():
    """With one consumer warpgroup and shared memory for two blocks, the kernel asks ptxas for two blocks per SM and
    its consumers take the producer's spare registers (232); with two stages it stays at one block, at 240 (it had the
    160 of three warpgroups, and ptxas reported 1580 bytes of spill stores for the document mask's 64-row kernel)."""
    spec = attnc.Attention(4, qk_dim=128, mask_mod=mods.causal())
    target = Target("cuda", "sm_90a")
    two = Kernel.render("fwd", spec.ir, attnc.KernelConfig(64, 128, 1, 128), "bfloat16", target)
    assert "T.annotate_min_blocks_per_sm(2)" in two.source and "T.set_max_nreg(232, 1)" in two.source
    device = two.build().device_source()
    assert "__launch_bounds__(256, 2)" in device and "warpgroup_reg_alloc<232>" in device
    one = Kernel.render("fwd", spec.ir, attnc.KernelConfig(64, 128, 2, 128), "bfloat16", target)
    assert "annotate_min_blocks_per_sm" not in one.source and "T.set_max_nreg(240, 1)" in one.source


@needs_nvcc
def test_sm90a_producer_fills_each_kv_tiles_kind_and_column_caches():
    """The consumers read a kv tile's kind and its column caches (a document mask's doc_ids[kv]) from the ring slot
    the producer filled before its k_full arrival, while QKᵀ runs; they had loaded them from global memory at every
    tile, the doc_ids after the gemm wait. Filled by the producer, the column cache of the spec above no longer
    trips tilelang's ThreadSync: its optimised d64 kernel builds."""
    spec = branch_on_q_and_kv_spec()
    kernel = Kernel.render("fwd", spec.ir, attnc.KernelConfig(192, 128, 2, 384), "bfloat16", Target("cuda", "sm_90a"))
    kernel.build()
    assert not kernel.plain and "column_cache0_ring" in kernel.source
    doc_ids = torch.tensor([0] * 300 + [1] * 700, dtype=torch.int32)
    document = attnc.Attention(4, qk_dim=128, mask_mod=mods.document(doc_ids) & mods.causal())
    source = Kernel.render("fwd", document.ir, attnc.KernelConfig(128, 128, 2, 256), "bfloat16",
                           Target("cuda", "sm_90a")).device_source()
    producer, consumers = source.split("warpgroup_reg_dealloc", 1)[1].split("warpgroup_reg_alloc", 1)
    assert "kind_ring)[(t & 1)] = " in producer and "column_cache0_ring)[" in producer
    assert "TileKind[" not in consumers and "in_doc_ids[" not in consumers.split("k_empty[0].arrive()")[1]


def test_a_config_that_does_not_fit_is_refused_before_building():
    spec = attnc.Attention(8, qk_dim=256, mask_mod=mods.causal())
    with pytest.raises(attnc.UnsupportedError, match=r"shared memory \d+ bytes exceeds the sm_90a limit of 232448"):
        Kernel.render("fwd", spec.ir, attnc.KernelConfig(128, 256, 3, 256), "bfloat16", Target("cuda", "sm_90a"))


def test_default_configs_fit_every_served_head_dim():
    from attnc.runtime.support import CUDA_HEAD_DIMS
    from attnc.schedules.resources import check

    for qk_dim, v_dim in CUDA_HEAD_DIMS:
        ir = attnc.Attention(8, 2, qk_dim=qk_dim, v_dim=v_dim, mask_mod=mods.causal()).ir
        for arch in ("sm_90a", "sm_80"):
            config = default_config("fwd", arch, ir, "bfloat16")
            assert check("fwd", arch, config, qk_dim=qk_dim, v_dim=v_dim, group=4) == [], (arch, qk_dim)


# ---------------------------------------------------------------------------------------------------- on a GPU
HEAD_DIMS = [(64, 64), (128, 128), (256, 256), (192, 128)]
LENGTHS = [(1, 1), (17, 17), (1000, 1000), (4096, 4096), (8192, 8192), (1000, 333), (333, 1000), (17, 4096)]
DTYPES = [torch.bfloat16, torch.float16]


def head_dim_specs(qk_dim, v_dim):
    """The library mods at one head dim: what the examples cover at 64, again at every served head dim."""
    slopes = mods.alibi_slopes(8)
    table = torch.randn(8, 2 * 8192 - 1) * 0.1
    return {
        "causal_gqa": attnc.Attention(8, 2, qk_dim=qk_dim, v_dim=v_dim, mask_mod=mods.causal()),
        "softcap_window_sinks": attnc.Attention(8, 2, qk_dim=qk_dim, v_dim=v_dim, score_mod=mods.softcap(30),
                                                mask_mod=mods.sliding_window(300), sinks=True, layout="bhsd"),
        "alibi_prefix": attnc.Attention(8, qk_dim=qk_dim, v_dim=v_dim, score_mod=mods.alibi(slopes),
                                        mask_mod=mods.prefix_lm(100)),
        "relative_bias_chunked": attnc.Attention(8, qk_dim=qk_dim, v_dim=v_dim,
                                                 score_mod=mods.relative_bias(table), mask_mod=mods.chunked(256)),
    }


@pytest.fixture(scope="module")
def gpu_ops():
    """Every op the GPU tests run, with its kernels built in parallel first (16 cores on the GPU machine)."""
    ops = {name: attnc.compile(e.spec, target="cuda") for name, e in EXAMPLES.items()}
    for dims in HEAD_DIMS:
        for name, spec in head_dim_specs(*dims).items():
            ops[(name, dims)] = attnc.compile(spec, target="cuda")
    jobs = [functools.partial(Kernel.render, "fwd", op.ir, op.config_for(dtype, 1, 4096, 4096)[0], dtype_name,
                              op.target)
            for op in ops.values() for dtype, dtype_name in ((torch.bfloat16, "bfloat16"), (torch.float16, "float16"))]
    errors = [e for e in build_in_parallel(jobs, GPU_WORKERS) if e]
    assert not errors, errors[:3]
    return ops


def check(op, q_len, kv_len, dtype, make_inputs=None, batch=2):
    inputs = make_inputs(q_len, kv_len) if make_inputs else None
    result = check_op(op, batch=batch, q_len=q_len, kv_len=kv_len, dtype=dtype, inputs=inputs)
    assert result.passed, (f"{result.name} {result.shape} {result.dtype}: max error {result.max_error:.3g} "
                           f"(tolerance {result.tolerance:.3g}), lse error {result.lse_error:.3g} "
                           f"(tolerance {result.lse_tolerance:.3g}), -inf match {result.lse_inf_match}, "
                           f"seed {result.seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len, kv_len", LENGTHS)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_example_matches_the_reference_on_the_gpu(gpu_ops, name, q_len, kv_len, dtype):
    example = EXAMPLES[name]
    check(gpu_ops[name], q_len, kv_len, dtype, example.inputs, batch=1 if q_len * kv_len > 2**24 else 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (17, 17), (1000, 1000), (4096, 4096), (8192, 8192), (1000, 333),
                                           (333, 1000)])
@pytest.mark.parametrize("dims", HEAD_DIMS, ids=lambda d: f"d{d[0]}_{d[1]}")
@pytest.mark.parametrize("name", ["causal_gqa", "softcap_window_sinks", "alibi_prefix", "relative_bias_chunked"])
def test_every_head_dim_matches_the_reference_on_the_gpu(gpu_ops, name, dims, q_len, kv_len, dtype):
    check(gpu_ops[(name, dims)], q_len, kv_len, dtype, batch=1)


@pytest.mark.gpu
@pytest.mark.parametrize("plain", [False, True], ids=["optimised", "plain"])
@pytest.mark.parametrize("q_len, kv_len", [(17, 17), (1000, 1000), (1000, 333)])
def test_the_branch_spec_optimised_and_built_plain_matches_the_reference_on_the_gpu(monkeypatch, plain, q_len, kv_len):
    """Its optimised kernel (column cache in the producer's ring) and, with tilelang's refusal simulated, its plain
    one."""
    if plain:
        refuse_column_caches(monkeypatch)
    op = attnc.compile(branch_on_q_and_kv_spec(), target="cuda", config=attnc.KernelConfig(192, 128, 2, 384))
    check(op, q_len, kv_len, torch.bfloat16)
    assert op.kernel(torch.bfloat16).plain is plain


@pytest.mark.gpu
def test_fully_masked_rows_and_lengths_that_change_without_a_rebuild(gpu_ops):
    op = gpu_ops[("causal_gqa", (128, 128))]
    kernel = op.kernel(torch.bfloat16, op.config_for(torch.bfloat16, 1, 4096, 4096)[0]).build()
    compiled = kernel.compiled
    q = torch.randn(1, 700, 8, 128, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(1, 300, 2, 128, device="cuda", dtype=torch.bfloat16)
    out, lse = op(q, k, k, return_lse=True)  # bottom-right causal: the first 400 queries see no key
    assert not out.isnan().any() and (out[:, :400] == 0).all() and (lse[..., :400] == -math.inf).all()
    assert torch.isfinite(lse[..., 400:]).all()
    for length in (100, 2000, 3000):
        q = torch.randn(1, length, 8, 128, device="cuda", dtype=torch.bfloat16)
        op(q, q[:, :, :2].contiguous(), q[:, :, :2].contiguous())
    assert kernel.compiled is compiled


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mask", ["document", "window"])
def test_short_kv_loops_run_two_blocks_per_sm_and_match_the_reference_on_the_gpu(mask, dtype):
    """At 4k a causal document mask and a 512 window keep under `SHORT_LOOP_KEYS` keys a row: the heuristic's
    two-block config runs, and matches the reference."""
    doc_ids = torch.repeat_interleave(torch.arange(8), torch.tensor([700, 100, 900, 300, 1000, 96, 500, 500]))
    mask_mod = mods.document(doc_ids) & mods.causal() if mask == "document" else mods.sliding_window(512)
    op = attnc.compile(attnc.Attention(8, 2, qk_dim=128, mask_mod=mask_mod), target="cuda")
    config, source = op.config_for(dtype, 1, 4096, 4096)
    assert (source, config) == ("heuristic", attnc.KernelConfig(64, 64, 2, 128))
    check(op, 4096, 4096, dtype, batch=1)


@pytest.mark.gpu
def test_target_auto_picks_cuda_when_a_gpu_is_present():
    assert attnc.compile(attnc.Attention(8, qk_dim=64)).target.kind == "cuda"
