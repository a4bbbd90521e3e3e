"""Running a benchmark: every case, every peer, one process, one GPU, the same inputs for all."""

from __future__ import annotations

import argparse
import traceback
from pathlib import Path

import torch

from attnc.bench import report
from attnc.bench.cases import Case, forward_cases
from attnc.bench.peers import PEERS, NotApplicable
from attnc.schedules.timing import attention_flops, buffer_count, measure, tflops, unmasked_elements


def _timed(fn, sets: int, repeats: int):
    """Median timing of ``fn(i)`` over rotating input sets, and the peak memory the runs added (MiB)."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    timing = measure(fn, [(i,) for i in range(sets)], device="cuda", warmup=5, reps=repeats)
    return timing, (torch.cuda.max_memory_allocated() - base) / 2**20


def _inputs(case: Case, dtype: torch.dtype, device, sets: int):
    def make(heads):
        return torch.randn(case.batch, heads, case.seq, case.dim, dtype=dtype, device=device)
    return ([make(case.q_heads) for _ in range(sets)], [make(case.kv_heads) for _ in range(sets)],
            [make(case.kv_heads) for _ in range(sets)])


def _prebuild(cases: list[Case], dtype: torch.dtype, device, workers: int = 16) -> None:
    """Build attnc's kernel for every case in parallel processes first; the timed loop then loads them from disk."""
    import attnc
    from attnc.runtime.kernels import KERNEL_DTYPES, build_in_parallel

    jobs = []
    for case in cases:
        op = attnc.compile(case.spec(device), target="cuda")
        config, _ = op.config_for(dtype, case.batch, case.seq, case.seq)
        jobs.append(("fwd", op.ir, config, KERNEL_DTYPES[dtype], op.target))
    build_in_parallel(jobs, min(workers, len(jobs)))


def run_forward(cases: list[Case], peers: list[str], dtype: torch.dtype = torch.bfloat16, repeats: int = 20,
                log=print) -> list[dict]:
    """Time every peer on every case; a peer that cannot run a case is recorded with its reason."""
    device = torch.device("cuda")
    results = []
    if "attnc" in peers:
        _prebuild(cases, dtype, device)
    for case in cases:
        torch.manual_seed(0)
        per_set = case.batch * case.seq * case.dim * (case.q_heads + 2 * case.kv_heads) * dtype.itemsize
        sets = buffer_count(per_set, device)
        qs, ks, vs = _inputs(case, dtype, device, sets)
        spec = case.spec(device)
        elements = unmasked_elements(spec.ir, case.batch, case.seq, case.seq, spec.captured_tensors(),
                                     sample_rows=None)
        flops = attention_flops(spec.ir, elements)
        outputs = {}
        for peer in peers:
            row = {"case": case.name, "peer": peer, "batch": case.batch, "q_heads": case.q_heads,
                   "kv_heads": case.kv_heads, "seq": case.seq, "dim": case.dim, "dtype": str(dtype),
                   "unmasked": elements, "flops": flops}
            try:
                setup_ms, fn = PEERS[peer](case, qs, ks, vs)
                outputs[peer] = fn(0).float()
                timing, peak_mib = _timed(fn, sets, repeats)
                row.update(ms=timing.median_ms, min_ms=timing.min_ms, peak_mib=peak_mib, setup_ms=setup_ms,
                           tflops=tflops(flops, timing.median_ms))
                if peer == "attnc":
                    row["config"] = fn.op.kernel(dtype).config.short()
            except NotApplicable as reason:
                row["error"] = str(reason)
            except Exception as error:  # a failing peer is reported, not fatal to the run
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                log(traceback.format_exc(limit=3))
            results.append(row)
            log(f"{case.name:40s} {peer:6s} " + (f"{row['tflops']:7.1f} TFLOP/s {row['ms']:8.3f} ms"
                                                   if "tflops" in row else row["error"]))
        if "attnc" in outputs:
            reference = next((outputs[p] for p in ("cudnn", "fa2", "flex") if p in outputs), None)
            attnc_row = next(r for r in results if r["case"] == case.name and r["peer"] == "attnc")
            attnc_row["max_diff"] = None if reference is None else (outputs["attnc"] - reference).abs().max().item()
        del qs, ks, vs, outputs
        torch.cuda.empty_cache()
    return results


def _prebuild_backward(cases: list[Case], dtype: torch.dtype, device) -> None:
    """Build attnc's backward kernels for every case, several at once (nvcc runs outside the GIL)."""
    import concurrent.futures

    import attnc
    from attnc.runtime.autograd import backward_for

    backwards = [backward_for(attnc.compile(case.spec(device), target="cuda"), dtype, ()) for case in cases]
    stages = [b.stage(name) for b in backwards for name in b.stage_names()]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda stage: stage.build(), stages))


def run_backward(cases: list[Case], peers: list[str], dtype: torch.dtype = torch.bfloat16, repeats: int = 20,
                 log=print) -> list[dict]:
    """Time the backward alone (gradients of q, k, v from a recorded forward) of every peer on every case."""
    device = torch.device("cuda")
    results = []
    if "attnc" in peers:
        _prebuild_backward(cases, dtype, device)
    for case in cases:
        torch.manual_seed(0)
        per_set = case.batch * case.seq * case.dim * (case.q_heads + 2 * case.kv_heads) * dtype.itemsize
        sets = min(4, buffer_count(per_set, device))
        qs, ks, vs = (_requires_grad(t) for t in _inputs(case, dtype, device, sets))
        douts = [torch.randn_like(q) for q in qs]
        spec = case.spec(device)
        elements = unmasked_elements(spec.ir, case.batch, case.seq, case.seq, spec.captured_tensors(),
                                     sample_rows=None)
        flops = attention_flops(spec.ir, elements, backward=True)
        grads = {}
        for peer in peers:
            row = {"case": case.name, "peer": peer, "batch": case.batch, "q_heads": case.q_heads,
                   "kv_heads": case.kv_heads, "seq": case.seq, "dim": case.dim, "dtype": str(dtype),
                   "unmasked": elements, "flops": flops, "pass": "backward"}
            try:
                setup_ms, forward = PEERS[peer](case, qs, ks, vs)
                outs = [forward(i) for i in range(sets)]

                def backward(i):
                    return torch.autograd.grad(outs[i], (qs[i], ks[i], vs[i]), douts[i], retain_graph=True)
                grads[peer] = [g.float() for g in backward(0)]
                timing, peak_mib = _timed(backward, sets, repeats)
                row.update(ms=timing.median_ms, min_ms=timing.min_ms, peak_mib=peak_mib, setup_ms=setup_ms,
                           tflops=tflops(flops, timing.median_ms))
            except NotApplicable as reason:
                row["error"] = str(reason)
            except Exception as error:  # a failing peer is reported, not fatal to the run
                row["error"] = f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"
                log(traceback.format_exc(limit=3))
            results.append(row)
            log(f"{case.name:40s} {peer:6s} bwd " + (f"{row['tflops']:7.1f} TFLOP/s {row['ms']:8.3f} ms"
                                                       if "tflops" in row else row["error"]))
        if "attnc" in grads:
            reference = next((grads[p] for p in ("cudnn", "fa2", "flex") if p in grads), None)
            attnc_row = next(r for r in results if r["case"] == case.name and r["peer"] == "attnc")
            attnc_row["max_diff"] = None if reference is None else max(
                (a - b).abs().max().item() for a, b in zip(grads["attnc"], reference))
    return results


def _requires_grad(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.requires_grad_() for t in tensors]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnc bench", description="attnc against its peers, one GPU, one run")
    parser.add_argument("--quick", action="store_true", help="only the 4k, head-dim-128 cases")
    parser.add_argument("--backward", action="store_true", help="time the backward alone instead of the forward")
    parser.add_argument("--peers", default="attnc,cudnn,fa2,flex", help="comma-separated (default: all)")
    parser.add_argument("--cases", default="", help="only cases whose name contains one of these (comma-separated)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="bench-results", help="directory for JSON, markdown and PNG")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attnc bench needs a CUDA GPU; none is visible")
        return 2
    cases = forward_cases(quick=args.quick)
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",")]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    run = run_backward if args.backward else run_forward
    results = run(cases, args.peers.split(","), repeats=args.repeats)
    direction = "Backward" if args.backward else "Forward"
    title = f"{direction}, {torch.cuda.get_device_name()}, bf16, medians of {args.repeats}"
    print(report.write(results, Path(args.out), "bwd" if args.backward else "fwd", title))
    return 0
