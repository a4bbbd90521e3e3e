"""The sympy symbols a traced mod is written in.

A score_mod is an expression in ``score, b, h, q_idx, kv_idx``; a mask_mod a boolean in ``b, h, q_idx, kv_idx``.
``q_len`` and ``kv_len`` are the run-time sequence lengths, which masks aligned to the end of the sequence
(bottom-right causal) refer to.
"""

import sympy

score = sympy.Symbol("score", real=True)
b = sympy.Symbol("b", integer=True, nonnegative=True)
h = sympy.Symbol("h", integer=True, nonnegative=True)
q_idx = sympy.Symbol("q_idx", integer=True, nonnegative=True)
kv_idx = sympy.Symbol("kv_idx", integer=True, nonnegative=True)
q_len = sympy.Symbol("q_len", integer=True, positive=True)
kv_len = sympy.Symbol("kv_len", integer=True, positive=True)

INDEX_SYMBOLS = (b, h, q_idx, kv_idx)
LENGTH_SYMBOLS = (q_len, kv_len)
