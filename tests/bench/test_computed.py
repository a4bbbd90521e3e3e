"""Computed score elements of a forward config (the tiles it visits), and the table against the dense figure."""

import json

import pytest
import torch

import attnc
from attnc.bench.computed import (
    DENSE_SHARE,
    computed_elements,
    computed_rows,
    main,
    markdown,
)
from attnc.schedules.timing import attention_flops, tflops


def test_a_causal_map_counts_the_in_bounds_elements_of_its_visited_tiles():
    """q = kv = 10 in 4 x 4 tiles: q tile 0 visits kv tile 0 (16), q tile 1 kv tiles 0-1 (2 x 16), the ragged q tile 2
    (2 rows) every kv tile (8 + 8 + 4)."""
    causal = attnc.Attention(3, mask_mod=attnc.mods.causal()).ir
    assert computed_elements(causal, 4, 4, 2, 10, 10, {}) == 68 * 2 * 3
    assert computed_elements(attnc.Attention(3).ir, 4, 4, 2, 10, 7, {}) == 70 * 2 * 3  # dense: every element


def test_a_tensor_mask_counts_its_non_empty_tiles():
    """Documents [0]*5 + [1]*5 in 4 x 4 tiles: the tiles holding both a q and a kv row of one document are visited:
    (0,0) (0,1) (1,0) (1,1) (1,2) (2,1) (2,2), 16 + 16 + 16 + 16 + 8 + 8 + 4."""
    doc_ids = torch.tensor([0] * 5 + [1] * 5)
    spec = attnc.Attention(2, mask_mod=attnc.mods.document(doc_ids))
    assert computed_elements(spec.ir, 4, 4, 3, 10, 10, spec.captured_tensors()) == 84 * 3 * 2


def test_rows_of_a_run_against_its_dense_case(tmp_path, capsys):
    results = [
        {"case": "non-causal d128 S4k", "peer": "attnc", "pass": "forward", "dim": 128, "seq": 4096,
         "unmasked": 4 * 32 * 4096 * 4096, "ms": 1.6, "config": "m128n160s2t256"},
        {"case": "causal d128 S4k", "peer": "attnc", "pass": "forward", "dim": 128, "seq": 4096,
         "unmasked": 4 * 32 * 4096 * 4097 // 2, "ms": 1.0, "config": "m128n128s2t256"},
        {"case": "causal d128 S4k", "peer": "flex", "pass": "forward", "dim": 128, "seq": 4096, "ms": 2.0},
    ]
    for r in results:
        r["tflops"] = tflops(attention_flops(attnc.Attention(32).ir, r.get("unmasked", 1)), r["ms"])
    rows = computed_rows(results)
    assert [r["case"] for r in rows] == ["non-causal d128 S4k", "causal d128 S4k"]
    dense, causal = rows
    assert dense["computed"] == dense["unmasked"] and dense["dense_share"] == pytest.approx(1.0)
    assert causal["computed"] == 4 * 32 * 528 * 128 * 128  # 32 x 33 / 2 tiles of 128 x 128
    assert causal["dense_share"] == pytest.approx(causal["computed_tflops"] / dense["tflops"])
    table = markdown(rows)
    assert f"target ≥ {DENSE_SHARE}" in table and "| causal d128 S4k | m128n128s2t256 | 1.031 |" in table
    path = tmp_path / "fwd.json"
    path.write_text(json.dumps(results))
    assert main([str(path)]) == 0 and "| non-causal d128 S4k | m128n160s2t256 | 1.000 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([str(tmp_path / "missing.json")])
    assert "results: no file" in capsys.readouterr().err


def test_a_forward_report_adds_the_table_and_the_json_the_figures(tmp_path):
    from attnc.bench import report

    results = [{"case": "causal d128 S4k", "peer": "attnc", "pass": "forward", "dim": 128, "seq": 4096,
                "unmasked": 4 * 32 * 4096 * 4097 // 2, "ms": 1.0, "tflops": 550.0, "config": "m128n128s2t256",
                "setup_ms": 1.0, "peak_mib": 1.0}]
    text = report.write(results, tmp_path, "fwd", "test")
    assert "### attnc over computed elements" in text and "| causal d128 S4k | m128n128s2t256 | 1.031 | 550 |" in text
    saved = json.loads((tmp_path / "fwd.json").read_text())[0]
    assert saved["computed"] == 4 * 32 * 528 * 128 * 128 and saved["dense_share"] is None  # no dense case in the run
