"""Time attnc's CUDA backward variants against cuDNN SDPA's backward on one GPU (issue 5).

The backward alone: gradients of q, k, v from a recorded forward (attnc: `Backward.run` on the forward's out and
lse; cuDNN: torch.autograd.grad through SDPA with the cuDNN backend). CUDA events, medians of REPEATS runs over
rotating input sets. Every variant's gradients are compared with cuDNN's (max abs difference over dq, dk, dv).
Every kernel is built first, in parallel processes. B4 H32 S4k d128 bf16, bhsd.

    python .explore/bwd_variants.py [--repeats 10] [--workers 16] [--cases non-causal,causal,gqa]

Variants: the main kernel's structure ('ws': warp-specialised, TMA producer and asynchronous wgmma, the sm_90a
default; 'pipelined': the main branch's T.Pipelined structure with synchronous gemms, now one block per q head),
the dQ mode ('atomic': per-thread fp32 atomics in the main kernel; 'tma': the main kernel adds each dQ tile with
one TMA reduce-add, the sm_90a default; 'separate': the deterministic dQ pass) and the main kernel's config
(block_m q rows × block_n kv rows, stages, consumer threads). 'pipelined atomic m64n128s2t256' is the main
branch's kernel and config, except that GQA no longer loops over the group's q heads inside one block.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import attnc  # noqa: E402
from attnc import mods  # noqa: E402
from attnc.runtime.autograd import Backward, build_in_parallel  # noqa: E402
from attnc.runtime.kernels import build_in_parallel as build_forwards_in_parallel  # noqa: E402
from attnc.schedules.config import KernelConfig  # noqa: E402
from attnc.schedules.resources import check  # noqa: E402
from attnc.schedules.timing import attention_flops, measure, tflops, unmasked_elements  # noqa: E402

BATCH, HEADS, SEQ, DIM = 4, 32, 4096, 128
CASES = {  # name: (kv heads, causal)
    "non-causal": (32, False),
    "causal": (32, True),
    "gqa": (8, True),
}
M64N128 = KernelConfig(block_m=64, block_n=128, stages=2, threads=256)
VARIANTS = [  # (dq_mode, config, warp_specialized, dq_tma_reduce)
    ("atomic", M64N128, False, False),
    ("atomic", M64N128, True, False),
    ("atomic", M64N128, True, True),
    ("atomic", KernelConfig(block_m=64, block_n=128, stages=3, threads=256), True, True),
    ("atomic", KernelConfig(block_m=64, block_n=64, stages=2, threads=128), True, True),
    ("separate", M64N128, True, False),
]
SETS = 3


def spec(kv_heads: int, causal: bool) -> attnc.Attention:
    return attnc.Attention(HEADS, kv_heads, qk_dim=DIM, layout="bhsd", mask_mod=mods.causal() if causal else None)


def variants_of(op) -> list[Backward]:
    """The Backward objects of every variant whose config fits (others are reported and skipped)."""
    kept = []
    for dq_mode, config, warp_specialized, dq_tma_reduce in VARIANTS:
        reasons = check("bwd", "sm_90a", config, qk_dim=DIM, v_dim=DIM, group=op.ir.group)
        if reasons:
            print(f"skip {dq_mode} {config.short()}: {'; '.join(reasons)}")
            continue
        kept.append(Backward(op.ir, op.target, "bfloat16", (), dq_mode, config, warp_specialized, dq_tma_reduce))
    return kept


def time_case(name: str, op, backwards: list[Backward], failed: set[int], repeats: int) -> list[tuple]:
    """Rows (case, variant, ms, TFLOP/s, ratio to cuDNN, max abs diff to cuDNN) of one case."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kv_heads, causal = CASES[name]
    device, dtype = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    qs = [torch.randn(BATCH, HEADS, SEQ, DIM, dtype=dtype, device=device) for _ in range(SETS)]
    ks = [torch.randn(BATCH, kv_heads, SEQ, DIM, dtype=dtype, device=device) for _ in range(SETS)]
    vs = [torch.randn(BATCH, kv_heads, SEQ, DIM, dtype=dtype, device=device) for _ in range(SETS)]
    douts = [torch.randn_like(q) for q in qs]
    elements = unmasked_elements(op.ir, BATCH, SEQ, SEQ, {}, sample_rows=None)
    flops = attention_flops(op.ir, elements, backward=True)

    leaves = [[t.clone().requires_grad_() for t in (q, k, v)] for q, k, v in zip(qs, ks, vs)]
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
        outs = [F.scaled_dot_product_attention(*leaf, is_causal=causal, enable_gqa=kv_heads != HEADS)
                for leaf in leaves]

    def cudnn(i):
        return torch.autograd.grad(outs[i], leaves[i], douts[i], retain_graph=True)
    reference = [g.float() for g in cudnn(0)]
    timing = measure(cudnn, [(i,) for i in range(SETS)], device=device, warmup=3, reps=repeats)
    base_ms = timing.median_ms
    rows = [(name, "cuDNN SDPA", base_ms, tflops(flops, base_ms), 1.0, 0.0)]
    print(*rows[-1], flush=True)
    outs.clear()

    forwards = [op(q, k, v, return_lse=True) for q, k, v in zip(qs, ks, vs)]
    nan = float("nan")
    for b in backwards:
        dq = "tma" if b.dq_tma_reduce else b.dq_mode
        label = f"attnc {'ws' if b.warp_specialized else 'pipelined'} {dq} {b.config.short()}"
        if id(b) in failed:
            rows.append((name, label, nan, nan, nan, nan))
            continue

        def run(i, b=b):
            out, lse = forwards[i]
            return b.run(qs[i], ks[i], vs[i], [], out, lse, douts[i], None)[:3]
        try:
            print(f"running {name} {label}", flush=True)
            got = run(0)
            torch.cuda.synchronize()
            diff = max((g.float() - r).abs().max().item() for g, r in zip(got, reference))
            timing = measure(run, [(i,) for i in range(SETS)], device=device, warmup=3, reps=repeats)
            rows.append((name, label, timing.median_ms, tflops(flops, timing.median_ms),
                         base_ms / timing.median_ms, diff))
            print(*rows[-1], flush=True)  # as it comes: a kernel that hangs leaves the rows before it
        except Exception as error:  # a failing variant is reported, not fatal to the run
            print(f"RUN FAILED {name} {label}: {type(error).__name__}: {str(error)[:300]}")
            rows.append((name, label, nan, nan, nan, nan))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    began = time.perf_counter()
    dtype = torch.bfloat16
    cases = [c for c in args.cases.split(",") if c]

    ops = {name: attnc.compile(spec(*CASES[name]), target="cuda", dtype=dtype) for name in cases}
    backwards = {name: variants_of(op) for name, op in ops.items()}
    forward_jobs = [("fwd", op.ir, op.config_for(dtype, BATCH, SEQ, SEQ)[0], "bfloat16", op.target)
                    for op in ops.values()]
    everything = [b for name in cases for b in backwards[name]]
    errors = build_in_parallel(everything, args.workers)
    forward_errors = build_forwards_in_parallel(forward_jobs, min(args.workers, len(forward_jobs)))
    print(f"built {len(errors)} backward stages and {len(forward_jobs)} forwards in "
          f"{time.perf_counter() - began:.0f} s")
    for (index, stage), error in errors.items():
        if error:
            b = everything[index]
            print(f"BUILD FAILED {b.dq_mode} {b.config.short()} {stage}: {error[-400:]}")
    for job, error in zip(forward_jobs, forward_errors):
        if error:
            print(f"BUILD FAILED forward: {error[-400:]}")
    failed = {id(everything[i]) for (i, _), error in errors.items() if error}

    rows = []
    for name in cases:
        rows += time_case(name, ops[name], backwards[name], failed, args.repeats)
        torch.cuda.empty_cache()

    print(f"\nbackward alone, B{BATCH} H{HEADS} S{SEQ} d{DIM} bf16 (gqa: 32/8 causal), medians of {args.repeats}")
    print(f"{'case':11s} {'variant':34s} {'ms':>8s} {'TFLOP/s':>8s} {'x cuDNN':>8s} {'max|d|':>9s}")
    for name, label, ms, tf, ratio, diff in rows:
        print(f"{name:11s} {label:34s} {ms:8.3f} {tf:8.1f} {ratio:8.2f} {diff:9.2e}")
    print(f"total {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
