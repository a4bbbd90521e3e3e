"""attnc: an attention compiler for PyTorch. Write the variant as a spec; get fused kernels back."""

__version__ = "0.1.0"

from attnc import mods
from attnc.codegen.build import Target
from attnc.dsl import KV_LEN, Q_LEN, Attention, Input
from attnc.errors import AttncError, BuildError, InputError, SpecError, UnsupportedError
from attnc.runtime.compiled import CompiledAttention, compile
from attnc.runtime.reference import attention_reference
from attnc.schedules.config import KernelConfig

__all__ = [
    "Attention", "AttncError", "BuildError", "CompiledAttention", "Input", "InputError", "KV_LEN", "KernelConfig",
    "Q_LEN", "SpecError", "Target", "UnsupportedError", "attention_reference", "compile", "mods",
]
