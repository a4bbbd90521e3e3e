"""Rendering (strict context, readable sources), cache keys derived from the rendered source, and atomic,
self-healing cache writes."""

import dataclasses
import multiprocessing

import jinja2
import pytest
import sympy
import torch

import attnc
from attnc.codegen import build, printer, render
from attnc.codegen.build import Target, source_key, source_path
from attnc.codegen.cache import cache_dir, derive_key, write_atomic
from attnc.codegen.context import make_context
from attnc.dsl.tilemap import analyse
from attnc.errors import BuildError, UnsupportedError
from attnc.runtime.kernels import Kernel
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


def test_a_template_directory_in_the_environment_replaces_the_packages(tmp_path, monkeypatch):
    """ATTNC_TEMPLATE_DIR renders a variant of the templates (an A/B of a template change): the variant's source,
    under its own cache key; a family the directory lacks is a BuildError naming the directory."""
    spec = attnc.Attention(4, qk_dim=32)
    package = Kernel.render("cpu_fwd", spec.ir, KernelConfig(16, 32, 1, 1), "float32", Target("cpu"))
    for template in render.TEMPLATE_DIR.iterdir():
        (tmp_path / template.name).write_text(template.read_text())
    variant = (tmp_path / "cpu_fwd.py.j2").read_text() + "# a variant\n"
    (tmp_path / "cpu_fwd.py.j2").write_text(variant)
    monkeypatch.setenv(render.TEMPLATE_DIR_ENV, str(tmp_path))
    assert render.template_dir() == str(tmp_path)
    changed = Kernel.render("cpu_fwd", spec.ir, KernelConfig(16, 32, 1, 1), "float32", Target("cpu"))
    assert changed.source == package.source + "# a variant\n" and changed.key != package.key
    (tmp_path / "cpu_fwd.py.j2").unlink()
    render.environment.cache_clear()  # jinja2 caches loaded templates per environment
    with pytest.raises(BuildError, match=f"no template for kernel family 'cpu_fwd' in {tmp_path}"):
        Kernel.render("cpu_fwd", spec.ir, KernelConfig(16, 32, 1, 1), "float32", Target("cpu"))
    monkeypatch.delenv(render.TEMPLATE_DIR_ENV)
    assert Kernel.render("cpu_fwd", spec.ir, KernelConfig(16, 32, 1, 1), "float32", Target("cpu")).key == package.key


def cpu_key(spec, config=KernelConfig(16, 32, 1, 1), dtype="float32"):
    return Kernel.render("cpu_fwd", spec.ir, config, dtype, Target("cpu")).key


def test_cache_keys_are_derived_from_the_rendered_source_and_the_build():
    spec = attnc.Attention(4, qk_dim=32, mask_mod=attnc.mods.causal())
    key = cpu_key(spec)
    assert key.startswith("cpu_fwd_float32_d32_cpu_") and len(key.split("_")[-1]) == 16
    assert key == cpu_key(attnc.Attention(4, qk_dim=32, mask_mod=attnc.mods.causal()))  # the same render
    others = {
        cpu_key(attnc.Attention(4, qk_dim=32)),
        cpu_key(spec, KernelConfig(32, 32, 1, 1)),
        cpu_key(spec, dtype="float16"),
    }
    assert key not in others and len(others) == 3
    source = render.render(context(spec))
    cuda = source_key("x", source, Target("cuda", "sm_90a"))
    assert len({source_key("x", source, Target("cpu")), cuda, source_key("x", source, Target("cuda", "sm_80")),
                source_key("x", source, Target("cuda", "sm_90a"), {"tl.enable_fast_math": True})}) == 4
    assert source_key("x", source + "\n", Target("cuda", "sm_90a")) != cuda
    assert derive_key("x", {"a": 1, "b": 2}) == derive_key("x", {"b": 2, "a": 1})


def test_a_code_generator_change_changes_the_key(monkeypatch):
    """Same spec, config and template, another printer: another source, so another key (the key names one
    source whatever produced it)."""
    spec = attnc.Attention(4, qk_dim=32, score_mod=attnc.mods.softcap(20))
    before = Kernel.render("cpu_fwd", spec.ir, KernelConfig(16, 32, 1, 1), "float32", Target("cpu"))
    monkeypatch.setitem(printer._FUNCTIONS, sympy.tanh, "T.tanh_changed")
    after = Kernel.render("cpu_fwd", spec.ir, KernelConfig(16, 32, 1, 1), "float32", Target("cpu"))
    assert "T.tanh_changed" in after.source and "T.tanh_changed" not in before.source
    assert after.key != before.key
    monkeypatch.undo()
    assert Kernel.render("cpu_fwd", spec.ir, KernelConfig(16, 32, 1, 1), "float32", Target("cpu")).key == before.key


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
    old = source_path("cpu_fwd_float32_d16_cpu_0123456789abcdef")  # an entry under a key of another attnc: unused
    old.parent.mkdir(parents=True)
    old.write_text("an old entry(")
    kernel = Kernel.render("cpu_fwd", spec.ir, KernelConfig(16, 32, 1, 1), "float32", Target("cpu")).build()
    assert old.read_text() == "an old entry("
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


def test_a_source_s_own_pass_configs_reach_tilelang(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    seen = []
    tilelang = build._tilelang()
    monkeypatch.setattr(tilelang, "compile", lambda func, target, pass_configs: seen.append(pass_configs))
    spec = attnc.Attention(2, qk_dim=16)
    kernel = Kernel.render("cpu_fwd", spec.ir, KernelConfig(16, 32, 1, 1), "float32", Target("cpu"))
    own = kernel.source + '\nPASS_CONFIGS = {"tl.disable_thread_storage_sync": True}\n'
    build.build(source_key("own", own, Target("cpu")), own, Target("cpu"), {"tl.enable_fast_math": True})
    build.build(kernel.key, kernel.source, Target("cpu"), {"tl.enable_fast_math": True})
    assert seen == [{"tl.enable_fast_math": True, "tl.disable_thread_storage_sync": True},
                    {"tl.enable_fast_math": True}]
    assert source_key("own", own, Target("cpu")) != source_key("own", kernel.source, Target("cpu"))
