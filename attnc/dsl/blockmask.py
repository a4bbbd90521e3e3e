"""Whether a mask needs a block mask computed at run time, and which of batch and head it varies with.

The tile map (`attnc.dsl.tilemap`) decides at compile time which kv tiles a q tile visits, from the mask's formula
in the indices and lengths. A mask that reads a tensor (a captured document-id table, a declared `Input`) cannot be
decided there: its tiles are partial everywhere. Such a mask gets a block mask instead: a generated kernel evaluates
the predicate on every element of the tile map's range at run time, classifies each (q tile, kv tile) as empty,
partial or full, and the forward visits only the non-empty tiles, evaluating the predicate only on partial ones.

The block mask has shape ``(B or 1, H or 1, q tiles, kv tiles)``: one plane per batch entry when the mask reads
``b`` (directly or in a tensor index), one per q head when it reads ``h``, else one plane serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attnc.dsl import symbols


@dataclass(frozen=True)
class BlockMaskLayout:
    """How a run-time block mask is laid out: ``per_batch`` (a plane per batch entry), ``per_head`` (per q head)."""

    per_batch: bool
    per_head: bool

    def planes(self, batch: int, q_heads: int) -> tuple[int, int]:
        """The block mask's leading dims for ``batch`` entries and ``q_heads`` heads."""
        return (batch if self.per_batch else 1), (q_heads if self.per_head else 1)

    def canonical(self) -> list[bool]:
        return [self.per_batch, self.per_head]


def block_mask_layout(mask: sympy.Basic) -> BlockMaskLayout | None:
    """The layout of the run-time block mask ``mask`` needs; None when the tile map decides it (no tensor reads)."""
    mask = sympy.sympify(mask)
    if not mask.atoms(sympy.Indexed):
        return None
    used = mask.free_symbols
    return BlockMaskLayout(per_batch=symbols.b in used, per_head=symbols.h in used)
