"""``attnc tune``: tune a SPEC.py for some lengths, and move tuned configs between machines.

    attnc tune SPEC.py [--lengths 1k,4k,16k] [--batch 4] [--dtype bf16] [--target auto] [--budget 60]
                       [--max-candidates N] [--workers N] [--backward] [--database FILE] [--export FILE]
                       [--import FILE]

Order of work: ``--import`` merges a file of exported entries into the database first (keeping the faster entry per
key), then each length of ``--lengths`` is tuned (when a SPEC.py is given), then ``--export`` writes every entry of
the database as JSON lines. A SPEC.py defines ``spec`` (an `attnc.Attention`) and may define ``inputs(q_len,
kv_len)`` (see `attnc.cli`). Exit status: 0 when everything asked for was done, 1 when some length found no usable
candidate, 2 on an error.

`add_arguments` and `run` let ``attnc.cli`` host the command; `tune_command(argv)` runs it standalone.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from attnc.errors import AttncError, InputError

_SUFFIXES = {"": 1, "k": 1024, "m": 1024 * 1024}


def parse_length(text: str) -> int:
    """``"4096"``, ``"4k"`` (4096), ``"1m"`` (1048576) → a positive int; `InputError` otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match or int(match.group(1)) * _SUFFIXES[match.group(2).lower()] < 1:
        raise InputError(f"a length is a positive integer, optionally with k (×1024) or m (×1024²); got {text!r}")
    return int(match.group(1)) * _SUFFIXES[match.group(2).lower()]


def parse_lengths(text: str) -> list[tuple[int, int]]:
    """``"1k,4k,2k:8k"`` → ``[(1024, 1024), (4096, 4096), (2048, 8192)]``: comma-separated lengths, each either
    one length (q_len = kv_len) or ``Q:KV``."""
    pairs = []
    for item in text.split(","):
        if not item.strip():
            continue
        parts = item.split(":")
        if len(parts) > 2:
            raise InputError(f"a --lengths item is LEN or Q_LEN:KV_LEN; got {item!r}")
        q_len = parse_length(parts[0])
        pairs.append((q_len, parse_length(parts[1]) if len(parts) == 2 else q_len))
    if not pairs:
        raise InputError(f"--lengths lists no length: {text!r}")
    return pairs


def _lengths_arg(text: str) -> list[tuple[int, int]]:
    try:
        return parse_lengths(text)
    except InputError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0; got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``tune`` arguments to ``parser`` (a subparser of ``attnc`` or a standalone one)."""
    from attnc.schedules.tuner import DEFAULT_BUDGET_S

    parser.add_argument("spec", metavar="SPEC.py", nargs="?", default=None,
                        help="a Python file that defines `spec = attnc.Attention(...)` (optional with --import or "
                             "--export alone)")
    parser.add_argument("--lengths", type=_lengths_arg, default=None,
                        help="comma-separated sequence lengths to tune, each LEN or Q_LEN:KV_LEN, with k/m suffixes "
                             "(default: 4k on cuda, 256 on cpu)")
    parser.add_argument("--batch", type=_positive, default=4, help="batch size timed (default 4)")
    parser.add_argument("--dtype", default=None, help="bf16, fp16 or fp32 (default: bf16 on cuda, fp32 on cpu)")
    parser.add_argument("--target", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (default): cuda when a GPU is present, else cpu")
    parser.add_argument("--budget", type=_seconds, default=DEFAULT_BUDGET_S,
                        help=f"seconds per length, builds included (default {DEFAULT_BUDGET_S:g})")
    parser.add_argument("--max-candidates", type=_positive, default=None,
                        help="configs tried per length at most, the default heuristic's first (default: all)")
    parser.add_argument("--workers", type=int, default=None,
                        help="build processes (default: min(cpu count, 16); 0 builds in this process)")
    parser.add_argument("--database", type=Path, default=None,
                        help="the tuning database file (default: $ATTNC_CACHE_DIR/tuning.sqlite)")
    parser.add_argument("--import", dest="import_file", type=Path, default=None, metavar="FILE",
                        help="merge the entries of FILE (written by --export) into the database first")
    parser.add_argument("--export", dest="export_file", type=Path, default=None, metavar="FILE",
                        help="write every entry of the database to FILE (JSON lines) at the end")
    parser.add_argument("--backward", action="store_true",
                        help="tune the backward kernels (the gradients of q, k, v) instead of the forward")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(handler=run)
    return parser


def _print(*args) -> None:
    print(*args, flush=True)


HEADER = (f"{'q_len':>7} {'kv_len':>7}  {'best':<14} {'ms':>10} {'TFLOP/s':>9} {'default':<14} {'default ms':>10} "
          f"{'gain':>6}  {'timed/failed/wrong':>18} {'s':>6}")


def _row(result) -> str:
    default_ms = "-" if result.default_ms is None else f"{result.default_ms:.4f}"
    gain = "-" if result.gain is None else f"{result.gain:.2f}x"
    failed = result.count("build_failed") + result.count("run_failed")
    counts = f"{result.count('timed')}/{failed}/{result.count('wrong')}"
    return (f"{result.q_len:>7} {result.kv_len:>7}  {result.best.short():<14} {result.ms:>10.4f} {result.tflops:>9.4g} "
            f"{result.default.short():<14} {default_ms:>10} {gain:>6}  {counts:>18} {result.seconds:>6.1f}")


def run(args: argparse.Namespace) -> int:
    """Do what ``args`` (from `add_arguments`) ask; the exit status. Raises `AttncError` on an error."""
    from attnc.schedules.database import TuningDatabase

    if args.spec is None and args.import_file is None and args.export_file is None:
        raise InputError("attnc tune needs a SPEC.py to tune, or --import FILE / --export FILE")
    if args.spec is None and args.lengths is not None:
        raise InputError("--lengths needs a SPEC.py to tune")
    status = 0
    with TuningDatabase(args.database) as db:
        if args.import_file is not None:
            count = db.import_(args.import_file)
            _print(f"imported {count} entries from {args.import_file} into {db.path}")
        if args.spec is not None:
            status = _tune(args, db)
        if args.export_file is not None:
            count = db.export(args.export_file)
            _print(f"exported {count} entries of {db.path} to {args.export_file}")
    return status


def _tune(args: argparse.Namespace, db) -> int:
    import attnc
    from attnc.cli import load_spec
    from attnc.runtime.check import dtype_label, parse_dtype
    from attnc.runtime.compiled import TARGET_DTYPES, resolve_target
    from attnc.schedules.tuner import TuneError, backward_family, tune

    loaded = load_spec(args.spec)
    target = resolve_target(args.target)
    dtype = parse_dtype(args.dtype) if args.dtype is not None else TARGET_DTYPES[target.kind][0]
    lengths = args.lengths or ([(4096, 4096)] if target.kind == "cuda" else [(256, 256)])
    op = attnc.compile(loaded.spec, target=target)
    _print(loaded.spec.ir.describe())
    _print(f"tuning {backward_family(op) if args.backward else op.family} on {target.label}, {dtype_label(dtype)}, batch {args.batch}, budget {args.budget:g} s "
           f"per length; database {db.path}")
    rows, status = [], 0
    for q_len, kv_len in lengths:
        make = (lambda q, kv: loaded.inputs(q, kv)) if loaded.make_inputs is not None else None
        try:
            result = tune(op, dtype=dtype, batch=args.batch, q_len=q_len, kv_len=kv_len, inputs=make,
                          budget_s=args.budget, max_candidates=args.max_candidates, workers=args.workers,
                          database=db, progress=not args.quiet, backward=args.backward)
        except TuneError as error:
            _print(f"q_len {q_len}, kv_len {kv_len}: {error}")
            status = 1
            continue
        rows.append(result)
        if not result.recorded:
            _print(f"q_len {q_len}, kv_len {kv_len}: the database keeps an earlier, faster entry for this bucket")
    if rows:
        _print(HEADER)
        _print("-" * len(HEADER))
        for result in rows:
            _print(_row(result))
    return status


def tune_command(argv: list[str] | None = None) -> int:
    """Run ``attnc tune`` with ``argv`` (default: ``sys.argv[1:]``); the exit status (errors print one line, 2)."""
    parser = add_arguments(argparse.ArgumentParser(prog="attnc tune", description=__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except AttncError as error:
        text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
        print(f"attnc: error: {text}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("attnc: interrupted", file=sys.stderr)
        return 130
