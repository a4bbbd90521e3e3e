"""Run-time block masks on CUDA: the classifier and the forward that reads a block mask build for sm_90a (wgmma,
TMA) and lower for sm_80 on any machine with nvcc; on a GPU (marker `gpu`) the classifier's tile kinds and lists
equal the CPU classifier's (checked against brute force in test_blockmask.py), and the forward matches the
reference by DESIGN.md's rule, with the block mask computed in each call or made ahead."""

import functools
import os

import pytest
import torch

import attnc
from attnc import mods
from attnc.codegen.build import Target, cuda_home
from attnc.runtime.check import check_op
from attnc.runtime.kernels import BlockMaskKernel, Kernel, build_in_parallel
from attnc.schedules.config import KernelConfig
from attnc.schedules.heuristics import default_config

GPU_WORKERS = min(16, os.cpu_count() or 1)
MAX_LEN = 8192
needs_nvcc = pytest.mark.skipif(cuda_home() is None, reason="building CUDA kernels needs nvcc (set CUDA_HOME)")


def random_docs(length: int, generator: torch.Generator | None = None, docs: int = 8) -> torch.Tensor:
    """Ids (int32) of ``docs`` consecutive documents of random lengths covering ``length`` tokens."""
    cuts = torch.randperm(max(length - 1, 1), generator=generator)[:docs - 1].sort().values + 1
    sizes = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([max(length, 1)])])).clamp(min=0)
    return torch.repeat_interleave(torch.arange(len(sizes)), sizes)[:length].to(torch.int32)


DOCS = attnc.Input("docs", (2, MAX_LEN), torch.int32)


def per_batch_documents(b, h, q_idx, kv_idx):
    return (DOCS[b, q_idx] == DOCS[b, kv_idx]) & (q_idx >= kv_idx)


def specs():
    """Document masks at every tile shape the cuda heuristics pick (d64: 192x128, d128: 128x128, d192/128: 128x96,
    d256: 128x80), shared by every batch entry and head, per batch entry, per head; GQA, bhsd, sinks, a score_mod."""
    docs = random_docs(MAX_LEN, torch.Generator().manual_seed(0), docs=12)
    return {
        "document_causal_d64": attnc.Attention(8, qk_dim=64, mask_mod=mods.document(docs) & mods.causal()),
        "document_gqa_bhsd_d128": attnc.Attention(8, 2, qk_dim=128, layout="bhsd", mask_mod=mods.document(docs)),
        "per_batch_documents_d128": attnc.Attention(8, qk_dim=128, mask_mod=per_batch_documents, inputs=[DOCS]),
        "per_head_window_sinks_d192": attnc.Attention(
            8, 2, qk_dim=192, v_dim=128, score_mod=mods.softcap(30), sinks=True,
            mask_mod=lambda b, h, q_idx, kv_idx: (docs[q_idx] == docs[kv_idx]) & (abs(q_idx - kv_idx) <= 300 * (h + 1))),
        "document_d256": attnc.Attention(4, qk_dim=256, mask_mod=mods.document(docs) & mods.causal()),
    }


def inputs_for(name: str, batch: int, q_len: int, kv_len: int, seed: int = 0) -> dict:
    if name != "per_batch_documents_d128":
        return {}
    generator = torch.Generator().manual_seed(seed)
    return {"docs": torch.stack([random_docs(MAX_LEN, generator, docs=5 + 3 * i) for i in range(batch)])}


def jobs(spec, arch: str, dtypes=("bfloat16",)) -> list[functools.partial]:
    config = default_config("fwd", arch, spec.ir, "bfloat16")
    target = Target("cuda", arch)
    return [functools.partial(Kernel.render, "fwd", spec.ir, config, dtype, target) for dtype in dtypes] + \
        [functools.partial(BlockMaskKernel.render, spec.ir, config.block_m, config.block_n, target)]


@needs_nvcc
def test_the_classifier_and_the_forward_with_a_block_mask_build_for_sm90a_and_lower_for_sm80():
    chosen = [specs()["document_causal_d64"], specs()["per_batch_documents_d128"]]
    both = attnc.Attention(8, qk_dim=128, inputs=[DOCS],
                           mask_mod=lambda b, h, q_idx, kv_idx: per_batch_documents(b, h, q_idx, kv_idx) | (h == 3))
    per_entry_and_head = functools.partial(BlockMaskKernel.render, both.ir, 128, 128, Target("cuda", "sm_90a"))
    all_jobs = [job for spec in chosen for arch in ("sm_90a", "sm_80") for job in jobs(spec, arch)] + \
        [per_entry_and_head]  # planes per batch entry and per head
    errors = build_in_parallel(all_jobs, workers=2)
    assert errors == [None] * len(all_jobs), [e for e in errors if e]
    for spec in chosen:
        for arch in ("sm_90a", "sm_80"):
            config = default_config("fwd", arch, spec.ir, "bfloat16")
            kernel = Kernel.render("fwd", spec.ir, config, "bfloat16", Target("cuda", arch)).build()
            assert kernel.block_mask is not None and "KvList[" in kernel.source and "TileKind[" in kernel.source
            source = kernel.device_source()
            if arch == "sm_90a":
                assert "wgmma" in source and "tma_load" in source
            else:
                assert "wgmma" not in source and "mma" in source
            classifier = BlockMaskKernel.render(spec.ir, config.block_m, config.block_n, Target("cuda", arch))
            assert "__syncthreads_or" in classifier.build().device_source()


def test_without_a_block_mask_the_forward_renders_the_static_tile_map():
    spec = specs()["document_causal_d64"]
    config = default_config("fwd", "sm_90a", spec.ir, "bfloat16")
    static = Kernel.render("fwd", spec.ir, config, "bfloat16", Target("cuda", "sm_90a"), block_mask=False)
    with_mask = Kernel.render("fwd", spec.ir, config, "bfloat16", Target("cuda", "sm_90a"))
    assert static.block_mask is None and "KvList" not in static.source and "kv_end - kv_begin" in static.source
    assert static.key != with_mask.key


# ---------------------------------------------------------------------------------------------------- on a GPU
LENGTHS = [(1, 1), (17, 17), (1000, 1000), (4096, 4096), (1000, 333), (333, 1000)]
DTYPES = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def gpu_ops():
    """Every op the GPU tests run, its forwards (bf16, fp16) and classifier built in parallel first."""
    ops = {name: attnc.compile(spec, target="cuda") for name, spec in specs().items()}
    built = [job for op in ops.values() for job in jobs(op.spec, "sm_90a", ("bfloat16", "float16"))]
    errors = [e for e in build_in_parallel(built, GPU_WORKERS) if e]
    assert not errors, errors[:3]
    return ops


def check(op, name, q_len, kv_len, dtype, ahead, batch=2):
    batch = 1 if q_len * kv_len > 2**24 else batch
    result = check_op(op, batch=batch, q_len=q_len, kv_len=kv_len, dtype=dtype, block_mask=ahead,
                      inputs=inputs_for(name, batch, q_len, kv_len))
    assert result.passed, (f"{result.name} {result.shape} {result.dtype} ahead={ahead}: max error "
                           f"{result.max_error:.3g} (tolerance {result.tolerance:.3g}), lse error "
                           f"{result.lse_error:.3g} (tolerance {result.lse_tolerance:.3g}), -inf match "
                           f"{result.lse_inf_match}, seed {result.seed}")


@pytest.mark.gpu
@pytest.mark.parametrize("ahead", [False, True], ids=["per_call", "made_ahead"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_len, kv_len", LENGTHS)
@pytest.mark.parametrize("name", sorted(specs()))
def test_the_forward_with_a_block_mask_matches_the_reference_on_the_gpu(gpu_ops, name, q_len, kv_len, dtype, ahead):
    check(gpu_ops[name], name, q_len, kv_len, dtype, ahead)


@pytest.mark.gpu
@pytest.mark.parametrize("q_len, kv_len", [(17, 17), (1000, 333), (4096, 4096)])
@pytest.mark.parametrize("name", sorted(specs()))
def test_the_cuda_classifier_agrees_with_the_cpu_classifier(gpu_ops, name, q_len, kv_len):
    op = gpu_ops[name]
    inputs = inputs_for(name, 2, q_len, kv_len)
    got = op.block_mask(q_len, kv_len, batch=2, **{n: t.cuda() for n, t in inputs.items()})
    tiles = KernelConfig(block_m=got.tiles[0], block_n=got.tiles[1], stages=1, threads=1)
    want = attnc.compile(op.spec, target="cpu", config=tiles).block_mask(q_len, kv_len, batch=2, **inputs)
    assert torch.equal(got.tile_kind.cpu(), want.tile_kind) and torch.equal(got.kv_count.cpu(), want.kv_count)
    listed = torch.arange(want.kv_list.shape[-1]) < want.kv_count.unsqueeze(-1)
    assert torch.equal(got.kv_list.cpu()[listed], want.kv_list[listed])


@pytest.mark.gpu
def test_new_lengths_and_documents_do_not_rebuild(gpu_ops):
    op = gpu_ops["document_causal_d64"]
    check(op, "document_causal_d64", 1000, 1000, torch.bfloat16, ahead=False)
    kernels = [k.compiled for k in op._kernels.values()] + [k.compiled for k in op._classifiers.values()]
    for length in (100, 2000, 3000):
        q = torch.randn(1, length, 8, 64, device="cuda", dtype=torch.bfloat16)
        op(q, q, q, doc_ids=random_docs(length, docs=3).cuda())
    assert [k.compiled for k in op._kernels.values()] + [k.compiled for k in op._classifiers.values()] == kernels
