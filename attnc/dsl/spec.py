"""`Attention`: the public spec of an attention variant."""

from __future__ import annotations

import math
from typing import Callable

import torch

from attnc.dsl.inputs import Input
from attnc.dsl.ir import LAYOUTS, AttentionIR
from attnc.dsl.trace import TraceContext, trace_mask_mod, trace_score_mod
from attnc.errors import SpecError


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SpecError(f"Attention `{name}` must be a positive int; got {value!r}")
    return value


class Attention:
    """An attention variant: head sharing, head dims, scale, layout, mods, sinks and extra inputs.

    Args:
        q_heads: number of query heads.
        kv_heads: number of key/value heads (default ``q_heads``); fewer gives GQA, 1 gives MQA. q head ``h``
            reads kv head ``h // (q_heads // kv_heads)``.
        qk_dim: head dim of q and k (default 128).
        v_dim: head dim of v and the output (default ``qk_dim``).
        scale: multiplies q·k before the score_mod (default ``1 / sqrt(qk_dim)``).
        layout: ``"bshd"`` (batch, seq, heads, dim; flash-attn's, the default) or ``"bhsd"`` (torch SDPA's).
        score_mod: ``score_mod(score, b, h, q_idx, kv_idx) -> score``, as in FlexAttention (default: none).
        mask_mod: ``mask_mod(b, h, q_idx, kv_idx) -> bool``, True where attention is kept (default: none).
        sinks: if True, the op takes ``sinks``, one logit per q head that joins the softmax denominator
            and contributes no value (gpt-oss); default False.
        inputs: `Input` declarations of tensors the mods index, passed by name at call time (default none).
        name: a label for printing and cache file names (default: from the mods).

    Specs are immutable and hashable; two specs are equal when they trace to the same IR.
    """

    __slots__ = ("ir", "score_mod", "mask_mod", "captured", "declared")

    def __init__(
        self,
        q_heads: int,
        kv_heads: int | None = None,
        qk_dim: int = 128,
        v_dim: int | None = None,
        scale: float | None = None,
        layout: str = "bshd",
        score_mod: Callable | None = None,
        mask_mod: Callable | None = None,
        sinks: bool = False,
        inputs: tuple[Input, ...] | list[Input] = (),
        name: str | None = None,
    ):
        q_heads = _positive_int(q_heads, "q_heads")
        kv_heads = q_heads if kv_heads is None else _positive_int(kv_heads, "kv_heads")
        if q_heads % kv_heads:
            raise SpecError(f"Attention `q_heads` ({q_heads}) must be a multiple of `kv_heads` ({kv_heads})")
        qk_dim = _positive_int(qk_dim, "qk_dim")
        v_dim = qk_dim if v_dim is None else _positive_int(v_dim, "v_dim")
        if scale is None:
            scale = 1.0 / math.sqrt(qk_dim)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) or scale == 0:
            raise SpecError(f"Attention `scale` must be a finite non-zero number; got {scale!r}")
        if layout not in LAYOUTS:
            raise SpecError(f"Attention `layout` must be one of {LAYOUTS}; got {layout!r}")
        for role, fn in (("score_mod", score_mod), ("mask_mod", mask_mod)):
            if fn is not None and not callable(fn):
                raise SpecError(f"Attention `{role}` must be callable; got {type(fn).__name__}")
        inputs = tuple(inputs)
        for item in inputs:
            if not isinstance(item, Input):
                raise SpecError(f"Attention `inputs` must hold attnc.Input declarations; got {item!r}")
        if len({i.name for i in inputs}) != len(inputs):
            raise SpecError("Attention `inputs` names must be unique")

        context = TraceContext()
        score = trace_score_mod(score_mod, context) if score_mod is not None else None
        mask = trace_mask_mod(mask_mod, context) if mask_mod is not None else None
        declared = {i.name for i in inputs}
        for traced in context.inputs.values():
            if traced.captured and traced.name in declared:
                raise SpecError(f"a captured tensor and a declared Input share the name `{traced.name}`")
        if sinks and "sinks" in context.inputs:
            raise SpecError("the name `sinks` is taken by the sinks input; rename the captured tensor")
        kwargs = {}
        if score is not None:
            kwargs["score"] = score
        if mask is not None:
            kwargs["mask"] = mask
        label = name or "_".join(
            getattr(fn, "name", None) or getattr(fn, "__name__", "mod")
            for fn in (score_mod, mask_mod) if fn is not None
        ) or "attention"
        ir = AttentionIR(
            name=label.replace("<lambda>", "lambda"),
            q_heads=q_heads,
            kv_heads=kv_heads,
            qk_dim=qk_dim,
            v_dim=v_dim,
            scale=float(scale),
            layout=layout,
            sinks=bool(sinks),
            inputs=tuple(context.inputs.values()),
            **kwargs,
        )
        object.__setattr__(self, "ir", ir)
        object.__setattr__(self, "score_mod", score_mod)
        object.__setattr__(self, "mask_mod", mask_mod)
        object.__setattr__(self, "captured", dict(context.tensors))
        object.__setattr__(self, "declared", inputs)

    def __setattr__(self, name, value):
        raise AttributeError("Attention specs are immutable; build a new one")

    def __eq__(self, other):
        return isinstance(other, Attention) and other.ir.key == self.ir.key

    def __hash__(self):
        return hash(self.ir.key)

    def __repr__(self):
        ir = self.ir
        parts = [f"q_heads={ir.q_heads}", f"kv_heads={ir.kv_heads}", f"qk_dim={ir.qk_dim}", f"v_dim={ir.v_dim}",
                 f"layout={ir.layout!r}"]
        if ir.has_score_mod:
            parts.append(f"score={ir.score}")
        if ir.has_mask:
            parts.append(f"mask={ir.mask}")
        if ir.sinks:
            parts.append("sinks=True")
        if ir.inputs:
            parts.append("inputs=[" + ", ".join(t.name for t in ir.inputs) + "]")
        return f"Attention[{ir.name}]({', '.join(parts)})"

    @property
    def name(self) -> str:
        return self.ir.name

    def captured_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors the mods captured, by input name; the op passes these unless the caller overrides them."""
        return dict(self.captured)
