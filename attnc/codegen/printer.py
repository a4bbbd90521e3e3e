"""The one expression printer: sympy → TileLang source text, used by every template.

Templates decide what the index symbols are called in the kernel (``names``); the printer turns a traced score,
mask or tile-map expression into a TileLang expression. Integer sub-expressions that meet floats are cast, so
``q_idx / 2`` and ``slopes[h] * (kv_idx - q_idx)`` compute in float32 as torch would.
"""

from __future__ import annotations

from typing import Mapping

import sympy
from sympy.printing.printer import Printer

from attnc.errors import UnsupportedError

_FUNCTIONS = {sympy.tanh: "T.tanh", sympy.exp: "T.exp", sympy.log: "T.log"}
FAST_TANH = "attnc_fast_tanh"  # CUDA templates define it with tanh.approx.f32: tanhf stays slow under fast math
_RELATIONS = {"<": "<", "<=": "<=", ">": ">", ">=": ">=", "==": "==", "!=": "!="}


class TileLangPrinter(Printer):
    """Prints one sympy expression as a TileLang (TVM script) expression."""

    printmethod = "_tilelang"

    def __init__(self, names: Mapping[sympy.Symbol, str], tensors: Mapping[str, str], float_dtype: str = "float32",
                 fast_tanh: bool = False):
        super().__init__()
        self.names = {str(k): v for k, v in names.items()}
        self.tensors = dict(tensors)
        self.float_dtype = float_dtype
        self.fast_tanh = fast_tanh

    def _float(self, expr: sympy.Basic) -> str:
        if expr.is_Integer:
            return f"{int(expr)}.0"
        text = self._print(expr)
        if expr.is_integer or isinstance(expr, sympy.Indexed) and expr.base.is_integer:
            return f"T.cast({text}, \"{self.float_dtype}\")"
        return text

    def _operands(self, expr: sympy.Basic) -> list[str]:
        if expr.is_integer:
            return [self._print(a) for a in expr.args]
        return [self._float(a) for a in expr.args]

    def _print_Symbol(self, expr):
        if expr.name not in self.names:
            raise UnsupportedError(f"the kernel has no value for the symbol `{expr.name}`")
        return self.names[expr.name]

    def _print_Integer(self, expr):
        return str(int(expr))

    def _print_Rational(self, expr):
        return repr(float(expr))

    def _print_Float(self, expr):
        return repr(float(expr))

    def _print_Infinity(self, expr):
        return f"T.infinity(\"{self.float_dtype}\")"

    def _print_NegativeInfinity(self, expr):
        return f"(-T.infinity(\"{self.float_dtype}\"))"

    def _print_BooleanTrue(self, expr):
        return "True"

    def _print_BooleanFalse(self, expr):
        return "False"

    def _print_Indexed(self, expr):
        name = str(expr.base)
        if name not in self.tensors:
            raise UnsupportedError(f"the kernel has no buffer for the tensor `{name}`")
        index = ", ".join(self._print(i) for i in expr.indices)
        return f"{self.tensors[name]}[{index}]"

    def _print_Add(self, expr):
        terms = self._operands(expr)
        return "(" + " + ".join(terms) + ")"

    def _print_Mul(self, expr):
        numerator, denominator = sympy.fraction(expr)
        if denominator != 1 and not expr.is_integer and not denominator.is_Number:
            return f"({self._float(numerator)} / {self._float(denominator)})"
        factors = self._operands(expr)
        if factors and factors[0] == "-1":
            return "(-" + " * ".join(factors[1:]) + ")"
        return "(" + " * ".join(factors) + ")"

    def _print_Pow(self, expr):
        base, exponent = expr.args
        if exponent.is_Integer and 0 < exponent <= 4:
            text = self._print(base) if expr.is_integer else self._float(base)
            return "(" + " * ".join([text] * int(exponent)) + ")"
        if exponent == sympy.Rational(1, 2):
            return f"T.sqrt({self._float(base)})"
        if exponent.is_Integer and -4 <= exponent < 0:
            return f"(1.0 / {self._print(base ** -exponent)})"
        if base == 2:
            return f"T.exp2({self._float(exponent)})"
        return f"T.pow({self._float(base)}, {self._float(exponent)})"

    def _print_floor(self, expr):
        numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
        if denominator.is_Integer and numerator.is_integer:
            return f"T.floordiv({self._print(numerator)}, {int(denominator)})"
        return f"T.floor({self._float(expr.args[0])})"

    def _print_ceiling(self, expr):
        numerator, denominator = sympy.fraction(sympy.together(expr.args[0]))
        if denominator.is_Integer and numerator.is_integer:
            return f"T.floordiv({self._print(numerator)} + {int(denominator) - 1}, {int(denominator)})"
        return f"T.ceil({self._float(expr.args[0])})"

    def _print_Mod(self, expr):
        a, b = expr.args
        if expr.is_integer:
            return f"T.floormod({self._print(a)}, {self._print(b)})"
        raise UnsupportedError(f"`%` on non-integers is not supported in kernels: `{expr}`")

    def _print_Abs(self, expr):
        return f"T.abs({self._print(expr.args[0]) if expr.is_integer else self._float(expr.args[0])})"

    def _print_sign(self, expr):
        x = self._float(expr.args[0])
        return f"T.if_then_else({x} > 0, 1.0, T.if_then_else({x} < 0, -1.0, 0.0))"

    def _fold(self, fn: str, expr):
        args = self._operands(expr)
        text = args[0]
        for a in args[1:]:
            text = f"{fn}({text}, {a})"
        return text

    def _print_Min(self, expr):
        return self._fold("T.min", expr)

    def _print_Max(self, expr):
        return self._fold("T.max", expr)

    def _print_Function(self, expr):
        if self.fast_tanh and isinstance(expr, sympy.tanh):
            return f"T.call_extern(\"float32\", \"{FAST_TANH}\", {self._float(expr.args[0])})"
        fn = _FUNCTIONS.get(type(expr))
        if fn is None:
            raise UnsupportedError(f"kernels cannot compute `{expr.func}` (in `{expr}`)")
        return f"{fn}({self._float(expr.args[0])})"

    def _print_Relational(self, expr):
        lhs, rhs = expr.args
        both_int = bool(lhs.is_integer) and bool(rhs.is_integer)
        left = self._print(lhs) if both_int else self._float(lhs)
        right = self._print(rhs) if both_int else self._float(rhs)
        return f"({left} {_RELATIONS[expr.rel_op]} {right})"

    def _print_And(self, expr):
        return self._fold_logic("T.And", expr)

    def _print_Or(self, expr):
        return self._fold_logic("T.Or", expr)

    def _fold_logic(self, fn: str, expr):
        args = [self._print(a) for a in expr.args]
        text = args[0]
        for a in args[1:]:
            text = f"{fn}({text}, {a})"
        return text

    def _print_ITE(self, expr):
        condition, then, otherwise = (self._print(a) for a in expr.args)
        return f"T.if_then_else({condition}, {then}, {otherwise})"

    def _print_Not(self, expr):
        return f"T.Not({self._print(expr.args[0])})"

    def _print_Piecewise(self, expr):
        integer = bool(expr.is_integer)
        pieces = list(expr.args)
        value, condition = pieces[-1]
        if condition is not sympy.true:
            raise UnsupportedError(f"a piecewise expression needs a default branch: `{expr}`")
        text = self._print(value) if integer else self._float(value)
        for value, condition in reversed(pieces[:-1]):
            branch = self._print(value) if integer else self._float(value)
            text = f"T.if_then_else({self._print(condition)}, {branch}, {text})"
        return text

    def emptyPrinter(self, expr):
        raise UnsupportedError(f"kernels cannot compute `{expr}` ({type(expr).__name__})")


def print_expr(expr: sympy.Basic, names: Mapping[sympy.Symbol, str], tensors: Mapping[str, str] | None = None,
               float_dtype: str = "float32", fast_tanh: bool = False) -> str:
    """``expr`` as TileLang text; ``names`` maps symbols to kernel variables, ``tensors`` input names to buffers;
    ``fast_tanh`` prints tanh as a call of the template's ``attnc_fast_tanh`` (one PTX instruction)."""
    return TileLangPrinter(names, tensors or {}, float_dtype, fast_tanh).doprint(expr)
