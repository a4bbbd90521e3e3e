"""Kernel contexts: what the backward's templates learn about the gradients of captured tensors."""

import sympy

from attnc.codegen.context import diagonal_target
from attnc.dsl import symbols as s

TABLE = sympy.IndexedBase("table", real=True)
TENSORS = {"table": "in_table"}


def test_a_read_indexed_by_the_query_key_distance_is_summed_per_diagonal():
    read = TABLE[s.h, s.kv_idx - s.q_idx + 511]
    assert diagonal_target(read, TENSORS, "table") == "grad_table[h, (511 + (-diag))]"
    clamped = TABLE[s.h, sympy.Min(sympy.Max(s.q_idx - s.kv_idx, -8), 8) + 8]
    assert "diag" in diagonal_target(clamped, TENSORS, "table")
    assert "kv_idx" not in diagonal_target(clamped, TENSORS, "table")


def test_other_reads_keep_one_atomic_per_element():
    assert diagonal_target(TABLE[s.h, s.kv_idx], TENSORS, "table") == ""  # a per-key bias: not a diagonal
    assert diagonal_target(TABLE[s.q_idx, s.kv_idx], TENSORS, "table") == ""  # a full score bias
    assert diagonal_target(TABLE[s.h, s.q_idx + s.kv_idx], TENSORS, "table") == ""  # an anti-diagonal
    assert diagonal_target(TABLE[s.b, s.h], TENSORS, "table") == ""  # one address per (b, h): reduced in the block
