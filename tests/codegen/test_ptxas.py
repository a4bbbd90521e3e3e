"""ptxas's resource report: parsed per kernel entry, and true of attnc's kernels (no GPU needed, nvcc is)."""

import pytest
import torch

import attnc
from attnc import mods
from attnc.codegen.build import Target, cuda_home
from attnc.codegen.ptxas import PtxasReport, parse_report
from attnc.errors import BuildError, UnsupportedError
from attnc.schedules import heuristics
from attnc.schedules.config import KernelConfig

needs_nvcc = pytest.mark.skipif(cuda_home() is None, reason="ptxas's report needs nvcc (set CUDA_HOME)")

SAMPLE = """\
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function 'first_kernel' for 'sm_90a'
ptxas info    : Function properties for first_kernel
    456 bytes stack frame, 1500 bytes spill stores, 956 bytes spill loads
ptxas info    : Used 128 registers, used 5 barriers, 456 bytes cumulative stack size
ptxas info    : Compiling entry function 'second_kernel' for 'sm_90a'
ptxas info    : Function properties for second_kernel
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 4 barriers, 1024 bytes smem
"""


def test_parse_report_reads_every_entry():
    first, second = parse_report(SAMPLE)
    assert first == PtxasReport("first_kernel", registers=128, spill_stores=1500, spill_loads=956, stack_frame=456)
    assert first.spills and not second.spills
    assert (second.entry, second.registers) == ("second_kernel", 168)
    assert str(first) == ("128 registers a thread at launch, 1500 B spill stores, 956 B spill loads, "
                          "456 B stack frame")
    assert parse_report("ptxas info    : 0 bytes gmem\n") == []


def test_parse_report_refuses_an_entry_without_its_counts():
    with pytest.raises(BuildError, match="first_kernel"):
        parse_report(SAMPLE.replace("Used 128 registers", "Used registers"))


def test_a_cpu_kernel_has_no_ptxas_report():
    op = attnc.compile(attnc.Attention(2, qk_dim=16), target="cpu")
    with pytest.raises(UnsupportedError, match="cuda kernels; this one targets cpu"):
        op.kernel(torch.float32, op.config_for(torch.float32, 1, 16, 16)[0]).resource_report()


@needs_nvcc
def test_three_warpgroups_at_head_dim_64_spill_where_an_element_does_more_than_one_comparison():
    """The reason `heuristics.light` exists: at 512 threads a block ptxas has 128 registers a thread, and a document
    mask's element loop spills there; the heuristic's config for it does not, nor does causal's at three
    warpgroups."""
    target = Target("cuda", "sm_90a")
    three = KernelConfig(block_m=192, block_n=128, stages=2, threads=384)
    document = attnc.compile(attnc.Attention(8, qk_dim=64, mask_mod=mods.document(torch.arange(4096) // 512)),
                             target=target)
    causal = attnc.compile(attnc.Attention(8, qk_dim=64, mask_mod=mods.causal()), target=target)
    spilled = document.kernel(torch.bfloat16, three).resource_report()
    assert spilled.registers == 128 and spilled.spill_stores > 0
    assert not causal.kernel(torch.bfloat16, three).resource_report().spills
    chosen = heuristics.default_config("fwd", "sm_90a", document.ir, "bfloat16")
    assert chosen != three
    assert not document.kernel(torch.bfloat16, chosen).resource_report().spills
