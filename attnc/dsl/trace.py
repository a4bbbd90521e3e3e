"""Tracing FlexAttention-style mods into sympy expressions.

`trace_score_mod` calls ``score_mod(score, b, h, q_idx, kv_idx)`` and `trace_mask_mod` calls
``mask_mod(b, h, q_idx, kv_idx)`` with `Proxy` arguments. A torch tensor the mod indexes becomes a kernel input,
named after the variable that holds it (found in the mod's closure or globals); an `Input` declared in the spec is
indexed the same way.
"""

from __future__ import annotations

import contextvars
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable

import sympy
import torch

from attnc.dsl import symbols
from attnc.dsl.inputs import Input, TensorInput, dtype_name
from attnc.dsl.proxy import BOOL, FLOAT, INT, PartialRead, Proxy, lift
from attnc.errors import SpecError

_CURRENT: contextvars.ContextVar[TraceContext | None] = contextvars.ContextVar("attnc_trace", default=None)


def current_trace(action: str) -> TraceContext:
    context = _CURRENT.get()
    if context is None:
        raise SpecError(f"cannot {action} outside of tracing a mod")
    return context


def _closure_names(fn: Any, seen: set[int] | None = None) -> dict[int, str]:
    """Variable names of the tensors a mod can see: its closure cells and the globals it names, following the
    functions it calls there (a mod wrapping `attnc.mods.alibi(slopes)` names ``slopes``)."""
    seen = set() if seen is None else seen
    if id(fn) in seen:
        return {}
    seen.add(id(fn))
    inner = getattr(fn, "fn", None) or getattr(fn, "func", None)  # attnc Mod, functools.partial
    code = getattr(fn, "__code__", None)
    if code is None:
        return _closure_names(inner, seen) if callable(inner) else {}
    names: dict[int, str] = {}
    values = []
    for var, cell in zip(code.co_freevars, getattr(fn, "__closure__", None) or ()):
        try:
            values.append((var, cell.cell_contents))
        except ValueError:
            continue
    module = getattr(fn, "__globals__", {})
    values += [(var, module[var]) for var in code.co_names if var in module]
    for var, value in values:
        if isinstance(value, torch.Tensor):
            names.setdefault(id(value), var)
        elif callable(value) and not isinstance(value, type):
            for key, name in _closure_names(value, seen).items():
                names.setdefault(key, name)
    return names


@dataclass
class TraceContext:
    """What tracing one spec's mods has found: the tensors read, in order of first use."""

    what: str = "a mod"
    names: dict[int, str] = field(default_factory=dict)
    inputs: dict[str, TensorInput] = field(default_factory=dict)
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def _name_for(self, tensor: torch.Tensor) -> str:
        for name, known in self.tensors.items():
            if known is tensor:
                return name
        base = self.names.get(id(tensor), f"tensor{len(self.tensors)}")
        name, n = base, 1
        while name in self.inputs:
            name, n = f"{base}_{n}", n + 1
        return name

    def read(self, source: torch.Tensor | Input, index: Any) -> Proxy:
        """Trace ``source[index]`` where index holds proxies and ints."""
        index = index if isinstance(index, tuple) else (index,)
        if isinstance(source, Input):
            name, declared = source.name, source.as_tensor_input()
        else:
            name = self._name_for(source)
            declared = TensorInput(name, dtype_name(source.dtype), tuple(source.shape), captured=True)
            self.tensors[name] = source
        if len(index) < len(declared.shape) and not any(isinstance(i, (slice, type(Ellipsis))) for i in index):
            return PartialRead(self, source, index)
        if len(index) != len(declared.shape):
            raise SpecError(
                f"{self.what} indexes `{name}` (shape {declared.shape}) with {len(index)} indices; "
                f"index every dimension, e.g. `{name}[{', '.join(['i'] * len(declared.shape))}]`"
            )
        exprs = []
        for position, item in enumerate(index):
            if isinstance(item, (slice, type(None), type(Ellipsis))):
                raise SpecError(f"{self.what} indexes `{name}` with a slice; index each dimension with one value")
            expr, kind = lift(item)
            if kind != INT:
                raise SpecError(
                    f"{self.what} indexes `{name}` at position {position} with the {kind} value `{expr}`; "
                    "indices must be integers"
                )
            exprs.append(expr)
        previous = self.inputs.get(name)
        if previous is not None and previous != declared:
            raise SpecError(f"{self.what} reads two different tensors under the name `{name}`")
        self.inputs[name] = declared
        base = sympy.IndexedBase(name, integer=declared.is_integer, real=True)
        return Proxy(base[tuple(exprs)], INT if declared.is_integer else FLOAT)

    def run(self, what: str, fn: Callable, args: tuple) -> Proxy:
        self.what = what
        self.names.update(_closure_names(fn))
        token = _CURRENT.set(self)
        try:
            result = fn(*args)
        except SpecError:
            raise
        except (TypeError, AttributeError, RuntimeError, IndexError, ValueError, NameError, KeyError,
                ZeroDivisionError) as error:
            raise SpecError(f"tracing {what} failed: {type(error).__name__}: {error}") from error
        finally:
            _CURRENT.reset(token)
        if isinstance(result, Proxy):
            return result
        expr, kind = lift(result)
        return Proxy(expr, kind)


def _mod_name(fn: Callable) -> str:
    return getattr(fn, "name", None) or getattr(fn, "__name__", None) or type(fn).__name__


def _check_arity(fn: Callable, count: int, role: str, signature: str) -> None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return
    if any(p.kind == p.VAR_POSITIONAL for p in params):
        return
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    required = [p for p in positional if p.default is p.empty]
    if not (len(required) <= count <= len(positional)):
        raise SpecError(f"{role} `{_mod_name(fn)}` must take {count} arguments {signature}; it takes {len(positional)}")


def trace_score_mod(fn: Callable, context: TraceContext) -> sympy.Expr:
    """The score_mod as a real-valued sympy expression in ``score, b, h, q_idx, kv_idx`` and tensor reads."""
    _check_arity(fn, 5, "score_mod", "(score, b, h, q_idx, kv_idx)")
    s = symbols
    result = context.run(
        f"score_mod `{_mod_name(fn)}`",
        fn,
        (Proxy(s.score, FLOAT), Proxy(s.b, INT), Proxy(s.h, INT), Proxy(s.q_idx, INT), Proxy(s.kv_idx, INT)),
    )
    if result.kind == BOOL:
        raise SpecError(f"score_mod `{_mod_name(fn)}` returned a boolean `{result.expr}`; a mask belongs in mask_mod")
    return result.expr


def trace_mask_mod(fn: Callable, context: TraceContext) -> sympy.Basic:
    """The mask_mod as a sympy boolean in ``b, h, q_idx, kv_idx``, the length symbols and tensor reads."""
    _check_arity(fn, 4, "mask_mod", "(b, h, q_idx, kv_idx)")
    s = symbols
    result = context.run(
        f"mask_mod `{_mod_name(fn)}`",
        fn,
        (Proxy(s.b, INT), Proxy(s.h, INT), Proxy(s.q_idx, INT), Proxy(s.kv_idx, INT)),
    )
    if result.kind != BOOL:
        raise SpecError(
            f"mask_mod `{_mod_name(fn)}` must return a boolean (a comparison, or & | ~ of them); got `{result.expr}`"
        )
    return result.expr
