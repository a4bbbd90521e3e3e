"""Gradients of captured tensors with torch operations in a fixed order: what deterministic mode runs on cuda.

The cuda backward kernel adds the gradient of a tensor the score_mod reads with atomics, whose order varies between
runs. ``deterministic=True`` computes those gradients here instead. Per chunk of query rows it recomputes the
modded scores ``s``, ``P = exp(s - lse)`` on the kept elements and ``dS = P · (dO vᵀ - rowsum(dO · O) + dlse)``;
each float read of the score_mod (`attnc.dsl.derivative.read_gradients`: the read and ``d score_mod / d read``,
as the kernel uses them) adds ``dS · d score_mod / d read`` at its index with ``index_put_(accumulate=True)`` under
torch's deterministic algorithms (a sorted accumulation), and the chunks add in row order, so every run gives the
same bits. No autograd: this runs inside the backward custom op, below autograd. The work is the reference's,
O(q_len · kv_len) elements per head in torch: slower than the kernel's atomics, the price of the guarantee.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch

from attnc.dsl import symbols
from attnc.dsl.derivative import read_gradients
from attnc.dsl.ir import AttentionIR
from attnc.runtime.evaluate import evaluate, index_env

CHUNK_ELEMENTS = 1 << 24
"""Score elements (batch × q heads × rows × kv_len) recomputed at once: about 64 MiB per float32 temporary."""


@contextlib.contextmanager
def _deterministic_algorithms() -> Iterator[None]:
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


def tensor_gradients(ir: AttentionIR, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     inputs: Mapping[str, torch.Tensor], out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                     dlse: torch.Tensor | None, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """The gradients (float32) of the captured float tensors ``names`` for an attention call of ``ir`` with these
    q, k, v (its layout), ``inputs`` (every tensor the mods read, by name), forward ``out`` and natural-log ``lse``
    (batch, q_heads, q_len), and the gradients ``dout`` and ``dlse`` (None: zero) of those outputs."""
    if ir.layout == "bshd":
        q, k, v, out, dout = (t.transpose(1, 2) for t in (q, k, v, out, dout))
    q, k, v, out, dout = (t.float() for t in (q, k, v, out, dout))
    if ir.group > 1:
        k, v = (t.repeat_interleave(ir.group, dim=1) for t in (k, v))
    batch, heads, q_len, _ = q.shape
    kv_len = k.shape[2]
    device = q.device
    tensors = dict(inputs)
    grads = {name: torch.zeros(inputs[name].shape, dtype=torch.float32, device=device) for name in names}
    reads = read_gradients(ir, set(names))
    delta = (dout * out).sum(-1) - (dlse.float() if dlse is not None else 0.0)  # (batch, heads, q_len)
    rows = max(1, CHUNK_ELEMENTS // max(1, batch * heads * kv_len))
    for start in range(0, q_len if reads else 0, rows):
        stop = min(q_len, start + rows)
        chunk = index_env(batch, heads, q_len, kv_len, device, torch.arange(start, stop, device=device))
        shape = (batch, heads, stop - start, kv_len)
        chunk[symbols.score] = torch.einsum("bhqd,bhkd->bhqk", q[:, :, start:stop], k) * ir.scale
        scores = torch.as_tensor(evaluate(ir.score, chunk, tensors, torch.float32)).expand(shape)
        keep = torch.as_tensor(evaluate(ir.mask, chunk, tensors, torch.float32)).to(device).expand(shape)
        row_lse = lse[:, :, start:stop, None].float()
        keep = keep & torch.isfinite(row_lse)
        probs = torch.where(keep, torch.exp(scores - row_lse), 0.0)
        d_probs = torch.einsum("bhqd,bhkd->bhqk", dout[:, :, start:stop], v)
        d_scores = probs * (d_probs - delta[:, :, start:stop, None])
        for read in reads:
            factor = torch.as_tensor(evaluate(read.derivative, chunk, tensors, torch.float32)).to(device)
            values = torch.where(keep, d_scores * factor, 0.0)
            index = [torch.as_tensor(evaluate(i, chunk, tensors, torch.float32)).to(device).long()
                     for i in read.read.indices]
            *index, values = torch.broadcast_tensors(*index, values)
            with _deterministic_algorithms():
                grads[read.name].index_put_(tuple(index), values, accumulate=True)
    return grads
