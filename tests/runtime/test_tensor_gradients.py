"""Captured-tensor gradients in torch (deterministic mode's path on cuda): equal to the reference's autograd over
several row chunks, in both layouts, with and without an lse gradient, without autograd (as inside the backward
custom op), and the same bits twice."""

import pytest
import torch

import attnc
from attnc import mods
from attnc.runtime import tensor_gradients as tg
from attnc.runtime.reference import attention_reference

TABLE = torch.randn(4, 2 * 40 - 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
SLOPES = torch.rand(4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
DOCS = torch.arange(40) // 13


def spec(layout: str) -> attnc.Attention:
    """GQA, sinks, a causal document mask (reads an integer tensor) and a score_mod reading two float tensors."""
    return attnc.Attention(4, 2, qk_dim=16, layout=layout, sinks=True,
                           mask_mod=mods.causal() & mods.document(DOCS),
                           score_mod=lambda s, b, h, q, kv: s + TABLE[h, q - kv + 39] * SLOPES[h])


def reference_gradients(ir, q, k, v, inputs, sinks, dout, dlse, names):
    leaves = {n: (t.clone().requires_grad_() if n in names else t) for n, t in inputs.items()}
    out, lse = attention_reference(ir, q, k, v, leaves, sinks)
    loss = (out * dout).sum() + ((torch.where(torch.isfinite(lse), lse, 0) * dlse).sum() if dlse is not None else 0)
    loss.backward()
    return out.detach(), lse.detach(), {n: leaves[n].grad for n in names}


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("with_dlse", [False, True], ids=["no_dlse", "dlse"])
def test_tensor_gradients_equal_the_references_over_several_chunks(monkeypatch, layout, with_dlse):
    ir = spec(layout).ir
    inputs = spec(layout).captured_tensors()
    names = [n for n, t in inputs.items() if t.is_floating_point()]
    assert sorted(names) == ["SLOPES", "TABLE"]
    generator = torch.Generator().manual_seed(2)
    batch, q_len, kv_len = 2, 33, 40
    shape = (lambda s, h: (batch, s, h, 16)) if layout == "bshd" else (lambda s, h: (batch, h, s, 16))
    q = torch.randn(shape(q_len, 4), dtype=torch.float64, generator=generator)
    k, v = (torch.randn(shape(kv_len, 2), dtype=torch.float64, generator=generator) for _ in range(2))
    sinks = torch.randn(4, dtype=torch.float64, generator=generator)
    dout = torch.randn(shape(q_len, 4), dtype=torch.float64, generator=generator)
    dlse = torch.randn(batch, 4, q_len, dtype=torch.float64, generator=generator) if with_dlse else None
    out, lse, want = reference_gradients(ir, q, k, v, inputs, sinks, dout, dlse, names)
    monkeypatch.setattr(tg, "CHUNK_ELEMENTS", batch * 4 * kv_len * 5)  # chunks of 5 rows: 7 chunks
    with torch.inference_mode():  # as inside the backward custom op: no autograd
        got = tg.tensor_gradients(ir, q, k, v, inputs, out, lse, dout, dlse, names)
    for name in names:
        assert got[name].shape == inputs[name].shape
        torch.testing.assert_close(got[name].double(), want[name], rtol=1e-4, atol=1e-4 * want[name].abs().max())
    again = tg.tensor_gradients(ir, q, k, v, inputs, out, lse, dout, dlse, names)
    assert all(torch.equal(got[n], again[n]) for n in names)


def test_tensor_gradients_leave_torchs_deterministic_setting_as_it_was():
    ir = spec("bshd").ir
    inputs = spec("bshd").captured_tensors()
    q, k, v = torch.randn(1, 5, 4, 16), torch.randn(1, 6, 2, 16), torch.randn(1, 6, 2, 16)
    out, lse = attention_reference(ir, q, k, v, inputs, None, dtype=torch.float32)
    assert not torch.are_deterministic_algorithms_enabled()
    tg.tensor_gradients(ir, q, k, v, inputs, out, lse, torch.randn_like(out), None, ["TABLE"])
    assert not torch.are_deterministic_algorithms_enabled()
