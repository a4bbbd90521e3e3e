"""What each target's templates serve; anything else is rejected at compile time with what is supported."""

from __future__ import annotations

from attnc.codegen.build import Target
from attnc.dsl.ir import AttentionIR
from attnc.errors import UnsupportedError

CUDA_HEAD_DIMS = ((64, 64), (128, 128), (256, 256), (192, 128))
CPU_MAX_HEAD_DIM = 512


def check_supported(ir: AttentionIR, target: Target) -> None:
    """Raise `UnsupportedError` unless a template of ``target`` can serve ``ir``."""
    dims = (ir.qk_dim, ir.v_dim)
    if target.kind == "cuda" and dims not in CUDA_HEAD_DIMS:
        listing = ", ".join(f"{a}/{b}" if a != b else str(a) for a, b in CUDA_HEAD_DIMS)
        raise UnsupportedError(f"the cuda forward template serves head dims (qk/v) {listing}; the spec has "
                               f"qk_dim {ir.qk_dim}, v_dim {ir.v_dim}")
    if target.kind == "cpu" and max(dims) > CPU_MAX_HEAD_DIM:
        raise UnsupportedError(f"the cpu template serves head dims up to {CPU_MAX_HEAD_DIM}; got {dims}")
