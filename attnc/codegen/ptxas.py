"""ptxas's resource report for a CUDA kernel: registers a thread and bytes spilled to local memory.

tilelang builds without ptxas's verbose output, so the report comes from compiling the kernel's CUDA source once more
with ``-Xptxas -v`` and the flags tilelang's build passes (C++20, its template and CUTLASS headers, fast math where the
kernel builds with it). Spills are what makes a config slow for a spec with heavy per-element work (the head-dim-64
forward at three consumer warpgroups: docs/performance.md, eighth session); `attnc show --ptxas` prints the report.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from attnc.codegen.build import cuda_home
from attnc.errors import BuildError, UnsupportedError

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class PtxasReport:
    """One kernel entry's resources. ``registers``: a thread's count at launch (a warp-specialised kernel's
    consumers raise theirs at run time with setmaxnreg); spills and the stack frame in bytes."""

    entry: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0

    def __str__(self) -> str:
        return (f"{self.registers} registers a thread at launch, {self.spill_stores} B spill stores, "
                f"{self.spill_loads} B spill loads, {self.stack_frame} B stack frame")


def parse_report(output: str) -> list[PtxasReport]:
    """The reports of every kernel entry in ptxas's verbose output (``-Xptxas -v``), in order."""
    reports = []
    parts = _ENTRY.split(output)
    for entry, body in zip(parts[1::2], parts[2::2]):
        frame, registers = _FRAME.search(body), _REGISTERS.search(body)
        if frame is None or registers is None:
            raise BuildError(f"ptxas's report for {entry} lacks its register or spill line:\n{body.strip()[:400]}")
        reports.append(PtxasReport(entry, int(registers[1]), int(frame[2]), int(frame[3]), int(frame[1])))
    return reports


def resource_report(cuda_source: str, arch: str, fast_math: bool) -> PtxasReport:
    """Compile ``cuda_source`` (one kernel entry, as tilelang generates it) for ``arch`` ('sm_90a', 'sm_80') and
    return ptxas's report of its kernel."""
    from tilelang.contrib.nvcc import default_compile_options  # tilelang's C++ standard and include directories

    home = cuda_home()
    if home is None:
        raise UnsupportedError("ptxas's resource report needs nvcc: set CUDA_HOME to a CUDA toolkit")
    number = arch.removeprefix("sm_")
    with tempfile.TemporaryDirectory(prefix="attnc-ptxas-") as tmp:
        source = Path(tmp, "kernel.cu")
        source.write_text(cuda_source)
        command = [str(Path(home, "bin", "nvcc")), *default_compile_options(), "-w", "-gencode",
                   f"arch=compute_{number},code=sm_{number}", "--cubin", "-Xptxas=-v",
                   *(["--use_fast_math"] if fast_math else []), "-o", str(Path(tmp, "kernel.cubin")), str(source)]
        result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"nvcc could not compile the kernel for {arch} (exit {result.returncode}):\n"
                         f"{(result.stderr or result.stdout).strip()[-600:]}")
    reports = parse_report(result.stdout + result.stderr)
    if not reports:
        raise BuildError(f"ptxas reported no kernel entry for {arch}:\n{(result.stdout + result.stderr)[-400:]}")
    return reports[0]
