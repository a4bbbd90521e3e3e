"""The attention IR: a spec after tracing, as plain hashable values.

Everything a code generator needs and nothing it does not: head counts, head dims, the scale, the layout, the
score expression, the mask predicate, whether sinks join the softmax, and the extra tensor inputs. Its `key` is a
hash of the canonical form (sympy ``srepr``), so two specs that trace to the same formulas share kernels.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import sympy

from attnc.dsl import symbols
from attnc.dsl.inputs import TensorInput

LAYOUTS = ("bshd", "bhsd")


@dataclass(frozen=True)
class AttentionIR:
    """A traced attention variant. ``score`` is the modified score, ``mask`` the keep-predicate."""

    name: str
    q_heads: int
    kv_heads: int
    qk_dim: int
    v_dim: int
    scale: float
    layout: str
    score: sympy.Expr = symbols.score
    mask: sympy.Basic = sympy.true
    sinks: bool = False
    inputs: tuple[TensorInput, ...] = ()

    @property
    def group(self) -> int:
        """How many q heads share one kv head (1 for MHA, q_heads for MQA)."""
        return self.q_heads // self.kv_heads

    @property
    def has_mask(self) -> bool:
        return self.mask != sympy.true

    @property
    def has_score_mod(self) -> bool:
        return self.score != symbols.score

    def canonical(self) -> dict:
        """The IR as JSON-ready values; the hash of this is the IR's identity."""
        return {
            "q_heads": self.q_heads,
            "kv_heads": self.kv_heads,
            "qk_dim": self.qk_dim,
            "v_dim": self.v_dim,
            "scale": repr(float(self.scale)),
            "layout": self.layout,
            "score": sympy.srepr(self.score),
            "mask": sympy.srepr(self.mask),
            "sinks": self.sinks,
            "inputs": [[t.name, t.dtype, len(t.shape)] for t in self.inputs],
        }

    @property
    def key(self) -> str:
        blob = json.dumps(self.canonical(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()

    def describe(self) -> str:
        """A few readable lines: what the variant computes."""
        heads = f"{self.q_heads} q heads / {self.kv_heads} kv heads"
        lines = [
            f"{self.name}: {heads}, qk_dim {self.qk_dim}, v_dim {self.v_dim}, scale {self.scale:.6g}, layout {self.layout}",
            f"  score = {self.score}",
            f"  mask  = {self.mask}",
        ]
        if self.sinks:
            lines.append("  sinks: one logit per q head joins the softmax denominator")
        for t in self.inputs:
            origin = "captured" if t.captured else "declared"
            lines.append(f"  input {t.name}: {t.dtype}, rank {len(t.shape)} ({origin})")
        return "\n".join(lines)
