"""Proxy values that stand for ``score``, ``b``, ``h``, ``q_idx``, ``kv_idx`` while a mod is traced.

Each operation on a `Proxy` builds a sympy expression instead of computing, so a FlexAttention mod called with
proxies returns its own formula. torch functions reach the proxies through ``__torch_function__``; indexing a
captured tensor with proxies records the tensor as a kernel input (see `trace.TraceContext`).
"""

from __future__ import annotations

import math
from typing import Any

import sympy
import torch

from attnc.errors import SpecError

INT, FLOAT, BOOL = "int", "float", "bool"


def lift(value: Any) -> tuple[sympy.Basic, str]:
    """A traced operand as (sympy expression, kind); Python numbers become constants."""
    if isinstance(value, Proxy):
        return value.expr, value.kind
    if isinstance(value, bool):
        return sympy.true if value else sympy.false, BOOL
    if isinstance(value, int):
        return sympy.Integer(value), INT
    if isinstance(value, float):
        if math.isinf(value):
            return (sympy.oo if value > 0 else -sympy.oo), FLOAT
        if math.isnan(value):
            raise SpecError("a mod produced NaN as a constant; attnc cannot compile NaN into a kernel")
        return sympy.Float(value), FLOAT
    if isinstance(value, PartialRead):
        raise SpecError(f"{value.context.what} indexes a tensor of {len(value.source.shape)} dimensions with "
                        f"{len(value.index)} indices; index every dimension")
    if isinstance(value, torch.Tensor):
        raise SpecError(
            f"a mod uses a captured tensor of shape {tuple(value.shape)} as a value; index it with the traced "
            "indices (`bias[h]`, `doc_ids[q_idx]`) or use a Python number"
        )
    raise SpecError(f"a mod combined a traced value with {type(value).__name__} {value!r}, which attnc cannot trace")


class PartialRead:
    """``table[i]`` of a tensor with more dimensions: a value only once every dimension is indexed
    (``bias[q_idx][kv_idx]`` reads like ``bias[q_idx, kv_idx]``)."""

    def __init__(self, context, source, index: tuple):
        self.context, self.source, self.index = context, source, index

    def __getitem__(self, more):
        more = more if isinstance(more, tuple) else (more,)
        return self.context.read(self.source, self.index + more)

    def __getattr__(self, name):
        raise SpecError(f"{self.context.what} uses a partly indexed tensor (`.{name}`); index every dimension")


def _number_kind(*kinds: str) -> str:
    return FLOAT if FLOAT in kinds else INT


def _as_bool(expr: sympy.Basic, kind: str, what: str) -> sympy.Basic:
    if kind != BOOL:
        raise SpecError(f"`{what}` needs boolean operands (comparisons); got a {kind} value `{expr}`")
    return expr


class Proxy:
    """A traced value: a sympy expression and its kind ('int', 'float' or 'bool')."""

    __slots__ = ("expr", "kind")
    __hash__ = None  # type: ignore[assignment]  # == builds a relation, so proxies are not hashable

    def __init__(self, expr: sympy.Basic, kind: str):
        self.expr = expr
        self.kind = kind

    def __repr__(self) -> str:
        return f"Proxy({self.expr}, {self.kind})"

    def __bool__(self) -> bool:
        raise SpecError(
            f"a mod used the traced value `{self.expr}` as a Python bool (`if`, `and`, `or`, `not`, min() or max()); "
            "write it with torch.where, &, |, ~, torch.minimum or torch.maximum"
        )

    def __index__(self) -> int:
        raise SpecError(f"a mod used the traced value `{self.expr}` where a Python int is needed")

    # arithmetic
    def _arith(self, other: Any, op, reflected: bool = False) -> Proxy:
        a, ka = lift(self)
        b, kb = lift(other)
        if BOOL in (ka, kb):
            a, b = (sympy.Piecewise((1, a), (0, True)) if ka == BOOL else a,
                    sympy.Piecewise((1, b), (0, True)) if kb == BOOL else b)
            ka, kb = (INT if ka == BOOL else ka), (INT if kb == BOOL else kb)
        if reflected:
            a, b, ka, kb = b, a, kb, ka
        return Proxy(op(a, b), _number_kind(ka, kb))

    def __add__(self, o): return self._arith(o, lambda a, b: a + b)
    def __radd__(self, o): return self._arith(o, lambda a, b: a + b, True)
    def __sub__(self, o): return self._arith(o, lambda a, b: a - b)
    def __rsub__(self, o): return self._arith(o, lambda a, b: a - b, True)
    def __mul__(self, o): return self._arith(o, lambda a, b: a * b)
    def __rmul__(self, o): return self._arith(o, lambda a, b: a * b, True)

    def __truediv__(self, o):
        r = self._arith(o, lambda a, b: a / b)
        return Proxy(r.expr, FLOAT)

    def __rtruediv__(self, o):
        r = self._arith(o, lambda a, b: a / b, True)
        return Proxy(r.expr, FLOAT)

    def _intdiv(self, other: Any, op, reflected: bool) -> Proxy:
        r = self._arith(other, op, reflected)
        if r.kind != INT:
            raise SpecError(f"`//` and `%` in a mod need integer operands; got `{self.expr}` and `{other}`")
        return r

    def __floordiv__(self, o): return self._intdiv(o, lambda a, b: sympy.floor(a / b), False)
    def __rfloordiv__(self, o): return self._intdiv(o, lambda a, b: sympy.floor(a / b), True)
    def __mod__(self, o): return self._intdiv(o, sympy.Mod, False)
    def __rmod__(self, o): return self._intdiv(o, sympy.Mod, True)

    def __pow__(self, o):
        r = self._arith(o, lambda a, b: a**b)
        return Proxy(r.expr, FLOAT if r.kind == FLOAT or not lift(o)[0].is_nonnegative else INT)

    def __neg__(self): return Proxy(-self.expr, self.kind if self.kind != BOOL else INT)
    def __pos__(self): return self
    def __abs__(self): return Proxy(sympy.Abs(self.expr), self.kind)

    # comparisons build relations (sympy's own == is structural and returns a bool)
    def _rel(self, other: Any, rel) -> Proxy:
        a, _ = lift(self)
        b, _ = lift(other)
        return Proxy(rel(a, b), BOOL)

    def __lt__(self, o): return self._rel(o, sympy.Lt)
    def __le__(self, o): return self._rel(o, sympy.Le)
    def __gt__(self, o): return self._rel(o, sympy.Gt)
    def __ge__(self, o): return self._rel(o, sympy.Ge)
    def __eq__(self, o): return self._rel(o, sympy.Eq)  # type: ignore[override]
    def __ne__(self, o): return self._rel(o, sympy.Ne)  # type: ignore[override]

    # boolean logic
    def _logic(self, other: Any, op, name: str) -> Proxy:
        a, ka = lift(self)
        b, kb = lift(other)
        return Proxy(op(_as_bool(a, ka, name), _as_bool(b, kb, name)), BOOL)

    def __and__(self, o): return self._logic(o, sympy.And, "&")
    def __rand__(self, o): return self._logic(o, sympy.And, "&")
    def __or__(self, o): return self._logic(o, sympy.Or, "|")
    def __ror__(self, o): return self._logic(o, sympy.Or, "|")

    def __invert__(self):
        return Proxy(sympy.Not(_as_bool(self.expr, self.kind, "~")), BOOL)

    # tensor-method spellings of the supported functions
    def tanh(self): return apply_function(torch.tanh, (self,))
    def exp(self): return apply_function(torch.exp, (self,))
    def log(self): return apply_function(torch.log, (self,))
    def sqrt(self): return apply_function(torch.sqrt, (self,))
    def sigmoid(self): return apply_function(torch.sigmoid, (self,))
    def abs(self): return apply_function(torch.abs, (self,))
    def sign(self): return apply_function(torch.sign, (self,))
    def clamp(self, min=None, max=None): return apply_function(torch.clamp, (self, min, max))

    def _constant(self, value, shape, dtype) -> Proxy:
        if tuple(shape) not in ((), (1,)):
            raise SpecError(f"a mod builds a tensor of shape {tuple(shape)} from a traced value; only scalars trace")
        if dtype == torch.bool:
            return Proxy(sympy.true if value else sympy.false, BOOL)
        if dtype is not None and dtype.is_floating_point or dtype is None and self.kind == FLOAT:
            return Proxy(sympy.Float(value), FLOAT)
        return Proxy(sympy.Integer(value), INT)

    def new_zeros(self, shape, dtype=None, **_):
        """FlexAttention's ``or_masks`` starts from ``b.new_zeros((), dtype=torch.bool)``."""
        return self._constant(0, shape, dtype)

    def new_ones(self, shape, dtype=None, **_):
        return self._constant(1, shape, dtype)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        return apply_function(func, args, kwargs or {})


def _unary(fn):
    def apply(x):
        e, k = lift(x)
        return Proxy(fn(e), FLOAT)
    return apply


def _sign(x):
    e, k = lift(x)
    return Proxy(sympy.sign(e), k)


def _abs(x):
    e, k = lift(x)
    return Proxy(sympy.Abs(e), k)


def _where(cond, a, b):
    c, kc = lift(cond)
    ea, ka = lift(a)
    eb, kb = lift(b)
    return Proxy(sympy.Piecewise((ea, _as_bool(c, kc, "torch.where")), (eb, True)), _number_kind(ka, kb))


def _minmax(fn):
    def apply(a, b):
        ea, ka = lift(a)
        eb, kb = lift(b)
        return Proxy(fn(ea, eb), _number_kind(ka, kb))
    return apply


def _clamp(x, min=None, max=None):
    e, k = lift(x)
    kinds = [k]
    if min is not None:
        lo, klo = lift(min)
        e = sympy.Max(e, lo)
        kinds.append(klo)
    if max is not None:
        hi, khi = lift(max)
        e = sympy.Min(e, hi)
        kinds.append(khi)
    return Proxy(e, _number_kind(*kinds))


def _logical(fn, name):
    def apply(a, b):
        return Proxy(fn(_as_bool(*lift(a), name), _as_bool(*lift(b), name)), BOOL)
    return apply


def _getitem(tensor, index):
    from attnc.dsl.trace import current_trace

    return current_trace("index a captured tensor").read(tensor, index)


_FUNCTIONS = {
    torch.where: _where,
    torch.tanh: _unary(sympy.tanh),
    torch.exp: _unary(sympy.exp),
    torch.exp2: _unary(lambda e: 2**e),
    torch.log: _unary(sympy.log),
    torch.sqrt: _unary(sympy.sqrt),
    torch.sigmoid: _unary(lambda e: 1 / (1 + sympy.exp(-e))),
    torch.abs: _abs,
    torch.sign: _sign,
    torch.minimum: _minmax(sympy.Min),
    torch.maximum: _minmax(sympy.Max),
    torch.clamp: _clamp,
    torch.logical_and: _logical(sympy.And, "torch.logical_and"),
    torch.logical_or: _logical(sympy.Or, "torch.logical_or"),
    torch.logical_not: lambda a: ~a if isinstance(a, Proxy) else Proxy(sympy.Not(lift(a)[0]), BOOL),
    torch.Tensor.__getitem__: _getitem,
    torch.Tensor.__and__: lambda a, b: Proxy.__and__(b, a) if isinstance(b, Proxy) else a.__and__(b),
    torch.Tensor.__or__: lambda a, b: Proxy.__or__(b, a) if isinstance(b, Proxy) else a.__or__(b),
}


def apply_function(func, args, kwargs=None) -> Proxy:
    """Trace one torch function applied to proxies, or say which function attnc cannot trace."""
    from attnc.dsl.trace import current_trace

    handler = _FUNCTIONS.get(func)
    if handler is None:
        name = getattr(func, "__name__", None) or repr(func)
        current = current_trace("trace a torch function")
        raise SpecError(
            f"{current.what} uses `torch.{name}`, which attnc cannot trace; supported: arithmetic, comparisons, "
            "&, |, ~, //, %, torch.where, tanh, exp, exp2, log, sqrt, sigmoid, abs, sign, minimum, maximum, clamp, "
            "and indexing a captured tensor"
        )
    return handler(*args, **(kwargs or {}))
