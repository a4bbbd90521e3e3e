"""Train a tiny decoder with attnc's attention and with torch SDPA side by side, from the same init and data.

The task: copy (or ``--task reverse``) a sequence of 15 random digits (``BOS x1..x15 SEP x1..x15``, 32 tokens; the
loss is on the second half). Both models are 2 layers, d_model 128, 2 causal heads of head dim 64 (one the CUDA
kernels serve); they differ only in the attention call. Every 25 steps the script prints both loss curves, and, at
the attnc model's current weights, the difference of the loss and the max relative difference of the gradients that
the two attentions give.

The curves agree to float32 rounding (1e-7) for most of the run; where the model learns the task quickly (the
loss falls steeply), training amplifies that rounding and the two trajectories drift apart, as two SDPA runs with
different thread counts would. The same-weights columns show the gradients themselves agree to ~1e-6 throughout.

    python examples/train_tiny.py [--steps 300] [--target auto]

``--target auto`` runs attnc's CUDA kernels (bf16 attention) on a GPU, its CPU kernels (fp32) elsewhere.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

try:
    import attnc
except ModuleNotFoundError:  # run from a source checkout: python examples/train_tiny.py
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import attnc

VOCAB, DIGITS, BOS, SEP = 12, 10, 10, 11
HALF = 15
SEQ = 2 * HALF + 2
D_MODEL, HEADS = 128, 2  # head dim 64


class Block(nn.Module):
    def __init__(self, d_model: int, heads: int, attend):
        super().__init__()
        self.heads, self.attend = heads, attend
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))

    def forward(self, x):
        batch, seq, width = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(batch, seq, 3, self.heads, width // self.heads).unbind(2)
        x = x + self.proj(self.attend(q, k, v).reshape(batch, seq, width))
        return x + self.mlp(self.norm2(x))


class TinyDecoder(nn.Module):
    def __init__(self, attend, d_model: int = D_MODEL, heads: int = HEADS, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, d_model)
        self.pos = nn.Parameter(torch.randn(SEQ, d_model) * 0.02)
        self.blocks = nn.ModuleList(Block(d_model, heads, attend) for _ in range(layers))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, tokens):
        x = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def attnc_attention(target: str):
    """q, k, v (batch, seq, heads, dim) -> attention through attnc's compiled causal op."""
    op = attnc.compile(attnc.Attention(HEADS, qk_dim=D_MODEL // HEADS, mask_mod=attnc.mods.causal()), target=target)
    dtype = torch.float32 if op.target.kind == "cpu" else torch.bfloat16

    def attend(q, k, v):
        return op(*(t.to(dtype).contiguous() for t in (q, k, v))).to(q.dtype)

    return attend, op


def sdpa_attention(q, k, v):
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


def batch_of(generator: torch.Generator, size: int, device, task: str = "reverse") -> torch.Tensor:
    digits = torch.randint(0, DIGITS, (size, HALF), generator=generator)
    bos, sep = torch.full((size, 1), BOS), torch.full((size, 1), SEP)
    answer = digits.flip(1) if task == "reverse" else digits
    return torch.cat([bos, digits, sep, answer], dim=1).to(device)


def loss_of(model, tokens):
    logits = model(tokens[:, :-1])[:, HALF:]  # predictions of the reversed half
    return F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, HALF + 1:].reshape(-1))


def compare_at_same_weights(ours, probe, tokens) -> tuple[float, float]:
    """|loss difference| and max relative gradient difference of two models with the same weights."""
    grads, losses = [], []
    for model in (ours, probe):
        model.zero_grad(set_to_none=True)
        loss = loss_of(model, tokens)
        loss.backward()
        losses.append(loss.item())
        grads.append([p.grad.detach().clone() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
    rel = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(*grads))
    return abs(losses[0] - losses[1]), rel


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--target", default="auto", help="attnc target: auto (default), cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=("copy", "reverse"), default="copy")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the matrices are tiny, more threads only contend)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    attend, op = attnc_attention(args.target)
    device = torch.device("cuda" if op.target.kind == "cuda" else "cpu")
    torch.manual_seed(args.seed)
    ours = TinyDecoder(attend).to(device)
    theirs = copy.deepcopy(ours)  # the same init
    for block in theirs.blocks:
        block.attend = sdpa_attention
    optimizers = [torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.01) for m in (ours, theirs)]
    data = torch.Generator().manual_seed(args.seed + 1)

    probe = copy.deepcopy(theirs)  # SDPA attention, loaded with attnc's current weights at each report
    print(f"attnc target {op.target.label} vs torch SDPA: {args.steps} steps, batch {args.batch}, {SEQ} tokens, "
          f"task {args.task}")
    print(f"{'step':>5} {'attnc loss':>11} {'sdpa loss':>11} {'|diff|':>9}   same weights: {'|dloss|':>9} "
          f"{'grad rel':>9}")
    curves = {"attnc": [], "sdpa": []}
    start, max_diff, max_same = time.perf_counter(), 0.0, 0.0
    for step in range(1, args.steps + 1):
        tokens = batch_of(data, args.batch, device, args.task)  # the same batch for both
        report = step % 25 == 0 or step == 1
        if report:  # both attentions at the same weights: what the trajectories' divergence is not
            probe.load_state_dict(ours.state_dict())
            same_loss, same_grad = compare_at_same_weights(ours, probe, tokens)
            max_same = max(max_same, same_grad)
        losses = []
        for model, optimizer in zip((ours, theirs), optimizers):
            loss = loss_of(model, tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
        curves["attnc"].append(losses[0])
        curves["sdpa"].append(losses[1])
        max_diff = max(max_diff, abs(losses[0] - losses[1]))
        if report:
            print(f"{step:5d} {losses[0]:11.5f} {losses[1]:11.5f} {abs(losses[0] - losses[1]):9.2e}   "
                  f"{'':>13}{same_loss:9.2e} {same_grad:9.2e}")
    elapsed = time.perf_counter() - start
    print(f"max |loss difference| over {args.steps} steps: {max_diff:.3e}; at the same weights, max relative "
          f"gradient difference {max_same:.2e}; final losses {curves['attnc'][-1]:.4f} / {curves['sdpa'][-1]:.4f} "
          f"(chance {math.log(DIGITS):.3f}); {elapsed:.1f}s")
    return {"curves": curves, "max_diff": max_diff, "max_same_weights_grad_diff": max_same}


if __name__ == "__main__":
    main()
