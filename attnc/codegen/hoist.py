"""Hoisting tensor reads out of the per-element loop of a GPU kernel.

A mod's read of a captured tensor often depends on fewer indices than the score element it modifies: ALiBi's
``slopes[h]`` on none of the position indices, a document mask's ``doc_ids[q_idx]`` on the row alone and
``doc_ids[kv_idx]`` on the column alone. Reading them inside the block_m × block_n loop costs one global load per
element; hoisted, they cost one register per block, one per row per q tile, one per column per kv tile.
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from attnc.dsl import symbols

_INVARIANT = {symbols.b, symbols.h, symbols.q_len, symbols.kv_len}


@dataclass(frozen=True)
class HoistedRead:
    """One tensor read moved out of the element loop: the cache it lands in, the read, and where it is computed.

    ``level`` is 'block' (once per kernel block), 'row' (per query row of the q tile, indexed by ``i``) or 'column'
    (per key of the kv tile, indexed by ``j``). ``symbol`` stands for the cache in the rewritten expressions.
    """

    cache: str
    read: sympy.Indexed
    level: str
    integer: bool
    symbol: sympy.Symbol


def _level(read: sympy.Indexed) -> str | None:
    if any(index.atoms(sympy.Indexed) for index in read.indices):
        return None
    used = set().union(*(index.free_symbols for index in read.indices)) if read.indices else set()
    if used <= _INVARIANT:
        return "block"
    if used <= _INVARIANT | {symbols.q_idx}:
        return "row"
    if used <= _INVARIANT | {symbols.kv_idx}:
        return "column"
    return None


def hoist(*exprs: sympy.Basic) -> tuple[tuple[sympy.Basic, ...], tuple[HoistedRead, ...], dict]:
    """``exprs`` with every hoistable read replaced by a cache symbol; the reads; the symbol → kernel-text names.

    Cache symbols keep the read's integer-ness, so the printer casts them exactly as it would the read.
    """
    reads = sorted(set().union(*(e.atoms(sympy.Indexed) for e in exprs)), key=sympy.default_sort_key)
    hoisted, replace, names = [], {}, {}
    for read in reads:
        level = _level(read)
        if level is None:
            continue
        cache = f"{level}_cache{len(hoisted)}"
        integer = bool(read.is_integer)
        symbol = sympy.Symbol(cache, integer=True) if integer else sympy.Symbol(cache, real=True)
        replace[read] = symbol
        names[symbol] = {"block": cache, "row": f"{cache}[i]", "column": f"{cache}[j]"}[level]
        hoisted.append(HoistedRead(cache, read, level, integer, symbol))
    return tuple(e.xreplace(replace) for e in exprs), tuple(hoisted), names
