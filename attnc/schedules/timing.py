"""Measuring kernels: medians of device-event (CUDA) or wall-clock (CPU) times over rotating input buffers, and the
FLOP count that turns a time into TFLOP/s by DESIGN.md's convention (unmasked score elements only).

`measure(fn, buffers, device=...)` runs ``fn(*buffers[i % len(buffers)])`` a few times to warm up, then ``reps``
times more, each run timed on its own: on CUDA between two ``torch.cuda.Event`` records on the current stream, queued
behind an untimed run (device time, launch overhead excluded), on the CPU with ``time.perf_counter``. Rotating among
several input sets keeps a kernel from reading inputs the previous run left in L2; `buffer_count` says how many sets
that takes.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from attnc.dsl import symbols
from attnc.dsl.ir import AttentionIR

SAMPLE_ROWS = 1024
"""`unmasked_elements` counts every query row up to this many rows, and a stratified sample of this many beyond."""

_CHUNK_ELEMENTS = 1 << 24  # mask elements evaluated at once when counting


@dataclass(frozen=True)
class Timing:
    """The times (ms) of the timed runs of one kernel; ``median_ms`` is the figure that counts."""

    times_ms: tuple[float, ...]

    @property
    def median_ms(self) -> float:
        return statistics.median(self.times_ms)

    @property
    def min_ms(self) -> float:
        return min(self.times_ms)

    def __str__(self) -> str:
        return f"{self.median_ms:.4f} ms (median of {len(self.times_ms)}, min {self.min_ms:.4f})"


def _device(device: torch.device | str | None, buffers: Sequence[Sequence]) -> torch.device:
    if device is not None:
        return torch.device(device)
    for value in buffers[0]:
        if isinstance(value, torch.Tensor):
            return value.device
    return torch.device("cpu")


def measure(
    fn: Callable[..., object],
    buffers: Sequence[Sequence],
    *,
    device: torch.device | str | None = None,
    warmup: int = 3,
    reps: int = 20,
    max_seconds: float | None = None,
) -> Timing:
    """Time ``fn`` over rotating argument sets; the per-run times.

    Args:
        fn: the function to time; called as ``fn(*buffers[i % len(buffers)])``.
        buffers: one or more argument sets (default device: that of the first tensor of the first set).
        device: where ``fn`` runs: a CUDA device is timed with events, anything else with ``perf_counter``.
        warmup: untimed runs first (default 3).
        reps: timed runs (default 20); fewer when ``max_seconds`` would be exceeded, but at least 3 (1 when one
            run alone takes longer than ``max_seconds``).
        max_seconds: rough cap on the timed runs' total (default: none), estimated from the warm-up runs.
    """
    if not buffers:
        raise ValueError("measure needs at least one set of arguments")
    if reps < 1 or warmup < 0:
        raise ValueError(f"measure needs reps >= 1 and warmup >= 0; got reps={reps}, warmup={warmup}")
    device = _device(device, buffers)
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    n = len(buffers)

    sync()
    start = time.perf_counter()
    for i in range(warmup):
        fn(*buffers[i % n])
    sync()
    if max_seconds is not None:
        per_run = (time.perf_counter() - start) / warmup if warmup else 0.0
        if per_run > 0:
            affordable = int(max_seconds / per_run)
            reps = max(1 if per_run > max_seconds else min(3, reps), min(reps, affordable))

    times: list[float] = []
    if cuda:
        with torch.cuda.device(device):
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
            # An untimed lead run keeps the GPU busy while the timed ones are enqueued: after the sync above, the
            # first timed run would also time the host launching it (H200: 0.7-1.2 ms for an attnc backward).
            fn(*buffers[warmup % n])
            for i, (begin, end) in enumerate(events):
                args = buffers[(warmup + 1 + i) % n]
                begin.record()
                fn(*args)
                end.record()
            torch.cuda.synchronize(device)
            times = [begin.elapsed_time(end) for begin, end in events]
    else:
        for i in range(reps):
            args = buffers[(warmup + i) % n]
            begin = time.perf_counter()
            fn(*args)
            times.append((time.perf_counter() - begin) * 1e3)
    # Event resolution is ~0.5 us; a zero would make a kernel look infinitely fast.
    return Timing(tuple(max(t, 1e-6) for t in times))


def buffer_count(bytes_per_set: int, device: torch.device | str, *, maximum: int = 8) -> int:
    """How many input sets to rotate so consecutive runs find nothing of theirs in the L2 cache.

    CUDA: enough sets to cover twice the device's L2, at least 2 and at most ``maximum`` (default 8), and no more
    than a quarter of the free memory holds. CPU: 2.
    """
    device = torch.device(device)
    if device.type != "cuda":
        return 2
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    want = max(2, min(maximum, math.ceil(2 * l2 / max(1, bytes_per_set)) + 1))
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, min(want, int(0.25 * free) // max(1, bytes_per_set)))


def unmasked_elements(
    ir: AttentionIR,
    batch: int,
    q_len: int,
    kv_len: int,
    inputs: Mapping[str, torch.Tensor] | None = None,
    sample_rows: int | None = SAMPLE_ROWS,
) -> int:
    """The number of (batch, q head, query, key) score elements the mask keeps.

    Without a mask: ``batch * q_heads * q_len * kv_len``. With one, the traced mask is evaluated (as the reference
    evaluates it) on every query row when ``q_len <= SAMPLE_ROWS``, which is exact, and otherwise on the middle row of
    each of ``SAMPLE_ROWS`` equal strata of rows, each standing for its stratum: exact for masks whose kept count is
    linear in the row within a stratum (causal, windows, prefixes), within a fraction of a percent for the others.
    Work is O(SAMPLE_ROWS · kv_len), never O(q_len · kv_len). ``inputs``: the tensors the mask reads;
    ``sample_rows=None`` evaluates every row (exact, O(q_len · kv_len) work in chunks: what benchmarks report).
    """
    heads = ir.q_heads
    if not ir.has_mask or batch == 0 or q_len == 0 or kv_len == 0:
        return batch * heads * q_len * kv_len if not ir.has_mask else 0
    from attnc.runtime.evaluate import evaluate, index_env

    tensors = dict(inputs or {})
    device = next((t.device for t in tensors.values()), torch.device("cpu"))
    if sample_rows is None or q_len <= sample_rows:
        rows = torch.arange(q_len, device=device)
        weights = torch.ones(q_len, dtype=torch.float64, device=device)
    else:
        edges = [round(i * q_len / sample_rows) for i in range(sample_rows + 1)]
        rows = torch.tensor([(a + b - 1) // 2 for a, b in itertools.pairwise(edges)], device=device)
        weights = torch.tensor([b - a for a, b in itertools.pairwise(edges)], dtype=torch.float64, device=device)
    score = {symbols.score: torch.zeros((), dtype=torch.float64, device=device)}
    chunk = max(1, _CHUNK_ELEMENTS // max(1, kv_len * batch * heads))
    total = 0.0
    for start in range(0, len(rows), chunk):
        sample = rows[start:start + chunk]
        env = {**index_env(batch, heads, q_len, kv_len, device, sample), **score}
        keep = torch.as_tensor(evaluate(ir.mask, env, tensors, torch.float64), device=device)
        keep = keep.reshape((1,) * (4 - keep.ndim) + tuple(keep.shape))
        keep = keep.expand(keep.shape[0], keep.shape[1], len(sample), kv_len)
        per_row = keep.to(torch.float64).sum(dim=-1)  # (batch or 1, heads or 1, rows)
        per_row = per_row * (batch * heads / (per_row.shape[0] * per_row.shape[1]))
        total += float((per_row.sum(dim=(0, 1)) * weights[start:start + chunk]).sum())
    return round(total)


def attention_flops(ir: AttentionIR, elements: int, *, backward: bool = False) -> float:
    """FLOPs of attention over ``elements`` unmasked score elements: ``2·qk_dim + 2·v_dim`` each in the forward,
    2.5 times that in the backward (DESIGN.md)."""
    flops = float(elements) * (2 * ir.qk_dim + 2 * ir.v_dim)
    return 2.5 * flops if backward else flops


def tflops(flops: float, ms: float) -> float:
    """TFLOP/s of ``flops`` done in ``ms`` milliseconds."""
    return flops / (ms * 1e-3) / 1e12
