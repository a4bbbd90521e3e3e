"""The score elements a forward kernel computes, for the Hopper forward issue's second masked-case target: TFLOP/s
over computed elements (every in-bounds element of every tile the kernel visits, masked or not) against attnc's
dense figure.

The visited tiles are the tile map's (`attnc.dsl.tilemap.analyse` at the config's tiles), or for a mask that reads a
tensor the non-empty tiles of its block mask (`attnc.runtime.blockmask.reference_tile_kinds`, on the CPU).

    python -m attnc.bench.computed RESULTS.json     (a forward run of `attnc bench`: prints the table)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch

from attnc.bench.cases import forward_cases
from attnc.dsl.blockmask import block_mask_layout
from attnc.dsl.ir import AttentionIR
from attnc.dsl.tilemap import analyse
from attnc.runtime.blockmask import EMPTY, reference_tile_kinds
from attnc.schedules.timing import attention_flops, tflops

DENSE_SHARE = 0.9
"""The target: a masked case's TFLOP/s over computed elements at least this share of attnc's dense figure."""


def computed_elements(ir: AttentionIR, block_m: int, block_n: int, batch: int, q_len: int, kv_len: int,
                      tensors: dict[str, torch.Tensor]) -> int:
    """In-bounds score elements of the tiles of ``block_m`` x ``block_n`` a forward kernel visits, over the batch
    and the q heads; ``tensors``: the mask's captured tensors (CPU)."""
    q_tiles, kv_tiles = -(-q_len // block_m), -(-kv_len // block_n)
    rows = (q_len - torch.arange(q_tiles) * block_m).clamp(max=block_m)
    cols = (kv_len - torch.arange(kv_tiles) * block_n).clamp(max=block_n)
    area = rows.view(-1, 1) * cols.view(1, -1)
    layout = block_mask_layout(ir.mask)
    if layout is None:
        tilemap = analyse(ir.mask, block_m, block_n)
        visited = torch.zeros(q_tiles, kv_tiles, dtype=torch.bool)
        for q_tile in range(q_tiles):
            begin, end, _, _ = tilemap.bounds(q_tile, q_len, kv_len)
            visited[q_tile, max(begin, 0):max(end, 0)] = True
        return int(area[visited].sum()) * batch * ir.q_heads
    kinds = reference_tile_kinds(ir, layout, batch, q_len, kv_len, tensors, block_m, block_n)
    planes_b, planes_h = layout.planes(batch, ir.q_heads)
    per_plane = (area * (kinds != EMPTY)).sum()
    return int(per_plane) * (batch // planes_b) * (ir.q_heads // planes_h)


def _tiles(config: str) -> tuple[int, int]:
    found = re.match(r"m(\d+)n(\d+)", config)
    if not found:
        raise ValueError(f"config: expected a label like 'm128n128s2t256'; got {config!r}")
    return int(found[1]), int(found[2])


def computed_rows(results: list[dict]) -> list[dict]:
    """attnc's timed rows of a forward run (of the bench's cases), each with ``computed`` (elements),
    ``computed_tflops`` and ``dense_share``: its TFLOP/s over computed elements against the run's dense non-causal
    case of the same head dim and length."""
    cases = {c.name: c for c in forward_cases()}
    rows = [dict(r) for r in results if r["peer"] == "attnc" and r.get("pass") == "forward" and "ms" in r
            and r.get("config") and r["case"] in cases]
    for row in rows:
        case = cases[row["case"]]
        spec = case.spec(torch.device("cpu"))
        block_m, block_n = _tiles(row["config"])
        row["computed"] = computed_elements(spec.ir, block_m, block_n, case.batch, case.seq, case.seq,
                                            spec.captured_tensors())
        row["computed_tflops"] = tflops(attention_flops(spec.ir, row["computed"]), row["ms"])
    for row in rows:
        dense = next((d for d in rows if d["case"].startswith("non-causal") and d["dim"] == row["dim"]
                      and d["seq"] == row["seq"]), None)
        row["dense_share"] = row["computed_tflops"] / dense["tflops"] if dense else None
    return rows


def markdown(rows: list[dict]) -> str:
    """The table of `computed_rows`."""
    head = ("| case | config | computed / unmasked elements | TFLOP/s (unmasked) | TFLOP/s (computed) | "
            f"/ dense (target ≥ {DENSE_SHARE}) |")
    lines = [head, "|" + " --- |" * 6]
    for r in rows:
        share = f"{r['dense_share']:.2f}" if r["dense_share"] is not None else "—"
        lines.append(f"| {r['case']} | {r['config']} | {r['computed'] / r['unmasked']:.3f} | {r['tflops']:.0f} | "
                     f"{r['computed_tflops']:.0f} | {share} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m attnc.bench.computed", description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="the JSON of a forward run of `attnc bench`")
    args = parser.parse_args(argv)
    if not args.results.is_file():
        parser.error(f"results: no file {args.results}")
    print(markdown(computed_rows(json.loads(args.results.read_text()))), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
