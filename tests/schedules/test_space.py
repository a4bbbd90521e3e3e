"""Config spaces: sizes, order, pruning by the resource model."""

import itertools

import pytest

from attnc.errors import UnsupportedError
from attnc.schedules.config import KernelConfig
from attnc.schedules.resources import check, get_arch, shared_memory_bytes
from attnc.schedules.space import candidates, decode_rows, space

GRID = [
    (family, arch, qk, v, group, dtype_bytes)
    for family, arch in (("fwd", "sm_90a"), ("fwd", "sm_80"), ("bwd", "sm_90a"), ("bwd", "sm_80"),
                         ("decode", "sm_90a"), ("decode", "sm_80"))
    for qk, v in ((64, 64), (128, 128), (192, 128), (256, 256))
    for group in (1, 4)
    for dtype_bytes in (2,)
] + [(f, "cpu", d, d, g, 4) for f in ("cpu_fwd", "cpu_bwd") for d in (32, 64, 128) for g in (1, 8)]


def _order(c: KernelConfig):
    return (c.block_m, c.block_n, c.stages, c.threads, c.pack_gqa, c.split)


@pytest.mark.parametrize("family,arch,qk,v,group,dtype_bytes", GRID)
def test_every_config_fits_and_order_is_deterministic(family, arch, qk, v, group, dtype_bytes):
    configs = space(family, arch, qk, v, group, dtype_bytes)
    assert configs
    assert configs == space(family, arch, qk, v, group, dtype_bytes)
    assert configs == sorted(configs, key=_order)
    assert len(set(configs)) == len(configs)
    dims = dict(qk_dim=qk, v_dim=v, group=group, dtype_bytes=dtype_bytes)
    for config in configs:
        assert check(family, arch, config, **dims) == [], config.short()
        output_in_q = family == "fwd" and get_arch(arch).wgmma and dims["qk_dim"] == dims["v_dim"]
        warp_specialized = family == "bwd" and get_arch(arch).wgmma
        assert shared_memory_bytes(family, config, **dims, output_in_q=output_in_q,
                                   warp_specialized=warp_specialized) <= get_arch(arch).smem_per_block


def test_unpruned_sizes():
    assert len(candidates("fwd", "sm_90a")) == 4 * 8 * 3 * 3  # block_n includes 80, 96, 160, 176 on Hopper
    assert len(candidates("fwd", "sm_80")) == 4 * 4 * 3 * 3
    assert len(candidates("fwd", "sm_90a", group=4)) == 4 * 8 * 3 * 3  # the forward template does not pack
    assert len(candidates("bwd", "sm_90a", group=4)) == 4 * 4 * 3 * 3  # the backward never packs
    assert len(candidates("decode", "sm_90a", group=8)) == 1 * 4 * 3 * 3 * 5  # block_m fixed by the group
    assert len(candidates("cpu_fwd", "cpu")) == 9


def test_pruned_sizes_snapshot():
    # Snapshot of the model's verdicts; update deliberately when the resource model changes.
    assert len(space("fwd", "sm_90a", 128, 128)) == 54
    assert len(space("fwd", "sm_90a", 128, 128, group=4)) == 54
    assert len(space("bwd", "sm_90a", 128, 128)) == 8  # 1 KiB-aligned buffers + static reserve
    assert len(space("cpu_fwd", "cpu", 64, 64, 1, 4)) == 9


def test_known_infeasible_configs_excluded():
    fwd256 = space("fwd", "sm_90a", 256, 256)
    assert not any(c.block_m == 256 and c.block_n == 256 for c in fwd256)
    fwd128 = space("fwd", "sm_90a", 128, 128)
    assert not any(c.block_m == 128 and c.threads == 384 for c in fwd128)
    assert all(c.threads % 128 == 0 and c.block_m % (16 * c.threads // 32) == 0 for c in fwd128)
    # 128x128 on one warpgroup would need more than 255 registers per thread.
    assert KernelConfig(block_m=128, block_n=128, stages=2, threads=128) not in fwd128


def test_design_measured_configs_present():
    fwd128 = space("fwd", "sm_90a", 128, 128)
    for cfg in (
        KernelConfig(block_m=128, block_n=128, stages=2, threads=256),
        KernelConfig(block_m=192, block_n=128, stages=2, threads=384),
        KernelConfig(block_m=128, block_n=64, stages=2, threads=256),
        KernelConfig(block_m=128, block_n=176, stages=1, threads=256),
    ):
        assert cfg in fwd128, cfg.short()


def test_block_176_only_for_hopper_forward():
    assert any(c.block_n == 176 for c in space("fwd", "sm_90a", 128, 128))
    assert not any(c.block_n == 176 for c in space("fwd", "sm_80", 128, 128))
    assert not any(c.block_n == 176 for c in space("bwd", "sm_90a", 64, 64))


def test_pack_gqa_and_split_axes():
    mha = space("fwd", "sm_90a", 128, 128, group=1)
    assert not any(c.pack_gqa for c in mha)
    gqa = space("fwd", "sm_90a", 128, 128, group=4)
    assert not any(c.pack_gqa for c in gqa)  # the forward template serves each q head in its own block
    assert all(c.split == 1 for c in gqa)
    decode = space("decode", "sm_90a", 128, 128, group=8)
    assert {c.split for c in decode} == {1, 2, 4, 8, 16}
    assert all(c.pack_gqa and c.block_m == 64 for c in decode)
    assert not any(c.pack_gqa for c in space("bwd", "sm_90a", 128, 128, group=4))


def test_decode_rows():
    assert decode_rows(1) == (64,)
    assert decode_rows(64) == (64,)
    assert decode_rows(65) == (128,)
    assert decode_rows(160) == (192,)
    assert decode_rows(512) == (64, 128, 192, 256)


def test_cpu_space_is_tiny():
    configs = space("cpu_fwd", "cpu", 64, 64, 1, 4)
    assert {(c.block_m, c.block_n) for c in configs} == set(itertools.product((16, 32, 64), repeat=2))
    assert all(c.threads == 1 and c.stages == 1 and not c.pack_gqa and c.split == 1 for c in configs)
    assert space("cpu_bwd", "cpu", 64, 64, 4, 4) == configs


def test_unsupported_problems_raise():
    with pytest.raises(UnsupportedError, match="qk_dim 72 is not a multiple of 16"):
        space("fwd", "sm_90a", 72, 72)
    with pytest.raises(UnsupportedError, match="no 'cpu_fwd' config fits sm_90a"):
        space("cpu_fwd", "sm_90a", 64, 64)
    with pytest.raises(UnsupportedError, match="unknown template family"):
        space("mla", "sm_90a", 64, 64)
    with pytest.raises(UnsupportedError, match="sm_90a"):
        space("fwd", "sm_90", 64, 64)
    with pytest.raises(UnsupportedError, match="shared memory"):
        space("fwd", "sm_80", 1024, 1024)
