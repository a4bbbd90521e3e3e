"""Training: autograd of the `attnc::forward` custom op, the `attnc::backward` op, and the backward kernels it runs.

``attnc::backward(q, k, v, out, lse, dout, dlse, extras, op_id, wanted, block_lists, block_config) -> (dq, dk, dv,
dextras)`` computes the gradients of q, k, v and of the extras listed in ``wanted`` (indices into ``extras``: float
captured tensors and declared Inputs in kernel order, then sinks); ``block_lists`` and ``block_config``: a block
mask's backward lists and its configs' JSON when the forward was called with one made ahead, else ``[]`` and ``""``.
Its fake implementation gives the shapes, so the op trains eagerly and under ``torch.compile(fullgraph=True)``.
``dlse`` (the gradient of the returned log-sum-exp) joins the softmax backward as ``delta = rowsum(dO * O) - dlse``.

Kernels, per (compiled op, dtype, gradients wanted, dQ mode):

- cpu (``cpu_bwd``): one kernel, scalar loops (see the template's header).
- cuda (``bwd``, FlashAttention-2 style): ``pre`` (delta and per-q-tile sink-gradient partials), ``main`` (one block
  per kv tile and q head, over the q tiles of the kv-side tile map; warp-specialised with asynchronous wgmma on
  sm_90a; captured-tensor gradients by atomics; dK, dV written once without GQA, else summed over the q heads of a
  group: fp32 atomics, or per-q-head fp32 partials summed here in a fixed order when dQ is ``separate``), and for dQ
  either
  ``dq_mode="atomic"``: the main kernel adds dS K into an fp32 buffer with atomics (on sm_90a one TMA reduce-add
  per tile, the tile's first block storing rather than adding, so the buffer needs no zero fill) and ``post``
  converts it, or
  ``dq_mode="separate"``: a ``dq`` kernel per q tile over the forward's tile map, no atomics.
  ``attnc.compile(..., deterministic=True)`` selects ``separate``: dQ, dK, dV and dsinks are then the same bits on
  every run. The kernel adds gradients of captured tensors with atomics; deterministic mode leaves them out of the
  kernel and computes them with torch in a fixed order (`attnc.runtime.tensor_gradients`, slower).
  Otherwise ``atomic`` is the default (FlashAttention-2's choice); to time the other, set
  ``op.backward_dq_mode = "separate"`` on a compiled op (or pass ``dq_mode`` to `backward_for`).

The kv-side tile map (which q tiles each kv tile visits, which are full) is the forward's analysis applied to the
transposed mask (`attnc.dsl.derivative.backward_tiles`), so the backward skips exactly the tiles the forward skips
for the affine masks, and evaluates the mask only on partial tiles. A mask that reads tensors (a document mask) gets
a run-time block mask instead (`attnc.runtime.blockmask`), classified at the backward's own tiles (the forward's
lists are for the forward's tiles): the main kernel walks per kv tile its list of non-empty q tiles (the transpose
view), the dq stage per q tile its list of kv tiles. A block mask made ahead with ``op.block_mask`` holds those
lists, and the backward of a call with it reuses them; otherwise each backward classifies the mask tensors the
forward was called with.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from attnc.codegen import build, render
from attnc.codegen.context import dkv_mode, make_bwd_context
from attnc.dsl.blockmask import BlockMaskLayout, block_mask_layout
from attnc.dsl.derivative import read_gradients
from attnc.dsl.ir import AttentionIR
from attnc.errors import UnsupportedError
from attnc.runtime import custom_op
from attnc.runtime.blockmask import STAGE_TENSORS, classify, compact, compact_by_kv_tile
from attnc.runtime.kernels import KERNEL_DTYPES, BlockMaskKernel, BuiltKernel
from attnc.runtime.tensor_gradients import tensor_gradients
from attnc.schedules.config import KernelConfig
from attnc.schedules.heuristics import backward_config
from attnc.schedules.resources import bwd_dq_staged

DQ_MODES = ("atomic", "separate")


@dataclass
class Backward:
    """The backward kernels of one compiled op for one dtype, set of input gradients (``grads``: names of float
    inputs read by the score_mod) and dQ mode. ``warp_specialized`` (cuda main kernel; default: on sm_90a) picks
    the Hopper structure (TMA producer, asynchronous wgmma) over the T.Pipelined one that sm_80 runs;
    ``dq_tma_reduce`` (default: when warp-specialised, up to head dim 128) adds dQ tiles by TMA reduce-add rather
    than per-thread atomics; ``dq_first_store`` (default: with ``dq_tma_reduce``): the first block to reach a dQ tile
    stores it rather than adding, so the accumulator is not zero-filled (a ticket per tile, zeroed by 'pre', says who
    is first and tells 'post' which tiles no block reached). ``block_mask``: the layout of the run-time block mask
    the 'main' and 'dq' stages take (`attnc.dsl.blockmask`), None when the tile map decides their tiles."""

    ir: AttentionIR
    target: build.Target
    dtype: str
    grads: tuple[str, ...]
    dq_mode: str
    config: KernelConfig
    warp_specialized: bool | None = None
    dq_tma_reduce: bool | None = None
    dq_first_store: bool | None = None
    stages: dict[str, BuiltKernel] = field(default_factory=dict)
    classifiers: dict[tuple[int, int], BlockMaskKernel] = field(default_factory=dict)
    block_mask: BlockMaskLayout | None = field(init=False)

    def __post_init__(self):
        self.block_mask = block_mask_layout(self.ir.mask)
        if self.warp_specialized is None:
            self.warp_specialized = self.target.arch == "sm_90a"
        if self.warp_specialized and self.target.arch != "sm_90a":
            raise UnsupportedError(f"warp_specialized=True needs the sm_90a target; got {self.target.label}")
        if self.dq_tma_reduce is None:
            self.dq_tma_reduce = self.warp_specialized and bwd_dq_staged(self.ir.qk_dim)
        if self.dq_tma_reduce and not self.warp_specialized:
            raise UnsupportedError("dq_tma_reduce=True needs the warp-specialised main kernel (warp_specialized=True)")
        if self.dq_first_store is None:
            self.dq_first_store = self.dq_tma_reduce
        if self.dq_first_store and not self.dq_tma_reduce:
            raise UnsupportedError("dq_first_store=True needs dQ added by TMA reduce-add (dq_tma_reduce=True)")

    @property
    def family(self) -> str:
        return "cpu_bwd" if self.target.kind == "cpu" else "bwd"

    def stage_names(self) -> tuple[str, ...]:
        if self.target.kind == "cpu":
            return ("main",)
        return ("pre", "main", "post") if self.dq_mode == "atomic" else ("pre", "main", "dq")

    def mask_stages(self) -> tuple[str, ...]:
        """The stages that take a run-time block mask: 'main' and 'dq' when the mask reads tensors, else none."""
        return tuple(n for n in self.stage_names() if n in ("main", "dq")) if self.block_mask else ()

    def kernel_names(self) -> tuple[str, ...]:
        """Every kernel a call runs: the stages, then '<stage> block mask', the classifier for each mask stage."""
        return self.stage_names() + tuple(f"{name} block mask" for name in self.mask_stages())

    def kernel(self, name: str) -> BuiltKernel:
        """The kernel ``name`` of `kernel_names`, rendered on first request."""
        stage, _, classifier = name.partition(" ")
        return self.classifier(stage) if classifier else self.stage(stage)

    def config_of(self, stage: str) -> KernelConfig:
        """``config`` for every stage but the cuda dQ pass, which tiles by q rows."""
        return backward_config(self.target.arch or "cpu", self.ir, "dq") if stage == "dq" else self.config

    def stage(self, name: str) -> BuiltKernel:
        """The kernel of stage ``name``, rendered on first request."""
        if name not in self.stages:
            family, ir = self.family, self.ir
            layout = self.block_mask if name in self.mask_stages() else None
            ctx = make_bwd_context(family, f"attnc_{family}_{name}", ir, self.config_of(name), self.dtype, name,
                                   self.dq_mode, self.grads, self.warp_specialized, self.dq_tma_reduce,
                                   self.dq_first_store, layout)
            self.stages[name] = BuiltKernel(family, f"{family}_{name}_{self.dtype}_d{ir.qk_dim}_{self.target.label}",
                                            render.render(ctx), self.target)
        return self.stages[name]

    def classifier(self, stage: str) -> BlockMaskKernel:
        """The block-mask classifier at stage ``stage``'s tiles, rendered on first request."""
        config = self.config_of(stage)
        tiles = (config.block_m, config.block_n)
        if tiles not in self.classifiers:
            self.classifiers[tiles] = BlockMaskKernel.render(self.ir, *tiles, self.target)
        return self.classifiers[tiles]

    def block_mask_tensors(self, stage: str, inputs: list[torch.Tensor], batch: int, q_len: int, kv_len: int,
                           device: torch.device) -> list[torch.Tensor]:
        """What stage ``stage`` takes after the extras: the tile kinds of the mask on ``inputs`` at the stage's
        tiles and the lists it walks (main: per kv tile the q tiles; dq: per q tile the kv tiles), computed on
        ``device`` without a host sync; nothing for a stage without a block mask."""
        if stage not in self.mask_stages():
            return []
        tile_kind = classify(self.classifier(stage), inputs, self.block_mask, batch, self.ir.q_heads, q_len, kv_len,
                             device)
        return [tile_kind, *(compact_by_kv_tile(tile_kind) if stage == "main" else compact(tile_kind))]

    def _bare(self) -> Backward:
        """A copy without the kernels rendered here (loaded ones need not pickle), for build jobs."""
        return dataclasses.replace(self, stages={}, classifiers={})

    def build_jobs(self) -> list[Callable[[], BuiltKernel]]:
        """One job per kernel of `kernel_names`, for `attnc.runtime.kernels.build_in_parallel`: each renders its
        kernel in a bare copy of this backward."""
        bare = self._bare()
        return [functools.partial(bare.kernel, name) for name in self.kernel_names()]

    def build_job(self) -> Callable[[], Backward]:
        """One picklable job whose ``job().build()`` builds every kernel of a bare copy (the tuner's build workers
        run it: one job per candidate config)."""
        return functools.partial(dataclasses.replace, self._bare())

    def build(self) -> Backward:
        """Build (or load) every kernel of `kernel_names`."""
        for name in self.kernel_names():
            self.kernel(name).build()
        return self

    def run(self, q, k, v, extras, out, lse, dout, dlse, block_lists=()):
        """Gradients ``(dq, dk, dv, {name: grad} for self.grads, dsinks or None)``, grads of inputs in float32.
        ``block_lists``: the tensors of each `mask_stages` stage made ahead (a `BlockMask`'s ``backward_lists``),
        else computed here."""
        ir = self.ir
        bshd = ir.layout == "bshd"
        batch, q_len, kv_len = q.shape[0], q.shape[1 if bshd else 2], k.shape[1 if bshd else 2]
        inputs = extras[:len(ir.inputs)]
        f32 = dict(dtype=torch.float32, device=q.device)
        grads = {name: torch.zeros(inputs[[t.name for t in ir.inputs].index(name)].shape, **f32)
                 for name in self.grads}
        dsinks = torch.zeros((batch, ir.q_heads), **f32) if ir.sinks else None
        if batch == 0 or q_len == 0 or kv_len == 0:
            return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), grads, dsinks
        dlse = torch.zeros_like(lse) if dlse is None else dlse.to(torch.float32).contiguous()
        delta = torch.empty((batch, ir.q_heads, q_len), **f32)
        made = {stage: list(block_lists[i * STAGE_TENSORS:(i + 1) * STAGE_TENSORS])
                for i, stage in enumerate(self.mask_stages()) if block_lists}

        def stage_mask(stage):
            return made[stage] if stage in made else self.block_mask_tensors(stage, inputs, batch, q_len, kv_len,
                                                                              q.device)
        main_mask = stage_mask("main")
        if self.target.kind == "cpu":
            dk, dv = torch.empty_like(k), torch.empty_like(v)
            dq = torch.empty(q.shape, **f32)
            self.stage("main")(q, k, v, *extras, *main_mask, out, lse, dout, dlse, delta, dq, dk, dv,
                               *grads.values(), *([dsinks] if ir.sinks else []))
            return dq.to(q.dtype), dk, dv, grads, dsinks
        sink_parts = (torch.empty((batch, ir.q_heads, -(-q_len // self.config.block_m)), **f32)
                      if ir.sinks else None)
        first_store = self.dq_mode == "atomic" and self.dq_first_store
        tickets = [torch.empty(self.dq_acc_shape(q)[:3], dtype=torch.int32, device=q.device)] if first_store else []
        self.stage("pre")(out, dout, lse, dlse, *extras[len(ir.inputs):], delta,
                          *([sink_parts] if ir.sinks else []), *tickets)
        if ir.sinks:
            dsinks = sink_parts.sum(-1)
        dk_out, dv_out = self._dkv_buffers(k, v)
        if self.dq_mode == "atomic":
            dq_acc = (torch.empty if first_store else torch.zeros)(self.dq_acc_shape(q), **f32)
            self.stage("main")(q, k, v, *extras, *main_mask, lse, dout, delta, dq_acc, *tickets, dk_out, dv_out,
                               *grads.values())
            dq = torch.empty_like(q)
            self.stage("post")(dq_acc, *tickets, dq)
        else:
            self.stage("main")(q, k, v, *extras, *main_mask, lse, dout, delta, dk_out, dv_out, *grads.values())
            dq = torch.empty_like(q)
            dq_mask = stage_mask("dq")
            self.stage("dq")(q, k, v, *extras, *dq_mask, lse, dout, delta, dq)
        return dq, self._finish_dkv(dk_out, k), self._finish_dkv(dv_out, v), grads, dsinks

    def dq_acc_shape(self, q: torch.Tensor) -> tuple[int, ...]:
        """The shape of the fp32 dQ accumulator that the cuda main kernel adds into and 'post' reads: ``q``'s, or with
        ``dq_tma_reduce`` (batch, heads, q tiles, block_m * qk_dim), one q tile's dQ after another (the bwd template
        says in what order)."""
        if not self.dq_tma_reduce:
            return tuple(q.shape)
        batch, q_len = q.shape[0], q.shape[1 if self.ir.layout == "bshd" else 2]
        block_m = self.config.block_m
        return (batch, self.ir.q_heads, -(-q_len // block_m), block_m * self.ir.qk_dim)

    def _dkv_buffers(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the cuda main kernel writes dK, dV into (see `attnc.codegen.context.dkv_mode`)."""
        mode = dkv_mode(self.ir, self.dq_mode)
        if mode == "direct":
            return torch.empty_like(k), torch.empty_like(v)
        if mode == "atomic":
            return torch.zeros(k.shape, dtype=torch.float32, device=k.device), \
                torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        heads_dim = 2 if self.ir.layout == "bshd" else 1
        per_head = [list(t.shape) for t in (k, v)]
        for shape in per_head:
            shape[heads_dim] = self.ir.q_heads
        return tuple(torch.empty(shape, dtype=torch.float32, device=k.device) for shape in per_head)

    def _finish_dkv(self, out: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """dK or dV in ``like``'s dtype: partials summed over each group's q heads (in a fixed order), cast."""
        if out.shape != like.shape:  # per q head: (.., kv_heads * group, ..) -> sum over the group
            heads_dim = 2 if self.ir.layout == "bshd" else 1
            shape = list(like.shape)
            shape[heads_dim:heads_dim + 1] = [self.ir.kv_heads, self.ir.group]
            out = out.view(shape).sum(heads_dim + 1)
        return out.to(like.dtype)


_BACKWARDS: dict[tuple, Backward] = {}


def backward_for(op, dtype: torch.dtype, grads: tuple[str, ...], dq_mode: str | None = None,
                 config: KernelConfig | None = None) -> Backward:
    """The (cached) `Backward` of compiled op ``op`` for ``dtype`` computing the gradients of inputs ``grads``, with
    ``config`` (default: `heuristics.backward_config`)."""
    deterministic = bool(getattr(op, "deterministic", False))
    dq_mode = dq_mode or getattr(op, "backward_dq_mode", None) or ("separate" if deterministic else "atomic")
    if dq_mode not in DQ_MODES:
        raise UnsupportedError(f"the backward's dQ mode must be one of {DQ_MODES}; got {dq_mode!r}")
    if deterministic and dq_mode != "separate":
        raise UnsupportedError("deterministic=True computes dQ without atomics: dq_mode must be 'separate'")
    if deterministic and grads and op.target.kind == "cuda":
        listing = ", ".join(f"`{g}`" for g in grads)
        raise UnsupportedError(
            f"a deterministic cuda backward kernel cannot compute the gradients of {listing}: the kernel adds "
            "captured-tensor gradients with atomics, whose order varies between runs (the op's backward computes "
            "them with attnc.runtime.tensor_gradients instead)")
    config = config or backward_config(op.target.arch or "cpu", op.ir)
    key = (op.op_id, dtype, grads, dq_mode, config)
    if key not in _BACKWARDS:
        _BACKWARDS[key] = Backward(op.ir, op.target, KERNEL_DTYPES[dtype], grads, dq_mode, config)
    return _BACKWARDS[key]


def _differentiable_inputs(ir: AttentionIR) -> set[str]:
    """Names of the inputs the score_mod reads as floats: the ones with a nonzero gradient."""
    return {g.name for g in read_gradients(ir)}


@torch.library.custom_op("attnc::backward", mutates_args=())
def backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
             dout: torch.Tensor, dlse: torch.Tensor | None, extras: list[torch.Tensor], op_id: str,
             wanted: list[int], block_lists: list[torch.Tensor], block_config: str
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    op = custom_op._OPS[op_id]
    ir = op.ir
    names = [t.name for t in ir.inputs]
    differentiable = _differentiable_inputs(ir)
    in_torch = ()  # gradients computed with torch, not by the kernel
    if op.target.kind == "cpu":  # computing every gradient costs little there, and keeps one kernel per spec
        grads = tuple(n for n in names if n in differentiable)
    else:  # cuda: only the gradients asked for, each costs atomics (deterministic: computed in torch instead)
        grads = tuple(names[i] for i in wanted if i < len(names) and names[i] in differentiable)
        if op.deterministic:
            grads, in_torch = (), grads
    if block_lists:  # a block mask made ahead: the backward runs with the config its lists were made for
        config = KernelConfig(**json.loads(block_config)["backward"])
    else:
        config, _ = op.backward_config_for(q.dtype, q.shape[0], lse.shape[-1],
                                           k.shape[1 if ir.layout == "bshd" else 2])
    dq, dk, dv, dinputs, dsinks = backward_for(op, q.dtype, grads, config=config).run(
        q, k, v, list(extras), out, lse, dout.contiguous(), dlse, list(block_lists))
    if in_torch:
        dinputs = tensor_gradients(ir, q, k, v, dict(zip(names, extras)), out, lse, dout, dlse, in_torch)
    result = []
    for i in wanted:
        if i == len(names):
            result.append(dsinks.sum(0).to(extras[i].dtype))
        elif names[i] in dinputs:
            result.append(dinputs[names[i]].to(extras[i].dtype))
        else:  # read only by the mask, or not at all: the gradient is zero
            result.append(torch.zeros_like(extras[i]))
    return dq, dk, dv, result


@backward.register_fake
def _(q, k, v, out, lse, dout, dlse, extras, op_id, wanted, block_lists, block_config):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), [torch.empty_like(extras[i]) for i in wanted]


def _setup_context(ctx, inputs, output):
    q, k, v, extras, op_id, block_mask, block_config = inputs  # no gradient flows to the block mask
    out, lse = output
    ctx.op_id = op_id
    ctx.n_extras = len(extras)
    ctx.n_block_mask = len(block_mask)
    ctx.block_config = block_config
    ctx.save_for_backward(q, k, v, out, lse, *extras, *block_mask[STAGE_TENSORS:])


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, *rest = ctx.saved_tensors
    extras, block_lists = rest[:ctx.n_extras], rest[ctx.n_extras:]
    needs = ctx.needs_input_grad[3]
    needs = needs if isinstance(needs, (list, tuple)) else [needs] * ctx.n_extras
    wanted = [i for i, (e, n) in enumerate(zip(extras, needs)) if n and e.is_floating_point()]
    if dout is None:
        dout = torch.zeros_like(out)
    dq, dk, dv, dextras = backward(q, k, v, out, lse, dout, dlse, extras, ctx.op_id, wanted, block_lists,
                                   ctx.block_config)
    grads: list[torch.Tensor | None] = [None] * ctx.n_extras
    for i, g in zip(wanted, dextras):
        grads[i] = g
    return dq, dk, dv, grads, None, [None] * ctx.n_block_mask, None


torch.library.register_autograd("attnc::forward", _backward, setup_context=_setup_context)
