"""What one block of the backward's main kernel spends outside its q-tile loop (launch, K/V load, pipeline fill,
dK/dV store), on the GPU:

    python benchmarks/bwd_block_cost.py [--kv-len 4096] [--q-lens 256,512,1024,2048]

Non-causal, kv_len fixed, so the grid (one block per kv tile, head and batch) and its waves stay the same while q_len
sets the q tiles each block visits. The main kernel's time (torch.profiler) is fitted by a line in the q tiles; its
intercept over the waves is each block's fixed cost, the share a short-loop mask (a document, a narrow window) pays.
The default lengths stop at 2048: a 5 ms kernel (q_len 4096) runs into the GPU's power limit, and that point moved
4.4% between two sessions (4815 and 5026 µs), moving the intercept from 3.3 to 1.7 µs, while the shorter ones moved
under 1% and fit 4.0-4.1 µs in both.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

import attnc  # noqa: E402


def fit_block_cost(q_tiles: list[int], main_us: list[float], waves: int) -> tuple[float, float]:
    """Least-squares line main_us = a + b · q_tiles, as (fixed µs, µs per q tile) per block and wave."""
    x = torch.tensor(q_tiles, dtype=torch.float64)
    y = torch.tensor(main_us, dtype=torch.float64)
    a, b = torch.linalg.lstsq(torch.stack([torch.ones_like(x), x], 1), y[:, None]).solution[:, 0].tolist()
    return a / waves, b / waves


def main_kernel_us(fn, reps: int = 10) -> float:
    """Mean CUDA time per call of the kernels whose name holds 'bwd_main' (the backward's main kernel)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    return sum(e.time_range.elapsed_us() for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA and "bwd_main" in e.name) / reps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kv-len", type=int, default=4096)
    parser.add_argument("--q-lens", default="256,512,1024,2048", help="comma-separated, at least two")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--dim", type=int, default=128)
    args = parser.parse_args(argv)
    q_lens = [int(n) for n in args.q_lens.split(",") if n.strip()]
    if len(q_lens) < 2:
        parser.error(f"--q-lens: a line needs at least two lengths; got {args.q_lens!r}")
    if not torch.cuda.is_available():
        parser.error("the backward's main kernel runs on a GPU, and torch sees none")
    device, dtype = torch.device("cuda"), torch.bfloat16
    op = attnc.compile(attnc.Attention(args.heads, qk_dim=args.dim, layout="bhsd"), target="cuda", dtype=dtype)
    configs = {q_len: op.backward_config_for(dtype, args.batch, q_len, args.kv_len)[0] for q_len in q_lens}
    config = configs[q_lens[0]]
    if any(c != config for c in configs.values()):  # a tuned database may pick another tile per length bucket
        parser.error("--q-lens: the line needs one backward config at every length; got "
                     + ", ".join(f"{n}: {c.short()}" for n, c in configs.items()))
    blocks = args.batch * args.heads * -(-args.kv_len // config.block_n)
    waves = -(-blocks // torch.cuda.get_device_properties(device).multi_processor_count)
    q_tiles, times = [], []
    for q_len in q_lens:
        def make(rows):
            return torch.randn(args.batch, args.heads, rows, args.dim, dtype=dtype, device=device, requires_grad=True)
        q, k, v = make(q_len), make(args.kv_len), make(args.kv_len)
        out = op(q, k, v)
        dout = torch.randn_like(out)
        q_tiles.append(-(-q_len // config.block_m))
        times.append(main_kernel_us(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)))
        print(f"q_len {q_len:6d}  q tiles per block {q_tiles[-1]:4d}  main kernel {times[-1]:9.1f} us", flush=True)
    fixed, per_tile = fit_block_cost(q_tiles, times, waves)
    print(f"{blocks} blocks in {waves} waves; per block and wave: {fixed:.2f} us fixed, {per_tile:.3f} us per q tile")
    for tiles in q_tiles:
        print(f"  {tiles:4d} q tiles: fixed share {fixed / (fixed + per_tile * tiles):.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
