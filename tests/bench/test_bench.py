"""The benchmark's arithmetic and reports, checked on the CPU (timing itself needs a GPU)."""

import itertools
import json
import sys

import torch

import attnc
from attnc.bench import report
from attnc.bench.cases import backward_cases, forward_cases
from attnc.schedules.timing import unmasked_elements


def test_unmasked_elements_counts_exactly():
    causal = attnc.Attention(2, mask_mod=attnc.mods.causal()).ir
    assert unmasked_elements(causal, 3, 100, 100, {}, sample_rows=None) == 3 * 2 * 100 * 101 // 2
    window = attnc.Attention(2, mask_mod=attnc.mods.sliding_window(10)).ir
    assert unmasked_elements(window, 1, 50, 50, {}, sample_rows=None) == 2 * (sum(range(1, 11)) + 40 * 10)
    assert unmasked_elements(attnc.Attention(4).ir, 2, 8, 16, {}) == 2 * 4 * 8 * 16
    doc = torch.tensor([0] * 3 + [1] * 5)
    documents = attnc.Attention(1, mask_mod=attnc.mods.document(doc)).ir
    assert unmasked_elements(documents, 1, 8, 8, {"doc_ids": doc}) == 9 + 25


def test_exact_count_of_a_long_causal_mask():
    causal = attnc.Attention(1, mask_mod=attnc.mods.causal()).ir
    assert unmasked_elements(causal, 1, 3000, 3000, {}, sample_rows=None) == 3000 * 3001 // 2


def test_the_cases_are_the_issues_list():
    """Dense causal and non-causal at 1k, 4k, 16k (head dim 128) and 4k (64), GQA 32/8, windows 1k and 4k, a document
    mask, prefix-LM, ALiBi, softcap 30 both ways; the backward adds a learned relative bias."""
    names = [c.name for c in forward_cases()]
    for seq in ("S1k", "S4k", "S16k"):
        assert {f"non-causal d128 {seq}", f"causal d128 {seq}"} <= set(names)
    assert {"non-causal d64 S4k", "causal d64 S4k", "causal d128 S4k GQA 32/8", "sliding window 1k S4k",
            "sliding window 4k S16k", "prefix-LM 1k S4k", "ALiBi, causal S4k", "softcap 30, causal S4k",
            "softcap 30, non-causal S4k"} <= set(names)
    assert any(n.startswith("document") for n in names)
    assert [c.name for c in backward_cases()] == names + ["relative bias, causal S4k"]
    assert all(c.seq == 4096 and c.dim == 128 for c in forward_cases(quick=True))


def test_cases_build_specs_and_flex_mods_that_agree():
    for case in forward_cases():
        spec = case.spec(torch.device("cpu"))
        assert spec.ir.q_heads == case.q_heads and spec.ir.qk_dim == case.dim
        mask = case.flex_mask(torch.device("cpu"))
        if mask is not None and case.seq <= 4096:
            q = torch.arange(256).view(-1, 1)
            kv = torch.arange(256).view(1, -1)
            flex = mask(0, 0, q, kv)
            ours = unmasked_elements(spec.ir, 1, 256, 256, spec.captured_tensors()) // case.q_heads
            assert int(flex.sum()) == ours, case.name


def test_cases_are_picked_by_the_starts_of_their_names_in_the_order_given():
    import pytest

    from attnc.bench.cases import cases_named

    cases = backward_cases()
    picked = cases_named("causal d128 S4k, non-causal d128", cases)
    assert [c.name for c in picked] == ["causal d128 S4k", "non-causal d128 S4k"]
    with pytest.raises(ValueError, match="no case's name starts with 'nope'; the cases: non-causal d128 S4k, "):
        cases_named("causal,nope", cases)


def test_report_writes_json_markdown_and_plot(tmp_path):
    rows = [
        {"case": "causal", "peer": "attnc", "tflops": 600.0, "setup_ms": 4200.0, "peak_mib": 2.0, "max_diff": 1e-3},
        {"case": "causal", "peer": "cudnn", "tflops": 560.0, "setup_ms": 0.0},
        {"case": "causal", "peer": "flex", "tflops": 340.0, "setup_ms": 3.0},
        {"case": "alibi", "peer": "cudnn", "error": "SDPA has no argument for this mask or score_mod"},
    ]
    text = report.write(rows, tmp_path, "fwd", "test")
    assert "| causal | 600 | 560 | 340 | 1.07× | 1.76× | 4.2 | 3.0 | 2 | 1.0e-03 |" in text
    assert "cudnn on alibi: SDPA has no argument" in text and report.CONVENTION in text
    assert json.loads((tmp_path / "fwd.json").read_text()) == rows
    assert (tmp_path / "fwd.png").stat().st_size > 1000


def test_report_of_a_backward_run_adds_a_forward_and_backward_table(tmp_path):
    rows = [
        {"case": "causal", "peer": "attnc", "tflops": 430.0, "ms": 3.1, "setup_ms": 300.0, "peak_mib": 640.0,
         "max_diff": 1e-2, "step_tflops": 470.0, "step_ms": 4.0, "step_peak_mib": 900.0},
        {"case": "causal", "peer": "cudnn", "tflops": 480.0, "ms": 2.8, "setup_ms": 0.0, "step_tflops": 500.0,
         "step_ms": 3.8, "step_peak_mib": 950.0},
        {"case": "relative bias", "peer": "flex", "error": "InductorError: out of resource"},
    ]
    text = report.write(rows, tmp_path, "bwd", "Backward, H200, bf16, medians of 20")
    alone, steps = text.split("### Forward + backward, H200, bf16, medians of 20")
    assert "| causal | 430 | 480 | — | 0.90× | — | 0.3 | — | 640 | 1.0e-02 |" in alone
    assert "| causal | 470 | 500 | — | 0.94× | — | 0.3 | — | 900 | 1.0e-02 |" in steps
    assert "flex on relative bias: InductorError" in steps
    assert report.training_steps([{"case": "causal", "peer": "attnc", "tflops": 600.0}]) == []


def test_report_of_a_tuned_run_shows_the_gain_the_configs_and_first_call(tmp_path):
    rows = [
        {"case": "causal", "peer": "attnc", "tflops": 630.0, "setup_ms": 200.0, "peak_mib": 2.0, "max_diff": 1e-3,
         "tune_s": 41.7, "tuned_config": "m128n176s2t256", "default_config": "m128n128s2t256",
         "first_call_s": 0.41, "one_time_imports_s": {"tilelang": 1.5, "torch._dynamo": 0.6}},
        {"case": "causal", "peer": "attnc_default", "tflops": 600.0, "setup_ms": 150.0, "peak_mib": 2.0},
        {"case": "causal", "peer": "cudnn", "tflops": 600.0, "setup_ms": 0.0},
    ]
    text = report.markdown(rows, "tuned")
    assert "| case | attnc | attnc default | cuDNN SDPA | attnc / cuDNN SDPA | tuned / default |" in text
    assert ("| causal | 630 | 600 | 600 | 1.05× | 1.05× | m128n128s2t256 → m128n176s2t256 | 42 | 0.41 | 0.2 |"
            in text)
    assert "`tilelang` 1.50 s, `torch._dynamo` 0.60 s" in text


def test_backward_cases_add_a_learned_relative_bias_shared_by_attnc_and_flex():
    from attnc.bench.cases import backward_cases

    case = backward_cases()[-1]
    (table,) = case.learned(torch.device("cpu"))
    assert table.requires_grad and table.shape == (32, 2 * case.seq - 1)
    assert case.spec(torch.device("cpu")).captured_tensors()["table"] is table
    score = case.flex_score(torch.device("cpu"))(torch.tensor(1.0), 0, 3, torch.tensor(5), torch.tensor(2))
    assert score.item() == (1.0 + table[3, 2 - 5 + case.seq - 1]).item()


def test_no_benchmark_script_shadows_a_standard_module():
    """A script runs with benchmarks/ first on sys.path: a file named like a standard module replaces it for every
    import (benchmarks/profile.py replaced `profile`, so torch._dynamo's `import cProfile` failed in the backward)."""
    from pathlib import Path

    scripts = {p.stem for p in (Path(__file__).resolve().parents[2] / "benchmarks").glob("*.py")}
    assert scripts and not scripts & set(sys.stdlib_module_names)


def _benchmark_script(name):
    """benchmarks/<name>.py as a module (the scripts are not a package)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_script", path)
    script = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = script  # its dataclasses look their module up
    spec.loader.exec_module(script)
    return script


def _refusal(script, argv, capsys) -> str:
    """What ``script.main(argv)`` printed to stderr as it exited (argparse's error)."""
    import pytest

    with pytest.raises(SystemExit):
        script.main(argv)
    return capsys.readouterr().err


def test_profile_script_names_a_wrong_case_and_a_missing_gpu(capsys):
    """benchmarks/profile_case.py (a peer's forward or backward run a few times, for ncu) rejects a case no quick
    case's name starts with, listing the cases, and says when there is no GPU to run on."""
    script = _benchmark_script("profile_case")
    err = _refusal(script, ["no such case", "attnc"], capsys)
    assert "case: no quick case's name starts with 'no such case'" in err and "'causal d128 S4k'" in err
    if not torch.cuda.is_available():
        err = _refusal(script, ["--backward", "causal d128", "attnc"], capsys)
        assert "the peers run on a GPU, and torch sees none" in err


def test_block_cost_fit_splits_main_kernel_time_into_fixed_and_per_tile_parts():
    """benchmarks/bwd_block_cost.py: main-kernel times on a line (with noise that cancels) give back the line's
    intercept and slope, divided over the grid's waves."""
    script = _benchmark_script("bwd_block_cost")
    tiles = [4, 8, 16, 32, 64]
    times = [32 * (3.0 + 2.5 * t) + noise for t, noise in zip(tiles, [1.0, -1.0, 0.0, 1.0, -1.0])]
    fixed, per_tile = script.fit_block_cost(tiles, times, waves=32)
    assert abs(fixed - 3.0) < 0.05 and abs(per_tile - 2.5) < 0.002


def test_block_cost_script_wants_two_lengths_and_a_gpu(capsys):
    script = _benchmark_script("bwd_block_cost")
    err = _refusal(script, ["--q-lens", "1024"], capsys)
    assert "--q-lens: a line needs at least two lengths; got '1024'" in err
    if not torch.cuda.is_available():
        assert "the backward's main kernel runs on a GPU, and torch sees none" in _refusal(script, [], capsys)


def test_power_stretch_reports_time_energy_clock_and_power_per_call():
    """benchmarks/bwd_power.py: a stretch of back-to-back calls reads as ms and joules per call, and the medians of
    the SM clock and power samples."""
    script = _benchmark_script("bwd_power")
    row = script.Stretch(calls=8, seconds=0.04, millijoules=32000, clocks_mhz=(1980, 1755, 1740, 1770),
                         watts=(450.0, 690.0, 700.0, 695.0)).row("attnc")
    assert row.startswith("attnc") and "5.000 ms/call" in row and "4.000 J/call" in row
    assert "SM clock median  1762 MHz (min 1740)" in row and "power median  692 W" in row


def test_power_script_names_a_wrong_case_a_wrong_peer_and_a_missing_gpu(capsys):
    script = _benchmark_script("bwd_power")
    err = _refusal(script, ["--cases", "no such case"], capsys)
    assert "--cases: no case's name starts with 'no such case'" in err and "relative bias" in err
    assert "--peers: unknown peer(s) ['nobody']" in _refusal(script, ["--peers", "attnc,nobody"], capsys)
    if not torch.cuda.is_available():
        assert "the backward runs on a GPU, and torch sees none" in _refusal(script, [], capsys)


def test_kernel_times_are_means_per_call_longest_first_with_names_cut():
    """benchmarks/bwd_kernels.py: each kernel's launches over the profiled calls, as µs per call."""
    script = _benchmark_script("bwd_kernels")
    long_name = "void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int, unsigned int)"
    launches = [("attnc_bwd_main_kernel", 900.0), ("attnc_bwd_pre_kernel", 70.0), (long_name, 110.0),
                ("attnc_bwd_main_kernel", 1100.0), ("attnc_bwd_pre_kernel", 66.0), (long_name, 106.0)]
    assert script.kernel_times(launches, calls=2) == [
        ("attnc_bwd_main_kernel", 1000.0), (long_name[:script.NAME_CHARS], 108.0), ("attnc_bwd_pre_kernel", 68.0)]


def test_kernels_script_names_a_wrong_case_a_wrong_peer_and_a_missing_gpu(capsys):
    script = _benchmark_script("bwd_kernels")
    err = _refusal(script, ["--cases", "no such case"], capsys)
    assert "--cases: no case's name starts with 'no such case'" in err and "document (8 docs)" in err
    assert "--peers: unknown peer(s) ['nobody']" in _refusal(script, ["--peers", "flex,nobody"], capsys)
    assert "--calls: at least one call is profiled; got 0" in _refusal(script, ["--calls", "0"], capsys)
    if not torch.cuda.is_available():
        assert "the backward runs on a GPU, and torch sees none" in _refusal(script, [], capsys)


def test_peers_are_named_by_a_comma_separated_list_and_an_unknown_one_is_refused():
    import pytest

    from attnc.bench.peers import PEERS, peers_named

    assert peers_named(" attnc, flex,") == ["attnc", "flex"]
    with pytest.raises(ValueError, match=r"unknown peer\(s\) \['sdpa'\]; known: " + ", ".join(PEERS)):
        peers_named("attnc,sdpa")


def test_peers_are_timed_in_interleaved_rounds_and_a_failing_one_is_reported():
    """Each round runs every function in turn (after a longer warm-up in the first): 10 runs in 4 rounds are 3, 3,
    2, 2, so neither peer owns a stretch of the run. A function that raises is returned as its exception, and the
    others keep their rounds."""
    from attnc.bench.run import timed_together
    calls = []

    def peer(name):
        return lambda i: calls.append(name)

    def broken(i):
        raise RuntimeError("no kernel for this shape")
    result = timed_together({"a": peer("a"), "b": peer("b"), "c": broken}, sets=2, repeats=10, device="cpu",
                            log=lambda text: None)
    assert isinstance(result["c"], RuntimeError)
    for name in "ab":
        timing, peak_mib = result[name]
        assert len(timing.times_ms) == 10 and peak_mib == 0.0
    blocks = [name for i, name in enumerate(calls) if i == 0 or calls[i - 1] != name]
    assert blocks == ["a", "b"] * 4
    assert [len(list(group)) for _, group in itertools.groupby(calls)] == [5 + 3, 5 + 3, 1 + 3, 1 + 3, 1 + 2, 1 + 2,
                                                                           1 + 2, 1 + 2]


def test_variants_script_renders_from_each_variants_directory_and_refuses_an_incomplete_one(tmp_path, monkeypatch,
                                                                                           capsys):
    """benchmarks/bwd_variants.py: a variant is "main" or a directory holding every template; inside
    ``templates(variant)`` attnc renders from it (the environment variable spawned builders inherit), and the
    variable is restored after."""
    from attnc.codegen import render

    script = _benchmark_script("bwd_variants")
    for template in render.TEMPLATE_DIR.iterdir():
        (tmp_path / template.name).write_text(template.read_text())
    assert script.check_variant("main") is None and script.check_variant(str(tmp_path)) is None
    monkeypatch.setenv(render.TEMPLATE_DIR_ENV, "/elsewhere")
    with script.templates(str(tmp_path)):
        assert render.template_dir() == str(tmp_path.resolve())
    with script.templates("main"):
        assert render.template_dir() == str(render.TEMPLATE_DIR)
    assert render.template_dir() == "/elsewhere"
    (tmp_path / "bwd.py.j2").unlink()
    assert "missing: bwd.py.j2" in script.check_variant(str(tmp_path))
    err = _refusal(script, ["main", str(tmp_path)], capsys)
    assert f"variants: {str(tmp_path)!r} is not a directory of every template (missing: bwd.py.j2)" in err
    assert "--cases: no case's name starts with 'nope'" in _refusal(script, ["main", "--cases", "nope"], capsys)
    if not torch.cuda.is_available():
        assert "the backward runs on a GPU, and torch sees none" in _refusal(script, ["main"], capsys)

