"""Building rendered sources with tilelang: targets, the on-disk source cache, and tilelang's kernel cache.

A rendered source is written to ``$ATTNC_CACHE_DIR/kernels/<key>.py`` (readable, shown by ``attnc show``),
imported, and its ``build()`` factory's prim_func compiled by tilelang, whose own verified binary cache lives in
``$ATTNC_CACHE_DIR/tilelang``. The key is derived from the source text itself (`source_key`), so one key names one
source whatever produced it (templates, context, printer); a source file that does not match what was rendered is
rewritten, never trusted.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from attnc.codegen.cache import cache_dir, derive_key, versions, write_atomic
from attnc.errors import BuildError, UnsupportedError

ARCHES = ("sm_90a", "sm_80")


@dataclass(frozen=True)
class Target:
    """Where a kernel runs: ``Target("cpu")`` (tilelang's C target) or ``Target("cuda", "sm_90a")``."""

    kind: str
    arch: str = ""

    def __post_init__(self):
        if self.kind not in ("cpu", "cuda"):
            raise UnsupportedError(f"target kind must be 'cpu' or 'cuda'; got {self.kind!r}")
        if self.kind == "cuda" and self.arch not in ARCHES:
            raise UnsupportedError(f"cuda arch must be one of {ARCHES}; got {self.arch!r} (plain sm_90 cannot "
                                   "build warp-specialised code: use sm_90a)")

    @property
    def label(self) -> str:
        return self.arch.replace("_", "") if self.kind == "cuda" else "cpu"

    def tilelang(self) -> str | dict:
        return "c" if self.kind == "cpu" else {"kind": "cuda", "arch": self.arch}


def cuda_home() -> str | None:
    """The CUDA toolkit tilelang builds with: $CUDA_HOME, else the directory of nvcc on PATH, else /usr/local/cuda."""
    home = os.environ.get("CUDA_HOME")
    if home and Path(home, "bin", "nvcc").exists():
        return home
    nvcc = shutil.which("nvcc")
    if nvcc:
        return str(Path(nvcc).resolve().parent.parent)
    return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def _tilelang():
    """Import tilelang with its cache under ours and its per-kernel log lines silenced."""
    os.environ["TILELANG_CACHE_DIR"] = str(cache_dir() / "tilelang")
    os.environ.setdefault("TILELANG_PRINT_ON_COMPILATION", "0")
    home = cuda_home()
    if home:
        os.environ.setdefault("CUDA_HOME", home)
    import tilelang

    logging.getLogger("tilelang").setLevel(logging.WARNING)
    return tilelang


def source_key(label: str, source: str, target: Target, pass_configs: dict | None = None) -> str:
    """The cache key of building ``source``: ``<label>_<hash>`` over the source text and what the build reads besides
    it: the target, tilelang's pass configs, attnc's and tilelang's versions. The label (``fwd_bfloat16_d128_sm90a``)
    is for people."""
    return derive_key(label, {
        "source": source,
        "target": [target.kind, target.arch],
        "pass_configs": pass_configs or {},
        "versions": versions(),
    })


def source_path(key: str) -> Path:
    return cache_dir() / "kernels" / f"{key}.py"


def _load_module(key: str, path: Path):
    name = f"attnc_kernels.{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def build(key: str, source: str, target: Target, pass_configs: dict | None = None):
    """Write ``source`` under ``key`` and compile its ``build()`` prim_func for ``target``; a tilelang JITKernel.
    A source may add pass configs of its own (``PASS_CONFIGS``, a dict: a kernel that places its own barriers turns
    tilelang's barrier insertion off); the source text is part of the key, so they are too."""
    if target.kind == "cuda" and cuda_home() is None:
        raise UnsupportedError("building CUDA kernels needs nvcc: set CUDA_HOME to a CUDA toolkit")
    tilelang = _tilelang()
    path = source_path(key)
    write_atomic(path, source)
    try:
        module = _load_module(key, path)
        configs = {**(pass_configs or {}), **getattr(module, "PASS_CONFIGS", {})}
        return tilelang.compile(module.build(), target=target.tilelang(), pass_configs=configs)
    except Exception as error:
        raise BuildError(f"building {key} for {target.label} failed: {type(error).__name__}: "
                         f"{str(error).strip().splitlines()[-1] if str(error).strip() else ''}\n"
                         f"  source: {path}") from error
