"""The resource model: what one kernel config needs (shared memory, registers, warp layout) against what an
architecture offers, so that configs which cannot build or launch are pruned before anything is built.

The model is deliberately simple and conservative: it counts the tiles a template keeps in shared memory and the
fp32 accumulators it keeps in registers, and it encodes the warp-partition rule TileLang's GEMM lowering imposes.
A config it admits may still turn out slow; a config it refuses would not build, would spill badly, or could not
launch.

What is counted, per template family (``dtype_bytes`` is the input dtype's size; fp32 is 4 bytes):

``fwd`` (flash forward, one block = ``block_m`` query rows against the whole key range)
    shared memory: the Q tile ``block_m × qk_dim`` (loaded once) + ``stages ×`` (K tile ``block_n × qk_dim`` + V tile
    ``block_n × v_dim``) for the software pipeline + the output staging tile ``block_m × v_dim``, all in the input
    dtype. P (the probabilities) stays in registers and is not counted. The output tile is counted on top of the
    main-loop tiles even though TileLang may reuse their space once they are dead: the estimate errs on the safe
    side.
    registers per thread: the fp32 output accumulator ``block_m × v_dim`` and the fp32 score tile
    ``block_m × block_n`` spread over the block's threads, plus 3 per softmax row a thread owns (running max, sum,
    rescale factor) and a fixed overhead of ``OVERHEAD_REGS`` (addresses, loop indices; the low-precision copy of P
    is assumed to take the scores' registers as they are consumed).
``bwd`` (FlashAttention-2-style backward: one block keeps ``block_n`` key rows and walks the query tiles)
    shared memory: K and V tiles of ``block_n`` rows (resident) + ``stages ×`` (Q tile ``block_m × qk_dim``, dO tile
    ``block_m × v_dim``, and the fp32 lse and delta rows, ``2 × block_m × 4`` bytes) + the P and dS tiles
    (``block_m × block_n`` each, input dtype). sm_80 (T.Pipelined): P and dS once, plus the dK and dV output staging
    tiles (``block_n × (qk_dim + v_dim)``). sm_90a (warp-specialised): dS twice (one consumer warpgroup may run an
    iteration ahead of the other), P twice only when the warps split the kv rows in both dimensions (``block_n <
    16 × warps``: P then goes through shared memory), the fp32 dQ tile ``block_m × qk_dim`` that one TMA
    reduce-add sends to global memory (head dims up to 128, `bwd_dq_staged`), and no dK / dV staging (they are
    staged in K's and V's tiles). Otherwise dQ is added to global memory with atomics straight from registers.
    On sm_90a each buffer is counted rounded up to ``SMEM_ALIGN`` (tilelang aligns them for TMA and swizzling) and
    ``SMEM_RESERVE`` bytes are kept for the static shared memory (mbarriers) beside the dynamic allocation: the
    H200 refused to launch kernels of 232448 and 231936 dynamic bytes that the unaligned count put under its limit.
    registers per thread: the fp32 dK and dV accumulators ``block_n × (qk_dim + v_dim)`` held over the whole loop,
    plus the larger of the per-iteration fp32 tiles: S and dP (``2 × block_m × block_n``) or the dQ partial
    (``block_m × qk_dim``, computed after S and dP are dead), spread over the threads, plus ``OVERHEAD_REGS``. On
    sm_90a the consumer warpgroups get at most ``consumer_regs(threads)`` registers (setmaxnreg), the producer 24.
``decode`` (one query token; a block serves one kv head and packs its ``group`` q heads into ``block_m`` rows)
    as ``fwd``, with ``block_m`` the padded q-head rows; with ``split > 1`` the output staging holds fp32 partials
    (4 bytes per element) that are merged by a second pass.
``cpu_fwd`` / ``cpu_bwd`` (TileLang's C target: scalar loops)
    the tile buffers of one block (inputs in the input dtype, accumulators and scores in fp32) against
    ``Arch.smem_per_block``, which for the CPU is a 1 MiB cap guarding against tile buffers too large for the
    stack. Registers are not modelled.

Registers against the architecture: the per-thread estimate must not exceed ``max_regs_per_thread`` (255), and one
block's total — the estimate rounded up to the allocation granularity of 8, times ``threads``, plus the producer
warpgroup TileLang's warp specialisation adds on sm_90a (128 threads at 24 registers) — must fit the 64K registers
of one SM.

Warp layout (CUDA). Every row of the score tile must be owned by one warp, so the online softmax's row statistics
need no exchange across warps: the GEMMs over ``block_m`` rows use TileLang's ``FullRow`` policy with every warp
along M, which requires ``block_m % (16 * warps) == 0`` (each warp owns a multiple of the MMA's 16 rows). On sm_90a
the GEMMs are wgmma: ``threads`` must be a multiple of 128 (whole warpgroups). TileLang's own partitioner
(``ComputeWgmmaWarpPartition``) would fall back to splitting N across warpgroups when the rows cannot be split — e.g.
128 rows over 12 warps (384 threads) leaves only ``m_warp = 4, n_warp = 3``, which fails for N = 128 anyway ("no
valid warp partition") — and such fallbacks split softmax rows across warpgroups; this model excludes them. The
backward has no row reduction in its main loop (P and dS are elementwise given lse and delta), so there each of its
products (Sᵀ = K Qᵀ and dV = Pᵀ dO, dK = dSᵀ Q over ``block_n`` rows; dQ = dS K over ``block_m`` rows) only needs a
partition TileLang's partitioner accepts: ``m_warp × n_warp = warps`` with 16 rows and 8 columns per warp and, on
sm_90a, ``m_warp`` a multiple of 4.
"""

from __future__ import annotations

from dataclasses import dataclass

from attnc.errors import UnsupportedError
from attnc.schedules.config import KernelConfig

FAMILIES = ("fwd", "bwd", "decode", "cpu_fwd", "cpu_bwd")
"""The template families the resource model knows."""

CUDA_FAMILIES = ("fwd", "bwd", "decode")
CPU_FAMILIES = ("cpu_fwd", "cpu_bwd")

OVERHEAD_REGS = 24
"""Registers per thread the model reserves beyond the accumulators (addresses, indices, loop state)."""

REG_GRANULARITY = 8
"""Registers are allocated per thread in multiples of this."""

SMEM_ALIGN = 1024
"""Bytes each sm_90a backward shared buffer is rounded up to."""

SMEM_RESERVE = 2048
"""Bytes of the per-block limit the sm_90a backward leaves for static shared memory (mbarriers)."""

BLOCK_SMEM_RESERVE = 1024
"""Shared memory the hardware keeps for each resident block on sm_80 and later, beside what the block asks for."""

MMA_ROWS = 16
"""Rows one warp's MMA covers; a warp owns a multiple of this."""

MMA_COLS = 8
"""Columns one warp's MMA covers (the N step)."""

HEAD_DIM_STEP = 16
"""Head dims must be multiples of the MMA's k step (16 for 16-bit inputs)."""


@dataclass(frozen=True)
class Arch:
    """What one target offers a single block.

    name: the target name (``'sm_90a'``, ``'sm_80'``, ``'cpu'``); kind: ``'cuda'`` or ``'cpu'``;
    smem_per_block: the most shared memory (opt-in maximum) one block may use, in bytes — for the CPU, the cap on
    one block's tile buffers; regs_per_sm: 32-bit registers per SM; max_regs_per_thread: the per-thread register
    cap; max_threads: threads per block; wgmma: GEMMs are Hopper warpgroup MMAs (threads in whole warpgroups);
    producer_threads / producer_regs: the producer warpgroup TileLang's warp specialisation may add to a block and
    the registers it keeps (counted so that the block still fits when it is added); smem_per_sm: the shared memory
    of one SM, which the blocks resident on it share (0: not modelled).
    """

    name: str
    kind: str
    smem_per_block: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    max_threads: int = 1024
    wgmma: bool = False
    producer_threads: int = 0
    producer_regs: int = 0
    smem_per_sm: int = 0

    @property
    def is_cpu(self) -> bool:
        return self.kind == "cpu"


SM90A = Arch("sm_90a", "cuda", smem_per_block=232448, wgmma=True, producer_threads=128, producer_regs=24,
             smem_per_sm=233472)
SM80 = Arch("sm_80", "cuda", smem_per_block=166912)
SM86 = Arch("sm_86", "cuda", smem_per_block=101376)
SM89 = Arch("sm_89", "cuda", smem_per_block=101376)
CPU = Arch("cpu", "cpu", smem_per_block=1 << 20, regs_per_sm=0, max_regs_per_thread=0, max_threads=1)

ARCHES: dict[str, Arch] = {a.name: a for a in (SM90A, SM80, SM86, SM89, CPU)}
"""The architectures attnc has a resource model for, by name."""

_CAPABILITIES = {"9.0": "sm_90a", "8.0": "sm_80", "8.6": "sm_86", "8.7": "sm_86", "8.9": "sm_89"}


def get_arch(arch: Arch | str | tuple[int, int]) -> Arch:
    """The `Arch` for a name (``'sm_90a'``, ``'cpu'``), a compute capability (``'9.0'``, ``(9, 0)``) or an `Arch`.

    Plain ``'sm_90'`` is refused: warp-specialised code needs ``'sm_90a'``.
    """
    if isinstance(arch, Arch):
        return arch
    if isinstance(arch, tuple) and len(arch) == 2 and all(isinstance(v, int) for v in arch):
        arch = f"{arch[0]}.{arch[1]}"
    if isinstance(arch, str):
        name = arch.strip().lower()
        name = _CAPABILITIES.get(name, name)
        if name in ARCHES:
            return ARCHES[name]
        if name == "sm_90":
            raise UnsupportedError(
                "arch 'sm_90' is not supported: Hopper kernels use warp specialisation and wgmma, which need "
                "'sm_90a'. Pass arch='sm_90a'."
            )
    supported = ", ".join(repr(n) for n in ARCHES)
    raise UnsupportedError(
        f"no resource model for arch {arch!r}; supported: {supported} (or a compute capability such as '9.0')"
    )


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        supported = ", ".join(repr(f) for f in FAMILIES)
        raise UnsupportedError(f"unknown template family {family!r}; supported: {supported}")


def _dtype_name(dtype_bytes: int) -> str:
    return {1: "8-bit", 2: "16-bit", 4: "fp32"}.get(dtype_bytes, f"{dtype_bytes}-byte")


def bwd_dq_staged(qk_dim: int) -> bool:
    """Whether the sm_90a backward adds dQ by TMA reduce-add from a shared fp32 tile (by default): up to head dim
    128; above, the tile would leave no room for double-buffered Q and dO tiles."""
    return qk_dim <= 128


def consumer_regs(threads: int, blocks_per_sm: int = 1) -> int:
    """Registers per thread the sm_90a warp-specialised kernels give their ``threads`` consumer threads (setmaxnreg).

    One block per SM: 240 (160 with three consumer warpgroups). Two (one consumer warpgroup,
    `forward_blocks_per_sm`): each block launches with 128 registers per thread (64K over 2 × 256 threads), and the
    consumers take the 104 per thread the producer gives up by keeping 24: 232.
    """
    if blocks_per_sm == 2:
        return 232
    return 240 if threads <= 256 else 160


def forward_blocks_per_sm(config: KernelConfig, *, qk_dim: int, v_dim: int, dtype_bytes: int = 2,
                          arch: Arch | str = "sm_90a") -> int:
    """Blocks of the warp-specialised forward one SM is built to hold: 2 when a block has one consumer warpgroup
    (128 threads) and two blocks' shared memory fit the SM, so that one block's prologue and epilogue (Q's load, O's
    store) overlap the other's loop, which pays on short kv loops (document masks, narrow windows); else 1. The
    kernel then caps its registers for two blocks (``__launch_bounds__(256, 2)``, `consumer_regs`)."""
    arch = get_arch(arch)
    if not arch.wgmma or config.threads != 128 or not arch.smem_per_sm:
        return 1
    smem = shared_memory_bytes("fwd", config, qk_dim=qk_dim, v_dim=v_dim, dtype_bytes=dtype_bytes,
                               output_in_q=qk_dim == v_dim)
    return 2 if 2 * (smem + SMEM_RESERVE + BLOCK_SMEM_RESERVE) <= arch.smem_per_sm else 1


def shared_memory_bytes(
    family: str, config: KernelConfig, *, qk_dim: int, v_dim: int, group: int = 1, dtype_bytes: int = 2,
    output_in_q: bool = False, warp_specialized: bool = False,
) -> int:
    """Shared memory (bytes) one block of ``family`` needs under ``config``; see the module docstring for the terms.

    ``group`` (q heads per kv head) does not change the count: for ``decode`` it is already in ``config.block_m``.
    ``output_in_q``: the output tile reuses the Q tile's bytes (the sm_90a forward when qk_dim == v_dim).
    ``warp_specialized``: the sm_90a backward's layout (``bwd`` only).
    """
    _check_family(family)
    bm, bn, st, e = config.block_m, config.block_n, max(1, config.stages), dtype_bytes
    if family in ("fwd", "decode"):
        q_tile = bm * qk_dim * e
        kv_tiles = st * bn * (qk_dim + v_dim) * e
        out_elem = 4 if (family == "decode" and config.split > 1) else e
        out_tile = 0 if output_in_q else bm * v_dim * out_elem
        return q_tile + kv_tiles + out_tile
    if family == "bwd":
        kv_tiles = bn * (qk_dim + v_dim) * e
        q_do_tiles = st * (bm * (qk_dim + v_dim) * e + 2 * bm * 4)
        if warp_specialized:
            p_in_shared = bn < MMA_ROWS * max(1, config.threads // 32)
            buffers = [bn * qk_dim * e, bn * v_dim * e, st * bm * qk_dim * e, st * bm * v_dim * e, st * bm * 4,
                       st * bm * 4, 2 * bm * bn * e]
            buffers += [2 * bm * bn * e] if p_in_shared else []
            buffers += [bm * qk_dim * 4] if bwd_dq_staged(qk_dim) else []
            return sum(_round_up(b, SMEM_ALIGN) for b in buffers) + SMEM_RESERVE
        p_ds_tiles = 2 * bm * bn * e
        dkdv_staging = bn * (qk_dim + v_dim) * e
        return kv_tiles + q_do_tiles + p_ds_tiles + dkdv_staging
    if family == "cpu_fwd":
        inputs = (bm * qk_dim + bn * (qk_dim + v_dim)) * e
        fp32 = (bm * bn + bm * v_dim + 3 * bm) * 4
        return inputs + fp32
    # cpu_bwd
    inputs = (bn * (qk_dim + v_dim) + bm * (qk_dim + v_dim)) * e
    fp32 = (2 * bm * bn + bn * (qk_dim + v_dim) + bm * qk_dim + 2 * bm) * 4
    return inputs + fp32


def register_estimate(
    family: str, config: KernelConfig, *, qk_dim: int, v_dim: int, group: int = 1, dtype_bytes: int = 2
) -> int:
    """Estimated 32-bit registers per thread for one block of ``family`` (0 for the CPU families)."""
    _check_family(family)
    if family in CPU_FAMILIES:
        return 0
    bm, bn, threads = config.block_m, config.block_n, max(1, config.threads)
    warps = max(1, threads // 32)
    if family in ("fwd", "decode"):
        accum = bm * v_dim + bm * bn
        # In the MMA fragment layout a thread holds 2 rows of each 16-row tile its warp owns.
        rows_per_thread = 2 * -(-bm // (MMA_ROWS * warps))
        return -(-accum // threads) + 3 * rows_per_thread + OVERHEAD_REGS
    # bwd
    accum = bn * (qk_dim + v_dim) + max(2 * bm * bn, bm * qk_dim)
    return -(-accum // threads) + OVERHEAD_REGS


def _round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def _partition_exists(m: int, n: int, warps: int, wgmma: bool) -> bool:
    """Whether TileLang's GEMM lowering finds any warp partition for an ``m × n`` product (any policy)."""
    for m_warp in range(1, warps + 1):
        if warps % m_warp:
            continue
        n_warp = warps // m_warp
        if wgmma and m_warp % 4:
            continue
        if m % (m_warp * MMA_ROWS) == 0 and n % (n_warp * MMA_COLS) == 0:
            return True
    return False


def check(
    family: str,
    arch: Arch | str,
    config: KernelConfig,
    *,
    qk_dim: int,
    v_dim: int,
    group: int = 1,
    dtype_bytes: int = 2,
) -> list[str]:
    """The reasons ``config`` does not fit ``family`` on ``arch`` for these head dims; empty when it fits.

    Each reason is one sentence naming the resource or rule, the amount needed and the limit.
    """
    _check_family(family)
    arch = get_arch(arch)
    reasons: list[str] = []
    bm, bn, st, threads = config.block_m, config.block_n, config.stages, config.threads
    dims = dict(qk_dim=qk_dim, v_dim=v_dim, group=group, dtype_bytes=dtype_bytes)

    if family in CPU_FAMILIES and not arch.is_cpu:
        reasons.append(f"family {family!r} runs on the 'cpu' target, not on {arch.name!r}")
    if family in CUDA_FAMILIES and arch.is_cpu:
        reasons.append(f"family {family!r} is a CUDA template; the 'cpu' target runs 'cpu_fwd' and 'cpu_bwd'")
    if reasons:
        return reasons

    for name, value in (("block_m", bm), ("block_n", bn), ("stages", st), ("threads", threads), ("split", config.split)):
        if not isinstance(value, int) or value < 1:
            reasons.append(f"{name} must be a positive integer, got {value!r}")
    for name, value in (("qk_dim", qk_dim), ("v_dim", v_dim), ("group", group), ("dtype_bytes", dtype_bytes)):
        if not isinstance(value, int) or value < 1:
            reasons.append(f"{name} must be a positive integer, got {value!r}")
    if reasons:
        return reasons

    warp_specialized_fwd = family == "fwd" and arch.wgmma
    smem = shared_memory_bytes(family, config, **dims, output_in_q=warp_specialized_fwd and qk_dim == v_dim,
                               warp_specialized=family == "bwd" and arch.wgmma)
    resource = "tile buffer memory" if arch.is_cpu else "shared memory"
    if smem > arch.smem_per_block:
        reasons.append(f"{resource} {smem} bytes exceeds the {arch.name} limit of {arch.smem_per_block} bytes per block")

    if arch.is_cpu:
        if config.split != 1:
            reasons.append(f"split {config.split}: the CPU templates do not split the key range (split must be 1)")
        if config.pack_gqa:
            reasons.append("pack_gqa: the CPU templates do not pack GQA heads")
        return reasons

    # CUDA: divisibility and warp layout.
    for name, value in (("qk_dim", qk_dim), ("v_dim", v_dim)):
        if value % HEAD_DIM_STEP:
            reasons.append(f"{name} {value} is not a multiple of {HEAD_DIM_STEP} (the MMA k step)")
    for name, value in (("block_m", bm), ("block_n", bn)):
        if value % MMA_ROWS:
            reasons.append(f"{name} {value} is not a multiple of {MMA_ROWS} (the MMA tile)")
    if threads % 32:
        reasons.append(f"threads {threads} is not a multiple of 32 (whole warps)")
    if arch.wgmma and threads % 128:
        reasons.append(f"threads {threads} is not a multiple of 128: {arch.name} wgmma needs whole warpgroups")
    total_threads = threads + arch.producer_threads
    if total_threads > arch.max_threads:
        extra = f" (+{arch.producer_threads} producer threads)" if arch.producer_threads else ""
        reasons.append(f"threads {threads}{extra} exceeds the {arch.name} limit of {arch.max_threads} per block")
    if warp_specialized_fwd and bm != 64 * (threads // 128):
        reasons.append(f"block_m {bm} with {threads} consumer threads: the {arch.name} forward gives each consumer "
                       f"warpgroup 64 rows, so block_m must be 64 * threads // 128 = {64 * (threads // 128)}")
    warps = threads // 32
    if warps and family in ("fwd", "decode"):
        need = MMA_ROWS * warps
        if bm % need:
            reasons.append(
                f"block_m {bm} cannot be split over {warps} warps ({threads} threads): the FullRow warp partition "
                f"needs block_m % {need} == 0 (16 rows per warp, each softmax row within one warp)"
            )
    if warps and family == "bwd":
        for product, m, n in (
            ("S^T = K Q^T", bn, bm),
            ("dV = P^T dO", bn, v_dim),
            ("dK = dS^T Q", bn, qk_dim),
            ("dQ = dS K", bm, qk_dim),
        ):
            if not _partition_exists(m, n, warps, arch.wgmma):
                rule = "16 rows per warp, in whole warpgroups along M" if arch.wgmma else "16 rows per warp"
                reasons.append(
                    f"the product {product} ({m} × {n}) has no warp partition over {warps} warps ({threads} threads; "
                    f"{rule}, 8 columns per warp)"
                )
                break
    if family == "decode" and config.pack_gqa is False and group > 1:
        reasons.append("decode packs the q heads of a kv group into block_m rows: pack_gqa must be True when group > 1")
    if family != "decode" and config.split != 1:
        reasons.append(f"split {config.split}: only the decode template splits the key range (split must be 1)")
    if family in ("fwd", "bwd") and config.pack_gqa:  # one block per q head: a packed config would be ignored
        reasons.append(f"pack_gqa: the {family} template does not pack GQA heads (one block per q head)")
    if config.pack_gqa and group == 1:
        reasons.append("pack_gqa needs group > 1 (several q heads per kv head)")

    regs = register_estimate(family, config, **dims)
    if regs > arch.max_regs_per_thread:
        reasons.append(
            f"registers {regs} per thread (estimated) exceed the {arch.name} limit of {arch.max_regs_per_thread}"
        )
    if family == "bwd" and arch.wgmma and regs > consumer_regs(threads):
        reasons.append(f"registers {regs} per thread (estimated) exceed the {consumer_regs(threads)} that the "
                       f"{arch.name} backward gives each of its {threads} consumer threads")
    block_regs = _round_up(regs, REG_GRANULARITY) * threads + arch.producer_threads * arch.producer_regs
    if block_regs > arch.regs_per_sm:
        reasons.append(
            f"registers {block_regs} per block (estimated, {threads} threads) exceed the {arch.name} limit of "
            f"{arch.regs_per_sm} per SM"
        )
    return reasons


def fits(family: str, arch: Arch | str, config: KernelConfig, **dims: int) -> bool:
    """Whether ``check`` finds nothing wrong."""
    return not check(family, arch, config, **dims)


def require_fits(
    family: str,
    arch: Arch | str,
    config: KernelConfig,
    *,
    qk_dim: int,
    v_dim: int,
    group: int = 1,
    dtype_bytes: int = 2,
) -> None:
    """Raise `UnsupportedError` naming the config, each resource, the amount and the limit when it does not fit."""
    arch = get_arch(arch)
    reasons = check(family, arch, config, qk_dim=qk_dim, v_dim=v_dim, group=group, dtype_bytes=dtype_bytes)
    if reasons:
        problem = f"qk_dim {qk_dim}, v_dim {v_dim}, group {group}, {_dtype_name(dtype_bytes)} inputs"
        raise UnsupportedError(
            f"config {config.short()} does not fit the {family!r} template on {arch.name} ({problem}): "
            + "; ".join(reasons)
            + ". Pick a config from attnc.schedules.space.space(...), which lists only configs that fit."
        )
