"""Running a benchmark: every case, every peer, one process, one GPU, the same inputs for all; a case's peers are
timed in interleaved rounds (`timed_together`), so that the GPU's drifting clocks reach them alike.

``run(cases, peers)`` times the forward, ``run(cases, peers, backward=True)`` the backward alone (gradients of q,
k, v from a recorded forward) and a training step's attention: forward and backward together (``step_*`` fields).
With ``tune=True`` attnc's forward is first tuned for every case at its sizes (`attnc.schedules.tuner.tune`,
recorded in the tuning database that dispatch then reads), the default heuristic's config is timed beside it as the
peer ``attnc_default``, and a fresh process measures compile + first call (`attnc.bench.first_call`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from attnc.bench import report
from attnc.bench.cases import Case, backward_cases, case_inputs, cases_named, forward_cases
from attnc.bench.peers import PEERS, NotApplicable, peers_named
from attnc.schedules.timing import (
    Timing,
    attention_flops,
    buffer_count,
    measure,
    tflops,
    unmasked_elements,
)

ROUNDS = 4
"""Every case's peers are timed in this many interleaved rounds (`timed_together`)."""


def backward_cases_and_peers(parser: argparse.ArgumentParser, cases: str, peers: str) -> tuple[list[Case], list[str]]:
    """What a backward script's ``--cases`` (comma-separated starts of case names) and ``--peers`` name; a name
    that matches none exits through ``parser.error``, naming the option."""
    try:
        named_cases = cases_named(cases, backward_cases())
    except ValueError as error:
        parser.error(f"--cases: {error}")
    try:
        return named_cases, peers_named(peers)
    except ValueError as error:
        parser.error(f"--peers: {error}")


def timed_together(fns: dict[str, Callable], sets: int, repeats: int, device: torch.device | str = "cuda",
                   rounds: int = ROUNDS, log=print) -> dict[str, tuple[Timing, float] | Exception]:
    """Per name, the timing of ``fn(i)`` over rotating input sets (``repeats`` runs in all) and the peak memory its
    runs added (MiB; CUDA only), or the exception it raised. The runs are taken in ``rounds`` interleaved rounds, each
    timing every function in turn: the GPU's clocks drift within a run by several percent, and interleaving hands the
    drift to every peer alike, where timing one peer after another gave it to whichever ran in the slow stretch."""
    cuda = torch.device(device).type == "cuda"
    counts = [n for n in (repeats // rounds + (r < repeats % rounds) for r in range(rounds)) if n]
    times: dict[str, list[float]] = {name: [] for name in fns}
    peaks = dict.fromkeys(fns, 0.0)
    failed: dict[str, Exception] = {}
    for round_index, count in enumerate(counts):
        for name, fn in fns.items():
            if name in failed:
                continue
            if cuda:
                torch.cuda.synchronize(device)
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            try:
                timing = measure(fn, [(i,) for i in range(sets)], device=device, warmup=5 if round_index == 0 else 1,
                                 reps=count)
            except Exception as error:  # a failing peer is reported, not fatal to the others
                failed[name] = error
                log(traceback.format_exc(limit=3))
                continue
            times[name] += timing.times_ms
            if cuda:
                peaks[name] = max(peaks[name], (torch.cuda.max_memory_allocated(device) - base) / 2**20)
    return {name: failed.get(name) or (Timing(tuple(times[name])), peaks[name]) for name in fns}


def _reason(error: Exception) -> str:
    """A peer's failure as its row records it: the exception's type and the first line of its message."""
    return f"{type(error).__name__}: {str(error).splitlines()[0][:160]}"


def prebuild(cases: list[Case], dtype: torch.dtype, backward: bool, workers: int = 16) -> list[str]:
    """Build attnc's kernels for every case in parallel processes first: the config a call dispatches to and every
    default one (what ``attnc.compile(..., dtype=...)`` builds); the timed loop then loads them from disk. The
    builds' errors, one line each (a kernel that failed fails again, with its traceback, when first called)."""
    import functools

    import attnc
    from attnc.runtime import autograd
    from attnc.runtime.kernels import KERNEL_DTYPES, Kernel, build_in_parallel
    from attnc.schedules.heuristics import default_configs

    device = torch.device("cuda")
    ops = [(case, attnc.compile(case.spec(device), target="cuda")) for case in cases]
    jobs = []
    for case, op in ops:
        configs = {op.config_for(dtype, case.batch, case.seq, case.seq)[0],
                   *default_configs(op.family, op.target.arch, op.ir, KERNEL_DTYPES[dtype])}
        jobs += [functools.partial(Kernel.render, "fwd", op.ir, config, KERNEL_DTYPES[dtype], op.target)
                 for config in configs]
    errors = build_in_parallel(jobs, min(workers, len(jobs)))
    if backward:
        jobs = []
        for case, op in ops:
            learned = {id(t) for t in case.learned(device)}
            captured = op.spec.captured_tensors()
            grads = tuple(t.name for t in op.ir.inputs if id(captured.get(t.name)) in learned)
            config = op.backward_config_for(dtype, case.batch, case.seq, case.seq)[0]  # what the timed calls run
            jobs += autograd.backward_for(op, dtype, grads, config=config).build_jobs()
        errors += build_in_parallel(jobs, workers)
    return [error for error in errors if error]


def tune_cases(cases: list[Case], dtype: torch.dtype, budget_s: float, max_candidates: int | None,
               log=print) -> dict[str, dict]:
    """Tune attnc's forward for every case at its sizes, recording each bucket's best in the tuning database; per
    case name: the tuning's seconds, candidates timed, best and default configs and times."""
    import attnc
    from attnc.schedules import tuner

    summary = {}
    for case in cases:
        op = attnc.compile(case.spec(torch.device("cuda")), target="cuda")
        result = tuner.tune(op, dtype=dtype, batch=case.batch, q_len=case.seq, budget_s=budget_s,
                            max_candidates=max_candidates)
        log(f"{case.name:40s} tune: {result.summary()}")
        summary[case.name] = {"tune_s": result.seconds, "timed": result.count("timed"),
                              "candidates": len(result.candidates), "tuned_config": result.best.short(),
                              "default_config": result.default.short(), "tune_best_ms": result.ms,
                              "tune_default_ms": result.default_ms,
                              "tune_candidates": [(c.config.short(), c.status, c.ms) for c in result.candidates]}
    return summary


def first_calls(cases: list[Case], log=print) -> dict:
    """Compile + first call per case, measured in a fresh process (`attnc.bench.first_call`); the one-time imports
    under the key ``'imports'``."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "attnc.bench.first_call", *(c.name for c in cases)], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        log(f"first-call measurement failed: {done.stderr.strip()[-2000:]}")
        return {}
    seconds = {}
    for line in done.stdout.splitlines():
        record = json.loads(line)
        if "one_time_imports_s" in record:
            seconds["imports"] = record["one_time_imports_s"]
        else:
            seconds[record["case"]] = record["first_call_s"]
    return seconds


def run(cases: list[Case], peers: list[str], *, backward: bool = False, dtype: torch.dtype = torch.bfloat16,
        repeats: int = 20, tune: bool = False, tune_budget_s: float = 60.0, tune_candidates: int | None = None,
        log=print) -> list[dict]:
    """Time every peer on every case (forward, or the backward alone); a peer that cannot run a case is recorded
    with its reason."""
    tuned = {}
    if "attnc" in peers:
        if tune:
            tuned = tune_cases(cases, dtype, tune_budget_s, tune_candidates, log)
            peers = [p for p in peers if p != "attnc_default"]
            peers.insert(peers.index("attnc") + 1, "attnc_default")
        prebuild(cases, dtype, backward)
    first_call = first_calls(cases, log) if tune else {}
    results = []
    for case in cases:
        torch.manual_seed(0)
        per_set = case.batch * case.seq * case.dim * (case.q_heads + 2 * case.kv_heads) * dtype.itemsize
        sets = buffer_count(per_set, torch.device("cuda"))
        if backward:
            sets = min(4, sets)
        qs, ks, vs = case_inputs(case, dtype, sets, grad=backward)
        douts = [torch.randn_like(q) for q in qs] if backward else None
        spec = case.spec(torch.device("cuda"))
        learned = case.learned(torch.device("cuda")) if backward else ()
        elements = unmasked_elements(spec.ir, case.batch, case.seq, case.seq, spec.captured_tensors(),
                                     sample_rows=None)
        flops = attention_flops(spec.ir, elements, backward=backward)
        step_flops = attention_flops(spec.ir, elements) + flops if backward else None
        outputs, rows, timed, steps = {}, {}, {}, {}
        for peer in peers:
            row = rows[peer] = {"case": case.name, "peer": peer, "batch": case.batch, "q_heads": case.q_heads,
                                "kv_heads": case.kv_heads, "seq": case.seq, "dim": case.dim, "dtype": str(dtype),
                                "unmasked": elements, "flops": flops, "pass": "backward" if backward else "forward"}
            try:
                setup_ms, forward = PEERS[peer](case, qs, ks, vs)
                row["setup_ms"] = setup_ms
                if backward:
                    outs = [forward(i) for i in range(sets)]

                    def fn(i, outs=outs, qs=qs, ks=ks, vs=vs, douts=douts, learned=learned):
                        return torch.autograd.grad(outs[i], (qs[i], ks[i], vs[i], *learned), douts[i],
                                                   retain_graph=True)

                    def step(i, forward=forward, qs=qs, ks=ks, vs=vs, douts=douts, learned=learned):
                        return torch.autograd.grad(forward(i), (qs[i], ks[i], vs[i], *learned), douts[i])
                    outputs[peer] = [g.float() for g in fn(0)]
                    steps[peer] = step
                else:
                    fn = forward
                    outputs[peer] = [fn(0).float()]
                timed[peer] = fn
                if hasattr(forward, "op") and backward:
                    config, source = forward.op.backward_config_for(dtype, case.batch, case.seq, case.seq)
                    row["config"], row["config_source"] = config.short(), f"backward {source}"
                elif hasattr(forward, "op"):
                    config, row["config_source"] = forward.op.config_for(dtype, case.batch, case.seq, case.seq)
                    row["config"] = config.short()
                if peer == "attnc":
                    row.update(tuned.get(case.name, {}))
                    if case.name in first_call:
                        row["first_call_s"] = first_call[case.name]
                        row["one_time_imports_s"] = first_call.get("imports")
            except NotApplicable as reason:
                row["error"] = str(reason)
            except Exception as error:  # a failing peer is reported, not fatal to the run
                row["error"] = _reason(error)
                log(traceback.format_exc(limit=3))
        for peer, result in timed_together(timed, sets, repeats, log=log).items():
            if isinstance(result, Exception):
                rows[peer]["error"] = _reason(result)
                steps.pop(peer, None)
                continue
            timing, peak_mib = result
            rows[peer].update(ms=timing.median_ms, min_ms=timing.min_ms, peak_mib=peak_mib,
                              tflops=tflops(flops, timing.median_ms))
        for peer, result in timed_together(steps, sets, repeats, log=log).items():
            if isinstance(result, Exception):
                rows[peer]["step_error"] = _reason(result)
                continue
            timing, peak_mib = result
            rows[peer].update(step_ms=timing.median_ms, step_peak_mib=peak_mib,
                              step_tflops=tflops(step_flops, timing.median_ms))
        for peer, row in rows.items():
            results.append(row)
            log(f"{case.name:40s} {peer:13s} {row['pass'][:3]} " +
                (f"{row['tflops']:7.1f} TFLOP/s {row['ms']:8.3f} ms" if "tflops" in row else row["error"]) +
                (f"; forward + backward {row['step_tflops']:7.1f} TFLOP/s" if "step_tflops" in row else ""))
        for name in ("attnc", "attnc_default"):
            if name in outputs:
                reference = next((outputs[p] for p in ("cudnn", "fa2", "flex") if p in outputs), None)
                attnc_row = next(r for r in results if r["case"] == case.name and r["peer"] == name)
                attnc_row["max_diff"] = None if reference is None else max(
                    (a - b).abs().max().item() for a, b in zip(outputs[name], reference))
        del qs, ks, vs, douts, outputs
        torch.cuda.empty_cache()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="attnc bench", description="attnc against its peers, one GPU, one run")
    parser.add_argument("--quick", action="store_true", help="only the 4k, head-dim-128 cases")
    parser.add_argument("--backward", action="store_true",
                        help="time the backward alone, and forward + backward, instead of the forward")
    parser.add_argument("--peers", default="attnc,cudnn,fa2,flex", help="comma-separated (default: all)")
    parser.add_argument("--cases", default="", help="only cases whose name contains one of these (comma-separated)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--tune", action="store_true",
                        help="tune attnc's forward per case first and time the default config beside the tuned one")
    parser.add_argument("--tune-budget", type=float, default=60.0, help="seconds per case's tuning (default 60)")
    parser.add_argument("--tune-candidates", type=int, default=None, help="configs per case at most (default all)")
    parser.add_argument("--out", default="bench-results", help="directory for JSON, markdown and PNG")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attnc bench needs a CUDA GPU; none is visible")
        return 2
    if args.tune and args.backward:
        parser.error("--tune tunes the forward; run it without --backward")
    cases = backward_cases(quick=args.quick) if args.backward else forward_cases(quick=args.quick)
    if args.cases:
        wanted = [w.strip() for w in args.cases.split(",")]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    try:
        peers = peers_named(args.peers)
    except ValueError as error:
        parser.error(str(error))
    results = run(cases, peers, backward=args.backward, repeats=args.repeats, tune=args.tune,
                  tune_budget_s=args.tune_budget, tune_candidates=args.tune_candidates)
    direction = "Backward" if args.backward else "Forward"
    title = (f"{direction}, {torch.cuda.get_device_name()}, bf16, medians of {args.repeats} "
             f"({ROUNDS} interleaved rounds)")
    print(report.write(results, Path(args.out), "bwd" if args.backward else "fwd", title))
    return 0
