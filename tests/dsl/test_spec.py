"""The Attention spec: defaults, validation, immutability, printing."""

import math

import pytest
import torch

import attnc
from attnc.errors import SpecError


def test_defaults():
    ir = attnc.Attention(8).ir
    assert (ir.q_heads, ir.kv_heads, ir.qk_dim, ir.v_dim, ir.layout, ir.sinks) == (8, 8, 128, 128, "bshd", False)
    assert ir.scale == pytest.approx(1 / math.sqrt(128))
    assert not ir.has_mask and not ir.has_score_mod and ir.group == 1


def test_gqa_group_and_separate_head_dims():
    ir = attnc.Attention(32, 8, qk_dim=192, v_dim=128, scale=0.1, layout="bhsd").ir
    assert (ir.group, ir.qk_dim, ir.v_dim, ir.scale, ir.layout) == (4, 192, 128, 0.1, "bhsd")


@pytest.mark.parametrize("kwargs, message", [
    ({"q_heads": 0}, "`q_heads` must be a positive int; got 0"),
    ({"q_heads": 8, "kv_heads": 3}, r"`q_heads` \(8\) must be a multiple of `kv_heads` \(3\)"),
    ({"q_heads": 8, "qk_dim": 64.0}, "`qk_dim` must be a positive int"),
    ({"q_heads": 8, "layout": "sbhd"}, "`layout` must be one of"),
    ({"q_heads": 8, "scale": float("inf")}, "`scale` must be a finite non-zero number"),
    ({"q_heads": 8, "score_mod": 3}, "`score_mod` must be callable"),
    ({"q_heads": 8, "inputs": [3]}, "must hold attnc.Input"),
    ({"q_heads": True}, "`q_heads` must be a positive int"),
])
def test_invalid_specs_name_the_argument(kwargs, message):
    with pytest.raises(SpecError, match=message):
        attnc.Attention(**kwargs)


def test_specs_are_immutable_and_print_readably():
    spec = attnc.Attention(8, 2, score_mod=attnc.mods.softcap(30), mask_mod=attnc.mods.causal(), sinks=True)
    with pytest.raises(AttributeError):
        spec.ir = None
    text = repr(spec)
    assert text.startswith("Attention[softcap_30_causal](q_heads=8, kv_heads=2")
    assert "tanh" in text and "sinks=True" in text
    assert "sinks: one logit per q head" in spec.ir.describe()


def test_input_declaration_validation():
    with pytest.raises(SpecError, match="identifier"):
        attnc.Input("not a name", (3,))
    with pytest.raises(SpecError, match="tuple of positive ints"):
        attnc.Input("t", [3])
    with pytest.raises(SpecError, match="dtype"):
        attnc.Input("t", (3,), torch.complex64)


def test_mods_are_named_factories_with_exact_docstrings():
    mods = attnc.mods
    assert mods.sliding_window(256).name == "sliding_window_256"
    assert "256 most recent keys" in mods.sliding_window(256).__doc__
    assert mods.prefix_lm(64).name == "prefix_lm_64" and mods.chunked(32).name == "chunked_32"
    combined = mods.causal() & ~mods.chunked(4) | mods.prefix_lm(2)
    assert combined.name == "causal_and_not_chunked_4_or_prefix_lm_2"
    with pytest.raises(SpecError, match="combines two mask mods"):
        mods.causal() & mods.softcap(3)
    with pytest.raises(SpecError, match="positive int"):
        mods.sliding_window(0)
    with pytest.raises(SpecError, match="1-D integer tensor"):
        mods.document(torch.rand(4))
