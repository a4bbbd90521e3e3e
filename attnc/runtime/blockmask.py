"""`BlockMask`: the kv tiles each q tile visits, computed at run time for masks that read tensors.

A mask that reads a tensor (a document mask's ``doc_ids``) cannot be tiled at compile time
(`attnc.dsl.blockmask`). Its op computes a block mask per call instead, or takes one made ahead with
``op.block_mask(q_len, kv_len, ...)`` and passed as ``op(q, k, v, block_mask=bm)`` (FlexAttention's
``create_block_mask`` → ``block_mask=`` pattern): the generated classifier (`BlockMaskKernel`) evaluates the mask on
every element of the tile map's range on the device, and torch ops on the device compact its tile kinds into
per-q-tile lists: no host synchronisation and no host work proportional to the tiles.

A block mask is valid for the mask tensors' values it was made from: made for other values, it gives wrong results.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnc.dsl.blockmask import BlockMaskLayout
from attnc.errors import InputError, UnsupportedError
from attnc.runtime.kernels import BlockMaskKernel
from attnc.schedules.config import KernelConfig

EMPTY, PARTIAL, FULL = 0, 1, 2
GRID_LIMIT = 65535  # CUDA grid y / z extents: q tiles, and batch × heads planes of the classifier
STAGE_TENSORS = 3  # what a kernel that walks a block mask takes: tile kinds, tile counts, tile lists
_GLYPHS = {EMPTY: "·", PARTIAL: "░", FULL: "█"}
_PRINTED_TILES = 48  # a larger grid prints downsampled, one glyph per group of tiles


@dataclass(frozen=True, eq=False)
class BlockMask:
    """Per q tile, the non-empty kv tiles (count and ascending list) and every tile's kind, for one op's mask at
    ``q_len`` x ``kv_len`` in tiles of ``config.block_m`` x ``config.block_n``.

    ``tile_kind``: (planes_b, planes_h, q tiles, kv tiles) int8, 0 empty / 1 partial / 2 full; ``kv_count``: (planes_b,
    planes_h, q tiles) int32; ``kv_list``: like ``tile_kind``, int32, the first ``kv_count`` entries of each row
    listed. ``planes_b`` is the batch (1 when the mask does not read ``b``), ``planes_h`` the q heads (1 when it does
    not read ``h``). ``config``: the kernel config the forward runs with this mask (its tile sizes); ``config_json``
    the same as the custom op carries it (made once: a traced call runs no json.dumps), with the backward's config
    under "backward" when the mask has one.

    ``backward_config`` and ``backward_lists``: made by ``op.block_mask``, the config the backward of a call with this
    mask runs with and, per stage of it that takes a block mask (`Backward.mask_stages`), the tile kinds at its tiles
    and its lists (the main stage: per kv tile, the q tiles), so that the backward reuses them as FlexAttention's
    does instead of classifying the mask again. A mask made per call has neither (its backward classifies).
    """

    spec_key: str
    target: str
    config: KernelConfig
    config_json: str
    batch: int
    q_len: int
    kv_len: int
    tile_kind: torch.Tensor
    kv_count: torch.Tensor
    kv_list: torch.Tensor
    backward_config: KernelConfig | None = None
    backward_lists: tuple[torch.Tensor, ...] = ()

    @property
    def tiles(self) -> tuple[int, int]:
        return self.config.block_m, self.config.block_n

    def tensors(self) -> list[torch.Tensor]:
        """What the custom op carries: the forward kernel's `STAGE_TENSORS` (tile kinds, kv tile counts, kv tile
        lists), then the backward's `backward_lists` (as many per stage)."""
        return [self.tile_kind, self.kv_count, self.kv_list, *self.backward_lists]

    def grid(self, batch: int = 0, head: int = 0) -> list[str]:
        """One row per q tile of plane (``batch``, ``head``): '█' full, '░' partial, '·' empty; downsampled (a glyph
        per group of tiles: full or empty when all of the group is) beyond 48 tiles a side."""
        kinds = self.tile_kind[min(batch, self.tile_kind.shape[0] - 1), min(head, self.tile_kind.shape[1] - 1)]
        kinds = kinds.to("cpu", torch.int8)
        rows, cols = kinds.shape
        step_r, step_c = -(-rows // _PRINTED_TILES) or 1, -(-cols // _PRINTED_TILES) or 1
        lines = []
        for r in range(0, rows, step_r):
            line = []
            for c in range(0, cols, step_c):
                group = kinds[r:r + step_r, c:c + step_c]
                line.append(_GLYPHS[FULL] if bool((group == FULL).all()) else
                            _GLYPHS[EMPTY] if bool((group == EMPTY).all()) else _GLYPHS[PARTIAL])
            lines.append("".join(line))
        return lines

    def __str__(self) -> str:
        planes_b, planes_h, rows, cols = self.tile_kind.shape
        listed = int(self.kv_count.sum())
        full = int((self.tile_kind == FULL).sum())
        total = planes_b * planes_h * rows * cols
        step_r, step_c = -(-rows // _PRINTED_TILES) or 1, -(-cols // _PRINTED_TILES) or 1
        scale = f", one glyph per {step_r}x{step_c} tiles" if step_r * step_c > 1 else ""
        lines = [
            f"BlockMask(q_len={self.q_len}, kv_len={self.kv_len}, batch={self.batch}, tiles={self.tiles[0]}x"
            f"{self.tiles[1]}, shape={tuple(self.tile_kind.shape)}, target={self.target}, "
            f"config={self.config.short()})",
            f"  {listed} of {total} tiles visited ({full} full), sparsity {100.0 * (1 - listed / max(total, 1)):.1f}%"
            + (f"; with the backward's lists at its config {self.backward_config.short()}" if self.backward_config
               else ""),
            f"  plane (0, 0) (█ full, ░ partial, · empty{scale}):",
        ]
        lines += ["    " + row for row in self.grid()]
        return "\n".join(lines)

    __repr__ = __str__


def compact(tile_kind: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per q tile, the count and the ascending list of the non-empty kv tiles (entries past the count: the empty
    tiles, never read), by torch ops on ``tile_kind``'s device."""
    listed = tile_kind != EMPTY
    kv_count = listed.sum(-1, dtype=torch.int32)
    order = torch.sort(listed.to(torch.int8), dim=-1, descending=True, stable=True).indices
    return kv_count, order.to(torch.int32).contiguous()


def compact_by_kv_tile(tile_kind: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per kv tile, the count and the ascending list of the non-empty q tiles: the transpose view the backward's
    main kernel walks (kv tiles outside, q tiles inside); ``(.., kv tiles)`` and ``(.., kv tiles, q tiles)``."""
    return compact(tile_kind.transpose(-1, -2))


def classify(kernel: BlockMaskKernel, inputs: list[torch.Tensor], layout: BlockMaskLayout, batch: int,
             q_heads: int, q_len: int, kv_len: int, device: torch.device) -> torch.Tensor:
    """The tile kinds of the mask at these sizes, filled by ``kernel`` on ``device`` (zeros: all empty, when there
    are no tiles)."""
    planes_b, planes_h = layout.planes(batch, q_heads)
    q_tiles, kv_tiles = -(-q_len // kernel.block_m), -(-kv_len // kernel.block_n)
    if kernel.target.kind == "cuda" and max(q_tiles, planes_b * planes_h) > GRID_LIMIT:
        raise UnsupportedError(f"the cuda block-mask kernel takes at most {GRID_LIMIT} q tiles and batch x heads "
                               f"planes; got {q_tiles} q tiles and {planes_b * planes_h} planes")
    tile_kind = torch.zeros((planes_b, planes_h, q_tiles, kv_tiles), dtype=torch.int8, device=device)
    if tile_kind.numel():
        kernel(*inputs, tile_kind, q_len, kv_len)
    return tile_kind


def reference_tile_kinds(ir, layout: BlockMaskLayout, batch: int, q_len: int, kv_len: int,
                         tensors: dict[str, torch.Tensor], block_m: int, block_n: int) -> torch.Tensor:
    """The oracle of `classify`: tile kinds (planes, q tiles, kv tiles; int8) from the mask evaluated on every
    element, on the CPU, O(S²): full when every in-bounds element of a tile whose columns are all in bounds is kept
    (a ragged last kv tile is never full), empty when none is, else partial."""
    from attnc.dsl import symbols
    from attnc.runtime.evaluate import evaluate

    env = {symbols.b: torch.arange(batch).view(-1, 1, 1, 1), symbols.h: torch.arange(ir.q_heads).view(1, -1, 1, 1),
           symbols.q_idx: torch.arange(q_len).view(1, 1, -1, 1), symbols.kv_idx: torch.arange(kv_len).view(1, 1, 1, -1),
           symbols.q_len: q_len, symbols.kv_len: kv_len}
    keep = torch.as_tensor(evaluate(ir.mask, env, tensors)).expand(batch, ir.q_heads, q_len, kv_len)
    planes_b, planes_h = layout.planes(batch, ir.q_heads)
    q_tiles, kv_tiles = -(-q_len // block_m), -(-kv_len // block_n)
    padded = torch.zeros(planes_b, planes_h, q_tiles * block_m, kv_tiles * block_n, dtype=torch.int32)
    padded[..., :q_len, :kv_len] = keep[:planes_b, :planes_h].int()
    kept = padded.view(planes_b, planes_h, q_tiles, block_m, kv_tiles, block_n).sum((3, 5))
    rows = (q_len - torch.arange(q_tiles) * block_m).clamp(max=block_m)
    full = (kept == rows.view(-1, 1) * block_n) & ((torch.arange(kv_tiles) + 1) * block_n <= kv_len)
    return torch.where(kept == 0, EMPTY, torch.where(full, FULL, PARTIAL)).to(torch.int8)


def check_block_mask(block_mask, *, spec_key: str, target: str, layout: BlockMaskLayout | None, batch: int,
                     q_len: int, kv_len: int, device: torch.device, config: KernelConfig | None) -> None:
    """Raise `InputError` unless ``block_mask`` serves a call of this op at these sizes; ``config``: the op's
    explicit config (a block mask for other tiles cannot run it), or None."""
    if layout is None:
        raise InputError("`block_mask` was passed, but this op's mask reads no tensor: the compile-time tile map "
                         "decides its tiles. Call it without block_mask.")
    if not isinstance(block_mask, BlockMask):
        raise InputError(f"`block_mask` must be a BlockMask made by op.block_mask(q_len, kv_len, ...); got "
                         f"{type(block_mask).__name__}")
    if block_mask.spec_key != spec_key or block_mask.target != target:
        raise InputError(f"`block_mask` was made for another op (spec {block_mask.spec_key[:16]}, target "
                         f"{block_mask.target}); expected one of this op (spec {spec_key[:16]}, target {target}). "
                         "Make it with this op's block_mask(...).")
    if (block_mask.q_len, block_mask.kv_len) != (q_len, kv_len):
        raise InputError(f"`block_mask` was made for q_len {block_mask.q_len}, kv_len {block_mask.kv_len}; this call "
                         f"has q_len {q_len}, kv_len {kv_len}. Make one with op.block_mask({q_len}, {kv_len}, ...).")
    if layout.per_batch and block_mask.batch != batch:
        raise InputError(f"`block_mask` was made for batch {block_mask.batch} (the mask reads `b`); this call has "
                         f"batch {batch}")
    if config is not None and (config.block_m, config.block_n) != block_mask.tiles:
        raise InputError(f"`block_mask` has tiles of {block_mask.tiles[0]}x{block_mask.tiles[1]}; this op runs "
                         f"{config.block_m}x{config.block_n} tiles (its config {config.short()})")
    if block_mask.tile_kind.device != device:
        raise InputError(f"`block_mask` must be on {device} like q; got {block_mask.tile_kind.device}")
