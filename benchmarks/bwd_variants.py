"""A/B of template variants on the backward: each variant is a directory of templates, "main" the package's.

    python benchmarks/bwd_variants.py main my_templates [--cases "non-causal d128 S4k,causal d128 S4k"] [--reps 24]
    ncu -k regex:attnc_bwd_main --metrics gpu__time_duration.sum \\
        python benchmarks/bwd_variants.py main my_templates --once

A variant directory holds every template (copy attnc/codegen/templates, then edit); attnc renders from it through
ATTNC_TEMPLATE_DIR, and its kernels get their own cache keys. Every variant's kernels are built first, in parallel.
Without --once, each case's variants and cuDNN (where SDPA can express the case) are timed in interleaved rounds, as
`attnc bench` times peers, and printed in TFLOP/s beside the first variant. On the H200 the same kernel timed so
differed from itself by up to 1.5% (fourteenth session). With --once, one backward per variant and case runs, in the
order given, for ncu: its kernel times at locked clocks repeated to 0.3%.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from attnc.bench.cases import backward_cases, cases_named  # noqa: E402
from attnc.bench.peers import NotApplicable, backward_call  # noqa: E402
from attnc.bench.run import prebuild, timed_together  # noqa: E402
from attnc.codegen import render  # noqa: E402
from attnc.schedules.timing import attention_flops, tflops, unmasked_elements  # noqa: E402

DTYPE = torch.bfloat16


@contextlib.contextmanager
def templates(variant: str):
    """Render from ``variant``'s directory ("main": the package's) inside the block; spawned build workers inherit
    it through the environment."""
    before = os.environ.pop(render.TEMPLATE_DIR_ENV, None)
    if variant != "main":
        os.environ[render.TEMPLATE_DIR_ENV] = str(Path(variant).resolve())
    try:
        yield
    finally:
        os.environ.pop(render.TEMPLATE_DIR_ENV, None)
        if before is not None:
            os.environ[render.TEMPLATE_DIR_ENV] = before


def check_variant(variant: str) -> str | None:
    """Why ``variant`` cannot be rendered from, or None."""
    if variant == "main":
        return None
    missing = [t.name for t in render.TEMPLATE_DIR.iterdir() if t.name.endswith(".j2")
               and not (Path(variant) / t.name).is_file()]
    return f"{variant!r} is not a directory of every template (missing: {', '.join(sorted(missing))})" \
        if missing else None


def build_variants(variants: list[str], cases) -> list[str]:
    """Build every variant's kernels for the cases in spawned processes (`attnc bench`'s prebuild, which the
    variant's environment reaches); their errors."""
    errors = []
    for variant in variants:
        with templates(variant):
            errors += [f"{variant}: {e}" for e in prebuild(cases, DTYPE, backward=True)]
    return errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("variants", nargs="+", help='template directories; "main" is the package\'s')
    parser.add_argument("--cases", default="non-causal d128 S4k,causal d128 S4k",
                        help="comma-separated starts of backward case names")
    parser.add_argument("--reps", type=int, default=24, help="timed runs per variant, in 4 interleaved rounds")
    parser.add_argument("--once", action="store_true", help="one backward per variant and case, for ncu")
    args = parser.parse_args(argv)
    for variant in args.variants:
        if (reason := check_variant(variant)) is not None:
            parser.error(f"variants: {reason}")
    try:
        cases = cases_named(args.cases, backward_cases())
    except ValueError as error:
        parser.error(f"--cases: {error}")
    if not torch.cuda.is_available():
        parser.error("the backward runs on a GPU, and torch sees none")
    device = torch.device("cuda")
    errors = build_variants(args.variants, cases)
    if errors:
        print("\n".join(errors))
        return 1
    sets = 1 if args.once else 4
    for case in cases:
        calls = {}
        for variant in args.variants:
            with templates(variant):
                calls[variant] = backward_call("attnc", case, sets)
                calls[variant](0)  # renders the variant's backward kernels while its templates are in place
        if args.once:
            torch.cuda.synchronize()
            print(f"ran one backward of {case.name!r} per variant: {', '.join(args.variants)}")
            continue
        try:
            calls["cudnn"] = backward_call("cudnn", case, sets)
        except NotApplicable:
            pass
        spec = case.spec(device)
        elements = unmasked_elements(spec.ir, case.batch, case.seq, case.seq, spec.captured_tensors(),
                                     sample_rows=None)
        flops = attention_flops(spec.ir, elements, backward=True)
        first = None
        for name, result in timed_together(calls, sets, args.reps).items():
            if isinstance(result, Exception):
                print(f"{case.name:32s} {name:24s} failed: {result}")
                continue
            timing = result[0]
            rate = tflops(flops, timing.median_ms)
            first = first or rate
            print(f"{case.name:32s} {name:24s} {rate:6.1f} TFLOP/s ({rate / first - 1:+.1%})  median "
                  f"{timing.median_ms:.3f} ms, min {timing.min_ms:.3f}", flush=True)
        del calls
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
