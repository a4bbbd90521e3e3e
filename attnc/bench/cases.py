"""The benchmark cases of the forward (and backward) comparison, each with attnc's spec and its peers' arguments.

A case says what attention to compute; for each peer it gives the equivalent call: SDPA's ``is_causal`` where
SDPA can express the case, and FlexAttention's ``score_mod``/``mask_mod`` written as FlexAttention users write them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable

import torch

import attnc
from attnc import mods


@dataclass(frozen=True)
class Case:
    """One benchmark configuration: shapes plus the variant, for attnc and for each peer."""

    name: str
    batch: int
    q_heads: int
    kv_heads: int
    seq: int
    dim: int
    spec: Callable[[torch.device], attnc.Attention]
    flex_score: Callable[[torch.device], Callable | None] = lambda device: None
    flex_mask: Callable[[torch.device], Callable | None] = lambda device: None
    sdpa_causal: bool | None = None  # None: SDPA cannot express the case
    learned: Callable[[torch.device], tuple[torch.Tensor, ...]] = lambda device: ()  # trained tensors the mods read
    tags: tuple[str, ...] = field(default=())


def _doc_ids(seq: int, docs: int, device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    cuts = torch.randperm(seq - 1, generator=generator)[: docs - 1].sort().values + 1
    lengths = torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([seq])]))
    return torch.repeat_interleave(torch.arange(docs), lengths).to(device)


def _flex_causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def dense(seq: int, dim: int, causal: bool, batch: int = 4, heads: int = 32, kv_heads: int | None = None) -> Case:
    kv_heads = kv_heads or heads
    label = f"{'causal' if causal else 'non-causal'} d{dim} S{seq // 1024}k" + \
        (f" GQA {heads}/{kv_heads}" if kv_heads != heads else "")
    return Case(
        label, batch, heads, kv_heads, seq, dim,
        spec=lambda device: attnc.Attention(heads, kv_heads, qk_dim=dim, layout="bhsd",
                                            mask_mod=mods.causal() if causal else None),
        flex_mask=lambda device: _flex_causal if causal else None,
        sdpa_causal=causal, tags=("dense",),
    )


def sliding_window(window: int, seq: int = 4096, batch: int = 4) -> Case:
    def flex_mask(device):
        def sliding(b, h, q_idx, kv_idx):
            return (q_idx >= kv_idx) & (q_idx - kv_idx < window)
        return sliding

    return Case(f"sliding window {window // 1024}k S{seq // 1024}k", batch, 32, 32, seq, 128,
                spec=lambda device: attnc.Attention(32, layout="bhsd", mask_mod=mods.sliding_window(window)),
                flex_mask=flex_mask)


def document(seq: int = 4096, docs: int = 8, batch: int = 4) -> Case:
    def spec(device):
        return attnc.Attention(32, layout="bhsd", mask_mod=mods.document(_doc_ids(seq, docs, device)) & mods.causal())

    def flex_mask(device):
        document_id = _doc_ids(seq, docs, device)

        def document_causal(b, h, q_idx, kv_idx):
            return (document_id[q_idx] == document_id[kv_idx]) & (q_idx >= kv_idx)
        return document_causal

    return Case(f"document ({docs} docs), causal S{seq // 1024}k", batch, 32, 32, seq, 128, spec=spec,
                flex_mask=flex_mask)


def prefix_lm(prefix: int = 1024, seq: int = 4096, batch: int = 4) -> Case:
    def flex_mask(device):
        def prefix_mask(b, h, q_idx, kv_idx):
            return (kv_idx < prefix) | (q_idx >= kv_idx)
        return prefix_mask

    return Case(f"prefix-LM {prefix // 1024}k S{seq // 1024}k", batch, 32, 32, seq, 128,
                spec=lambda device: attnc.Attention(32, layout="bhsd", mask_mod=mods.prefix_lm(prefix)),
                flex_mask=flex_mask)


def alibi(seq: int = 4096, batch: int = 4) -> Case:
    def flex_score(device):
        slopes = mods.alibi_slopes(32).to(device)

        def alibi_bias(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * (kv_idx - q_idx)
        return alibi_bias

    return Case(f"ALiBi, causal S{seq // 1024}k", batch, 32, 32, seq, 128,
                spec=lambda device: attnc.Attention(32, layout="bhsd", mask_mod=mods.causal(),
                                                    score_mod=mods.alibi(mods.alibi_slopes(32).to(device))),
                flex_score=flex_score, flex_mask=lambda device: _flex_causal)


def softcap(causal: bool, cap: float = 30.0, seq: int = 4096, batch: int = 4) -> Case:
    def flex_score(device):
        def soft_cap(score, b, h, q_idx, kv_idx):
            return cap * torch.tanh(score / cap)
        return soft_cap

    return Case(f"softcap {cap:g}, {'causal' if causal else 'non-causal'} S{seq // 1024}k", batch, 32, 32, seq, 128,
                spec=lambda device: attnc.Attention(32, layout="bhsd", score_mod=mods.softcap(cap),
                                                    mask_mod=mods.causal() if causal else None),
                flex_score=flex_score, flex_mask=lambda device: _flex_causal if causal else None)


@functools.cache
def _bias_table(seq: int, device: torch.device) -> torch.Tensor:
    """A learned (heads, 2·seq − 1) relative-position table, one per device, shared by attnc's and Flex's mods."""
    table = torch.randn(32, 2 * seq - 1, generator=torch.Generator().manual_seed(1)) * 0.1
    return table.to(device).requires_grad_()


def relative_bias(seq: int = 4096, batch: int = 4) -> Case:
    """A learned relative-position bias (FlexAttention's captured-buffer gradient path in the backward)."""
    def table(device):
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:  # "cuda" and "cuda:0" must share one table
            device = torch.device("cuda", torch.cuda.current_device())
        return _bias_table(seq, device)

    def flex_score(device):
        bias = table(device)

        def rel_bias(score, b, h, q_idx, kv_idx):
            return score + bias[h, kv_idx - q_idx + seq - 1]
        return rel_bias

    return Case(f"relative bias, causal S{seq // 1024}k", batch, 32, 32, seq, 128,
                spec=lambda device: attnc.Attention(32, layout="bhsd", mask_mod=mods.causal(),
                                                    score_mod=mods.relative_bias(table(device))),
                flex_score=flex_score, flex_mask=lambda device: _flex_causal, learned=lambda device: (table(device),))


def forward_cases(quick: bool = False) -> list[Case]:
    """The forward benchmark of the Hopper issue; ``quick`` keeps the 4k head-dim-128 cases."""
    cases = [dense(4096, 128, False), dense(4096, 128, True)]
    if not quick:
        cases += [dense(1024, 128, False), dense(1024, 128, True), dense(16384, 128, False, batch=1),
                  dense(16384, 128, True, batch=1), dense(4096, 64, False), dense(4096, 64, True),
                  dense(4096, 128, True, kv_heads=8)]
    cases += [sliding_window(1024), document(), prefix_lm(), alibi(), softcap(True), softcap(False)]
    if not quick:
        cases += [sliding_window(4096, seq=16384, batch=1)]
    return cases


def backward_cases(quick: bool = False) -> list[Case]:
    """The backward benchmark: the forward's cases plus a learned relative bias (its table's gradient too)."""
    return forward_cases(quick) + [relative_bias()]


def case_inputs(case: Case, dtype: torch.dtype, sets: int, grad: bool):
    """``sets`` random (q, k, v) sets of the case's shapes on the GPU, as three lists (requiring grad with ``grad``)."""
    def make(heads):
        t = torch.randn(case.batch, heads, case.seq, case.dim, dtype=dtype, device="cuda")
        return t.requires_grad_() if grad else t
    return ([make(case.q_heads) for _ in range(sets)], [make(case.kv_heads) for _ in range(sets)],
            [make(case.kv_heads) for _ in range(sets)])


def cases_named(starts: str, cases: list[Case]) -> list[Case]:
    """For each comma-separated start in ``starts``, the first of ``cases`` whose name begins with it; a start that
    no name begins with is a ValueError naming it and listing the cases."""
    found = []
    for start in (s.strip() for s in starts.split(",") if s.strip()):
        match = next((case for case in cases if case.name.startswith(start)), None)
        if match is None:
            raise ValueError(f"no case's name starts with {start!r}; the cases: "
                             + ", ".join(case.name for case in cases))
        found.append(match)
    return found
