"""The measuring harnesses of one tuning run: a small check input with its reference result, timing inputs at the
bucket's real sizes, and running one forward kernel (`Harness`) or one backward (`BackwardHarness`) on them.

`Harness.verify(kernel)` runs the kernel on the check input (at most ``CHECK_LEN`` per length, batch ≤ 2, outputs
pre-filled with NaN so a kernel that writes nothing fails) and compares it with `attention_reference` by DESIGN.md's
rule: fp32 max abs error ≤ 1e-4; bf16/fp16 ≤ 2× torch's own same-precision error + 1e-5; the lse likewise, with -inf
exactly where the reference has it. `Harness.time(kernel)` times it with `timing.measure` over `timing.buffer_count`
rotating input sets. Forward kernels are called as ``kernel(q, k, v, *extras, *block_mask, out, lse)``, the block
mask's tensors (when the mask reads a tensor) made for the kernel's tiles before timing, as FlexAttention's are.

`BackwardHarness` checks a `attnc.runtime.autograd.Backward` (every stage of one config) the same way: its dq, dk,
dv from the reference's out and lse against float64 autograd of the reference, within twice torch's own
same-precision error (floored at half an ulp of the largest gradient: one lucky rounding of a short sum must not set
the bar) + 1e-5, or 1e-4 relative to the gradient's size in fp32; and times ``Backward.run`` at the bucket's sizes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping

import torch

from attnc.runtime.check import max_abs_error, random_qkv, random_sinks, tolerance
from attnc.runtime.reference import attention_reference
from attnc.schedules import timing

CHECK_LEN = 300
"""The check input's lengths are at most this (ragged for every block size up to 256)."""

def outputs(ir, q: torch.Tensor, fill: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    if ir.layout == "bshd":
        batch, q_len = q.shape[0], q.shape[1]
        shape = (batch, q_len, ir.q_heads, ir.v_dim)
    else:
        batch, q_len = q.shape[0], q.shape[2]
        shape = (batch, ir.q_heads, q_len, ir.v_dim)
    if fill is None:
        return (torch.empty(shape, dtype=q.dtype, device=q.device),
                torch.empty((batch, ir.q_heads, q_len), dtype=torch.float32, device=q.device))
    return (torch.full(shape, fill, dtype=q.dtype, device=q.device),
            torch.full((batch, ir.q_heads, q_len), fill, dtype=torch.float32, device=q.device))


InputsArg = Mapping[str, torch.Tensor] | Callable[[int, int], Mapping[str, torch.Tensor]] | None


def given_tensors(inputs: InputsArg, q_len: int, kv_len: int, device: torch.device) -> dict[str, torch.Tensor]:
    """``inputs`` (`tuner.tune`'s argument) made for these lengths, on ``device``."""
    made = inputs(q_len, kv_len) if callable(inputs) else (inputs or {})
    return {name: t.to(device) for name, t in made.items()}


class Harness:
    """The check input and its reference, the timing inputs, and running one kernel on them, for ``op`` (a
    `CompiledAttention`) at these sizes; ``inputs`` as in `tuner.tune`."""

    def __init__(self, op, dtype: torch.dtype, batch: int, q_len: int, kv_len: int, inputs: InputsArg,
                 device: torch.device, *, warmup: int, reps: int):
        self.op, self.ir, self.dtype, self.device = op, op.ir, dtype, device
        self.batch, self.q_len, self.kv_len, self.inputs = batch, q_len, kv_len, inputs
        self.warmup, self.reps = warmup, reps
        self._timing: tuple[list[tuple], list[torch.Tensor]] | None = None  # (rotating sets, extras), made lazily
        ir = self.ir
        cb, cq, ckv = min(batch, 2), min(q_len, CHECK_LEN), min(kv_len, CHECK_LEN)
        given = self.given(cq, ckv)
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        self.check_q, self.check_k, self.check_v = random_qkv(ir, cb, cq, ckv, dtype, device, generator)
        sinks = random_sinks(ir, device, generator)
        _, self.check_extras = op.prepare(self.check_q, self.check_k, self.check_v, given, sinks)
        tensors = {**{n: t.to(device) for n, t in op.spec.captured_tensors().items()}, **given}
        args = (ir, self.check_q, self.check_k, self.check_v, tensors, sinks)
        self.ref_out, self.ref_lse = attention_reference(*args, dtype=torch.float64)
        self.finite = torch.isfinite(self.ref_lse)
        if dtype == torch.float32:
            self.tol = self.lse_tol = tolerance(dtype)
        else:
            low_out, low_lse = attention_reference(*args, dtype=dtype)
            self.tol = tolerance(dtype, max_abs_error(low_out, self.ref_out))
            self.lse_tol = tolerance(dtype, max_abs_error(low_lse[self.finite], self.ref_lse[self.finite]))

    def given(self, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
        """The extra tensors the caller gave for these lengths, on the device (without the captured ones)."""
        return given_tensors(self.inputs, q_len, kv_len, self.device)

    def verify(self, kernel) -> str | None:
        """None when ``kernel`` agrees with the reference, else what is wrong."""
        out, lse = outputs(self.ir, self.check_q, fill=float("nan"))  # a kernel that writes nothing must not pass
        mask = self.op.block_mask_tensors(kernel.config, self.check_q, self.check_k, self.check_extras)
        kernel(self.check_q, self.check_k, self.check_v, *self.check_extras, *mask, out, lse)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        error = max_abs_error(out, self.ref_out)
        if not error <= self.tol:
            return f"output max abs error {error:.3g} > tolerance {self.tol:.3g}"
        if not torch.equal(torch.isneginf(lse), torch.isneginf(self.ref_lse)):
            return "lse is not -inf exactly where the reference's is (fully masked rows)"
        lse_error = max_abs_error(lse[self.finite], self.ref_lse[self.finite]) if self.finite.any() else 0.0
        if not lse_error <= self.lse_tol:
            return f"lse max abs error {lse_error:.3g} > tolerance {self.lse_tol:.3g}"
        return None

    def _timing_inputs(self) -> tuple[list[tuple], list[torch.Tensor]]:
        if self._timing is None:
            ir, generator = self.ir, torch.Generator().manual_seed(0)
            given = self.given(self.q_len, self.kv_len)
            first = random_qkv(ir, self.batch, self.q_len, self.kv_len, self.dtype, self.device, generator)
            _, extras = self.op.prepare(*first, given, random_sinks(ir, self.device, generator))
            out, lse = outputs(ir, first[0])
            per_set = sum(t.numel() * t.element_size() for t in (*first, out, lse))
            sets = [(*first, out, lse)]
            for _ in range(timing.buffer_count(per_set, self.device) - 1):
                qkv = random_qkv(ir, self.batch, self.q_len, self.kv_len, self.dtype, self.device, generator)
                sets.append((*qkv, *outputs(ir, qkv[0])))
            self._timing = sets, extras
        return self._timing

    def time(self, kernel, max_seconds: float | None = None) -> timing.Timing:
        """``kernel``'s times at the full sizes, rotating among the input sets (made on first use)."""
        sets, extras = self._timing_inputs()
        extras = extras + self.op.block_mask_tensors(kernel.config, sets[0][0], sets[0][1], extras)
        return timing.measure(lambda q, k, v, out, lse: kernel(q, k, v, *extras, out, lse), sets, device=self.device,
                              warmup=self.warmup, reps=self.reps, max_seconds=max_seconds)


class BackwardHarness:
    """`Harness` for the backward of ``op``: checks and times a `Backward` (q, k, v gradients) at these sizes."""

    def __init__(self, op, dtype: torch.dtype, batch: int, q_len: int, kv_len: int, inputs: InputsArg,
                 device: torch.device, *, warmup: int, reps: int):
        self.op, self.ir, self.dtype, self.device = op, op.ir, dtype, device
        self.batch, self.q_len, self.kv_len, self.inputs = batch, q_len, kv_len, inputs
        self.warmup, self.reps = warmup, reps
        self._timing: tuple[list[tuple], list[torch.Tensor]] | None = None
        generator = torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little"))
        self.check_set, self.check_extras, given = self._inputs(min(batch, 2), min(q_len, CHECK_LEN),
                                                                min(kv_len, CHECK_LEN), generator)
        q, k, v, _, _, dout = self.check_set
        tensors = self._tensors(given)
        sinks = self.check_extras[-1] if self.ir.sinks else None
        self.want = self._reference_grads(q, k, v, dout, tensors, sinks, torch.float64)
        low = self._reference_grads(q, k, v, dout, tensors, sinks, dtype) if dtype != torch.float32 else None
        self.bounds = []
        for i, want in enumerate(self.want):
            size = want.abs().max().item() if want.numel() else 0.0
            if low is None:
                self.bounds.append(tolerance(torch.float32) * max(1.0, size))
            else:
                half_ulp = torch.finfo(dtype).eps / 2 * size
                self.bounds.append(tolerance(dtype, max(max_abs_error(low[i], want), half_ulp)))

    def given(self, q_len: int, kv_len: int) -> dict[str, torch.Tensor]:
        return given_tensors(self.inputs, q_len, kv_len, self.device)

    def _tensors(self, given: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**{n: t.to(self.device) for n, t in self.op.spec.captured_tensors().items()}, **given}

    def _inputs(self, batch: int, q_len: int, kv_len: int, generator: torch.Generator,
                reference: bool = True) -> tuple[tuple, list, dict]:
        """``(q, k, v, out, lse, dout)``, the extras in kernel order and the given tensors; out and lse from the float64 reference (the
        check input), or from the op's own forward (the timing inputs: the reference would not fit at full size)."""
        ir = self.ir
        q, k, v = random_qkv(ir, batch, q_len, kv_len, self.dtype, self.device, generator)
        sinks = random_sinks(ir, self.device, generator)
        given = self.given(q_len, kv_len)
        _, extras = self.op.prepare(q, k, v, given, sinks)
        if reference:
            out, lse = attention_reference(ir, q, k, v, self._tensors(given), sinks, dtype=torch.float64)
        else:
            out, lse = self.op(q, k, v, sinks=sinks, return_lse=True, **given)
        dout = torch.randn(out.shape, generator=generator, dtype=torch.float32).to(self.device, self.dtype)
        return (q, k, v, out.to(self.dtype), lse.to(torch.float32), dout), extras, given

    def _reference_grads(self, q, k, v, dout, tensors, sinks, dtype) -> list[torch.Tensor]:
        with torch.enable_grad():  # a backward tuned on its first call runs inside the backward op (grad mode off)
            leaves = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
            low = {n: t.to(dtype) if t.is_floating_point() else t for n, t in tensors.items()}
            out, _ = attention_reference(self.ir, *leaves, low, sinks.to(dtype) if sinks is not None else None,
                                         dtype=dtype)
            return list(torch.autograd.grad(out, leaves, dout.to(dtype)))

    def verify(self, backward) -> str | None:
        """None when ``backward``'s dq, dk, dv agree with the reference, else what is wrong."""
        q, k, v, out, lse, dout = self.check_set
        got = backward.run(q, k, v, list(self.check_extras), out, lse, dout, None)[:3]
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for name, g, want, bound in zip(("dq", "dk", "dv"), got, self.want, self.bounds):
            error = max_abs_error(g, want)
            if not error <= bound:
                return f"{name} max abs error {error:.3g} > tolerance {bound:.3g}"
        return None

    def time(self, backward, max_seconds: float | None = None) -> timing.Timing:
        """``backward.run``'s times at the full sizes, rotating among the input sets (made on first use)."""
        if self._timing is None:
            generator = torch.Generator().manual_seed(0)
            first, extras, _ = self._inputs(self.batch, self.q_len, self.kv_len, generator, reference=False)
            per_set = sum(t.numel() * t.element_size() for t in first)
            sets = [first] + [self._inputs(self.batch, self.q_len, self.kv_len, generator, reference=False)[0]
                              for _ in range(timing.buffer_count(per_set, self.device) - 1)]
            self._timing = sets, extras
        sets, extras = self._timing
        return timing.measure(lambda q, k, v, out, lse, dout: backward.run(q, k, v, extras, out, lse, dout, None),
                              sets, device=self.device, warmup=self.warmup, reps=self.reps, max_seconds=max_seconds)
