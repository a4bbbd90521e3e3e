"""Rendering (strict context, readable sources), derived cache keys and atomic, self-healing cache writes."""

import dataclasses
import multiprocessing

import jinja2
import pytest
import torch

import attnc
from attnc.codegen import render
from attnc.codegen.build import Target, source_path
from attnc.codegen.cache import cache_dir, derive_key, write_atomic
from attnc.codegen.context import make_context
from attnc.dsl.tilemap import analyse
from attnc.errors import BuildError, UnsupportedError
from attnc.runtime.kernels import Kernel, kernel_key
from attnc.schedules.config import KernelConfig


def context(spec, family="cpu_fwd", config=KernelConfig(16, 32, 1, 1)):
    return make_context(family, "k", spec.ir, analyse(spec.ir.mask, config.block_m, config.block_n), config,
                        "float32")


def test_rendered_source_is_readable_and_carries_the_spec():
    spec = attnc.Attention(4, 2, qk_dim=32, score_mod=attnc.mods.softcap(20), mask_mod=attnc.mods.causal())
    source = render.render(context(spec))
    compile(source, "<rendered>", "exec")
    assert "softcap_20_causal: 4 q heads / 2 kv heads" in source
    assert "T.tanh" in source and "kv_head = h // 2" in source
    assert "{{" not in source and "{%" not in source


def test_a_missing_context_field_fails_the_render():
    spec = attnc.Attention(4, qk_dim=32)
    ctx = context(spec)
    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ ctx.no_such_field }}").render(ctx=ctx)
    with pytest.raises(BuildError, match="no template for kernel family 'nope'"):
        render.render(dataclasses.replace(ctx, family="nope"))


def test_cache_keys_are_derived_from_everything_the_kernel_depends_on():
    spec = attnc.Attention(4, qk_dim=32, mask_mod=attnc.mods.causal())
    cpu = Target("cpu")
    config = KernelConfig(16, 32, 1, 1)
    key = kernel_key("cpu_fwd", spec.ir, config, "float32", cpu)
    assert key.startswith("cpu_fwd_float32_d32_cpu_") and len(key.split("_")[-1]) == 16
    assert key == kernel_key("cpu_fwd", spec.ir, config, "float32", cpu)
    others = {
        kernel_key("cpu_fwd", attnc.Attention(4, qk_dim=32).ir, config, "float32", cpu),
        kernel_key("cpu_fwd", spec.ir, KernelConfig(32, 32, 1, 1), "float32", cpu),
        kernel_key("cpu_fwd", spec.ir, config, "float16", cpu),
    }
    assert key not in others and len(others) == 3
    assert derive_key("x", {"a": 1, "b": 2}) == derive_key("x", {"b": 2, "a": 1})


def test_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and cache_dir().is_dir()
    monkeypatch.delenv("ATTNC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "attnc"


def _write(args):
    path, text = args
    for _ in range(20):
        write_atomic(path, text)
    return path.read_text()


def test_concurrent_atomic_writes_leave_a_whole_file(tmp_path):
    path = tmp_path / "k.py"
    text = "x = 1\n" * 5000
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        results = pool.map(_write, [(path, text)] * 3)
    assert all(r == text for r in results) and path.read_text() == text
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_a_corrupt_cached_source_is_rewritten_not_trusted(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    spec = attnc.Attention(2, qk_dim=16, mask_mod=attnc.mods.causal())
    kernel = Kernel.render("cpu_fwd", spec.ir, KernelConfig(16, 32, 1, 1), "float32", Target("cpu")).build()
    path = source_path(kernel.key)
    assert path.read_text() == kernel.source
    path.write_text("garbage that is not the kernel(")
    again = Kernel.render("cpu_fwd", spec.ir, KernelConfig(16, 32, 1, 1), "float32", Target("cpu")).build()
    assert path.read_text() == again.source
    q, k, v = (torch.randn(1, 20, 2, 16) for _ in range(3))
    out, lse = torch.empty_like(q), torch.empty(1, 2, 20)
    again(q, k, v, out, lse)
    ref, _ = attnc.attention_reference(spec.ir, q, k, v)
    assert (out - ref).abs().max() < 1e-4


def test_unknown_targets_are_refused():
    with pytest.raises(UnsupportedError, match="plain sm_90"):
        Target("cuda", "sm_90")
    with pytest.raises(UnsupportedError, match="'cpu' or 'cuda'"):
        Target("tpu")
