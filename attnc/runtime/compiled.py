"""`attnc.compile` and `CompiledAttention`: a spec turned into a callable op."""

from __future__ import annotations

from typing import Mapping, Sequence

import torch

from attnc.codegen.build import Target
from attnc.dsl.spec import Attention
from attnc.errors import InputError, SpecError, UnsupportedError
from attnc.runtime import autograd as _autograd  # noqa: F401  (registers the backward of attnc::forward)
from attnc.runtime import custom_op
from attnc.runtime.kernels import KERNEL_DTYPES, Kernel
from attnc.runtime.support import check_supported
from attnc.runtime.validate import IndexBounds, Shapes, check_extras, check_qkv, check_sinks
from attnc.schedules import tuner
from attnc.schedules.config import KernelConfig
from attnc.schedules.heuristics import default_config

TARGET_DTYPES = {"cpu": (torch.float32,), "cuda": (torch.bfloat16, torch.float16)}


def resolve_target(target: str | Target) -> Target:
    """``"auto"`` → cuda (sm_90a on Hopper, sm_80 before) when a GPU is present, else cpu."""
    if isinstance(target, Target):
        return target
    if target == "auto":
        if torch.cuda.is_available():
            major, _ = torch.cuda.get_device_capability()
            return Target("cuda", "sm_90a" if major >= 9 else "sm_80")
        return Target("cpu")
    if target == "cpu":
        return Target("cpu")
    if target == "cuda":
        if torch.cuda.is_available() and torch.cuda.get_device_capability()[0] < 9:
            return Target("cuda", "sm_80")
        return Target("cuda", "sm_90a")
    raise UnsupportedError(f"`target` must be 'auto', 'cpu', 'cuda' or an attnc Target; got {target!r}")


class CompiledAttention:
    """An attention op compiled from a spec: ``op(q, k, v, **inputs)`` → output (and lse).

    Kernels are built on first use per (dtype, config) (or ahead of time with `build`), cached in memory and on
    disk. The config of a call comes from the tuning database for the call's shape bucket when it has an entry,
    else from the default heuristic (`config_for`); an explicit ``config`` overrides both.
    """

    def __init__(self, spec: Attention, target: Target, config: KernelConfig | None = None,
                 deterministic: bool = False, *, tune: bool = False, tune_options: Mapping | None = None):
        self.spec = spec
        self.deterministic = deterministic
        self.ir = spec.ir
        self.target = target
        self.family = "cpu_fwd" if target.kind == "cpu" else "fwd"
        self._config = config
        self.tune = tune
        self.tune_options = tuner.check_tune_options(tune_options)
        self._kernels: dict[tuple[torch.dtype, KernelConfig], Kernel] = {}
        self._dispatch: dict[tuple, tuple[KernelConfig, str]] = {}  # tuner.dispatch_slot -> (config, source)
        self._bounds = IndexBounds(self.ir)
        self._captured = spec.captured_tensors()
        self.op_id = custom_op.register(self)

    def config(self, dtype: torch.dtype) -> KernelConfig:
        if self._config is not None:
            return self._config
        return default_config(self.family, self.target.arch or "cpu", self.ir, KERNEL_DTYPES[dtype])

    def config_for(self, dtype: torch.dtype, batch: int, q_len: int, kv_len: int,
                   inputs: Mapping[str, torch.Tensor] | None = None) -> tuple[KernelConfig, str]:
        """The config a call of these sizes runs, and where it comes from: ``'explicit'`` (compile's ``config``),
        ``'database'`` (the tuning database's entry for the call's shape bucket), ``'tuned'`` (tuned now, not
        recorded) or ``'heuristic'`` (the default). Resolved once per (dtype, bucket) and kept in memory; with
        ``tune=True`` a bucket without an entry is tuned first (`attnc.schedules.tuner.lookup_or_tune`)."""
        if self._config is not None:
            return self._config, "explicit"
        slot = tuner.dispatch_slot(self.ir, dtype, batch, q_len, kv_len)
        if slot not in self._dispatch:
            self._dispatch[slot] = tuner.lookup_or_tune(self, dtype, batch=batch, q_len=q_len, kv_len=kv_len,
                                                        inputs=inputs)
        return self._dispatch[slot]

    def kernel(self, dtype: torch.dtype, config: KernelConfig | None = None) -> Kernel:
        """The forward kernel for ``dtype`` and ``config`` (default: `config`), rendered (not built) on first
        request."""
        if dtype not in TARGET_DTYPES[self.target.kind]:
            names = ", ".join(str(d).replace("torch.", "") for d in TARGET_DTYPES[self.target.kind])
            raise InputError(f"the {self.target.kind} target computes in {names}; got {dtype}")
        config = config or self.config(dtype)
        if (dtype, config) not in self._kernels:
            self._kernels[dtype, config] = Kernel.render(self.family, self.ir, config, KERNEL_DTYPES[dtype],
                                                         self.target)
        return self._kernels[dtype, config]

    def build(self, dtype: torch.dtype | None = None) -> CompiledAttention:
        """Build the kernel for ``dtype`` now (default: the target's first dtype) instead of on first call."""
        self.kernel(dtype or TARGET_DTYPES[self.target.kind][0]).build()
        return self

    def prepare(self, q, k, v, inputs: Mapping[str, torch.Tensor], sinks) -> tuple[Shapes, list[torch.Tensor]]:
        """Validate a call's arguments; the shapes and the extra tensors in kernel order (sinks last)."""
        shapes = check_qkv(self.ir, q, k, v, TARGET_DTYPES[self.target.kind], self.target.kind)
        extras = check_extras(self.ir, inputs, self._captured, q.device)
        self._bounds.check(shapes, {t.name: e for t, e in zip(self.ir.inputs, extras)})
        sink = check_sinks(self.ir, sinks, q.device)
        return shapes, extras + ([sink] if sink is not None else [])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sinks: torch.Tensor | None = None,
                 return_lse: bool = False, **inputs: torch.Tensor):
        """Attention of ``q`` over ``k``, ``v``; with ``return_lse=True`` also the natural-log log-sum-exp
        (batch, q_heads, q_len), float32."""
        _, extras = self.prepare(q, k, v, inputs, sinks)
        out, lse = custom_op.forward(q, k, v, extras, self.op_id)
        return (out, lse) if return_lse else out

    def launch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: list[torch.Tensor]):
        """Run the kernel on validated tensors; (out, lse)."""
        ir = self.ir
        if ir.layout == "bshd":
            batch, q_len, kv_len = q.shape[0], q.shape[1], k.shape[1]
            out = torch.empty((batch, q_len, ir.q_heads, ir.v_dim), dtype=q.dtype, device=q.device)
        else:
            batch, q_len, kv_len = q.shape[0], q.shape[2], k.shape[2]
            out = torch.empty((batch, ir.q_heads, q_len, ir.v_dim), dtype=q.dtype, device=q.device)
        lse = torch.empty((batch, ir.q_heads, q_len), dtype=torch.float32, device=q.device)
        if batch == 0 or q_len == 0:
            return out, lse
        if kv_len == 0:
            return out.zero_(), lse.fill_(float("-inf"))
        config, _ = self.config_for(q.dtype, batch, q_len, kv_len, {t.name: e for t, e in zip(ir.inputs, extras)})
        self.kernel(q.dtype, config)(q, k, v, *extras, out, lse)
        return out, lse

    def __repr__(self) -> str:
        lines = [f"CompiledAttention({self.spec!r}, target={self.target.label})"]
        for (dtype, _), kernel in self._kernels.items():
            lines.append(f"  {str(dtype).replace('torch.', '')}: {kernel.key} config={kernel.config.short()}")
        for (dtype, q_bucket, kv_bucket, bh_bucket), (config, source) in self._dispatch.items():
            lines.append(f"  {str(dtype).replace('torch.', '')} q{q_bucket} kv{kv_bucket} bh{bh_bucket}: "
                         f"config={config.short()} ({source})")
        if not self._kernels:
            lines.append("  no kernel built yet (built on first call or by .build(dtype))")
        return "\n".join(lines)


def compile(spec: Attention, *, target: str | Target = "auto", config: KernelConfig | None = None,
            dtype: torch.dtype | None = None, deterministic: bool = False, tune: bool = False,
            tune_shapes: Sequence[tuple[int, int, int]] | None = None,
            tune_options: Mapping | None = None) -> CompiledAttention:
    """Compile ``spec`` into an op.

    Args:
        spec: the `attnc.Attention` to compile.
        target: ``"auto"`` (default: cuda when a GPU is present, else cpu), ``"cpu"`` or ``"cuda"``.
        config: a `KernelConfig` to use instead of the default heuristic (default: None).
        dtype: build the kernel for this dtype now rather than on first call (default: None, lazily).
        deterministic: the backward computes dQ without atomics, so gradients are the same bits on every run
            (default: False: dQ accumulates with atomics, faster). See `attnc.runtime.autograd`.
        tune: autotune the forward kernel per shape bucket (default: False: tuning database entries are used where
            present, the default heuristic elsewhere). With True, every bucket without a database entry is tuned
            (`attnc.schedules.tuner.tune`) and recorded: those of ``tune_shapes`` now, any other on its first call
            (that call then takes up to the tuning budget, 60 s by default).
        tune_shapes: ``(batch, q_len, kv_len)`` shapes to tune now, in ``dtype`` (default: the target's first
            dtype) (default: None: none now, each bucket on its first call).
        tune_options: the tuner's settings (default: None: its defaults): ``budget_s``, ``max_candidates``,
            ``workers``, ``configs``, ``progress``, ``database`` (also where dispatch looks), ``inputs``, ``force``;
            see `attnc.schedules.tuner.TUNE_OPTIONS`.
    """
    if not isinstance(spec, Attention):
        raise SpecError(f"attnc.compile takes an attnc.Attention; got {type(spec).__name__}")
    resolved = resolve_target(target)
    check_supported(spec.ir, resolved)
    if tune and config is not None:
        raise InputError("pass either `config` (a fixed KernelConfig) or `tune=True`, not both")
    if tune_shapes and not tune:
        raise InputError("`tune_shapes` are tuned only with `tune=True`; pass tune=True as well")
    op = CompiledAttention(spec, resolved, config, deterministic, tune=tune, tune_options=tune_options)
    if tune and tune_shapes:
        tuner.tune_ahead(op, tune_shapes, dtype or TARGET_DTYPES[resolved.kind][0])
    if dtype is not None:
        op.build(dtype)
    return op
