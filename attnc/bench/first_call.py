"""What a user pays on a warm machine: ``attnc.compile`` + the first call, in a fresh process, with the kernel in
the disk cache and (after ``attnc bench --tune``) the tuning database's entry for the call's bucket.

    python -m attnc.bench.first_call CASE_NAME ...      (one JSON line per case on stdout)

The first line is ``{"one_time_imports_s": {...}}``: the imports a process pays once, whichever op triggers them,
timed on their own before the cases so that each case's figure is attnc's own work: ``tilelang`` (loaded on the
first kernel load) and ``torch._dynamo`` (torch.library's custom-op dispatch imports it on its first use).
"""

from __future__ import annotations

import importlib
import json
import sys
import time

import torch

import attnc
from attnc.bench.cases import forward_cases


def first_call_seconds(case, dtype: torch.dtype = torch.bfloat16) -> float:
    """Seconds from ``attnc.compile`` to the first call's output on the GPU, for ``case``'s spec and sizes."""
    device = torch.device("cuda")
    spec = case.spec(device)
    q = torch.randn(case.batch, case.q_heads, case.seq, case.dim, dtype=dtype, device=device)
    k, v = (torch.randn(case.batch, case.kv_heads, case.seq, case.dim, dtype=dtype, device=device) for _ in "kv")
    torch.cuda.synchronize()
    start = time.perf_counter()
    op = attnc.compile(spec, target="cuda")
    op(q, k, v)
    torch.cuda.synchronize()
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    names = sys.argv[1:] if argv is None else argv
    cases = {case.name: case for case in forward_cases()}
    unknown = [name for name in names if name not in cases]
    if unknown:
        print(f"unknown case(s) {unknown}; known: {sorted(cases)}", file=sys.stderr)
        return 2
    imports = {}
    for module in ("tilelang", "torch._dynamo"):
        start = time.perf_counter()
        importlib.import_module(module)
        imports[module] = time.perf_counter() - start
    print(json.dumps({"one_time_imports_s": imports}), flush=True)
    for name in names:
        print(json.dumps({"case": name, "first_call_s": first_call_seconds(cases[name])}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
