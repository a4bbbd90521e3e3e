"""Built kernels: the IR, tile map, config and source that made each, and a launcher over torch tensors.

`Kernel` is a forward kernel; `BlockMaskKernel` the classifier of a run-time block mask (`attnc.dsl.blockmask`).
"""

from __future__ import annotations

import concurrent.futures
import logging
import multiprocessing
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from attnc.codegen import build, ptxas, render
from attnc.codegen.cache import cache_dir
from attnc.codegen.context import make_block_mask_context, make_context
from attnc.dsl.blockmask import BlockMaskLayout, block_mask_layout
from attnc.dsl.ir import AttentionIR
from attnc.dsl.tilemap import TileMap, analyse
from attnc.errors import BuildError, UnsupportedError, one_line
from attnc.schedules.config import KernelConfig
from attnc.schedules.resources import require_fits

log = logging.getLogger(__name__)

KERNEL_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def pass_configs(family: str, target: build.Target) -> dict:
    """tilelang pass options for a family: CUDA kernels build with fast math (exp2; +4–7% measured on the H200).

    The T.Pipelined forward (sm_80) also turns shared-memory reuse off: tilelang 0.1.15 lets the output tile share
    Q's bytes while a q tile with no kv tile can still be receiving Q, which corrupts that tile's output.
    """
    if target.kind != "cuda":
        return {}
    configs = {"tl.enable_fast_math": True}
    if family == "fwd" and target.arch != "sm_90a":
        configs["tl.disable_shared_memory_reuse"] = True
    return configs


@dataclass
class BuiltKernel:
    """A rendered kernel source under its cache key, ``<label>_<hash>`` over the source and what its build reads
    besides (`attnc.codegen.build.source_key`); built (or loaded from the disk cache) on first use."""

    family: str
    label: str = field(repr=False)
    source: str = field(repr=False)
    target: build.Target
    key: str = field(init=False)
    compiled: object = field(default=None, kw_only=True)

    def __post_init__(self):
        self.key = build.source_key(self.label, self.source, self.target, pass_configs(self.family, self.target))

    def build(self) -> BuiltKernel:
        if self.compiled is None:
            self.compiled = build.build(self.key, self.source, self.target, pass_configs(self.family, self.target))
        return self

    @property
    def source_path(self):
        return build.source_path(self.key)

    def device_source(self) -> str:
        """The code tilelang generated (C for the CPU, CUDA for GPUs)."""
        return self.build().compiled.get_kernel_source()

    def resource_report(self) -> ptxas.PtxasReport:
        """ptxas's report of this cuda kernel: registers a thread and bytes spilled (`attnc.codegen.ptxas`)."""
        if self.target.kind != "cuda":
            raise UnsupportedError(f"ptxas's resource report is for cuda kernels; this one targets {self.target.label}")
        fast_math = bool(pass_configs(self.family, self.target).get("tl.enable_fast_math"))
        return ptxas.resource_report(self.device_source(), self.target.arch, fast_math)

    def __call__(self, *tensors: torch.Tensor) -> None:
        self.build().compiled(*tensors)


@dataclass
class Kernel(BuiltKernel):
    """A forward kernel for one (IR, family, dtype, config, target), with the tile map and config that made it.

    ``block_mask``: the layout of the run-time block mask the kernel takes after the extras (its tile kinds, kv
    tile counts and lists), None when the tile map alone decides which tiles it visits.
    """

    tilemap: TileMap
    config: KernelConfig
    block_mask: BlockMaskLayout | None = None
    ir: AttentionIR | None = field(default=None, repr=False)
    dtype: str = ""
    plain: bool = False

    @classmethod
    def render(cls, family: str, ir: AttentionIR, config: KernelConfig, dtype: str, target: build.Target,
               block_mask: bool = True, plain: bool = False) -> Kernel:
        """Render (not build) ``family``'s kernel; a config the target's resources cannot hold is refused first.
        ``block_mask=False`` keeps a data-dependent mask partial everywhere instead of taking a run-time block
        mask; ``plain``: see `make_context` (`build` falls back to it by itself)."""
        if target.kind == "cuda":
            require_fits(family, target.arch, config, qk_dim=ir.qk_dim, v_dim=ir.v_dim, group=ir.group,
                         dtype_bytes=2)
        tilemap = analyse(ir.mask, config.block_m, config.block_n)
        layout = block_mask_layout(ir.mask) if block_mask else None
        ctx = make_context(family, f"attnc_{family}", ir, tilemap, config, dtype, target.arch, layout, plain)
        return cls(family, f"{family}_{dtype}_d{ir.qk_dim}_{target.label}", render.render(ctx), target,
                   tilemap=tilemap, config=config, block_mask=layout, ir=ir, dtype=dtype, plain=plain)

    def build(self) -> Kernel:
        """Build (or load); a cuda kernel that tilelang 0.1.15 cannot lower with hoisted reads or score vectors
        ("[ThreadSync] Cannot lower a required shared-memory sync inside a divergent region", seen with a
        per-column read under a branch on q_idx and kv_idx) is built `plain` instead, with a logged warning."""
        try:
            return super().build()
        except BuildError as error:
            if self.plain or self.target.kind != "cuda" or "[ThreadSync]" not in str(error):
                raise
            log.warning("%s: tilelang cannot lower the optimised element loop (%s); building it plain", self.key,
                        str(error).splitlines()[0][:160])
            plain = Kernel.render(self.family, self.ir, self.config, self.dtype, self.target,
                                  block_mask=self.block_mask is not None, plain=True).build()
            self.key, self.source, self.compiled, self.plain = plain.key, plain.source, plain.compiled, True
            return self


@dataclass
class BlockMaskKernel(BuiltKernel):
    """The classifier of a run-time block mask: ``kernel(*inputs, tile_kind, q_len, kv_len)`` fills ``tile_kind``
    (planes, q tiles, kv tiles; int8) with 0 empty / 1 partial / 2 full for the tiles of ``block_m`` x ``block_n``."""

    layout: BlockMaskLayout
    block_m: int
    block_n: int

    @classmethod
    def render(cls, ir: AttentionIR, block_m: int, block_n: int, target: build.Target) -> BlockMaskKernel:
        """Render (not build) the classifier of ``ir``'s mask for these tiles; ``ir`` must need a block mask."""
        layout = block_mask_layout(ir.mask)
        family = "cpu_block_mask" if target.kind == "cpu" else "block_mask"
        config = KernelConfig(block_m=block_m, block_n=block_n, stages=1, threads=block_m)
        tilemap = analyse(ir.mask, block_m, block_n)
        ctx = make_block_mask_context(family, f"attnc_{family}", ir, tilemap, config, layout, target.arch)
        return cls(family, f"{family}_{target.label}", render.render(ctx), target, layout=layout, block_m=block_m,
                   block_n=block_n)


# --- building in parallel ------------------------------------------------------------------------------------------
# A build job is a picklable call that renders one kernel: ``functools.partial(Kernel.render, "fwd", ir, config,
# dtype, target)``, ``functools.partial(BlockMaskKernel.render, ir, block_m, block_n, target)``, or one of
# `attnc.runtime.autograd.Backward.build_jobs`. Spawned processes render and build them into this process's cache, so
# that a later render + build here loads from disk in milliseconds.

def timed_build(job: Callable[[], BuiltKernel]) -> tuple[str | None, float]:
    """Render (``job()``) and build one kernel; (its error on one line, or None; seconds)."""
    start = time.perf_counter()
    try:
        job().build()
    except Exception as error:  # reported to the caller, which decides
        return one_line(error), time.perf_counter() - start
    return None, time.perf_counter() - start


def build_in_worker(job: Callable[[], BuiltKernel], cache: str) -> tuple[str | None, float]:
    """In a process of `spawn_build_pool`: `timed_build` into the cache directory ``cache`` (the parent's)."""
    os.environ["ATTNC_CACHE_DIR"] = cache
    return timed_build(job)


def spawn_build_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    """``workers`` build processes, spawned (not forked: the parent may hold CUDA and tilelang state)."""
    return concurrent.futures.ProcessPoolExecutor(max_workers=max(1, workers),
                                                  mp_context=multiprocessing.get_context("spawn"))


def build_in_parallel(jobs: Sequence[Callable[[], BuiltKernel]], workers: int) -> list[str | None]:
    """Render and build every job (see above) in ``workers`` spawned processes into this process's cache; each
    job's error on one line, or None."""
    cache = str(cache_dir())
    with spawn_build_pool(workers) as pool:
        return [error for error, _ in pool.map(build_in_worker, jobs, [cache] * len(jobs))]
