"""Where one backward's time goes, kernel by kernel, for attnc and its peers (torch.profiler, on the GPU):

    python benchmarks/bwd_kernels.py [--cases "document,sliding window 1k"] [--peers attnc,cudnn,flex] [--calls 10]

Each peer's backward runs ``--calls`` times under the profiler after a warm-up; per kernel, its mean GPU time per
call, and their sum. attnc's backward on sm_90a is 'pre' (Delta; the dQ tiles' tickets), 'main' and 'post' (dQ cast
to the input dtype): the first block to reach a dQ tile stores it, so the accumulator has no zero fill. cuDNN's has
the same parts and a fill (inside its Delta kernel); FlexAttention's two kernels have no dQ accumulator. The kernels
outside 'main' are what a short kv loop (a document mask, a narrow window) cannot amortise: the sixteenth and
seventeenth sessions' tables in docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from attnc.bench.peers import NotApplicable, backward_call  # noqa: E402
from attnc.bench.run import backward_cases_and_peers, prebuild  # noqa: E402

NAME_CHARS = 72
"""Kernel names are cut to this many characters (templated C++ names run to hundreds)."""


def kernel_times(kernels: Iterable[tuple[str, float]], calls: int) -> list[tuple[str, float]]:
    """Mean µs per call of each kernel, from ``(name, µs)`` of every launch in ``calls`` calls; longest first."""
    total: dict[str, float] = defaultdict(float)
    for name, microseconds in kernels:
        total[name[:NAME_CHARS]] += microseconds / calls
    return sorted(total.items(), key=lambda item: -item[1])


def profile_calls(call, calls: int, sets: int) -> list[tuple[str, float]]:
    """``call(i)`` run ``calls`` times (over ``sets`` input sets) under torch.profiler: its kernels' times."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for i in range(calls):
            call(i % sets)
        torch.cuda.synchronize()
    launches = [(e.name, e.device_time) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return kernel_times(launches, calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="non-causal d128 S4k,causal d128 S4k,sliding window 1k,document,prefix-LM",
                        help="comma-separated starts of backward case names")
    parser.add_argument("--peers", default="attnc,cudnn,flex", help="comma-separated, of attnc bench's peers")
    parser.add_argument("--calls", type=int, default=10, help="profiled calls per peer and case")
    args = parser.parse_args(argv)
    cases, peers = backward_cases_and_peers(parser, args.cases, args.peers)
    if args.calls < 1:
        parser.error(f"--calls: at least one call is profiled; got {args.calls}")
    if not torch.cuda.is_available():
        parser.error("the backward runs on a GPU, and torch sees none")
    if "attnc" in peers:  # in parallel, as `attnc bench` does
        for error in prebuild(cases, torch.bfloat16, backward=True):
            print(f"build: {error}")
    sets = 2
    for case in cases:
        for peer in peers:
            try:
                call = backward_call(peer, case, sets)
            except NotApplicable as reason:
                print(f"{case.name}: {peer} skipped ({reason})")
                continue
            for i in range(2 * sets):  # warm-up: builds, autotuning, caches
                call(i % sets)
            times = profile_calls(call, args.calls, sets)
            print(f"{case.name} | {peer} | kernels {sum(t for _, t in times):.1f} us per backward")
            for name, microseconds in times:
                print(f"    {microseconds:8.1f}  {name}")
            sys.stdout.flush()
            del call
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
