"""Extra kernel inputs: tensors a mod reads (`TensorInput`), declared ahead of time with `Input`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnc.errors import SpecError

_DTYPES = {
    torch.float32: "float32",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.float64: "float64",
    torch.int32: "int32",
    torch.int64: "int64",
    torch.int16: "int16",
    torch.int8: "int8",
    torch.uint8: "uint8",
    torch.bool: "bool",
}
TORCH_DTYPES = {name: dtype for dtype, name in _DTYPES.items()}


def dtype_name(dtype: torch.dtype | str) -> str:
    """The canonical name of a dtype a kernel input may have."""
    if isinstance(dtype, str) and dtype in TORCH_DTYPES:
        return dtype
    if dtype in _DTYPES:
        return _DTYPES[dtype]
    raise SpecError(f"kernel inputs may have dtype {', '.join(TORCH_DTYPES)}; got {dtype}")


@dataclass(frozen=True)
class TensorInput:
    """One extra input of the kernel: its name, dtype, shape at trace time, and whether a mod captured it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    captured: bool = False

    @property
    def is_integer(self) -> bool:
        return self.dtype.startswith(("int", "uint")) or self.dtype == "bool"

    @property
    def torch_dtype(self) -> torch.dtype:
        return TORCH_DTYPES[self.dtype]


@dataclass(frozen=True)
class Input:
    """A tensor input declared for ahead-of-time compilation; mods index it like a captured tensor.

    ``Input("bias", (32, 1024), torch.float32)`` is passed at call time as ``op(q, k, v, bias=tensor)``. Each
    dimension of ``shape`` is the extent at declaration; at run time only the rank and dtype are checked, so
    tables sized by sequence length can grow.
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype | str = torch.float32

    def __post_init__(self):
        if not self.name.isidentifier():
            raise SpecError(f"Input name must be a Python identifier; got {self.name!r}")
        if not isinstance(self.shape, tuple) or not all(isinstance(n, int) and n > 0 for n in self.shape):
            raise SpecError(f"Input `{self.name}` shape must be a tuple of positive ints; got {self.shape!r}")
        object.__setattr__(self, "dtype", dtype_name(self.dtype))

    def as_tensor_input(self) -> TensorInput:
        return TensorInput(self.name, str(self.dtype), self.shape, captured=False)

    def __getitem__(self, index):
        from attnc.dsl.trace import current_trace

        return current_trace(f"index Input `{self.name}`").read(self, index)
