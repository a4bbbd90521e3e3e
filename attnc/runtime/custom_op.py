"""The torch.library custom op every compiled attention runs through, so torch.compile traces it.

One op, ``attnc::forward(q, k, v, extras, op_id, block_mask, block_config) -> (out, lse)``: ``op_id`` names a
registered `CompiledAttention` in this process; ``block_mask`` holds the tensors of a block mask made ahead
(`attnc.runtime.blockmask.BlockMask`: the forward kernel's, then the backward's lists, which autograd saves for the
backward) and ``block_config`` the kernel config it was made for (JSON, the backward's under "backward"), or ``[]``
and ``""`` (the op computes one per call when its mask reads a tensor). Its fake implementation gives the output shapes
without running anything.
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
def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extras: list[torch.Tensor], op_id: str,
            block_mask: list[torch.Tensor], block_config: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _OPS[op_id].launch(q, k, v, list(extras), list(block_mask), block_config)


@forward.register_fake
def _(q, k, v, extras, op_id, block_mask, block_config):
    ir = _OPS[op_id].ir
    if ir.layout == "bshd":
        batch, q_len = q.shape[0], q.shape[1]
        out = q.new_empty((batch, q_len, ir.q_heads, ir.v_dim))
    else:
        batch, q_len = q.shape[0], q.shape[2]
        out = q.new_empty((batch, ir.q_heads, q_len, ir.v_dim))
    return out, q.new_empty((batch, ir.q_heads, q_len), dtype=torch.float32)
