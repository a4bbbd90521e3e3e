"""The torch.library custom op every compiled attention runs through, so torch.compile traces it.

One op, ``attnc::forward(q, k, v, extras, op_id) -> (out, lse)``: ``op_id`` names a registered
`CompiledAttention` in this process. Its fake implementation gives the output shapes without running anything.
"""

from __future__ import annotations

import itertools

import torch

_OPS: dict[str, object] = {}
_COUNTER = itertools.count()


def register(op) -> str:
    """Register a CompiledAttention; the id the custom op calls it by."""
    op_id = f"{op.ir.key[:16]}_{op.target.label}_{next(_COUNTER)}"
    _OPS[op_id] = op
    return op_id


@torch.library.custom_op("attnc::forward", mutates_args=())
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: list[torch.Tensor],
            op_id: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _OPS[op_id].launch(q, k, v, list(extras))


@forward.register_fake
def _(q, k, v, extras, op_id):
    ir = _OPS[op_id].ir
    if ir.layout == "bshd":
        batch, q_len = q.shape[0], q.shape[1]
        out = q.new_empty((batch, q_len, ir.q_heads, ir.v_dim))
    else:
        batch, q_len = q.shape[0], q.shape[2]
        out = q.new_empty((batch, ir.q_heads, q_len, ir.v_dim))
    return out, q.new_empty((batch, ir.q_heads, q_len), dtype=torch.float32)
