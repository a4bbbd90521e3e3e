"""The spec language: `Attention`, `Input`, mod tracing into sympy, the IR and the tile-map analysis."""

from attnc.dsl.inputs import Input, TensorInput
from attnc.dsl.ir import AttentionIR
from attnc.dsl.lengths import KV_LEN, Q_LEN
from attnc.dsl.spec import Attention

__all__ = ["Attention", "AttentionIR", "Input", "KV_LEN", "Q_LEN", "TensorInput"]
