"""Timing on the GPU (device events, warm-up, median, rotating inputs), FLOP counting and peak memory."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from attnc.dsl import symbols
from attnc.dsl.ir import AttentionIR
from attnc.runtime.evaluate import evaluate


@dataclass(frozen=True)
class Timing:
    median_ms: float
    min_ms: float
    peak_mib: float


def time_cuda(fn: Callable[[int], object], *, rotations: int, warmup: int = 5, repeats: int = 20) -> Timing:
    """Median time of ``fn(i)`` over ``repeats`` runs, ``i`` cycling over ``rotations`` input sets.

    Each run is bracketed by CUDA events; the L2 cache is flushed between runs by rotating inputs (the caller
    sizes each set past the L2). Peak memory is what the runs allocated beyond what was live before them.
    """
    for i in range(warmup):
        fn(i % rotations)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i % rotations)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    return Timing(statistics.median(times), min(times), peak)


def unmasked_elements(ir: AttentionIR, batch: int, q_len: int, kv_len: int, inputs: dict, device,
                      rows: int = 1024) -> int:
    """How many (b, h, q, kv) score elements the mask keeps, counted exactly in row blocks on ``device``."""
    if not ir.has_mask:
        return batch * ir.q_heads * q_len * kv_len
    total = 0
    env = {
        symbols.b: torch.arange(batch, device=device).view(-1, 1, 1, 1),
        symbols.h: torch.arange(ir.q_heads, device=device).view(1, -1, 1, 1),
        symbols.kv_idx: torch.arange(kv_len, device=device).view(1, 1, 1, -1),
        symbols.q_len: q_len,
        symbols.kv_len: kv_len,
    }
    for start in range(0, q_len, rows):
        env[symbols.q_idx] = torch.arange(start, min(start + rows, q_len), device=device).view(1, 1, -1, 1)
        keep = torch.as_tensor(evaluate(ir.mask, env, inputs))
        shape = (batch, ir.q_heads, env[symbols.q_idx].shape[2], kv_len)
        total += int(keep.expand(shape).sum().item())
    return total


def forward_flops(ir: AttentionIR, elements: int) -> float:
    """DESIGN.md's convention: 2·qk_dim + 2·v_dim FLOPs per unmasked score element."""
    return float(elements) * (2 * ir.qk_dim + 2 * ir.v_dim)


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def rotation_count(tensors: Sequence[torch.Tensor], l2_bytes: int = 60 * 2**20) -> int:
    """Input sets needed so that cycling through them overflows the L2 (at least 2, at most 8)."""
    size = sum(t.numel() * t.element_size() for t in tensors)
    return max(2, min(8, -(-3 * l2_bytes // max(size, 1))))
