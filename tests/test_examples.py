"""The bundled examples: every spec in examples/specs and every FlexAttention mod in examples/flex_mods.py, built
for the CPU target and checked against float64 (fp32: max abs error <= 1e-4)."""

import ast
import importlib.util
from pathlib import Path

import pytest
import torch

import attnc
from attnc.cli import load_spec
from attnc.codegen.build import Target
from attnc.runtime.check import FP32_TOLERANCE, check_op, max_abs_error
from attnc.runtime.support import check_supported

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SPEC_FILES = sorted((EXAMPLES / "specs").glob("*.py"))
LENGTHS = [(1, 1), (17, 17), (128, 128), (129, 129), (17, 129), (129, 17), (1, 128)]


@pytest.fixture(scope="module")
def example_ops():
    """Each example loaded and compiled once for the module: ``ops(path) -> (SpecFile, op)``."""
    built = {}

    def get(path):
        if path not in built:
            loaded = load_spec(path)
            built[path] = loaded, attnc.compile(loaded.spec, target="cpu", dtype=torch.float32)
        return built[path]

    return get


def test_the_examples_are_all_there():
    names = {p.stem for p in SPEC_FILES}
    assert names >= {"causal_mha", "gqa_softcap", "sliding_window", "document_mask", "prefix_lm", "alibi", "sinks",
                     "relative_bias"}


@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_example_is_small_documented_and_served_by_the_cuda_template(path):
    docstring = ast.get_docstring(ast.parse(path.read_text()))
    assert docstring and "\n" not in docstring.strip(), "one-line module docstring"
    spec = load_spec(path).spec
    assert spec.ir.q_heads <= 8
    check_supported(spec.ir, Target("cuda", "sm_90a"))  # head dims the cuda forward template serves


@pytest.mark.parametrize("q_len, kv_len", LENGTHS)
@pytest.mark.parametrize("path", SPEC_FILES, ids=lambda p: p.stem)
def test_example_matches_the_reference(example_ops, path, q_len, kv_len):
    loaded, op = example_ops(path)
    result = check_op(op, batch=2, q_len=q_len, kv_len=kv_len, inputs=loaded.inputs(q_len, kv_len))
    assert result.tolerance == FP32_TOLERANCE == 1e-4
    assert result.passed, result


def test_document_mask_inputs_follow_the_lengths():
    loaded = load_spec(EXAMPLES / "specs" / "document_mask.py")
    made = loaded.inputs(40, 300, seed=3)
    assert set(made) == {t.name for t in loaded.spec.ir.inputs} == {"doc_ids"}
    assert made["doc_ids"].shape == (300,) and made["doc_ids"].dtype == torch.int32
    assert torch.equal(made["doc_ids"], loaded.inputs(40, 300, seed=3)["doc_ids"])
    assert made["doc_ids"].diff().ge(0).all() and made["doc_ids"].max() > 1


# --- FlexAttention's mods, unchanged ---------------------------------------------------------------------------

def _load_flex_mods():
    spec = importlib.util.spec_from_file_location("attnc_examples_flex_mods", EXAMPLES / "flex_mods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


flex = _load_flex_mods()
FLEX_LENGTHS = [(128, 128), (37, 100), (100, 37)]
FLEX_MODS = [(name, "mask") for name in flex.MASK_MODS] + [(name, "score") for name in flex.SCORE_MODS]


def _vmap_bhqkv(fn, prefix=()):
    """``fn`` over index tensors (b, h, q_idx, kv_idx) of shapes (B,), (H,), (Q,), (KV,), called on 0-d index
    tensors element by element, as FlexAttention evaluates mods (``bias[q_idx][kv_idx]`` works there and here)."""
    for dims in ((None, None, None, 0), (None, None, 0, None), (None, 0, None, None), (0, None, None, None)):
        fn = torch.vmap(fn, in_dims=prefix + dims, out_dims=0)
    return fn


def dense_flex_attention(q, k, v, score_mod=None, mask_mod=None):
    """Attention in float64 that calls the FlexAttention-style mods on every (b, h, q_idx, kv_idx) (bshd layout)."""
    q, k, v = (t.transpose(1, 2).to(torch.float64) for t in (q, k, v))
    batch, heads, q_len, dim = q.shape
    kv_len = k.shape[2]
    index = (torch.arange(batch), torch.arange(heads), torch.arange(q_len), torch.arange(kv_len))
    scores = q @ k.transpose(-1, -2) / dim ** 0.5
    if score_mod is not None:
        scores = _vmap_bhqkv(score_mod, prefix=(0,))(scores, *index).to(torch.float64)
    if mask_mod is not None:
        keep = _vmap_bhqkv(mask_mod)(*index).expand_as(scores)
        scores = scores.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1, keepdim=True)
    probs = torch.where(torch.isfinite(lse), torch.exp(scores - lse), torch.zeros_like(scores))
    return (probs @ v).transpose(1, 2)


@pytest.fixture(scope="module")
def flex_ops():
    built = {}

    def get(name, kind):
        if name not in built:
            fn = (flex.MASK_MODS if kind == "mask" else flex.SCORE_MODS)[name]
            spec = attnc.Attention(flex.HEADS, qk_dim=64, **{f"{kind}_mod": fn})
            built[name] = attnc.compile(spec, target="cpu", dtype=torch.float32)
        return built[name]

    return get


@pytest.mark.parametrize("q_len, kv_len", FLEX_LENGTHS)
@pytest.mark.parametrize("name, kind", FLEX_MODS)
def test_flex_attention_mod_works_unchanged(flex_ops, name, kind, q_len, kv_len):
    op = flex_ops(name, kind)
    q = torch.randn(2, q_len, flex.HEADS, 64)
    k, v = torch.randn(2, kv_len, flex.HEADS, 64), torch.randn(2, kv_len, flex.HEADS, 64)
    fn = (flex.MASK_MODS if kind == "mask" else flex.SCORE_MODS)[name]
    want = dense_flex_attention(q, k, v, **{f"{kind}_mod": fn})
    assert max_abs_error(op(q, k, v), want) <= FP32_TOLERANCE


def test_flex_mods_keep_their_flex_attention_names():
    spec = attnc.Attention(flex.HEADS, qk_dim=64, score_mod=flex.alibi, mask_mod=flex.document_causal_mask)
    assert {t.name for t in spec.ir.inputs} == {"alibi_bias", "document_id"}
    assert spec.name == "alibi_document_causal_mask"
