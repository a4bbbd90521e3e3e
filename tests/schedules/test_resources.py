"""The resource model: shared memory and register counts, warp-layout rules, messages."""

import pytest

from attnc.errors import UnsupportedError
from attnc.schedules.config import KernelConfig
from attnc.schedules.resources import (
    REG_GRANULARITY,
    SMEM_RESERVE,
    ARCHES,
    CPU,
    SM80,
    SM90A,
    _partition_exists,
    check,
    consumer_regs,
    fits,
    forward_blocks_per_sm,
    get_arch,
    register_estimate,
    require_fits,
    shared_memory_bytes,
)

D128 = dict(qk_dim=128, v_dim=128)


def test_arch_limits():
    assert SM90A.smem_per_block == 232448 == 227 * 1024
    assert SM80.smem_per_block == 166912 == 163 * 1024
    assert SM90A.regs_per_sm == SM80.regs_per_sm == 65536
    assert SM90A.max_threads == 1024 and SM90A.max_regs_per_thread == 255
    assert SM90A.wgmma and not SM80.wgmma
    assert CPU.is_cpu and not SM90A.is_cpu
    assert set(ARCHES) >= {"sm_90a", "sm_80", "cpu"}


def test_get_arch_accepts_names_and_capabilities():
    assert get_arch("sm_90a") is SM90A
    assert get_arch("9.0") is SM90A
    assert get_arch((9, 0)) is SM90A
    assert get_arch((8, 0)) is SM80
    assert get_arch(SM80) is SM80
    assert get_arch("cpu") is CPU


def test_get_arch_refuses_plain_sm90_and_unknown():
    with pytest.raises(UnsupportedError, match="sm_90a"):
        get_arch("sm_90")
    with pytest.raises(UnsupportedError, match="supported: 'sm_90a'"):
        get_arch("sm_70")


def test_fwd_shared_memory_counts_q_pipelined_kv_and_output():
    cfg = KernelConfig(block_m=128, block_n=128, stages=2, threads=256)
    q, kv, out = 128 * 128 * 2, 2 * 128 * (128 + 128) * 2, 128 * 128 * 2
    assert shared_memory_bytes("fwd", cfg, **D128) == q + kv + out == 196608
    # Only the K/V tiles are multiplied by the pipeline depth.
    three = KernelConfig(block_m=128, block_n=128, stages=3, threads=256)
    assert shared_memory_bytes("fwd", three, **D128) - shared_memory_bytes("fwd", cfg, **D128) == 128 * 256 * 2
    # fp32 inputs double everything.
    assert shared_memory_bytes("fwd", cfg, dtype_bytes=4, **D128) == 2 * 196608


def test_fwd_distinct_qk_and_v_dims():
    cfg = KernelConfig(block_m=64, block_n=64, stages=2, threads=128)
    got = shared_memory_bytes("fwd", cfg, qk_dim=192, v_dim=128)
    assert got == (64 * 192 + 2 * 64 * (192 + 128) + 64 * 128) * 2


def test_bwd_shared_memory_terms():
    cfg = KernelConfig(block_m=64, block_n=128, stages=2, threads=256)
    kv = 128 * 256 * 2
    q_do = 2 * (64 * 256 * 2 + 2 * 64 * 4)
    p_ds = 2 * 64 * 128 * 2
    dkdv = 128 * 256 * 2
    assert shared_memory_bytes("bwd", cfg, **D128) == kv + q_do + p_ds + dkdv
    # sm_90a: dS double-buffered, P in registers (128 kv rows over 8 warps), an fp32 dQ tile for the TMA
    # reduce-add, dK and dV staged in K's and V's tiles; every buffer rounded up to 1 KiB (the 2 × 64 fp32 lse and
    # delta rows each take 1 KiB), plus the reserve for static shared memory
    dq = 64 * 128 * 4
    rows = 2 * 1024
    assert shared_memory_bytes("bwd", cfg, **D128, warp_specialized=True) == \
        kv + 2 * 2 * 64 * 128 * 2 + rows + 2 * 64 * 128 * 2 + dq + SMEM_RESERVE
    square = KernelConfig(block_m=64, block_n=64, stages=2, threads=256)  # 64 kv rows over 8 warps: P in shared
    assert shared_memory_bytes("bwd", square, **D128, warp_specialized=True) == \
        64 * 256 * 2 + 2 * 2 * 64 * 128 * 2 + rows + 4 * 64 * 64 * 2 + dq + SMEM_RESERVE


def test_bwd_kernels_the_h200_refused_to_launch_do_not_fit():
    """Dynamic shared memory of 232448 and 231936 bytes failed to launch on the H200 (the static mbarriers count
    against the same limit): the ALiBi + sinks backward at d128 with 3 stages and at d256 with 2."""
    assert check("bwd", "sm_90a", KernelConfig(64, 128, 3, 256), **D128)
    assert check("bwd", "sm_90a", KernelConfig(64, 64, 2, 256), qk_dim=256, v_dim=256)
    assert not check("bwd", "sm_90a", KernelConfig(64, 128, 2, 256), **D128)


def test_decode_split_stages_fp32_partials():
    one = KernelConfig(block_m=64, block_n=128, stages=2, threads=128, pack_gqa=True, split=1)
    four = KernelConfig(block_m=64, block_n=128, stages=2, threads=128, pack_gqa=True, split=4)
    diff = shared_memory_bytes("decode", four, **D128) - shared_memory_bytes("decode", one, **D128)
    assert diff == 64 * 128 * (4 - 2)


def test_fwd_256_tiles_at_d256_exceed_shared_memory():
    cfg = KernelConfig(block_m=256, block_n=256, stages=1, threads=256)
    reasons = check("fwd", "sm_90a", cfg, qk_dim=256, v_dim=256)
    memory = [r for r in reasons if r.startswith("shared memory")]
    assert memory, reasons
    assert str(shared_memory_bytes("fwd", cfg, qk_dim=256, v_dim=256, output_in_q=True)) in memory[0]
    assert "232448" in memory[0]


def test_hopper_forward_gives_each_consumer_warpgroup_64_rows_and_reuses_q_for_the_output():
    assert any("64 * threads // 128 = 128" in r
               for r in check("fwd", "sm_90a", KernelConfig(64, 128, 2, 256), qk_dim=128, v_dim=128))
    fits_only_with_reuse = KernelConfig(block_m=128, block_n=80, stages=2, threads=256)
    assert check("fwd", "sm_90a", fits_only_with_reuse, qk_dim=256, v_dim=256) == []
    assert any(r.startswith("shared memory") for r in check("fwd", "sm_80", fits_only_with_reuse, qk_dim=256,
                                                             v_dim=256))


def test_a_forward_with_one_consumer_warpgroup_is_built_for_two_blocks_per_sm_when_their_shared_memory_fits():
    """Two blocks of 80 KiB (Q 16 KiB, one stage of K and V) fit the H200's 228 KiB SM; with two stages (144 KiB), or
    two consumer warpgroups, one block; sm_80 has no producer warpgroup to take registers from."""
    assert forward_blocks_per_sm(KernelConfig(64, 128, 1, 128), **D128) == 2
    assert forward_blocks_per_sm(KernelConfig(64, 64, 2, 128), **D128) == 2
    assert forward_blocks_per_sm(KernelConfig(64, 128, 2, 128), **D128) == 1
    assert forward_blocks_per_sm(KernelConfig(128, 128, 1, 256), **D128) == 1
    assert forward_blocks_per_sm(KernelConfig(64, 128, 1, 128), **D128, arch="sm_80") == 1
    assert forward_blocks_per_sm(KernelConfig(64, 64, 2, 128), qk_dim=256, v_dim=256) == 1


def test_consumer_registers_per_warpgroup_count_and_blocks_per_sm():
    """One block per SM: 240 (160 over three warpgroups). Two: 128 per thread at launch plus the 104 the producer
    warpgroup gives up (it keeps 24)."""
    assert (consumer_regs(128), consumer_regs(256), consumer_regs(384)) == (240, 240, 160)
    launch = SM90A.regs_per_sm // (2 * (128 + SM90A.producer_threads))
    assert consumer_regs(128, blocks_per_sm=2) == launch + (launch - SM90A.producer_regs) == 232


@pytest.mark.parametrize("threads,blocks", [(128, 1), (256, 1), (384, 1), (128, 2)])
def test_setmaxnreg_asks_no_more_registers_than_the_block_launched_with(threads, blocks):
    """The consumers' setmaxnreg.inc waits until the block's register pool holds what they ask for: the consumer
    threads at `consumer_regs` and the producer warpgroup at ``producer_regs`` must fit the registers the block
    launched with (``__launch_bounds__``: 65536 over the resident threads, in steps of 8), or the kernel hangs. A
    backward main kernel whose producer kept 32 registers (256 consumers at 240) hung on the H200."""
    block_threads = threads + SM90A.producer_threads
    per_thread = min(SM90A.max_regs_per_thread, SM90A.regs_per_sm // (blocks * block_threads))
    pool = per_thread // REG_GRANULARITY * REG_GRANULARITY * block_threads
    asked = threads * consumer_regs(threads, blocks) + SM90A.producer_threads * SM90A.producer_regs
    assert asked <= pool


def test_128_rows_on_384_threads_has_no_warp_partition_on_sm90a():
    cfg = KernelConfig(block_m=128, block_n=128, stages=2, threads=384)
    reasons = check("fwd", "sm_90a", cfg, **D128)
    assert any("block_m 128 cannot be split over 12 warps" in r and "% 192" in r for r in reasons), reasons
    # TileLang's own partitioner finds nothing either (DESIGN.md: "no valid warp partition").
    assert not _partition_exists(128, 128, 12, wgmma=True)


def test_design_measured_configs_fit_sm90a():
    for cfg in (
        KernelConfig(block_m=128, block_n=128, stages=2, threads=256),
        KernelConfig(block_m=192, block_n=128, stages=2, threads=384),
        KernelConfig(block_m=128, block_n=64, stages=2, threads=256),
    ):
        assert check("fwd", "sm_90a", cfg, **D128) == [], cfg.short()


def test_wgmma_needs_whole_warpgroups():
    cfg = KernelConfig(block_m=64, block_n=64, stages=2, threads=96)
    reasons = check("fwd", "sm_90a", cfg, **D128)
    assert any("multiple of 128" in r for r in reasons)
    # sm_80 takes any whole number of warps, as long as the rows split: 64 rows over 3 warps do not.
    assert any("cannot be split over 3 warps" in r for r in check("fwd", "sm_80", cfg, **D128))


def test_register_estimate_and_limits():
    big = KernelConfig(block_m=128, block_n=128, stages=2, threads=128)
    regs = register_estimate("fwd", big, **D128)
    # fp32 output 128x128 + fp32 scores 128x128 over 128 threads = 256 before overhead.
    assert regs > 255
    reasons = check("fwd", "sm_90a", big, **D128)
    assert any(r.startswith(f"registers {regs} per thread") and "255" in r for r in reasons), reasons
    ok = KernelConfig(block_m=128, block_n=128, stages=2, threads=256)
    assert register_estimate("fwd", ok, **D128) <= 255
    assert register_estimate("cpu_fwd", KernelConfig(32, 32, 1, 1), **D128) == 0


def test_register_file_per_block_limit():
    # 256 threads at ~250 regs each plus the producer warpgroup exceed 64K registers.
    cfg = KernelConfig(block_m=256, block_n=128, stages=1, threads=384)
    reasons = check("fwd", "sm_90a", cfg, qk_dim=128, v_dim=128)
    assert any("per block" in r or "per thread" in r for r in reasons)
    tight = KernelConfig(block_m=128, block_n=64, stages=1, threads=256)
    regs = register_estimate("fwd", tight, qk_dim=256, v_dim=256)
    assert regs <= 255
    assert fits("fwd", "sm_90a", tight, qk_dim=256, v_dim=256)


def test_bwd_partitions_checked_per_product():
    # 32 key rows over 8 warps: no partition of dK (32 x 128) in whole warpgroups.
    cfg = KernelConfig(block_m=64, block_n=32, stages=1, threads=256)
    reasons = check("bwd", "sm_90a", cfg, **D128)
    assert any("no warp partition" in r for r in reasons), reasons
    ok = KernelConfig(block_m=64, block_n=128, stages=2, threads=256)
    assert check("bwd", "sm_90a", ok, **D128) == []


def test_family_and_target_must_match():
    cpu_cfg = KernelConfig(block_m=32, block_n=32, stages=1, threads=1)
    assert "cpu" in check("cpu_fwd", "sm_90a", cpu_cfg, **D128)[0]
    assert "CUDA template" in check("fwd", "cpu", cpu_cfg, **D128)[0]
    assert check("cpu_fwd", "cpu", cpu_cfg, **D128) == []
    with pytest.raises(UnsupportedError, match="unknown template family 'flash'"):
        check("flash", "sm_90a", cpu_cfg, **D128)


def test_cpu_tile_buffer_cap():
    cfg = KernelConfig(block_m=64, block_n=64, stages=1, threads=1)
    assert check("cpu_fwd", "cpu", cfg, qk_dim=256, v_dim=256, dtype_bytes=4) == []
    reasons = check("cpu_bwd", "cpu", cfg, qk_dim=1024, v_dim=1024, dtype_bytes=4)
    assert any(r.startswith("tile buffer memory") for r in reasons)


def test_head_dims_and_options_validated():
    cfg = KernelConfig(block_m=64, block_n=64, stages=2, threads=128)
    assert any("qk_dim 72 is not a multiple of 16" in r for r in check("fwd", "sm_80", cfg, qk_dim=72, v_dim=64))
    split = KernelConfig(block_m=64, block_n=64, stages=2, threads=128, split=2)
    assert any("only the decode template splits" in r for r in check("fwd", "sm_80", split, **D128))
    packed = KernelConfig(block_m=64, block_n=64, stages=2, threads=128, pack_gqa=True)
    assert any("group > 1" in r for r in check("decode", "sm_80", packed, **D128))
    assert check("decode", "sm_80", packed, group=4, **D128) == []
    for family in ("fwd", "bwd"):  # their templates run one block per q head
        assert any("does not pack GQA heads" in r for r in check(family, "sm_80", packed, group=4, **D128))
    assert any("must be True" in r for r in check("decode", "sm_80", cfg, group=4, **D128))


def test_require_fits_names_config_resource_amount_and_limit():
    cfg = KernelConfig(block_m=256, block_n=256, stages=2, threads=256)
    with pytest.raises(UnsupportedError) as info:
        require_fits("fwd", "sm_80", cfg, qk_dim=256, v_dim=256)
    message = str(info.value)
    amount = shared_memory_bytes("fwd", cfg, qk_dim=256, v_dim=256)
    assert "m256n256s2t256" in message
    assert "shared memory" in message and str(amount) in message and "166912" in message
    assert "sm_80" in message and "'fwd'" in message
    require_fits("fwd", "sm_90a", KernelConfig(128, 128, 2, 256), qk_dim=128, v_dim=128)  # fits: no error
