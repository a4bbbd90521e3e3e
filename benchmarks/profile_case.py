"""Run one peer's forward (or backward) of one benchmark case a few times, for a profiler to catch one launch.

    ncu --section SpeedOfLight -k regex:attnc_fwd --launch-skip 2 --launch-count 1 \\
        python benchmarks/profile_case.py "non-causal d128" attnc
    python benchmarks/profile_case.py --backward "causal d128" attnc     (the main kernel: -k regex:bwd_main)

The case is the first of the quick cases whose name starts with CASE; the peers are those of ``attnc bench``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from attnc.bench.cases import backward_cases, forward_cases  # noqa: E402
from attnc.bench.peers import PEERS  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("case", help="the start of a quick case's name, e.g. 'causal d128'")
    parser.add_argument("peer", choices=sorted(PEERS))
    parser.add_argument("--backward", action="store_true", help="run forward once, then the backward")
    parser.add_argument("--runs", type=int, default=4)
    args = parser.parse_args(argv)
    cases = backward_cases(quick=True) if args.backward else forward_cases(quick=True)
    matching = [c for c in cases if c.name.startswith(args.case)]
    if not matching:
        parser.error(f"case: no quick case's name starts with {args.case!r}; the cases are "
                     + ", ".join(repr(c.name) for c in cases))
    if not torch.cuda.is_available():
        parser.error("the peers run on a GPU, and torch sees none")
    case = matching[0]
    device = torch.device("cuda")

    def make(heads):
        return torch.randn(case.batch, heads, case.seq, case.dim, dtype=torch.bfloat16, device=device,
                           requires_grad=args.backward)
    q, k, v = make(case.q_heads), make(case.kv_heads), make(case.kv_heads)
    _, run = PEERS[args.peer](case, [q], [k], [v])
    if args.backward:
        out = run(0)
        dout = torch.randn_like(out)
        for _ in range(args.runs):
            torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
    else:
        for _ in range(args.runs):
            run(0)
    torch.cuda.synchronize()
    print(f"ran {args.peer} {'backward' if args.backward else 'forward'} of {case.name!r} {args.runs} times")
    return 0


if __name__ == "__main__":
    sys.exit(main())
