"""Evaluate a traced sympy expression on torch tensors: how the reference applies score and mask mods.

The reference runs the traced IR (not the user's Python function) so that it checks exactly what the kernels
compile; tests check the tracing itself against the user's function separately.
"""

from __future__ import annotations

from typing import Mapping

import sympy
import torch

from attnc.dsl import symbols
from attnc.errors import SpecError

_UNARY = {
    sympy.tanh: torch.tanh,
    sympy.exp: torch.exp,
    sympy.log: torch.log,
    sympy.Abs: torch.abs,
    sympy.sign: torch.sign,
}
_RELATIONS = {
    sympy.StrictLessThan: torch.lt,
    sympy.LessThan: torch.le,
    sympy.StrictGreaterThan: torch.gt,
    sympy.GreaterThan: torch.ge,
    sympy.Equality: torch.eq,
    sympy.Unequality: torch.ne,
}


def _as_tensor(value, like: torch.Tensor | None = None):
    return value if isinstance(value, torch.Tensor) else torch.as_tensor(value)


def _floor_division(arg: sympy.Expr, env, tensors, dtype):
    numerator, denominator = sympy.fraction(sympy.together(arg))
    if denominator.is_Integer and numerator.is_integer:
        return torch.div(_as_tensor(evaluate(numerator, env, tensors, dtype)), int(denominator), rounding_mode="floor")
    return torch.floor(_as_tensor(evaluate(arg, env, tensors, dtype)))


def index_env(batch: int, heads: int, q_len: int, kv_len: int, device, rows: torch.Tensor | None = None) -> dict:
    """The index symbols of a (batch, heads, rows, kv_len) block of scores, broadcastable against it: ``b``, ``h``,
    ``q_idx`` (``rows``, default every query), ``kv_idx``, and the lengths."""
    rows = torch.arange(q_len, device=device) if rows is None else rows
    return {
        symbols.b: torch.arange(batch, device=device).view(-1, 1, 1, 1),
        symbols.h: torch.arange(heads, device=device).view(1, -1, 1, 1),
        symbols.q_idx: rows.view(1, 1, -1, 1),
        symbols.kv_idx: torch.arange(kv_len, device=device).view(1, 1, 1, -1),
        symbols.q_len: q_len,
        symbols.kv_len: kv_len,
    }


def evaluate(expr: sympy.Basic, env: Mapping[sympy.Symbol, object], tensors: Mapping[str, torch.Tensor],
             dtype: torch.dtype = torch.float64):
    """The value of ``expr`` with symbols from ``env`` and tensor reads from ``tensors``; floats in ``dtype``."""
    if expr.is_Symbol:
        return env[expr]
    if expr is sympy.true or expr is sympy.false:
        return torch.tensor(bool(expr))
    if expr.is_Integer:
        return int(expr)
    if expr is sympy.oo or expr is -sympy.oo:
        return torch.tensor(float(expr), dtype=dtype)
    if expr.is_Number:
        return torch.tensor(float(expr), dtype=dtype)
    if isinstance(expr, sympy.Indexed):
        table = tensors[str(expr.base)]
        index = tuple(_as_tensor(evaluate(i, env, tensors, dtype)).long() for i in expr.indices)
        value = table[index]
        return value.to(dtype) if value.is_floating_point() else value
    args = [evaluate(a, env, tensors, dtype) for a in expr.args] if not isinstance(expr, (sympy.floor, sympy.Piecewise)) else None
    if isinstance(expr, sympy.Add):
        total = args[0]
        for a in args[1:]:
            total = total + a
        return total
    if isinstance(expr, sympy.Mul):
        product = args[0]
        for a in args[1:]:
            product = product * a
        return product
    if isinstance(expr, sympy.Pow):
        base, exponent = args
        if isinstance(exponent, int) and exponent < 0:
            return 1.0 / _as_tensor(base).to(dtype) ** (-exponent)
        return _as_tensor(base) ** exponent
    if isinstance(expr, sympy.floor):
        return _floor_division(expr.args[0], env, tensors, dtype)
    if isinstance(expr, sympy.Mod):
        return torch.remainder(_as_tensor(args[0]), args[1])
    if isinstance(expr, (sympy.Min, sympy.Max)):
        op = torch.minimum if isinstance(expr, sympy.Min) else torch.maximum
        result = _as_tensor(args[0])
        for a in args[1:]:
            other = _as_tensor(a)
            if result.dtype != other.dtype:
                result, other = result.to(dtype), other.to(dtype)
            result = op(result, other)
        return result
    if type(expr) in _UNARY:
        return _UNARY[type(expr)](_as_tensor(args[0]).to(dtype))
    if type(expr) in _RELATIONS:
        return _RELATIONS[type(expr)](_as_tensor(args[0]), _as_tensor(args[1]))
    if isinstance(expr, sympy.And):
        result = _as_tensor(args[0])
        for a in args[1:]:
            result = result & _as_tensor(a)
        return result
    if isinstance(expr, sympy.Or):
        result = _as_tensor(args[0])
        for a in args[1:]:
            result = result | _as_tensor(a)
        return result
    if isinstance(expr, sympy.Not):
        return ~_as_tensor(args[0])
    if isinstance(expr, sympy.Piecewise):
        result = None
        for value, condition in reversed(expr.args):
            v = _as_tensor(evaluate(value, env, tensors, dtype))
            if result is None:
                result = v
                continue
            c = _as_tensor(evaluate(condition, env, tensors, dtype))
            if v.dtype != result.dtype:
                v, result = v.to(dtype), result.to(dtype)
            result = torch.where(c, v, result)
        return result
    raise SpecError(f"the reference cannot evaluate `{expr}` ({type(expr).__name__})")
