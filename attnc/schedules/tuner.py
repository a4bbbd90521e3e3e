"""The autotuner: build every config of a template's space, check each against the reference, time the rest on the
target, keep the fastest and record it in the tuning database.

`tune(spec, target=..., dtype=..., batch=..., q_len=..., kv_len=...)` tunes one shape bucket:

1. **Candidates.** The default heuristic's config first (so every run measures the baseline), then the space of the
   family on the target's architecture (`space.space`, pruned by the resource model), nearest to the default first,
   at most ``max_candidates`` of them.
2. **Builds** run in ``workers`` spawned processes (`attnc.runtime.kernels.spawn_build_pool`, kept for later
   tunings in the same process), which only render and build into the disk cache; the parent then loads each kernel
   from that cache (~0.1 s). A build that fails is logged and skipped; a worker process that dies is replaced (twice
   at most). Configs this process has loaded before (an earlier bucket of the same spec) need no worker.
3. **Check.** Each loaded kernel runs on one small random input (at most ``harness.CHECK_LEN`` per length, batch
   ≤ 2) and is compared with `attention_reference` by DESIGN.md's rule (fp32: max abs error ≤ 1e-4; bf16/fp16: ≤ 2×
   torch's own same-precision error + 1e-5; lse likewise, with -inf exactly where the reference has it). A wrong
   kernel, or one that raises, is logged and skipped: never chosen. (A kernel that faults the GPU, an illegal
   address say, leaves CUDA unusable in the process: the candidates after it then fail to run as well.)
4. **Timing** at the bucket's real sizes with `timing.measure`: CUDA events, warm-up, median of ``reps`` runs,
   rotating among several input sets. On CUDA, kernels are checked and timed as their builds finish, while the
   workers build the rest; on the CPU target after all builds, so that builds do not disturb the timings.
5. **Record** the fastest in the `TuningDatabase` with its time, TFLOP/s (unmasked elements only) and the number of
   candidates tried. The database keeps the faster of the new and any earlier entry.

``budget_s`` (default 60 s) bounds the whole run, builds included: when it runs out, nothing new starts, except
that a run never ends without a result it can still get: builds go on until one has succeeded, and checks and
timings until one candidate has been timed. A tqdm bar shows the candidates built, timed and the best so far.

The tuner runs the forward families (``fwd``, ``cpu_fwd``), whose kernels are called as
``kernel(q, k, v, *extras, *block_mask, out, lse)``, and with ``backward=True`` the backward families (``bwd``,
``cpu_bwd``): a candidate is every stage of one config, checked on dq, dk, dv and timed as ``Backward.run``
(`attnc.schedules.harness`); other families (decode) are refused until they have a runner here.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import IO

import torch

from attnc.errors import AttncError, InputError, UnsupportedError, one_line
from attnc.runtime.kernels import Kernel, build_in_worker, spawn_build_pool, timed_build
from attnc.schedules import timing
from attnc.schedules.config import KernelConfig
from attnc.schedules.database import TuningDatabase
from attnc.schedules.records import TuningKey
from attnc.schedules.harness import BackwardHarness, Harness, InputsArg

log = logging.getLogger(__name__)

DEFAULT_BUDGET_S = 60.0
"""Seconds one bucket's tuning may take, builds included."""

MAX_WORKERS = 16
"""Build processes at most (the GPU machine has 16 cores); the default is ``min(os.cpu_count(), MAX_WORKERS)``."""

FORWARD_FAMILIES = ("fwd", "cpu_fwd")
BACKWARD_FAMILIES = ("bwd", "cpu_bwd")
_BUILT: set[tuple] = set()  # (ir key, family, dtype, target, config) this process has loaded: no worker needed
_POOL_RESTARTS = 2


class TuneError(AttncError, RuntimeError):
    """No candidate could be built, checked and timed."""


@dataclass(frozen=True)
class Candidate:
    """What happened to one config: ``status`` is ``'timed'``, ``'build_failed'``, ``'wrong'`` (disagreed with
    the reference), ``'run_failed'`` (raised when run) or ``'not_reached'`` (the budget ran out first)."""

    config: KernelConfig
    status: str
    ms: float | None = None
    build_s: float | None = None
    error: str | None = None


@dataclass(frozen=True)
class TuneResult:
    """The outcome of tuning one bucket: the sizes timed, the best config, its median time and TFLOP/s, the
    default heuristic's config and time in the same run, every candidate's fate, the run's duration, and whether
    the database took it."""

    key: TuningKey
    batch: int
    q_len: int
    kv_len: int
    best: KernelConfig
    ms: float
    tflops: float
    default: KernelConfig
    default_ms: float | None
    candidates: tuple[Candidate, ...] = field(repr=False)
    seconds: float = 0.0
    recorded: bool = False

    @property
    def gain(self) -> float | None:
        """Default time / tuned time (≥ 1: the tuned config is at least as fast), or None without a default time."""
        return None if self.default_ms is None else self.default_ms / self.ms

    def count(self, status: str) -> int:
        return sum(c.status == status for c in self.candidates)

    def summary(self) -> str:
        default = "default not timed" if self.default_ms is None else (
            f"default {self.default.short()} {self.default_ms:.4f} ms, gain {self.gain:.2f}x")
        return (f"{self.key.short()}: best {self.best.short()} {self.ms:.4f} ms, {self.tflops:.4g} TFLOP/s; {default}; "
                f"{self.count('timed')} timed, {self.count('build_failed')} failed to build, "
                f"{self.count('wrong')} wrong, {self.count('run_failed')} failed to run, "
                f"{self.count('not_reached')} not reached; {self.seconds:.1f} s")


# --- keys and ordering ----------------------------------------------------------------------------------------------

def device_identity(target) -> tuple[str, str]:
    """(gpu name, compute capability) as they enter tuning keys: the current CUDA device's, or ('cpu', 'cpu')."""
    if target.kind == "cpu":
        return "cpu", "cpu"
    if not torch.cuda.is_available():
        raise UnsupportedError("tuning for the cuda target needs a CUDA GPU, and none is visible")
    major, minor = torch.cuda.get_device_capability()
    return torch.cuda.get_device_name(), f"{major}.{minor}"


def tuning_key(ir, family: str, target, dtype: torch.dtype, *, batch: int, q_len: int, kv_len: int) -> TuningKey:
    """The database key of one call's shape bucket (lengths rounded up to powers of two; batch × q heads)."""
    gpu, capability = device_identity(target)
    return TuningKey.make(ir.key, family, gpu=gpu, capability=capability, dtype=str(dtype).replace("torch.", ""),
                          q_len=q_len, kv_len=kv_len, batch_heads=max(1, batch * ir.q_heads))


def backward_family(op) -> str:
    """The family of ``op``'s backward kernels: ``cpu_bwd`` or ``bwd``."""
    return "cpu_bwd" if op.target.kind == "cpu" else "bwd"


def default_workers() -> int:
    """``min(os.cpu_count(), MAX_WORKERS)``."""
    return max(1, min(os.cpu_count() or 1, MAX_WORKERS))


def order_candidates(configs: Sequence[KernelConfig], default: KernelConfig) -> list[KernelConfig]:
    """``default`` first, then ``configs`` (deduplicated) nearest to it first: distance is the sum of |log2| ratios
    of block_m, block_n and threads, plus |stages difference| / 2, plus 1 for another pack_gqa or split; ties keep
    the given order."""

    def distance(c: KernelConfig) -> float:
        return (abs(math.log2(c.block_m / default.block_m)) + abs(math.log2(c.block_n / default.block_n))
                + abs(math.log2(max(1, c.threads) / max(1, default.threads))) + abs(c.stages - default.stages) / 2
                + (c.pack_gqa != default.pack_gqa) + (c.split != default.split))

    rest = sorted(dict.fromkeys(c for c in configs if c != default), key=distance)
    return [default, *rest]


# --- building -------------------------------------------------------------------------------------------------------

def _builds(jobs: dict[int, KernelConfig], ready: Sequence[int], job_of: Callable[[KernelConfig], Callable],
            workers: int, stop_at: Callable[[], float]) -> Iterator[tuple[int, str | None, float]]:
    """Yield ``(index, error or None, seconds)`` as builds finish, the ``ready`` ones (built before) first, once the
    workers have their jobs; stop when ``stop_at()`` has passed. ``job_of(config)``: a picklable job whose result's
    ``build()`` builds that config's kernels (run in this process with ``workers <= 1``).
    """
    pending = dict(jobs)
    if workers <= 1 or not pending:
        yield from ((index, None, 0.0) for index in ready)
        for index, config in list(pending.items()):
            if time.monotonic() >= stop_at():
                return
            yield (index, *timed_build(job_of(config)))
        return
    from attnc.codegen.cache import cache_dir

    cache = str(cache_dir())
    restarts = 0
    while pending:
        pool = _pool(workers)
        futures = {pool.submit(build_in_worker, job_of(c), cache): i for i, c in pending.items()}
        broken = False
        try:
            yield from ((index, None, 0.0) for index in ready)
            ready = ()
            waiting = set(futures)
            while waiting:
                remaining = stop_at() - time.monotonic()
                if remaining <= 0:
                    return
                done, waiting = wait(waiting, timeout=min(1.0, remaining), return_when=FIRST_COMPLETED)
                for future in done:
                    index = futures[future]
                    try:
                        error, seconds = future.result()
                    except BrokenProcessPool:
                        broken = True
                        continue
                    except Exception as exc:  # noqa: BLE001 - e.g. an argument that does not pickle
                        error, seconds = one_line(exc), 0.0
                    pending.pop(index)
                    yield index, error, seconds
        finally:
            for future in futures:  # what has not started is dropped; a build under way finishes into the cache
                future.cancel()
            if broken:
                _drop_pool(workers)
        if not broken:
            return
        restarts += 1
        if restarts > _POOL_RESTARTS:
            for index in list(pending):
                yield index, ("a build worker process died (a crash in tilelang or nvcc, or a script that tunes "
                              "without an `if __name__ == '__main__':` guard)"), 0.0
            return
        log.warning("a build worker process died; restarting the pool for %d candidates", len(pending))


_POOLS: dict[int, ProcessPoolExecutor] = {}


def _pool(workers: int) -> ProcessPoolExecutor:
    """The build pool of ``workers`` spawned processes, kept for the process's later tunings (a worker's start,
    importing torch and tilelang, takes seconds); ended at exit."""
    if workers not in _POOLS:
        if not _POOLS:
            atexit.register(_shutdown_pools)
        _POOLS[workers] = spawn_build_pool(workers)
    return _POOLS[workers]


def _drop_pool(workers: int) -> None:
    pool = _POOLS.pop(workers, None)
    if pool is not None:
        _shutdown(pool)


def _shutdown_pools() -> None:
    for workers in list(_POOLS):
        _drop_pool(workers)


def _shutdown(pool: ProcessPoolExecutor) -> None:
    """Stop the pool now: cancel what has not started, and end the builds still running (their results are moot)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=5)


# --- the loop -------------------------------------------------------------------------------------------------------

def _resolve_op(spec_or_op, target):
    from attnc.runtime.compiled import CompiledAttention, compile

    if isinstance(spec_or_op, CompiledAttention):
        return spec_or_op
    return compile(spec_or_op, target=target)


def _open_database(database) -> tuple[TuningDatabase, bool]:
    if isinstance(database, TuningDatabase):
        return database, False
    return TuningDatabase(database), True


def tune(
    spec_or_op,
    *,
    target="auto",
    dtype: torch.dtype | str | None = None,
    batch: int = 1,
    q_len: int,
    kv_len: int | None = None,
    inputs: InputsArg = None,
    configs: Sequence[KernelConfig] | None = None,
    budget_s: float = DEFAULT_BUDGET_S,
    max_candidates: int | None = None,
    workers: int | None = None,
    database=None,
    record: bool = True,
    progress: bool | IO[str] = True,
    warmup: int | None = None,
    reps: int | None = None,
    backward: bool = False,
) -> TuneResult:
    """Tune the forward kernel of ``spec_or_op`` (with ``backward=True`` its backward: every stage of one config,
    dq, dk, dv checked and `Backward.run` timed) for one shape bucket and record the fastest config.

    Args:
        spec_or_op: an `attnc.Attention`, or a `CompiledAttention` (whose target is then used).
        target: ``"auto"`` (default), ``"cpu"``, ``"cuda"`` or a `Target`; ignored for a compiled op.
        dtype: the input dtype (default: the target's first: float32 on cpu, bfloat16 on cuda); names as
            ``"bf16"`` work.
        batch, q_len, kv_len: the sizes timed (``kv_len`` defaults to ``q_len``); the key is their bucket.
        inputs: the extra tensors the mods read, by name, or a function ``(q_len, kv_len) -> dict`` making them for
            given lengths (default: the tensors the spec captured).
        configs: the candidates (default: `space.space` for the family and architecture).
        budget_s: wall-clock seconds for the whole run, builds included (default `DEFAULT_BUDGET_S`, 60).
        max_candidates: try at most this many configs, the default's first (default: all).
        workers: build processes (default `default_workers`: ``min(os.cpu_count(), 16)``); 0 or 1 builds in this
            process.
        database: a `TuningDatabase` or a path (default: ``$ATTNC_CACHE_DIR/tuning.sqlite``).
        record: store the best in the database (default True).
        progress: show a tqdm bar on stderr (default True), or write it to this text file; False hides it.
        warmup, reps: timing runs (default 3 and 20 on cuda, 1 and 5 on cpu).
        backward: tune the backward family (``bwd`` / ``cpu_bwd``) instead of the forward; the op's backward then
            dispatches to the entry (`CompiledAttention.backward_config_for`).
    Raises:
        TuneError: no candidate could be built, checked and timed; the message gives each one's failure.
    """
    from tqdm.auto import tqdm

    from attnc.codegen import render
    from attnc.runtime.check import parse_dtype
    from attnc.runtime.compiled import TARGET_DTYPES
    from attnc.runtime.autograd import backward_for
    from attnc.runtime.kernels import KERNEL_DTYPES
    from attnc.schedules.heuristics import backward_config, default_config
    from attnc.schedules.space import space

    started = time.monotonic()
    op = _resolve_op(spec_or_op, target)
    target, ir = op.target, op.ir
    family = backward_family(op) if backward else op.family
    if family not in FORWARD_FAMILIES + BACKWARD_FAMILIES:
        raise UnsupportedError(f"the tuner runs the families {FORWARD_FAMILIES + BACKWARD_FAMILIES}; {family!r} "
                               "has no runner")
    if not (render.TEMPLATE_DIR / render.template_name(family)).is_file():
        raise UnsupportedError(f"no template for kernel family {family!r} yet: nothing to tune on {target.label}")
    dtype = parse_dtype(dtype) if dtype is not None else TARGET_DTYPES[target.kind][0]
    if dtype not in TARGET_DTYPES[target.kind]:
        raise InputError(f"the {target.kind} target computes in "
                         f"{', '.join(str(d).replace('torch.', '') for d in TARGET_DTYPES[target.kind])}; got {dtype}")
    kv_len = q_len if kv_len is None else kv_len
    for name, value in (("batch", batch), ("q_len", q_len), ("kv_len", kv_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"tune's `{name}` must be a positive integer; got {value!r}")
    if not budget_s > 0:
        raise InputError(f"tune's `budget_s` must be > 0 seconds; got {budget_s!r}")
    cuda = target.kind == "cuda"
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    key = tuning_key(ir, family, target, dtype, batch=batch, q_len=q_len, kv_len=kv_len)
    arch = target.arch or "cpu"
    dtype_name = KERNEL_DTYPES[dtype]

    if max_candidates is not None and max_candidates < 1:
        raise InputError(f"tune's `max_candidates` must be at least 1; got {max_candidates!r}")
    workers = default_workers() if workers is None else workers

    warmup = (3 if cuda else 1) if warmup is None else warmup
    reps = (20 if cuda else 5) if reps is None else reps
    harness = (BackwardHarness if backward else Harness)(op, dtype, batch, q_len, kv_len, inputs, device,
                                                          warmup=warmup, reps=reps)
    captured = {n: t.to(device) for n, t in op.spec.captured_tensors().items()}
    elements = timing.unmasked_elements(ir, batch, q_len, kv_len, {**captured, **harness.given(q_len, kv_len)})
    flops = timing.attention_flops(ir, elements, backward=backward)
    keys_per_row = elements / (batch * ir.q_heads * q_len)
    default = backward_config(arch, ir) if backward else default_config(family, arch, ir, dtype_name, keys_per_row)
    if configs is None:
        configs = space(family, arch, ir.qk_dim, ir.v_dim, ir.group, dtype.itemsize)
    ordered = order_candidates(list(configs), default)[:max_candidates]

    def loaded_here(config: KernelConfig):  # the op's own caches: shared with dispatch and later buckets
        return backward_for(op, dtype, (), config=config) if backward else op.kernel(dtype, config)

    def job_of(config: KernelConfig):
        if backward:
            return backward_for(op, dtype, (), config=config).build_job()
        return functools.partial(Kernel.render, family, ir, config, dtype_name, target)

    deadline = started + budget_s
    outcome: dict[int, Candidate] = {}
    timed: dict[int, float] = {}
    loaded: list[tuple[int, float]] = []  # built, waiting to be checked and timed (CPU target)
    stop_at = lambda: deadline if (timed or loaded) else math.inf  # see the budget rule in the module docstring
    bar_file = None if progress is True or progress is False else progress
    bar = tqdm(total=len(ordered), desc=f"tune {ir.name} {dtype_name} b{batch} q{q_len} kv{kv_len}", unit="cfg",
               disable=progress is False, file=bar_file, leave=True, dynamic_ncols=True)
    built = 0

    def show() -> None:
        best = min(timed, key=timed.get) if timed else None
        best_text = f"{timed[best]:.4f} ms {ordered[best].short()}" if best is not None else "-"
        failed = sum(c.status != "timed" for c in outcome.values())
        bar.set_postfix_str(f"built {built}, timed {len(timed)}, skipped {failed}, best {best_text}", refresh=False)
        bar.update(len(outcome) - bar.n)

    def skip(index: int, status: str, error: str, build_s: float | None = None) -> None:
        outcome[index] = Candidate(ordered[index], status, build_s=build_s, error=error)
        log.warning("tune %s: candidate %s skipped (%s): %s", key.short(), ordered[index].short(), status, error)

    def measure(index: int, build_s: float) -> None:
        config = ordered[index]
        try:
            kernel = loaded_here(config).build()
        except Exception as error:  # noqa: BLE001
            return skip(index, "build_failed", one_line(error), build_s)
        _BUILT.add((ir.key, family, dtype_name, target, config))
        try:
            wrong = harness.verify(kernel)
        except Exception as error:  # noqa: BLE001
            return skip(index, "run_failed", one_line(error), build_s)
        if wrong is not None:
            return skip(index, "wrong", wrong, build_s)
        try:
            cap = max(0.5, min(budget_s / 10, deadline - time.monotonic()))
            result = harness.time(kernel, max_seconds=cap)
        except Exception as error:  # noqa: BLE001
            return skip(index, "run_failed", one_line(error), build_s)
        timed[index] = result.median_ms
        outcome[index] = Candidate(config, "timed", ms=result.median_ms, build_s=build_s)
        log.info("tune %s: %s %s", key.short(), config.short(), result)

    try:
        built_before = [i for i, c in enumerate(ordered) if (ir.key, family, dtype_name, target, c) in _BUILT]
        jobs = {i: c for i, c in enumerate(ordered) if i not in built_before}
        builds = _builds(jobs, built_before, job_of, workers, stop_at)
        with contextlib.closing(builds):  # closing ends the worker processes, on an error too
            for index, error, build_s in builds:
                if error is not None:
                    skip(index, "build_failed", error, build_s)
                else:
                    built += 1
                    if cuda:  # the GPU times while the workers build on the CPU
                        measure(index, build_s)
                    else:
                        loaded.append((index, build_s))
                show()
        for index, build_s in loaded:
            if timed and time.monotonic() >= deadline:
                break
            measure(index, build_s)
            show()
    finally:
        for index, config in enumerate(ordered):
            outcome.setdefault(index, Candidate(config, "not_reached", error="the time budget ran out first"))
        show()
        bar.close()

    candidates = tuple(outcome[i] for i in range(len(ordered)))
    if not timed:
        reasons = "; ".join(f"{c.config.short()}: {c.status} ({c.error})" for c in candidates[:6])
        raise TuneError(f"tuning {key.short()} found no usable candidate among {len(ordered)}: {reasons}")
    best = min(timed, key=timed.get)
    best_ms = timed[best]
    result = TuneResult(key=key, batch=batch, q_len=q_len, kv_len=kv_len, best=ordered[best], ms=best_ms,
                        tflops=timing.tflops(flops, best_ms), default=default, default_ms=timed.get(0),
                        candidates=candidates, seconds=time.monotonic() - started)
    if record:
        db, owned = _open_database(database)
        try:
            recorded = db.record(key, result.best, best_ms, tflops=result.tflops, candidates=len(ordered))
        finally:
            if owned:
                db.close()
        result = dataclasses.replace(result, recorded=recorded)
    log.info("tune %s", result.summary())
    return result


def tune_command(argv: list[str] | None = None) -> int:
    """``attnc tune ...`` with ``argv`` (default ``sys.argv[1:]``); the exit status. See `attnc.schedules.tune_cli`."""
    from attnc.schedules.tune_cli import tune_command as command

    return command(argv)


# --- dispatch: what CompiledAttention asks ---------------------------------------------------------------------------

TUNE_OPTIONS = ("budget_s", "max_candidates", "workers", "configs", "progress", "database", "inputs", "force")
"""The keys `attnc.compile(..., tune_options=...)` accepts: `tune`'s arguments of those names, plus ``force``
(tune even where the database has an entry; default False)."""


def check_tune_options(options: Mapping | None) -> dict:
    """``options`` as a dict; `InputError` naming any key `TUNE_OPTIONS` lacks."""
    options = dict(options or {})
    unknown = sorted(set(options) - set(TUNE_OPTIONS))
    if unknown:
        raise InputError(f"unknown tune_options {', '.join(map(repr, unknown))}; known: {', '.join(TUNE_OPTIONS)}")
    return options


def dispatch_slot(ir, dtype: torch.dtype, batch: int, q_len: int, kv_len: int) -> tuple:
    """The in-memory dispatch key of a call: (dtype, q bucket, kv bucket, batch × q heads bucket)."""
    from attnc.schedules.records import bucket

    return dtype, bucket(q_len), bucket(kv_len), bucket(max(1, batch * ir.q_heads), minimum=1)


def lookup(key: TuningKey, database=None):
    """The database's entry for ``key``, or None; never raises (a database that cannot be read is logged)."""
    try:
        if isinstance(database, TuningDatabase):
            return database.get(key)
        from attnc.schedules.database import default_path

        path = default_path() if database is None else database
        if not os.path.exists(path):
            return None
        with TuningDatabase(path) as db:
            return db.get(key)
    except Exception as error:  # noqa: BLE001 - dispatch must not fail because of the tuning database
        log.warning("cannot read the tuning database (%s); using the default heuristic", one_line(error))
        return None


def lookup_or_tune(op, dtype: torch.dtype, *, batch: int, q_len: int, kv_len: int,
                   inputs: InputsArg = None, backward: bool = False) -> tuple[KernelConfig, str]:
    """The config for a call of ``op`` (its backward with ``backward=True``) and its source: ``'database'`` (an
    entry for the call's bucket), ``'tuned'`` (tuned now but not recorded) or ``'heuristic'`` (the default config).
    The backward is looked up, never tuned here: it is resolved inside the backward op, where autograd (which the
    candidates' check needs for its reference) is off; tune it ahead with ``tune(..., backward=True)`` or
    ``attnc tune --backward``.

    With ``op.tune`` set, a bucket without an entry (any bucket with the ``force`` option) is tuned first, at the
    call's sizes; a tuning that fails is logged and the heuristic is used. Without a visible GPU a cuda op (built
    ahead of time) gets the heuristic: the database is keyed by the GPU.
    """
    from attnc.runtime.kernels import KERNEL_DTYPES
    from attnc.schedules.heuristics import backward_config, call_config

    def heuristic() -> KernelConfig:
        arch = op.target.arch or "cpu"
        if backward:
            return backward_config(arch, op.ir)
        tensors = {**op.spec.captured_tensors(), **(inputs if isinstance(inputs, Mapping) else {})}
        return call_config(op.family, arch, op.ir, KERNEL_DTYPES[dtype], q_len, kv_len, tensors)

    if op.target.kind == "cuda" and not torch.cuda.is_available():
        return heuristic(), "heuristic"  # building ahead of time for a GPU elsewhere: nothing to look up
    options = op.tune_options
    database = options.get("database")
    family = backward_family(op) if backward else op.family
    key = tuning_key(op.ir, family, op.target, dtype, batch=batch, q_len=q_len, kv_len=kv_len)
    entry = None if (op.tune and options.get("force") and not backward) else lookup(key, database)
    if entry is None and op.tune and not backward:
        settings = {name: options[name] for name in TUNE_OPTIONS if name in options and name not in ("force", "inputs")}
        inputs = inputs if inputs is not None else options.get("inputs")
        try:
            result = tune(op, dtype=dtype, batch=batch, q_len=q_len, kv_len=kv_len, inputs=inputs, backward=backward,
                          **settings)
        except AttncError as error:
            log.warning("tuning %s failed; using the default heuristic: %s", key.short(), one_line(error))
        else:
            entry = lookup(key, database)
            if entry is None:
                return result.best, "tuned"
    if entry is not None:
        return entry.config, "database"
    return heuristic(), "heuristic"


def tune_ahead(op, shapes: Sequence[Sequence[int]], dtype: torch.dtype) -> None:
    """Resolve (tuning where needed) the config of each ``(batch, q_len, kv_len)`` in ``shapes`` for ``dtype``."""
    for shape in shapes:
        if (not isinstance(shape, (tuple, list)) or len(shape) != 3
                or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
            raise InputError(f"tune_shapes must hold (batch, q_len, kv_len) triples of positive integers; "
                             f"got {shape!r}")
        op.config_for(dtype, *shape)
