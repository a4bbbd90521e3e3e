"""The backward under sustained load, attnc against cuDNN: time, energy and SM clock per call, on the GPU.

    python benchmarks/bwd_power.py [--cases "non-causal d128 S4k,causal d128 S4k"] [--seconds 3] [--rounds 2]

Run back to back, backward calls hold the H200 at its power limit (700 W) and the SM clock falls until the draw fits:
a peer's sustained speed is then set by the energy a call takes, where `attnc bench`'s medians also carry how warm
the GPU was. Each peer runs ``--seconds`` of calls in turn, ``--rounds`` times; NVML's energy counter is read around
each stretch, and the SM clock and the power drawn are sampled during it. NVML is read through pynvml
(``pip install nvidia-ml-py``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from attnc.bench.peers import NotApplicable, backward_call  # noqa: E402
from attnc.bench.run import backward_cases_and_peers, prebuild  # noqa: E402

SAMPLE_S = 0.02
"""Seconds between two samples of the SM clock and the power drawn."""


@dataclass(frozen=True)
class Stretch:
    """One peer's stretch of back-to-back backward calls, and what NVML read during it."""

    calls: int
    seconds: float
    millijoules: int
    clocks_mhz: tuple[int, ...]
    watts: tuple[float, ...]

    def row(self, name: str) -> str:
        return (f"{name:8s} {self.seconds / self.calls * 1e3:7.3f} ms/call  {self.millijoules / self.calls / 1e3:6.3f} "
                f"J/call  SM clock median {statistics.median(self.clocks_mhz):5.0f} MHz (min {min(self.clocks_mhz)})  "
                f"power median {statistics.median(self.watts):4.0f} W")


def sustain(nvml, handle, call, sets: int, seconds: float) -> Stretch:
    """``call(i)`` over ``sets`` input sets, back to back, for at least ``seconds``."""
    samples, done = [], threading.Event()

    def sample():
        while not done.is_set():
            samples.append((nvml.nvmlDeviceGetClockInfo(handle, nvml.NVML_CLOCK_SM),
                            nvml.nvmlDeviceGetPowerUsage(handle) / 1e3))
            time.sleep(SAMPLE_S)

    sampler = threading.Thread(target=sample)
    torch.cuda.synchronize()
    energy = nvml.nvmlDeviceGetTotalEnergyConsumption(handle)
    sampler.start()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        for i in range(sets):
            call(i)
        calls += sets
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    done.set()
    sampler.join()
    energy = nvml.nvmlDeviceGetTotalEnergyConsumption(handle) - energy
    return Stretch(calls, elapsed, energy, tuple(c for c, _ in samples), tuple(w for _, w in samples))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default="non-causal d128 S4k,causal d128 S4k",
                        help="comma-separated starts of backward case names")
    parser.add_argument("--peers", default="attnc,cudnn", help="comma-separated, of attnc bench's peers")
    parser.add_argument("--seconds", type=float, default=3.0, help="per peer and round")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    cases, peers = backward_cases_and_peers(parser, args.cases, args.peers)
    if not torch.cuda.is_available():
        parser.error("the backward runs on a GPU, and torch sees none")
    try:
        import pynvml as nvml
    except ImportError:
        parser.error("the energy counter is read through NVML's Python binding: pip install nvidia-ml-py")
    nvml.nvmlInit()
    handle = nvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device())
    limit = nvml.nvmlDeviceGetEnforcedPowerLimit(handle) / 1e3
    print(f"{torch.cuda.get_device_name()}, power limit {limit:.0f} W, bf16; {args.rounds} rounds of "
          f"{args.seconds:g} s per peer")
    if "attnc" in peers:  # in parallel, as `attnc bench` does: the first calls would build one kernel at a time
        for error in prebuild(cases, torch.bfloat16, backward=True):
            print(f"build: {error}")
    sets = 4
    for case in cases:
        calls = {}
        for peer in peers:
            try:
                calls[peer] = backward_call(peer, case, sets)
            except NotApplicable as reason:
                print(f"{case.name}: {peer} skipped ({reason})")
        for call in calls.values():
            for i in range(sets):
                call(i)
        for round_index in range(args.rounds):
            for peer, call in calls.items():
                stretch = sustain(nvml, handle, call, sets, args.seconds)
                print(f"{case.name:28s} round {round_index}  " + stretch.row(peer), flush=True)
        del calls
        torch.cuda.empty_cache()
    nvml.nvmlShutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
