"""The ``attnc`` command: ``show``, ``run``, ``demo`` over SPEC.py files; ``tune`` (`attnc.schedules.tune_cli`) and
``bench`` (`attnc.bench.run`) are hosted here.

A SPEC.py is a Python file that defines ``spec``, an `attnc.Attention`. It may also define
``inputs(q_len, kv_len) -> dict[str, torch.Tensor]``: extra tensors the mods read, made for those lengths (a
document mask's ``doc_ids``, say); ``run``, ``demo`` and the tests pass them to the op by name. Without it the op
uses the tensors the mods captured.

Errors attnc raises on purpose (`AttncError`) print as one line, ``attnc: error: ...``, and exit with status 2;
a check that fails exits with status 1.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import os
import random
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from attnc.errors import AttncError

# (q_len, kv_len) pairs `attnc demo` checks every example at.
DEMO_LENGTHS = ((1, 1), (17, 17), (128, 128), (48, 128), (128, 48))
_LOADED = itertools.count()


class CLIError(AttncError):
    """A command-line argument or SPEC.py file attnc cannot use."""


@dataclass(frozen=True)
class SpecFile:
    """A loaded SPEC.py: its path, its ``spec``, and its ``inputs(q_len, kv_len)`` function if it has one."""

    path: Path
    spec: object
    make_inputs: Callable | None = None

    @property
    def label(self) -> str:
        return self.path.stem

    def inputs(self, q_len: int, kv_len: int, seed: int | None = None) -> dict:
        """The extra tensors for these lengths (``{}`` without an ``inputs`` function); seeded when ``seed`` is set."""
        if self.make_inputs is None:
            return {}
        import torch

        with torch.random.fork_rng(devices=[]):
            if seed is not None:
                torch.manual_seed(seed)
            made = self.make_inputs(q_len, kv_len)
        if not isinstance(made, dict) or not all(isinstance(t, torch.Tensor) for t in made.values()):
            raise CLIError(f"{self.path}: inputs({q_len}, {kv_len}) must return a dict of name -> torch.Tensor; "
                           f"got {type(made).__name__}")
        return made


def load_spec(path: str | Path) -> SpecFile:
    """Execute a SPEC.py and take its ``spec`` (and ``inputs``); errors name the file and what is wrong."""
    from attnc.dsl.spec import Attention

    path = Path(path)
    if not path.is_file():
        raise CLIError(f"spec file {str(path)!r} does not exist" if not path.exists() else
                       f"{str(path)!r} is not a file; pass a SPEC.py that defines `spec = attnc.Attention(...)`")
    name = f"attnc_spec_{next(_LOADED)}_{''.join(c if c.isalnum() else '_' for c in path.stem)}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise CLIError(f"cannot load {str(path)!r} as Python; pass a .py file that defines `spec`")
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except AttncError as error:
        raise type(error)(f"{path}: {error}") from error
    except Exception as error:  # the user's file is at fault: say where, without a traceback
        frames = [f for f in traceback.extract_tb(error.__traceback__) if Path(f.filename) == path]
        where = f"{path}:{frames[-1].lineno}" if frames else str(path)
        if isinstance(error, SyntaxError) and error.lineno:
            where = f"{path}:{error.lineno}"
        raise CLIError(f"{where}: loading the spec file raised {type(error).__name__}: {error}") from error
    spec = getattr(module, "spec", None)
    if spec is None:
        raise CLIError(f"{path} defines no `spec`; a SPEC.py must define `spec = attnc.Attention(...)`")
    if not isinstance(spec, Attention):
        raise CLIError(f"{path}: `spec` must be an attnc.Attention; got {type(spec).__name__}")
    make_inputs = getattr(module, "inputs", None)
    if make_inputs is not None and not callable(make_inputs):
        raise CLIError(f"{path}: `inputs` must be a function inputs(q_len, kv_len) -> dict of tensors")
    return SpecFile(path, spec, make_inputs)


def examples_dir() -> Path:
    """The bundled examples/specs: beside the attnc package (source tree, editable install), else ./examples/specs."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        candidate = root / "examples" / "specs"
        if candidate.is_dir():
            return candidate
    raise CLIError("cannot find the bundled examples/specs (run from attnc's source tree, or pass --specs DIR)")


def example_specs(directory: Path | None = None) -> list[Path]:
    """The SPEC.py files of ``directory`` (default: the bundled examples), sorted by name."""
    directory = examples_dir() if directory is None else Path(directory)
    if not directory.is_dir():
        raise CLIError(f"spec directory {str(directory)!r} does not exist")
    files = sorted(p for p in directory.glob("*.py") if not p.name.startswith("_"))
    if not files:
        raise CLIError(f"spec directory {str(directory)!r} holds no *.py spec files")
    return files


# --- output ----------------------------------------------------------------------------------------------------

COLUMNS = (("spec", "<", 22), ("target", "<", 6), ("dtype", "<", 8), ("BxSqxSkv", ">", 11), ("max err", ">", 9),
           ("tol", ">", 8), ("lse err", ">", 9), ("result", "<", 6), ("build s", ">", 7), ("run ms", ">", 9))


def _row(values) -> str:
    return "  ".join(f"{str(v):{align}{width}}" for v, (_, align, width) in zip(values, COLUMNS)).rstrip()


def table_header() -> str:
    header = _row(name for name, _, _ in COLUMNS)
    return header + "\n" + "-" * len(header)


def table_row(label: str, result) -> str:
    verdict = "pass" if result.passed else "FAIL"
    lse = f"{result.lse_error:.2e}" if result.lse_inf_match else "-inf!"
    return _row((label, result.target, result.dtype, result.shape, f"{result.max_error:.2e}",
                 f"{result.tolerance:.0e}" if result.dtype == "float32" else f"{result.tolerance:.1e}", lse, verdict,
                 f"{result.build_s:.2f}", f"{1e3 * result.run_s:.3f}"))


def error_row(label: str, target: str, dtype: str, shape: str, error: Exception) -> str:
    return _row((label, target, dtype, shape, "", "", "", "ERROR")) + f"  {_one_line(error)}"


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _print(*args) -> None:
    print(*args, flush=True)


# --- commands --------------------------------------------------------------------------------------------------

def _target(name: str, arch: str | None):
    from attnc.codegen.build import Target
    from attnc.runtime.compiled import resolve_target

    if arch is not None:
        if name == "cpu":
            raise CLIError(f"--arch {arch} applies to the cuda target; drop it or pass --target cuda")
        return Target("cuda", arch)
    return resolve_target(name)


def _dtype(name: str | None, target):
    from attnc.runtime.check import parse_dtype
    from attnc.runtime.compiled import TARGET_DTYPES

    allowed = TARGET_DTYPES[target.kind]
    if name is None:
        return allowed[0]
    dtype = parse_dtype(name)
    if dtype not in allowed:
        from attnc.runtime.check import dtype_label

        raise CLIError(f"the {target.kind} target computes in {', '.join(map(dtype_label, allowed))}; "
                       f"got --dtype {name}")
    return dtype


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer; got {value}")
    return number


def cmd_show(args) -> int:
    import attnc
    from attnc.runtime.check import dtype_label

    loaded = load_spec(args.spec)
    target = _target(args.target, args.arch)
    dtype = _dtype(args.dtype, target)
    if args.ptxas and target.kind != "cuda":
        raise CLIError(f"--ptxas reports on cuda kernels; the target here is {target.label}: pass --target cuda")
    op = attnc.compile(loaded.spec, target=target)
    q_len = args.q_len
    kv_len = args.kv_len or q_len
    if args.backward:
        return _show_backward(op, loaded, args.batch, q_len, kv_len, dtype, args.ptxas)
    # what a call of these sizes runs (the heuristic's config without a GPU to key the tuning database by)
    config, source = op.config_for(dtype, args.batch, q_len, kv_len, loaded.inputs(q_len, kv_len) or None)
    kernel = op.kernel(dtype, config)
    _print(f"== spec ({loaded.path}) ==")
    _print(loaded.spec.ir.describe())
    _print(f"\n== kernel ==\n{kernel.key}\n  family {kernel.family}, target {target.label}, dtype {dtype_label(dtype)}, "
           f"config {kernel.config.short()} ({source}, for batch {args.batch}, q_len {q_len}, kv_len {kv_len})\n"
           f"  {kernel.config}\n  source file {kernel.source_path}")
    if target.arch == "sm_90a":
        from attnc.schedules.resources import consumer_regs, forward_blocks_per_sm

        blocks = forward_blocks_per_sm(kernel.config, qk_dim=loaded.spec.ir.qk_dim, v_dim=loaded.spec.ir.v_dim)
        _print(f"  launch: {blocks} block{'s' if blocks > 1 else ''} per SM, a producer warpgroup and "
               f"{kernel.config.threads // 128} consumer warpgroup{'s' if kernel.config.threads > 128 else ''} at "
               f"{consumer_regs(kernel.config.threads, blocks)} registers a thread")
    if args.ptxas:
        _print(f"  ptxas: {kernel.resource_report()}")
    _print(f"\n== tile map ==\n{kernel.tilemap}")
    _print(f"  q_len {q_len}, kv_len {kv_len} (█ full, ░ partial, · skipped):")
    for row in kernel.tilemap.grid(q_len, kv_len):
        _print("    " + row)
    if op.block_mask_layout is not None:
        _print(_block_mask_section(op, loaded, args.batch, q_len, kv_len, dtype))
    _print(f"\n== TileLang source ==\n{kernel.source.rstrip()}")
    if target.kind == "cuda":
        _print(f"\n== CUDA source ({target.arch}) ==\n{kernel.device_source().rstrip()}")
    return 0


def _show_backward(op, loaded: SpecFile, batch: int, q_len: int, kv_len: int, dtype, ptxas: bool = False) -> int:
    """`show --backward`: the backward that a training step of these sizes runs (gradients of every float input the
    score_mod reads), its kv-side tile map (per kv tile, the q tiles visited) and its main kernel's source."""
    import torch

    from attnc.dsl.derivative import backward_tiles, read_gradients
    from attnc.runtime.autograd import backward_for
    from attnc.runtime.check import dtype_label

    ir = op.ir
    if op.target.kind == "cuda" and not torch.cuda.is_available():  # no GPU to key the tuning database by
        config, source = None, "heuristic"
    else:
        config, source = op.backward_config_for(dtype, batch, q_len, kv_len)
    differentiable = {g.name for g in read_gradients(ir)}
    grads = tuple(t.name for t in ir.inputs if t.name in differentiable)
    backward = backward_for(op, dtype, grads, config=config)
    main = backward.stage("main")
    wrt = ", ".join(["q", "k", "v", *(["sinks"] if ir.sinks else []), *grads])
    _print(f"== spec ({loaded.path}) ==")
    _print(ir.describe())
    dq_mode = f", dQ mode {backward.dq_mode}" if op.target.kind == "cuda" else ""
    _print(f"\n== backward ==\n{main.key}\n  family {backward.family}, target {op.target.label}, dtype "
           f"{dtype_label(dtype)}, config {backward.config.short()} ({source}, for batch {batch}, q_len {q_len}, "
           f"kv_len {kv_len}){dq_mode}\n  kernels: {', '.join(backward.kernel_names())}\n"
           f"  gradients of: {wrt}\n  source file {main.source_path}")
    if ptxas:
        _print(f"  ptxas (main): {main.resource_report()}")
    tiles = backward_tiles(ir.mask, backward.config.block_m, backward.config.block_n)
    _print(f"\n== backward tile map ==\n  q tiles of {tiles.block_m} rows, kv tiles of {tiles.block_n}; one row per "
           f"kv tile, one column per q tile; q_len {q_len}, kv_len {kv_len} (█ full, ░ partial, · skipped):")
    for row in tiles.grid(q_len, kv_len):
        _print("    " + row)
    if backward.block_mask is not None:
        _print("  the mask reads a tensor: the main kernel visits the q tiles a block mask computed at run time lists")
    _print(f"\n== TileLang source (backward main) ==\n{main.source.rstrip()}")
    if op.target.kind == "cuda":
        _print(f"\n== CUDA source ({op.target.arch}, backward main) ==\n{main.device_source().rstrip()}")
    return 0


def _block_mask_section(op, loaded: SpecFile, batch: int, q_len: int, kv_len: int, dtype) -> str:
    """What `show` says of a mask that reads a tensor: the kernel visits a run-time block mask's tiles; the block
    mask of the spec file's inputs at these sizes, where the target can run."""
    import torch

    layout = op.block_mask_layout
    text = (f"  the mask reads a tensor: the kernel visits the kv tiles of a block mask computed at run time "
            f"(its planes vary with b: {'yes' if layout.per_batch else 'no'}, with h: "
            f"{'yes' if layout.per_head else 'no'})")
    if op.target.kind == "cuda" and not torch.cuda.is_available():
        return text + "; no GPU here to compute it"
    device = "cuda" if op.target.kind == "cuda" else "cpu"
    inputs = {name: t.to(device) for name, t in loaded.inputs(q_len, kv_len).items()}
    block_mask = op.block_mask(q_len, kv_len, batch=batch, dtype=dtype, **inputs)
    return f"{text}\n\n== block mask (the spec file's inputs) ==\n{block_mask}"


def _run_one(loaded: SpecFile, op, batch: int, q_len: int, kv_len: int, dtype, seed: int | None):
    from attnc.runtime.check import check_op

    if seed is None:  # one seed for the spec file's inputs and the op's, so `--seed` replays both
        seed = random.SystemRandom().randrange(2**31)
    return check_op(op, batch=batch, q_len=q_len, kv_len=kv_len, dtype=dtype,
                    inputs=loaded.inputs(q_len, kv_len, seed), seed=seed, name=loaded.label)


def cmd_run(args) -> int:
    import attnc

    loaded = load_spec(args.spec)
    target = _target(args.target, None)
    dtype = _dtype(args.dtype, target)
    op = attnc.compile(loaded.spec, target=target)
    kv_len = args.kv_len or args.q_len
    result = _run_one(loaded, op, args.batch, args.q_len, kv_len, dtype, args.seed)
    _print(loaded.spec.ir.describe())
    _print(table_header())
    _print(table_row(loaded.label, result))
    _print(f"kernel config {result.config} ({result.config_source})")
    if not result.passed:
        _print(f"FAILED: replay with --seed {result.seed}")
        return 1
    return 0


def cmd_demo(args) -> int:
    import attnc
    from attnc.runtime.check import dtype_label

    target = _target(args.target, None)
    dtype = _dtype(args.dtype, target)
    files = example_specs(args.specs)
    _print(f"attnc demo: {len(files)} example specs on {target.label} ({dtype_label(dtype)}), batch {args.batch}, "
           f"(q_len, kv_len) in {', '.join(f'({q}, {k})' for q, k in DEMO_LENGTHS)}")
    _print(table_header())
    start = time.perf_counter()
    passed = failed = 0
    for path in files:
        try:
            loaded = load_spec(path)
            op = attnc.compile(loaded.spec, target=target)
        except AttncError as error:
            _print(error_row(path.stem, target.label, dtype_label(dtype), "", error))
            failed += 1
            continue
        for q_len, kv_len in DEMO_LENGTHS:
            shape = f"{args.batch}x{q_len}x{kv_len}"
            try:
                result = _run_one(loaded, op, args.batch, q_len, kv_len, dtype, None)
            except AttncError as error:
                _print(error_row(loaded.label, target.label, dtype_label(dtype), shape, error))
                failed += 1
                continue
            _print(table_row(loaded.label, result) + ("" if result.passed else f"  (seed {result.seed})"))
            passed += result.passed
            failed += not result.passed
    _print(f"\nattnc demo: {passed} checks passed, {failed} failed, {len(files)} specs, "
           f"{time.perf_counter() - start:.1f} s")
    return 0 if failed == 0 else 1


# --- entry point -----------------------------------------------------------------------------------------------

def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="attnc", description="attnc: an attention compiler for PyTorch.")
    commands = top.add_subparsers(dest="command", metavar="COMMAND", required=True)

    show = commands.add_parser("show", help="print a spec, its tile map and its generated kernel source",
                               description="Print the spec, its tile map and the generated TileLang source; with "
                                           "--target cuda also the CUDA source lowered for --arch (no GPU needed).")
    show.add_argument("spec", metavar="SPEC.py", help="a Python file that defines `spec = attnc.Attention(...)`")
    show.add_argument("--target", choices=("auto", "cpu", "cuda"), default="auto",
                      help="auto (default): cuda when a GPU is present, else cpu")
    show.add_argument("--arch", choices=("sm_90a", "sm_80"), default=None,
                      help="cuda architecture (default: the GPU's, else sm_90a); implies --target cuda")
    show.add_argument("--dtype", default=None, help="kernel dtype (default: float32 on cpu, bfloat16 on cuda)")
    show.add_argument("--batch", type=_positive, default=2, help="batch of the call shown (default 2)")
    show.add_argument("--q-len", type=_positive, default=128,
                      help="q_len of the call shown and of the tile grid printed (default 128)")
    show.add_argument("--kv-len", type=_positive, default=None, help="kv_len (default: q_len)")
    show.add_argument("--backward", action="store_true",
                      help="show the backward instead: its config, its kv-side tile map (per kv tile, the q tiles "
                           "visited) and its main kernel's source")
    show.add_argument("--ptxas", action="store_true",
                      help="cuda: also print ptxas's resource report of the kernel shown (registers a thread, bytes "
                           "spilled), from compiling its CUDA source once more with -Xptxas -v")
    show.set_defaults(handler=cmd_show)

    run = commands.add_parser("run", help="build a spec, run it on random inputs, compare with the reference",
                              description="Build SPEC.py for the target, run it on random inputs and compare with "
                                          "the float64 reference by the numerics rule; exit 1 on a mismatch.")
    run.add_argument("spec", metavar="SPEC.py", help="a Python file that defines `spec = attnc.Attention(...)`")
    run.add_argument("--target", choices=("auto", "cpu", "cuda"), default="auto",
                     help="auto (default): cuda when a GPU is present, else cpu")
    run.add_argument("--dtype", default=None, help="dtype of q, k, v (default: float32 on cpu, bfloat16 on cuda)")
    run.add_argument("--batch", type=_positive, default=2, help="batch size (default 2)")
    run.add_argument("--q-len", type=_positive, default=128, help="query length (default 128)")
    run.add_argument("--kv-len", type=_positive, default=None, help="key/value length (default: q_len)")
    run.add_argument("--seed", type=int, default=None, help="seed of the random inputs (default: fresh)")
    run.set_defaults(handler=cmd_run)

    demo = commands.add_parser("demo", help="check every bundled example spec against the reference",
                               description="Build every example spec for the target and check each against the "
                                           "reference at several lengths; exit 1 if any check fails.")
    demo.add_argument("--target", choices=("auto", "cpu", "cuda"), default="auto",
                      help="auto (default): cuda when a GPU is present, else cpu")
    demo.add_argument("--dtype", default=None, help="dtype (default: float32 on cpu, bfloat16 on cuda)")
    demo.add_argument("--batch", type=_positive, default=2, help="batch size (default 2)")
    demo.add_argument("--specs", type=Path, default=None, help="a directory of SPEC.py files (default: the "
                                                                 "bundled examples/specs)")
    demo.set_defaults(handler=cmd_demo)

    from attnc.schedules import tune_cli

    tune = commands.add_parser("tune", help="tune a spec's schedule for some lengths; move tuned configs around",
                               description=tune_cli.__doc__.split("\n\n")[0].replace("``", ""))
    tune_cli.add_arguments(tune)  # its handler: tune_cli.run

    # `attnc bench ...` hands its arguments to attnc.bench.run.main (see `main`); listed here for --help.
    commands.add_parser("bench", add_help=False, help="attnc against its peers on one GPU (attnc bench --help)")
    return top


def main(argv: list[str] | None = None) -> int:
    """Run the ``attnc`` command line; the exit status (0 ok, 1 a check failed, 2 an error)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # a command with its own parser
        from attnc.bench.run import main as bench_main

        return bench_main(argv[1:])
    args = parser().parse_args(argv)
    try:
        return args.handler(args)
    except AttncError as error:
        print(f"attnc: error: {_one_line(error)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("attnc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `attnc show ... | head`: stop quietly, as other command-line tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
