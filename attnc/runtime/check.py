"""Checking a compiled op against the reference on random inputs, by the project's numerics rule.

The rule (DESIGN.md): compare with the reference in float64. A float32 kernel passes when its max abs error is at
most 1e-4. A bf16/fp16 kernel passes when its max error is at most twice the error of torch's own same-precision
computation of the reference, plus 1e-5 (FlashAttention's test rule). Inputs are random and fresh for every check
(never zeros); the seed is recorded so a failure can be replayed with ``check_op(..., seed=...)``.

The log-sum-exp is checked by the same rule where it is finite, and must be -inf exactly where the reference's is
(fully masked rows).
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from typing import Mapping

import torch

from attnc.dsl.ir import AttentionIR
from attnc.errors import UnsupportedError

FP32_TOLERANCE = 1e-4
LOW_PRECISION_SLACK = 1e-5
DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
               "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def dtype_label(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"fp32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"`` (or a torch dtype) → torch dtype."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPE_NAMES:
        raise UnsupportedError(f"dtype must be one of {', '.join(DTYPE_NAMES)}; got {name!r}")
    return DTYPE_NAMES[name]


def tolerance(dtype: torch.dtype, torch_error: float | None = None) -> float:
    """The largest max-abs error a kernel computing in ``dtype`` may have.

    ``torch_error``: the max error of torch's own ``dtype`` computation of the reference (needed for bf16/fp16).
    """
    if dtype == torch.float32:
        return FP32_TOLERANCE
    if torch_error is None:
        raise ValueError(f"the tolerance for {dtype_label(dtype)} needs torch's own {dtype_label(dtype)} error")
    return 2.0 * torch_error + LOW_PRECISION_SLACK


def max_abs_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| over all elements, in float64 (0 for empty tensors)."""
    if got.numel() == 0:
        return 0.0
    return (got.to(torch.float64) - want.to(torch.float64)).abs().max().item()


def _lse_error(got: torch.Tensor, want: torch.Tensor) -> tuple[float, bool]:
    """(max error where the reference is finite, whether -inf appears exactly where the reference has it)."""
    got, want = got.to(torch.float64), want.to(torch.float64)
    finite = torch.isfinite(want)
    same_inf = bool(torch.equal(torch.isneginf(got), torch.isneginf(want)))
    if not finite.any():
        return 0.0, same_inf
    return max_abs_error(got[finite], want[finite]), same_inf


def random_qkv(ir: AttentionIR, batch: int, q_len: int, kv_len: int, dtype: torch.dtype,
               device: torch.device | str = "cpu", generator: torch.Generator | None = None):
    """Standard-normal q, k, v in the spec's layout (drawn in float32 on the CPU, then cast and moved)."""

    def draw(seq: int, heads: int, dim: int) -> torch.Tensor:
        shape = (batch, seq, heads, dim) if ir.layout == "bshd" else (batch, heads, seq, dim)
        return torch.randn(shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)

    return draw(q_len, ir.q_heads, ir.qk_dim), draw(kv_len, ir.kv_heads, ir.qk_dim), draw(kv_len, ir.kv_heads, ir.v_dim)


def random_sinks(ir: AttentionIR, device: torch.device | str = "cpu",
                 generator: torch.Generator | None = None) -> torch.Tensor | None:
    """One standard-normal logit per q head (float32) when the spec has sinks, else None."""
    if not ir.sinks:
        return None
    return torch.randn(ir.q_heads, generator=generator, dtype=torch.float32).to(device)


@dataclass(frozen=True)
class CheckResult:
    """One comparison of an op with the reference: sizes, errors, tolerances, verdict and timings."""

    name: str
    target: str
    dtype: str
    batch: int
    q_len: int
    kv_len: int
    max_error: float
    tolerance: float
    lse_error: float
    lse_tolerance: float
    lse_inf_match: bool
    seed: int
    build_s: float  # building (or loading from the cache) the kernel; 0 when the op had it already
    run_s: float  # one call of the op, after a first (checked) call
    config: str = ""  # the kernel config the call ran (`KernelConfig.short`)
    config_source: str = ""  # where it came from: 'heuristic', 'database', 'tuned' or 'explicit'

    @property
    def passed(self) -> bool:
        return self.max_error <= self.tolerance and self.lse_error <= self.lse_tolerance and self.lse_inf_match

    @property
    def shape(self) -> str:
        return f"{self.batch}x{self.q_len}x{self.kv_len}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_op(op, *, batch: int = 2, q_len: int = 128, kv_len: int | None = None, dtype: torch.dtype | None = None,
             inputs: Mapping[str, torch.Tensor] | None = None, seed: int | None = None,
             name: str | None = None, block_mask: bool = False) -> CheckResult:
    """Build ``op`` (a `CompiledAttention`) for ``dtype``, run it on random inputs and compare with the reference.

    Args:
        op: the compiled op.
        batch, q_len, kv_len: the sizes (``kv_len`` defaults to ``q_len``).
        dtype: the dtype q, k, v are drawn in (default: the target's first, float32 on cpu, bfloat16 on cuda).
        inputs: extra tensors to pass by name, overriding the spec's captured ones (default: the captured ones).
        seed: seeds q, k, v and sinks (default: a fresh random seed, recorded in the result).
        name: the label of the result (default: the spec's name).
        block_mask: make the op's block mask ahead (``op.block_mask``) and pass it to the calls (default: False,
            each call computes its own); for ops whose mask reads a tensor.
    """
    from attnc.runtime.compiled import TARGET_DTYPES
    from attnc.runtime.reference import attention_reference

    kind = op.target.kind
    dtype = parse_dtype(dtype) if dtype is not None else TARGET_DTYPES[kind][0]
    kv_len = q_len if kv_len is None else kv_len
    if kind == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError("running the cuda target needs a CUDA GPU and none is visible; build without running "
                               "with `attnc show --target cuda`, or use target 'cpu'")
    device = torch.device("cuda" if kind == "cuda" else "cpu")
    seed = random.SystemRandom().randrange(2**31) if seed is None else seed
    generator = torch.Generator().manual_seed(seed)
    ir = op.ir

    given = {key: t.to(device) for key, t in (inputs or {}).items()}
    extras = {**{key: t.to(device) for key, t in op.spec.captured_tensors().items()}, **given}
    start = time.perf_counter()  # the kernel a call of these sizes runs (tuned per shape bucket, or the default)
    config, config_source = op.config_for(dtype, batch, q_len, kv_len, extras)
    op.kernel(dtype, config).build()
    build_s = time.perf_counter() - start

    q, k, v = random_qkv(ir, batch, q_len, kv_len, dtype, device, generator)
    sinks = random_sinks(ir, device, generator)

    mask = op.block_mask(q_len, kv_len, batch=batch, dtype=dtype, device=device, **given) if block_mask else None
    out, lse = op(q, k, v, sinks=sinks, return_lse=True, block_mask=mask, **given)
    _sync(device)
    start = time.perf_counter()  # a second call, timed: the first pays one-time costs (torch's op dispatch set-up)
    op(q, k, v, sinks=sinks, return_lse=True, block_mask=mask, **given)
    _sync(device)
    run_s = time.perf_counter() - start

    ref_out, ref_lse = attention_reference(ir, q, k, v, extras, sinks, dtype=torch.float64)
    if dtype == torch.float32:
        tol = lse_tol = tolerance(dtype)
    else:
        low_out, low_lse = attention_reference(ir, q, k, v, extras, sinks, dtype=dtype)
        tol = tolerance(dtype, max_abs_error(low_out, ref_out))
        lse_tol = tolerance(dtype, _lse_error(low_lse, ref_lse)[0])
    lse_error, inf_match = _lse_error(lse, ref_lse)
    return CheckResult(
        name=name or op.spec.name, target=op.target.label, dtype=dtype_label(dtype), batch=batch, q_len=q_len,
        kv_len=kv_len, max_error=max_abs_error(out, ref_out), tolerance=tol, lse_error=lse_error,
        lse_tolerance=lse_tol, lse_inf_match=inf_match, seed=seed, build_s=build_s, run_s=run_s,
        config=config.short(), config_source=config_source,
    )
