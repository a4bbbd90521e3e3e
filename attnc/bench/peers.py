"""The peers attnc is measured against, each as ``setup(case, tensors) -> (setup_ms, run(i))``.

cuDNN and FlashAttention-2 through torch's SDPA backends (where SDPA can express the case), and FlexAttention
compiled with torch.compile, whose create_block_mask time is reported as its setup. attnc's setup is compiling
(building or loading) its kernel, and making its block mask when the mask reads a tensor.
"""

from __future__ import annotations

import functools
import time
from typing import Callable

import torch
import torch.nn.functional as F

import attnc
from attnc.bench.cases import Case, case_inputs


class NotApplicable(Exception):
    """The peer cannot compute this case."""


def _sdpa(backend_name: str):
    def setup(case: Case, qs, ks, vs):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        if case.sdpa_causal is None:
            raise NotApplicable("SDPA has no argument for this mask or score_mod")
        backend = getattr(SDPBackend, backend_name)
        gqa = case.kv_heads != case.q_heads

        def run(i):
            with sdpa_kernel([backend]):
                return F.scaled_dot_product_attention(qs[i], ks[i], vs[i], is_causal=case.sdpa_causal, enable_gqa=gqa)
        return 0.0, run
    return setup


def _flex(case: Case, qs, ks, vs):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    device = qs[0].device
    # Every case compiles flex_attention anew; past dynamo's recompile limit (8) it would silently run eagerly.
    torch._dynamo.reset()
    mask_mod, score_mod = case.flex_mask(device), case.flex_score(device)
    block_mask, setup_ms = None, 0.0
    if mask_mod is not None:
        torch.cuda.synchronize()
        start = time.perf_counter()
        block_mask = create_block_mask(mask_mod, None, None, case.seq, case.seq, device=device)
        torch.cuda.synchronize()
        setup_ms = (time.perf_counter() - start) * 1e3
    compiled = torch.compile(flex_attention)
    gqa = case.kv_heads != case.q_heads

    def run(i):
        return compiled(qs[i], ks[i], vs[i], score_mod=score_mod, block_mask=block_mask, enable_gqa=gqa)
    return setup_ms, run


def _attnc(case: Case, qs, ks, vs, default: bool = False):
    """attnc's op; with ``default``, pinned to the default heuristic's config whatever the tuning database holds
    (timed beside the tuned op by ``attnc bench --tune``)."""
    from attnc.runtime.compiled import resolve_target
    from attnc.runtime.kernels import KERNEL_DTYPES
    from attnc.schedules.heuristics import call_config

    device, dtype = qs[0].device, qs[0].dtype
    spec = case.spec(device)
    config = None
    if default:
        config = call_config("fwd", resolve_target("cuda").arch, spec.ir, KERNEL_DTYPES[dtype], case.seq, case.seq,
                             spec.captured_tensors())
    start = time.perf_counter()
    op = attnc.compile(spec, target="cuda", dtype=dtype, config=config)
    block_mask = None
    if op.block_mask_layout is not None:  # a mask that reads a tensor: its block mask is made once, as Flex's is
        block_mask = op.block_mask(case.seq, case.seq, batch=case.batch, dtype=dtype)
        torch.cuda.synchronize()
    setup_ms = (time.perf_counter() - start) * 1e3

    def run(i):
        return op(qs[i], ks[i], vs[i], block_mask=block_mask)
    run.op = op
    return setup_ms, run


PEERS: dict[str, Callable] = {
    "attnc": _attnc,
    "attnc_default": functools.partial(_attnc, default=True),
    "cudnn": _sdpa("CUDNN_ATTENTION"),
    "fa2": _sdpa("FLASH_ATTENTION"),
    "flex": _flex,
}


def peers_named(names: str) -> list[str]:
    """The comma-separated peer names in ``names``; one that is not a key of `PEERS` is a ValueError naming it and
    listing the peers."""
    peers = [p.strip() for p in names.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise ValueError(f"unknown peer(s) {unknown}; known: {', '.join(PEERS)}")
    return peers


def backward_call(peer: str, case: Case, sets: int, dtype: torch.dtype = torch.bfloat16) -> Callable:
    """The peer's backward on ``sets`` random input sets of the case, as ``call(i)`` (the forward ran once per set,
    its graph kept); the gradients of q, k, v and the case's learned tensors. NotApplicable where the peer has
    none."""
    qs, ks, vs = case_inputs(case, dtype, sets, grad=True)
    douts = [torch.randn_like(q) for q in qs]
    learned = case.learned(torch.device("cuda"))
    _, forward = PEERS[peer](case, qs, ks, vs)
    outs = [forward(i) for i in range(sets)]

    def call(i):
        return torch.autograd.grad(outs[i], (qs[i], ks[i], vs[i], *learned), douts[i], retain_graph=True)
    return call
