"""CompiledAttention on the CPU target: results, lse, dispatch edge cases, caching, torch.compile."""

import math
import subprocess
import sys
import textwrap

import pytest
import torch

import attnc
from attnc.runtime.reference import attention_reference

TOL = 1e-4  # DESIGN.md: fp32 CPU kernels, max abs error


def check(op, q, k, v, **kw):
    out, lse = op(q, k, v, return_lse=True, **kw)
    inputs = {**op.spec.captured_tensors(), **{n: t for n, t in kw.items() if n != "sinks"}}
    ref_out, ref_lse = attention_reference(op.ir, q, k, v, inputs, kw.get("sinks"))
    assert (out.double() - ref_out).abs().max() <= TOL
    finite = torch.isfinite(ref_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    if finite.any():
        assert (lse.double()[finite] - ref_lse[finite]).abs().max() <= TOL
    return out, lse


@pytest.fixture(scope="module")
def gqa_op():
    spec = attnc.Attention(6, 2, qk_dim=16, v_dim=8, layout="bhsd", sinks=True,
                           score_mod=attnc.mods.softcap(4.0), mask_mod=attnc.mods.causal())
    return attnc.compile(spec, target="cpu")


@pytest.mark.parametrize("q_len, kv_len", [(1, 1), (17, 17), (33, 70), (70, 33), (129, 129)])
def test_gqa_bhsd_sinks_softcap_causal_match_the_reference(gqa_op, q_len, kv_len):
    q, k, v = torch.randn(2, 6, q_len, 16), torch.randn(2, 2, kv_len, 16), torch.randn(2, 2, kv_len, 8)
    out, lse = check(gqa_op, q, k, v, sinks=torch.randn(6))
    assert out.shape == (2, 6, q_len, 8) and lse.shape == (2, 6, q_len) and lse.dtype == torch.float32


def test_changing_lengths_does_not_rebuild(gqa_op, monkeypatch):
    kernel = gqa_op.kernel(torch.float32).build()
    compiled = kernel.compiled
    import tilelang

    monkeypatch.setattr(tilelang, "compile", lambda *a, **k: pytest.fail("rebuilt on a new length"))
    for length in (5, 40, 90):
        q, k, v = torch.randn(1, 6, length, 16), torch.randn(1, 2, length, 16), torch.randn(1, 2, length, 8)
        check(gqa_op, q, k, v, sinks=torch.randn(6))
    assert gqa_op.kernel(torch.float32).compiled is compiled


def test_fully_masked_rows_give_zero_and_minus_infinity():
    spec = attnc.Attention(2, qk_dim=8, mask_mod=lambda b, h, q_idx, kv_idx: (q_idx % 3 != 0) & (kv_idx <= q_idx))
    op = attnc.compile(spec, target="cpu")
    q, k, v = (torch.randn(1, 10, 2, 8) for _ in range(3))
    out, lse = check(op, q, k, v)
    assert (out[:, ::3] == 0).all() and (lse[..., ::3] == -math.inf).all() and not out.isnan().any()


def test_empty_lengths():
    op = attnc.compile(attnc.Attention(2, qk_dim=8), target="cpu")
    out, lse = op(torch.randn(1, 4, 2, 8), torch.randn(1, 0, 2, 8), torch.randn(1, 0, 2, 8), return_lse=True)
    assert (out == 0).all() and (lse == -math.inf).all()
    out = op(torch.randn(1, 0, 2, 8), torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8))
    assert out.shape == (1, 0, 2, 8)


def test_captured_tensor_can_be_overridden_per_call():
    doc = torch.tensor([0] * 10 + [1] * 10)
    op = attnc.compile(attnc.Attention(2, qk_dim=8, mask_mod=attnc.mods.document(doc)), target="cpu")
    q, k, v = (torch.randn(1, 20, 2, 8) for _ in range(3))
    check(op, q, k, v)
    check(op, q, k, v, doc_ids=torch.randint(0, 4, (20,)).sort().values)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_traces_through_the_op(backend):
    spec = attnc.Attention(4, 2, qk_dim=16, mask_mod=attnc.mods.sliding_window(8),
                           score_mod=attnc.mods.relative_bias(torch.randn(4, 101)))
    op = attnc.compile(spec, target="cpu")
    fn = torch.compile(lambda q, k, v: op(q, k, v) * 2 + 1, fullgraph=True, backend=backend)
    for length in (24, 40):
        q, k, v = torch.randn(1, length, 4, 16), torch.randn(1, length, 2, 16), torch.randn(1, length, 2, 16)
        torch.testing.assert_close(fn(q, k, v), op(q, k, v) * 2 + 1)


def test_repr_shows_spec_key_and_config(gqa_op):
    gqa_op.kernel(torch.float32)
    text = repr(gqa_op)
    assert "Attention[softcap_4_causal]" in text and "target=cpu" in text
    assert "cpu_fwd_float32_d16_cpu_" in text and "config=m16n32s1t1" in text


def test_a_new_process_reuses_the_disk_cache(tmp_path):
    script = textwrap.dedent("""
        import time, torch, attnc
        import tilelang, torch._dynamo  # imports are process start-up, not compile time
        spec = attnc.Attention(2, qk_dim=8, mask_mod=attnc.mods.causal())
        start = time.perf_counter()
        op = attnc.compile(spec, target="cpu", dtype=torch.float32)
        q = torch.randn(1, 5, 2, 8)
        op(q, q, q)
        print(f"{time.perf_counter() - start:.3f}")
    """)
    env = {**__import__("os").environ, "ATTNC_CACHE_DIR": str(tmp_path)}
    first = float(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                 check=True).stdout.split()[-1])
    second = float(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                  check=True).stdout.split()[-1])
    assert list((tmp_path / "kernels").glob("cpu_fwd_*.py")) and (tmp_path / "tilelang").is_dir()
    assert second < 1.0 < first


def test_dtype_is_a_torch_dtype_or_its_name_and_a_wrong_one_is_named():
    spec = attnc.Attention(2, qk_dim=16)
    assert attnc.compile(spec, target="cpu", dtype="fp32").kernel(torch.float32).compiled is not None
    with pytest.raises(attnc.errors.UnsupportedError, match=r"dtype must be one of .*; got 'float64x'"):
        attnc.compile(spec, target="cpu", dtype="float64x")
    with pytest.raises(attnc.errors.InputError, match=r"dtype: the cpu target computes in float32; got torch.float64"):
        attnc.compile(spec, target="cpu", dtype=torch.float64)
    with pytest.raises(attnc.errors.InputError, match=r"dtype: the cuda target computes in bfloat16, float16; got "
                                                      r"torch.float32"):
        attnc.compile(attnc.Attention(2, qk_dim=64), target="cuda").build(torch.float32)


def test_target_auto_is_the_cpu_without_a_gpu_and_the_gpus_architecture_with_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert attnc.compile(attnc.Attention(4, qk_dim=16)).target.kind == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for capability, arch in (((9, 0), "sm_90a"), ((8, 6), "sm_80")):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *_, c=capability: c)
        target = attnc.compile(attnc.Attention(4, qk_dim=64)).target
        assert (target.kind, target.arch) == ("cuda", arch)
