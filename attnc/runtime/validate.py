"""Checking what a caller passes to a compiled op, with errors that name the argument, the expectation and the fix."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Mapping

import sympy
import torch

from attnc.dsl import symbols
from attnc.dsl.ir import AttentionIR
from attnc.errors import InputError


@dataclass(frozen=True)
class Shapes:
    """The sizes a call resolves to."""

    batch: int
    q_len: int
    kv_len: int


def _dims(layout: str) -> str:
    return "(B, S, H, D)" if layout == "bshd" else "(B, H, S, D)"


def _split(layout: str, shape: torch.Size) -> tuple[int, int, int, int]:
    """(batch, seq, heads, dim) of a 4-D q/k/v shape in ``layout``."""
    if layout == "bshd":
        return shape[0], shape[1], shape[2], shape[3]
    return shape[0], shape[2], shape[1], shape[3]


def check_qkv(ir: AttentionIR, q, k, v, dtypes: tuple[torch.dtype, ...], device_kind: str) -> Shapes:
    """Validate q, k, v against the spec; the batch and lengths they carry."""
    other = "bhsd" if ir.layout == "bshd" else "bshd"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"`{name}` must be a torch.Tensor; got {type(t).__name__}")
        if t.ndim != 4:
            raise InputError(
                f"`{name}` must have 4 dimensions {_dims(ir.layout)} for layout '{ir.layout}', but got shape "
                f"{tuple(t.shape)}. Pass layout='{other}' to attnc.Attention for {_dims(other)} tensors."
            )
        if t.dtype not in dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
            raise InputError(f"`{name}` must have dtype {names} on the {device_kind} target; got "
                             f"{str(t.dtype).replace('torch.', '')}")
        if t.device.type != device_kind:
            raise InputError(f"`{name}` must be on a {device_kind} device for this op (target '{device_kind}'); "
                             f"got {t.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise InputError(f"`q`, `k`, `v` must share one dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise InputError(f"`q`, `k`, `v` must be on one device; got {q.device}, {k.device}, {v.device}")
    qb, q_len, qh, qd = _split(ir.layout, q.shape)
    kb, kv_len, kh, kd = _split(ir.layout, k.shape)
    vb, v_len, vh, vd = _split(ir.layout, v.shape)
    expect = (
        ("q", "heads", qh, ir.q_heads), ("k", "heads", kh, ir.kv_heads), ("v", "heads", vh, ir.kv_heads),
        ("q", "head dim", qd, ir.qk_dim), ("k", "head dim", kd, ir.qk_dim), ("v", "head dim", vd, ir.v_dim),
    )
    for name, what, got, want in expect:
        if got != want:
            raise InputError(f"`{name}` must have {want} {what} (the spec's), but its shape {_dims(ir.layout)} is "
                             f"{tuple((q if name == 'q' else k if name == 'k' else v).shape)}")
    if not (qb == kb == vb):
        raise InputError(f"`q`, `k`, `v` must share the batch size; got {qb}, {kb}, {vb}")
    if kv_len != v_len:
        raise InputError(f"`k` and `v` must have the same sequence length; got {kv_len} and {v_len}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_contiguous():
            raise InputError(f"`{name}` must be contiguous in layout '{ir.layout}' {_dims(ir.layout)}; got strides "
                             f"{t.stride()}. Call .contiguous() first.")
    return Shapes(qb, q_len, kv_len)


def check_extras(ir: AttentionIR, given: Mapping[str, torch.Tensor], captured: Mapping[str, torch.Tensor],
                 device: torch.device) -> list[torch.Tensor]:
    """The extra inputs in kernel order: passed by name, or the mod's captured tensor; checked and on ``device``."""
    expected = [t.name for t in ir.inputs]
    unexpected = sorted(set(given) - set(expected))
    if unexpected:
        listing = ", ".join(f"`{n}`" for n in expected) or "none"
        raise InputError(f"unexpected input {', '.join(f'`{n}`' for n in unexpected)}; this spec takes: {listing}")
    tensors = []
    for declared in ir.inputs:
        if declared.name in given:
            t = given[declared.name]
            where = f"input `{declared.name}`"
        elif declared.name in captured:
            t = captured[declared.name].to(device)
            where = f"captured tensor `{declared.name}`"
        else:
            raise InputError(f"missing input `{declared.name}`: pass it as op(q, k, v, {declared.name}=tensor) "
                             f"({declared.dtype}, {len(declared.shape)} dimensions)")
        if not isinstance(t, torch.Tensor):
            raise InputError(f"{where} must be a torch.Tensor; got {type(t).__name__}")
        if t.dtype != declared.torch_dtype:
            raise InputError(f"{where} must have dtype {declared.dtype} (as traced); got "
                             f"{str(t.dtype).replace('torch.', '')}. Convert it with .to(torch.{declared.dtype}).")
        if t.ndim != len(declared.shape):
            raise InputError(f"{where} must have {len(declared.shape)} dimensions; got shape {tuple(t.shape)}")
        if t.device != device:
            raise InputError(f"{where} must be on {device} like q; got {t.device}")
        tensors.append(t.contiguous())
    return tensors


def check_sinks(ir: AttentionIR, sinks, device: torch.device) -> torch.Tensor | None:
    if not ir.sinks:
        if sinks is not None:
            raise InputError("`sinks` was passed but the spec has no sinks; build it with attnc.Attention(..., sinks=True)")
        return None
    if sinks is None:
        raise InputError(f"missing `sinks`: this spec takes op(q, k, v, sinks=tensor) with shape ({ir.q_heads},)")
    if not isinstance(sinks, torch.Tensor) or not sinks.is_floating_point():
        raise InputError(f"`sinks` must be a floating-point torch.Tensor of shape ({ir.q_heads},); got {sinks!r:.60}")
    if tuple(sinks.shape) != (ir.q_heads,):
        raise InputError(f"`sinks` must have shape ({ir.q_heads},), one logit per q head; got {tuple(sinks.shape)}")
    if sinks.device != device:
        raise InputError(f"`sinks` must be on {device} like q; got {sinks.device}")
    return sinks.to(torch.float32).contiguous()


class IndexBounds:
    """Checks that every affine tensor read of the mods stays inside the tensor for the call's sizes.

    An affine index reaches its extremes at the corners of the (b, h, q_idx, kv_idx) box, so evaluating the 16
    corners is exact; reads whose index is not affine (a tensor read inside an index) are not checked.
    """

    def __init__(self, ir: AttentionIR):
        self.ir = ir
        reads = set()
        for expr in (ir.score, ir.mask):
            reads |= expr.atoms(sympy.Indexed)
        args = (symbols.b, symbols.h, symbols.q_idx, symbols.kv_idx, symbols.q_len, symbols.kv_len)
        self.checks = []
        for read in sorted(reads, key=str):
            for axis, index in enumerate(read.indices):
                if index.atoms(sympy.Indexed) or not index.is_polynomial(*args[:4]) or \
                        sympy.Poly(index, *args[:4]).total_degree() > 1:
                    continue
                self.checks.append((str(read.base), axis, str(read), sympy.lambdify(args, index, "math")))

    def check(self, shapes: Shapes, tensors: Mapping[str, torch.Tensor]) -> None:
        if shapes.q_len == 0 or shapes.kv_len == 0:
            return
        box = ((0, shapes.batch - 1), (0, self.ir.q_heads - 1), (0, shapes.q_len - 1), (0, shapes.kv_len - 1))
        for name, axis, text, fn in self.checks:
            size = tensors[name].shape[axis]
            values = [fn(*corner, shapes.q_len, shapes.kv_len) for corner in itertools.product(*box)]
            low, high = min(values), max(values)
            if low < 0 or high >= size:
                raise InputError(
                    f"`{text}` reads `{name}` at dimension {axis} from {low} to {high} for batch {shapes.batch}, "
                    f"q_len {shapes.q_len}, kv_len {shapes.kv_len}, but `{name}` has size {size} there"
                )
