"""Forward timing of the score-expression rewrite (issue 3): softcap 30 and ALiBi, causal and not, and dense causal.

B4 H32 S4k d128 bf16 (bhsd) on one GPU. attnc's kernels (heuristic configs, built in parallel first, in the
background while FlexAttention compiles) against FlexAttention compiled (dynamo reset per case) in the same run,
and against the figures docs/performance.md recorded before the rewrite. TFLOP/s over unmasked elements
(DESIGN.md). Each attnc output and lse is also checked against the float32 reference on batch 0.

Run from the repository root, with it on PYTHONPATH (.gpu/env.sh does that):  python3 .explore/fwd_expr_timing.py
"""

import argparse
import os
import threading
import time

import torch

import attnc
from attnc import mods
from attnc.bench.cases import Case
from attnc.bench.peers import PEERS
from attnc.codegen.build import Target
from attnc.runtime.kernels import build_in_parallel
from attnc.runtime.reference import attention_reference
from attnc.schedules.heuristics import default_config
from attnc.schedules.timing import attention_flops, buffer_count, measure, tflops, unmasked_elements

B, H, S, D = 4, 32, 4096, 128
BEFORE = {  # docs/performance.md, forward on the H200, before the rewrite (attnc TFLOP/s)
    "softcap 30, causal": 428, "softcap 30, non-causal": 480, "ALiBi, causal": 492, "causal": 589,
}
FLEX_BUDGET_S = 120.0  # FlexAttention cases that would start later than this are skipped (3 minutes in all)


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def _softcap(score, b, h, q_idx, kv_idx):
    return 30.0 * torch.tanh(score / 30.0)


def cases() -> list[Case]:
    def alibi(causal):
        def spec(device):
            return attnc.Attention(H, layout="bhsd", score_mod=mods.alibi(mods.alibi_slopes(H).to(device)),
                                   mask_mod=mods.causal() if causal else None)

        def flex_score(device):
            slopes = mods.alibi_slopes(H).to(device)

            def alibi_bias(score, b, h, q_idx, kv_idx):
                return score + slopes[h] * (kv_idx - q_idx)
            return alibi_bias
        return spec, flex_score

    made = []
    for causal in (True, False):
        label = "causal" if causal else "non-causal"
        mask = (lambda device: _causal) if causal else (lambda device: None)
        made.append(Case(f"softcap 30, {label}", B, H, H, S, D, flex_score=lambda device: _softcap, flex_mask=mask,
                         spec=lambda device, c=causal: attnc.Attention(
                             H, layout="bhsd", score_mod=mods.softcap(30), mask_mod=mods.causal() if c else None)))
        spec, flex_score = alibi(causal)
        made.append(Case(f"ALiBi, {label}", B, H, H, S, D, spec=spec, flex_score=flex_score, flex_mask=mask))
    made.append(Case("causal", B, H, H, S, D, spec=lambda device: attnc.Attention(H, layout="bhsd",
                                                                                 mask_mod=mods.causal()),
                     flex_mask=lambda device: _causal))
    return made


def inputs(device):
    count = buffer_count(3 * B * H * S * D * 2, device)
    make = lambda: torch.randn(B, H, S, D, device=device, dtype=torch.bfloat16)  # noqa: E731
    return [make() for _ in range(count)], [make() for _ in range(count)], [make() for _ in range(count)]


def reference_errors(op, spec, q, k, v) -> tuple[float, float]:
    """Max |Δ out| and max |Δ lse| of attnc against the float32 reference, on batch 0."""
    out, lse = op(q[:1], k[:1], v[:1], return_lse=True)
    want_out, want_lse = attention_reference(spec.ir, q[:1], k[:1], v[:1], spec.captured_tensors(),
                                             dtype=torch.float32)
    return (out.float() - want_out).abs().max().item(), (lse - want_lse).abs().max().item()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-flex", action="store_true", help="time attnc only")
    args = parser.parse_args()
    start = time.perf_counter()
    device = torch.device("cuda")
    target = Target("cuda", "sm_90a")
    all_cases = cases()
    specs = {case.name: case.spec(device) for case in all_cases}
    configs = {name: default_config("fwd", "sm_90a", spec.ir, "bfloat16") for name, spec in specs.items()}
    jobs = [("fwd", spec.ir, configs[name], "bfloat16", target) for name, spec in specs.items()]
    build_errors: list = []
    workers = min(len(jobs), os.cpu_count() or 1)
    builder = threading.Thread(target=lambda: build_errors.extend(build_in_parallel(jobs, workers)))
    builder.start()

    qs, ks, vs = inputs(device)
    buffers = [(i,) for i in range(len(qs))]
    flops = {case.name: attention_flops(specs[case.name].ir, unmasked_elements(specs[case.name].ir, B, S, S))
             for case in all_cases}
    flex = {}
    for case in [] if args.no_flex else all_cases:
        if time.perf_counter() - start > FLEX_BUDGET_S:
            print(f"[flex] {case.name}: skipped, past {FLEX_BUDGET_S:.0f} s")
            continue
        _, run = PEERS["flex"](case, qs, ks, vs)
        flex[case.name] = tflops(flops[case.name], measure(run, buffers).median_ms)
        print(f"[flex] {case.name}: {flex[case.name]:.0f} TFLOP/s ({time.perf_counter() - start:.0f} s)")

    builder.join()
    failed = [f"{job[1].name}: {error}" for job, error in zip(jobs, build_errors) if error]
    if failed:
        raise SystemExit("attnc builds failed:\n" + "\n".join(failed))
    print(f"attnc kernels built ({time.perf_counter() - start:.0f} s)")

    rows = []
    for case in all_cases:
        spec = specs[case.name]
        op = attnc.compile(spec, target="cuda", config=configs[case.name])
        ms = measure(lambda i: op(qs[i], ks[i], vs[i]), buffers).median_ms
        out_error, lse_error = reference_errors(op, spec, qs[0], ks[0], vs[0])
        rows.append((case.name, tflops(flops[case.name], ms), out_error, lse_error))

    header = ("case", "attnc", "before", "new/before", "flex", "attnc/flex", "max|Δout|", "max|Δlse|")
    print("\nB4 H32 S4k d128 bf16, TFLOP/s over unmasked elements (medians of 20)")
    print(" | ".join(header))
    for name, value, out_error, lse_error in rows:
        before, peer = BEFORE.get(name), flex.get(name)
        print(" | ".join([name, f"{value:.0f}", f"{before}" if before else "—",
                          f"{value / before:.3f}×" if before else "—", f"{peer:.0f}" if peer else "—",
                          f"{value / peer:.2f}×" if peer else "—", f"{out_error:.1e}", f"{lse_error:.1e}"]))
    print(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
