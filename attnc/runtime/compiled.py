"""`attnc.compile` and `CompiledAttention`: a spec turned into a callable op."""

from __future__ import annotations

import dataclasses
import json
from typing import Mapping, Sequence

import torch

from attnc.codegen.build import Target
from attnc.dsl.blockmask import block_mask_layout
from attnc.dsl.spec import Attention
from attnc.errors import InputError, SpecError, UnsupportedError
from attnc.runtime import autograd as _autograd  # also registers the backward of attnc::forward
from attnc.runtime import custom_op
from attnc.runtime.blockmask import STAGE_TENSORS, BlockMask, check_block_mask, classify, compact
from attnc.runtime.check import parse_dtype
from attnc.runtime.kernels import KERNEL_DTYPES, BlockMaskKernel, Kernel
from attnc.runtime.support import check_supported
from attnc.runtime.validate import IndexBounds, Shapes, check_extras, check_qkv, check_sinks
from attnc.schedules import tuner
from attnc.schedules.config import KernelConfig
from attnc.schedules.heuristics import default_config, default_configs

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

    A mask that reads a tensor (``block_mask_layout`` is not None) runs with a block mask computed per call from
    the lengths and the tensors' values, or made once with `block_mask` and passed as ``block_mask=`` (the backward
    of such a call reuses its lists too).
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
        self._backward_dispatch: dict[tuple, tuple[KernelConfig, str]] = {}  # the same for the backward
        self._bounds = IndexBounds(self.ir)
        self._captured = spec.captured_tensors()
        self.block_mask_layout = block_mask_layout(self.ir.mask)
        self._mask_owner = (self.ir.key, target.label)  # what a block mask of this op records (read when traced)
        self._classifiers: dict[tuple[int, int], BlockMaskKernel] = {}
        self.op_id = custom_op.register(self)

    def config(self, dtype: torch.dtype) -> KernelConfig:
        """compile's ``config``, else the default heuristic's for ``dtype`` at an unknown loop length (calls dispatch
        through `config_for`, which knows theirs)."""
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

    def backward_config_for(self, dtype: torch.dtype, batch: int, q_len: int, kv_len: int) -> tuple[KernelConfig, str]:
        """The backward's config for a call of these sizes and where it comes from, as `config_for` (compile's
        ``config`` is the forward's only): the database entry of the backward family for the bucket (tuned ahead:
        ``attnc.schedules.tuner.tune(..., backward=True)``, ``attnc tune --backward``), else
        `attnc.schedules.heuristics.backward_config`."""
        slot = tuner.dispatch_slot(self.ir, dtype, batch, q_len, kv_len)
        if slot not in self._backward_dispatch:
            self._backward_dispatch[slot] = tuner.lookup_or_tune(self, dtype, batch=batch, q_len=q_len,
                                                                 kv_len=kv_len, backward=True)
        return self._backward_dispatch[slot]

    def kernel(self, dtype: torch.dtype, config: KernelConfig | None = None) -> Kernel:
        """The forward kernel for ``dtype`` and ``config`` (default: `config`), rendered (not built) on first
        request."""
        self._check_dtype(dtype)
        config = config or self.config(dtype)
        if (dtype, config) not in self._kernels:
            self._kernels[dtype, config] = Kernel.render(self.family, self.ir, config, KERNEL_DTYPES[dtype],
                                                         self.target)
        return self._kernels[dtype, config]

    def _check_dtype(self, dtype: torch.dtype) -> torch.dtype:
        if dtype not in TARGET_DTYPES[self.target.kind]:
            names = ", ".join(str(d).replace("torch.", "") for d in TARGET_DTYPES[self.target.kind])
            raise InputError(f"dtype: the {self.target.kind} target computes in {names}; got {dtype!r}")
        return dtype

    def build(self, dtype: torch.dtype | str | None = None) -> CompiledAttention:
        """Build now, instead of on first call, the kernels calls in ``dtype`` (a torch dtype or a name: "bf16",
        "float16", ...; default: the target's first dtype) may run: compile's ``config``, else every config the
        default heuristic gives (one for long kv loops, one for short loops where they differ). Configs from the
        tuning database are built when a call dispatches to them."""
        dtype = self._check_dtype(parse_dtype(dtype) if dtype is not None else TARGET_DTYPES[self.target.kind][0])
        configs = [self._config] if self._config is not None else default_configs(
            self.family, self.target.arch or "cpu", self.ir, KERNEL_DTYPES[dtype])
        for config in configs:
            self.kernel(dtype, config).build()
        return self

    def prepare(self, q, k, v, inputs: Mapping[str, torch.Tensor], sinks) -> tuple[Shapes, list[torch.Tensor]]:
        """Validate a call's arguments; the shapes and the extra tensors in kernel order (sinks last)."""
        shapes = check_qkv(self.ir, q, k, v, TARGET_DTYPES[self.target.kind], self.target.kind)
        extras = check_extras(self.ir, inputs, self._captured, q.device)
        self._bounds.check(shapes, {t.name: e for t, e in zip(self.ir.inputs, extras)})
        sink = check_sinks(self.ir, sinks, q.device)
        return shapes, extras + ([sink] if sink is not None else [])

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, sinks: torch.Tensor | None = None,
                 return_lse: bool = False, block_mask: BlockMask | None = None, **inputs: torch.Tensor):
        """Attention of ``q`` over ``k``, ``v``; with ``return_lse=True`` also the natural-log log-sum-exp
        (batch, q_heads, q_len), float32. ``block_mask``: one made by `block_mask` for these lengths (default:
        None, computed in the call when the mask reads a tensor); the call then runs with its config."""
        if not isinstance(return_lse, bool):
            raise InputError(f"`return_lse` must be True or False; got {return_lse!r}")
        shapes, extras = self.prepare(q, k, v, inputs, sinks)
        mask_tensors, mask_config = [], ""
        if block_mask is not None:
            check_block_mask(block_mask, spec_key=self._mask_owner[0], target=self._mask_owner[1],
                             layout=self.block_mask_layout, batch=shapes.batch, q_len=shapes.q_len,
                             kv_len=shapes.kv_len, device=q.device, config=self._config)
            mask_tensors, mask_config = block_mask.tensors(), block_mask.config_json
        out, lse = custom_op.forward(q, k, v, extras, self.op_id, mask_tensors, mask_config)
        return (out, lse) if return_lse else out

    def block_mask(self, q_len: int, kv_len: int | None = None, *, batch: int = 1, dtype: torch.dtype | None = None,
                   device: torch.device | str | None = None, backward: bool = True,
                   **inputs: torch.Tensor) -> BlockMask:
        """The block mask of calls at these sizes, made now to pass as ``op(q, k, v, block_mask=bm, **inputs)``.

        Args:
            q_len, kv_len: the call's lengths (``kv_len`` defaults to ``q_len``).
            batch: the call's batch size (default 1); with a mask that reads ``b``, the mask serves only it.
            dtype: the call's dtype (default: the target's first), which with the sizes picks the kernel config.
            device: where the mask tensors live (default: the current cuda device, or the cpu).
            backward: also make the backward's lists, at the backward's config for these sizes, which the backward
                of a call with this mask then reuses (default True; False for inference saves building the
                backward's classifier kernel, and a backward then classifies per call).
            inputs: the tensors the mask reads, by name (default: the ones the mods captured). The block mask
                holds for these values only.
        """
        if self.block_mask_layout is None:
            raise InputError("this op's mask reads no tensor: the compile-time tile map decides its tiles, and it "
                             "takes no block mask")
        kv_len = q_len if kv_len is None else kv_len
        if not isinstance(backward, bool):
            raise InputError(f"block_mask `backward` must be True or False; got {backward!r}")
        for name, value in (("q_len", q_len), ("kv_len", kv_len), ("batch", batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InputError(f"block_mask `{name}` must be a non-negative int; got {value!r}")
        dtype = dtype or TARGET_DTYPES[self.target.kind][0]
        if dtype not in TARGET_DTYPES[self.target.kind]:
            names = ", ".join(str(d).replace("torch.", "") for d in TARGET_DTYPES[self.target.kind])
            raise InputError(f"block_mask `dtype` must be one the {self.target.kind} target computes in ({names}); "
                             f"got {dtype}")
        device = torch.device(device or ("cuda" if self.target.kind == "cuda" else "cpu"))
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        extras = check_extras(self.ir, inputs, self._captured, device)
        named = {t.name: e for t, e in zip(self.ir.inputs, extras)}
        self._bounds.check(Shapes(batch, q_len, kv_len), named)
        config, _ = self.config_for(dtype, batch, q_len, kv_len, named)
        mask = self._make_block_mask(config, batch, q_len, kv_len, extras, device)
        if not backward:
            return mask
        backward_config, _ = self.backward_config_for(dtype, batch, q_len, kv_len)
        stages = _autograd.backward_for(self, dtype, (), config=backward_config)
        lists = [t for stage in stages.mask_stages()
                 for t in stages.block_mask_tensors(stage, extras, batch, q_len, kv_len, device)]
        config_json = json.dumps({**json.loads(mask.config_json), "backward": json.loads(backward_config.to_json())})
        return dataclasses.replace(mask, config_json=config_json, backward_config=backward_config,
                                   backward_lists=tuple(lists))

    def _make_block_mask(self, config: KernelConfig, batch: int, q_len: int, kv_len: int,
                         inputs: list[torch.Tensor], device: torch.device) -> BlockMask:
        tiles = (config.block_m, config.block_n)
        if tiles not in self._classifiers:
            self._classifiers[tiles] = BlockMaskKernel.render(self.ir, *tiles, self.target)
        tile_kind = classify(self._classifiers[tiles], inputs, self.block_mask_layout, batch, self.ir.q_heads,
                             q_len, kv_len, device)
        kv_count, kv_list = compact(tile_kind)
        return BlockMask(*self._mask_owner, config, config.to_json(), batch, q_len, kv_len, tile_kind,
                         kv_count, kv_list)

    def block_mask_tensors(self, config: KernelConfig, q: torch.Tensor, k: torch.Tensor,
                           extras: list[torch.Tensor]) -> list[torch.Tensor]:
        """What a forward kernel of ``config`` takes after ``extras`` for these q, k: the tensors of a block mask
        computed now when the mask reads a tensor, else nothing."""
        if self.block_mask_layout is None:
            return []
        bshd = self.ir.layout == "bshd"
        batch, q_len, kv_len = q.shape[0], q.shape[1 if bshd else 2], k.shape[1 if bshd else 2]
        inputs = extras[:len(self.ir.inputs)]
        return self._make_block_mask(config, batch, q_len, kv_len, inputs, q.device).tensors()

    def launch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: list[torch.Tensor],
               block_mask: list[torch.Tensor], block_config: str):
        """Run the kernel on validated tensors, with ``block_mask``'s tensors and config (``block_config``, JSON)
        when given; (out, lse)."""
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
        if block_config:
            config = KernelConfig.from_json(block_config)
        else:
            config, _ = self.config_for(q.dtype, batch, q_len, kv_len,
                                        {t.name: e for t, e in zip(ir.inputs, extras)})
            block_mask = self.block_mask_tensors(config, q, k, extras)
        self.kernel(q.dtype, config)(q, k, v, *extras, *block_mask[:STAGE_TENSORS], out, lse)
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
        if self.block_mask_layout is not None:
            layout = self.block_mask_layout
            lines.append(f"  block mask: computed at run time (varies with b: {layout.per_batch}, with h: "
                         f"{layout.per_head}); op.block_mask(...) makes one to reuse")
        return "\n".join(lines)


def compile(spec: Attention, *, target: str | Target = "auto", config: KernelConfig | None = None,
            dtype: torch.dtype | str | None = None, deterministic: bool = False, tune: bool = False,
            tune_shapes: Sequence[tuple[int, int, int]] | None = None,
            tune_options: Mapping | None = None) -> CompiledAttention:
    """Compile ``spec`` into an op.

    Args:
        spec: the `attnc.Attention` to compile.
        target: ``"auto"`` (default: cuda when a GPU is present, else cpu), ``"cpu"`` or ``"cuda"``.
        config: a `KernelConfig` to use instead of the default heuristic (default: None).
        dtype: build the kernels for this dtype (a torch dtype or a name: "bf16", "float16", ...) now rather than on
            first call (default: None, lazily); see `CompiledAttention.build`.
        deterministic: the backward computes dQ without atomics, and on cuda the gradients of captured tensors with
            torch in a fixed order (`attnc.runtime.tensor_gradients`, slower), so gradients are the same bits on
            every run (default: False: atomics, faster). See `attnc.runtime.autograd`.
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
    dtype = parse_dtype(dtype) if dtype is not None else None
    op = CompiledAttention(spec, resolved, config, deterministic, tune=tune, tune_options=tune_options)
    if tune and tune_shapes:
        tuner.tune_ahead(op, tune_shapes, dtype or TARGET_DTYPES[resolved.kind][0])
    if dtype is not None:
        op.build(dtype)
    return op
