"""The autotuner on the CPU target (small spaces), its timing helpers, dispatch from the database, `attnc tune`;
and, on a GPU, tuning a causal spec end to end."""

import io
import json
import logging
import textwrap

import pytest
import torch

import attnc
from attnc.errors import BuildError, InputError
from attnc.runtime.kernels import Kernel
from attnc.schedules import timing, tuner
from attnc.schedules.config import KernelConfig
from attnc.schedules.database import TuningDatabase
from attnc.schedules.tune_cli import parse_lengths

DEFAULT = KernelConfig(block_m=16, block_n=32, stages=1, threads=1)  # the CPU heuristic's
SMALL = KernelConfig(block_m=16, block_n=16, stages=1, threads=1)
WIDE = KernelConfig(block_m=32, block_n=32, stages=1, threads=1)
SPACE = [SMALL, DEFAULT, WIDE]
SPEC = attnc.Attention(2, qk_dim=16, v_dim=16, mask_mod=attnc.mods.causal(), name="tuner_causal")
QUIET = {"progress": False, "workers": 0, "reps": 3}


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """One kernel cache for the module: each config is built once, then loaded (~0.1 s)."""
    with pytest.MonkeyPatch.context() as patch:
        path = tmp_path_factory.mktemp("attnc_cache")
        patch.setenv("ATTNC_CACHE_DIR", str(path))
        yield path


def timed(result):
    return {c.config: c.ms for c in result.candidates if c.status == "timed"}


# --- timing --------------------------------------------------------------------------------------------------------

def test_measure_returns_positive_medians_over_rotating_buffers():
    seen = []
    sets = [(torch.randn(256, 256),) for _ in range(3)]
    result = timing.measure(lambda x: seen.append(id(x)) or x @ x, sets, device="cpu", warmup=2, reps=7)
    assert len(result.times_ms) == 7 and all(t > 0 for t in result.times_ms)
    assert 0 < result.min_ms <= result.median_ms
    assert len(set(seen)) == 3  # every buffer was used
    capped = timing.measure(lambda x: x @ x, sets, device="cpu", warmup=2, reps=1000, max_seconds=0.05)
    assert 3 <= len(capped.times_ms) < 1000
    assert timing.buffer_count(1 << 20, "cpu") == 2


def test_cuda_timing_queues_its_first_timed_run_behind_an_untimed_one(monkeypatch):
    """After the warm-up's sync the GPU is idle: a timed run enqueued then would also time the host launching it
    (per-run times on the H200: an attnc backward's first run of each round 0.7-1.2 ms slower). A run enqueued
    between the sync and the first event keeps the GPU busy while the timed ones are enqueued."""
    import contextlib

    log = []

    class Event:
        def __init__(self, enable_timing):
            pass

        def record(self):
            log.append("record")

        def elapsed_time(self, end):
            return 1.0

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: log.append("sync"))
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    result = timing.measure(lambda i: log.append(f"run {i}"), [(0,), (1,)], device="cuda", warmup=2, reps=3)
    assert result.times_ms == (1.0, 1.0, 1.0)
    last_sync = len(log) - 1 - log[::-1].index("sync", 1)  # the warm-up's (the final one waits for the events)
    assert log[last_sync + 1:last_sync + 3] == ["run 0", "record"]  # the lead run, then the first timed run
    assert log[last_sync + 2:] == ["record", "run 1", "record"] + ["record", "run 0", "record"] + \
        ["record", "run 1", "record", "sync"]


def test_unmasked_elements_and_flops():
    causal = attnc.Attention(2, qk_dim=16, mask_mod=attnc.mods.causal()).ir
    assert timing.unmasked_elements(causal, 3, 100, 100) == 3 * 2 * 100 * 101 // 2  # exact below SAMPLE_ROWS rows
    big = timing.unmasked_elements(causal, 1, 8192, 8192)  # sampled rows: O(rows * kv_len) work
    assert abs(big - 2 * 8192 * 8193 // 2) / big < 1e-3
    dense = attnc.Attention(2, qk_dim=16).ir
    assert timing.unmasked_elements(dense, 2, 10, 30) == 2 * 2 * 10 * 30
    per_head = attnc.Attention(2, qk_dim=16, mask_mod=lambda b, h, q_idx, kv_idx: h == 0).ir
    assert timing.unmasked_elements(per_head, 2, 10, 30) == 2 * 10 * 30
    assert timing.attention_flops(dense, 10) == 10 * (2 * 16 + 2 * 16)
    assert timing.attention_flops(dense, 10, backward=True) == 2.5 * 10 * 64
    assert timing.tflops(2e12, 1000.0) == pytest.approx(2.0)


def test_order_candidates_puts_the_default_first_then_the_nearest():
    far = KernelConfig(block_m=64, block_n=64, stages=1, threads=1)
    assert tuner.order_candidates([far, WIDE, DEFAULT, SMALL, WIDE], DEFAULT) == [DEFAULT, WIDE, SMALL, far]
    assert tuner.order_candidates([far, SMALL, WIDE], DEFAULT) == [DEFAULT, SMALL, WIDE, far]  # ties: given order


# --- the loop ------------------------------------------------------------------------------------------------------

def test_tune_records_the_fastest_valid_candidate_and_dispatch_uses_it(tmp_path):
    db_path = tmp_path / "tuning.sqlite"
    result = tuner.tune(SPEC, target="cpu", batch=1, q_len=48, configs=SPACE, workers=2, database=db_path,
                        progress=False, reps=3)  # workers=2: spawned build processes
    times = timed(result)
    assert set(times) == set(SPACE) and result.count("timed") == 3
    assert result.ms == min(times.values()) and times[result.best] == result.ms
    assert result.default == DEFAULT and result.default_ms == times[DEFAULT] and result.gain >= 1
    assert result.tflops > 0 and result.recorded and result.key.q_bucket == 64
    with TuningDatabase(db_path) as db:
        entry = db.get(result.key)
    assert entry.config == result.best and entry.ms == result.ms and entry.candidates == 3
    assert entry.tflops == pytest.approx(result.tflops)

    op = attnc.compile(SPEC, target="cpu", tune_options={"database": db_path})
    assert op.config_for(torch.float32, 1, 40, 40) == (result.best, "database")  # same bucket
    assert op.config_for(torch.float32, 1, 200, 200) == (DEFAULT, "heuristic")  # another bucket
    q, k, v = (torch.randn(1, 40, 2, 16) for _ in range(3))
    out = op(q, k, v)
    ref, _ = attnc.attention_reference(op.ir, q, k, v)
    assert (out.double() - ref).abs().max() <= 1e-4
    assert f"config={result.best.short()} (database)" in repr(op)
    assert (torch.float32, result.best) in op._kernels

    # A later tuning in this process reuses the build processes (their start, importing torch, costs seconds).
    pool = tuner._POOLS[2]
    other = attnc.Attention(2, qk_dim=16, mask_mod=attnc.mods.sliding_window(7), name="tuner_pool_reuse")
    again = tuner.tune(other, target="cpu", batch=1, q_len=48, configs=SPACE[:2], workers=2, database=db_path,
                       progress=False, reps=3)
    assert again.count("timed") == 2 and tuner._POOLS[2] is pool

    # A second compile with tune=True finds the entry and does not tune again.
    def no_tuning(*args, **kwargs):
        raise AssertionError("tuned although the database has an entry")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tuner, "tune", no_tuning)
        again = attnc.compile(SPEC, target="cpu", tune=True, tune_shapes=[(1, 48, 48)],
                              tune_options={"database": db_path})
    assert again.config_for(torch.float32, 1, 48, 48) == (result.best, "database")


def test_compile_tune_tunes_a_new_bucket_on_its_first_call(tmp_path):
    db_path = tmp_path / "tuning.sqlite"
    op = attnc.compile(SPEC, target="cpu", tune=True,
                       tune_options={"database": db_path, "configs": [SMALL], "progress": False, "workers": 0})
    q, k, v = (torch.randn(1, 20, 2, 16) for _ in range(3))
    out = op(q, k, v)
    config, source = op.config_for(torch.float32, 1, 20, 20)
    assert source == "database" and config in (SMALL, DEFAULT)
    ref, _ = attnc.attention_reference(op.ir, q, k, v)
    assert (out.double() - ref).abs().max() <= 1e-4
    with TuningDatabase(db_path) as db:
        assert len(db) == 1


def test_compile_tune_argument_errors(tmp_path):
    with pytest.raises(InputError, match="tune_options"):
        attnc.compile(SPEC, target="cpu", tune=True, tune_options={"budget": 3})
    with pytest.raises(InputError, match="not both"):
        attnc.compile(SPEC, target="cpu", tune=True, config=SMALL)
    with pytest.raises(InputError, match="tune=True"):
        attnc.compile(SPEC, target="cpu", tune_shapes=[(1, 16, 16)])
    with pytest.raises(InputError, match="triples"):
        attnc.compile(SPEC, target="cpu", tune=True, tune_shapes=[(1, 16)], tune_options={"database": tmp_path / "d"})
    op = attnc.compile(SPEC, target="cpu", config=WIDE)
    assert op.config_for(torch.float32, 1, 16, 16) == (WIDE, "explicit")


def test_a_candidate_that_fails_to_build_is_skipped_and_logged(tmp_path, monkeypatch, caplog):
    build = Kernel.build

    def broken(self):
        if self.config == WIDE:
            raise BuildError("simulated build failure")
        return build(self)

    monkeypatch.setattr(Kernel, "build", broken)
    with caplog.at_level(logging.WARNING, logger="attnc.schedules.tuner"):
        result = tuner.tune(SPEC, target="cpu", q_len=33, configs=SPACE, database=tmp_path / "t.sqlite", **QUIET)
    failed = [c for c in result.candidates if c.status == "build_failed"]
    assert [c.config for c in failed] == [WIDE] and "simulated build failure" in failed[0].error
    assert result.best != WIDE and set(timed(result)) == {SMALL, DEFAULT}
    assert "m32n32s1t1 skipped (build_failed)" in caplog.text


def test_a_candidate_that_computes_wrong_or_raises_is_never_chosen(tmp_path, monkeypatch, caplog):
    call = Kernel.__call__

    def faulty(self, *tensors):
        if self.config == DEFAULT:
            raise RuntimeError("simulated launch failure")
        call(self, *tensors)
        if self.config == SMALL:
            tensors[-2].add_(1.0)  # the output

    monkeypatch.setattr(Kernel, "__call__", faulty)
    with caplog.at_level(logging.WARNING, logger="attnc.schedules.tuner"):
        result = tuner.tune(SPEC, target="cpu", q_len=17, configs=SPACE, database=tmp_path / "t.sqlite", **QUIET)
    status = {c.config: c.status for c in result.candidates}
    assert status == {SMALL: "wrong", DEFAULT: "run_failed", WIDE: "timed"}
    assert result.best == WIDE and result.default_ms is None and result.gain is None
    assert "max abs error" in next(c.error for c in result.candidates if c.status == "wrong")
    assert "skipped (wrong)" in caplog.text and "skipped (run_failed)" in caplog.text


def test_no_usable_candidate_raises_and_records_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(Kernel, "__call__", lambda self, *tensors: None)  # writes nothing: NaN stays
    with pytest.raises(tuner.TuneError, match="no usable candidate"):
        tuner.tune(SPEC, target="cpu", q_len=20, configs=[SMALL, DEFAULT], database=tmp_path / "t.sqlite", **QUIET)
    with TuningDatabase(tmp_path / "t.sqlite") as db:
        assert len(db) == 0


def test_progress_bar_shows_built_timed_and_best(tmp_path):
    bar = io.StringIO()
    result = tuner.tune(SPEC, target="cpu", q_len=24, configs=[SMALL, DEFAULT], database=tmp_path / "t.sqlite",
                        progress=bar, workers=0, reps=3, record=False)
    text = bar.getvalue()
    assert "2/2" in text and "built 2" in text and "timed 2" in text and f"best {result.ms:.4f} ms" in text
    assert not result.recorded


def test_max_candidates_and_budget(tmp_path):
    result = tuner.tune(SPEC, target="cpu", q_len=30, configs=SPACE, max_candidates=1, database=tmp_path / "t",
                        **QUIET)
    assert [c.config for c in result.candidates] == [DEFAULT]
    # A tiny budget still times one candidate (the default, first), then stops.
    result = tuner.tune(SPEC, target="cpu", q_len=30, configs=SPACE, budget_s=1e-3, database=tmp_path / "t", **QUIET)
    assert result.best == DEFAULT and result.count("not_reached") == 2


# --- the command ---------------------------------------------------------------------------------------------------

def test_a_document_mask_is_checked_and_timed_with_its_block_mask(tmp_path):
    docs = torch.repeat_interleave(torch.arange(4), torch.tensor([10, 20, 5, 29])).to(torch.int32)
    spec = attnc.Attention(2, qk_dim=16, v_dim=16, mask_mod=attnc.mods.document(docs) & attnc.mods.causal())
    result = tuner.tune(spec, target="cpu", batch=1, q_len=64, configs=[SMALL, DEFAULT],
                        database=tmp_path / "tuning.sqlite", **QUIET)
    assert result.count("timed") == 2 and result.best in (SMALL, DEFAULT)


# --- the backward --------------------------------------------------------------------------------------------------

def backward_grads(op, q, k, v, g):
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    op(*leaves).backward(g)
    return [t.grad for t in leaves]


def test_tune_backward_checks_times_and_records_and_the_backward_dispatches_to_its_entry(tmp_path):
    from attnc.runtime import autograd

    db_path = tmp_path / "tuning.sqlite"
    result = tuner.tune(SPEC, target="cpu", batch=1, q_len=48, configs=[SMALL, WIDE], backward=True,
                        database=db_path, **QUIET)
    assert result.key.family == "cpu_bwd" and result.default == DEFAULT  # the backward heuristic's, timed first
    assert set(timed(result)) == set(SPACE) and result.count("timed") == 3 and result.recorded
    assert result.tflops > 0 and result.ms == min(timed(result).values())

    # Dispatch: the backward of a call in that bucket runs the entry's config (here forced to WIDE), the forward
    # keeps its own (no forward entry); the gradients are right.
    with TuningDatabase(db_path) as db:
        db.record(result.key, WIDE, result.ms / 10)
    op = attnc.compile(SPEC, target="cpu", tune_options={"database": db_path})
    assert op.backward_config_for(torch.float32, 1, 40, 40) == (WIDE, "database")
    assert op.backward_config_for(torch.float32, 1, 200, 200) == (DEFAULT, "heuristic")
    assert op.config_for(torch.float32, 1, 40, 40) == (DEFAULT, "heuristic")
    q, k, v, g = (torch.randn(1, 40, 2, 16, dtype=torch.float64) for _ in range(4))
    got = backward_grads(op, *(t.float() for t in (q, k, v, g)))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    attnc.attention_reference(op.ir, *leaves)[0].backward(g)
    for a, b in zip(got, leaves):
        assert (a.double() - b.grad).abs().max() <= 1e-4 * max(1.0, b.grad.abs().max().item())
    assert any(key[0] == op.op_id and key[-1] == WIDE for key in autograd._BACKWARDS)


def test_compile_tune_leaves_the_backward_to_its_database_entry_or_the_heuristic(tmp_path):
    db_path = tmp_path / "tuning.sqlite"  # the backward op runs with autograd off: no check reference, no tuning there
    op = attnc.compile(SPEC, target="cpu", tune=True,
                       tune_options={"database": db_path, "configs": [SMALL], "progress": False, "workers": 0})
    backward_grads(op, *(torch.randn(1, 20, 2, 16) for _ in range(4)))
    assert op.backward_config_for(torch.float32, 1, 20, 20) == (DEFAULT, "heuristic")
    with TuningDatabase(db_path) as db:
        assert [e.key.family for e in db.entries()] == ["cpu_fwd"]


def test_the_backward_harness_rejects_wrong_gradients():
    from attnc.runtime.autograd import backward_for
    from attnc.schedules.harness import BackwardHarness

    op = attnc.compile(SPEC, target="cpu")
    harness = BackwardHarness(op, torch.float32, 1, 40, 40, None, torch.device("cpu"), warmup=1, reps=2)
    backward = backward_for(op, torch.float32, (), config=SMALL).build()
    assert harness.verify(backward) is None

    class OffByOne:
        def run(self, *args):
            dq, dk, dv, *rest = backward.run(*args)
            return (dq, dk + 1, dv, *rest)

    assert harness.verify(OffByOne()).startswith("dk max abs error")
    assert harness.time(backward).median_ms > 0


def test_tune_command_tunes_the_backward(tmp_path, capsys):
    spec_file = tmp_path / "causal_spec.py"
    spec_file.write_text(textwrap.dedent("""
        import attnc
        spec = attnc.Attention(2, qk_dim=16, v_dim=16, mask_mod=attnc.mods.causal(), name="tuner_causal")
    """))
    db_path = tmp_path / "tuning.sqlite"
    status = tuner.tune_command([str(spec_file), "--target", "cpu", "--lengths", "40", "--batch", "1", "--backward",
                                 "--max-candidates", "1", "--workers", "0", "--database", str(db_path), "--quiet"])
    out = capsys.readouterr().out
    assert status == 0 and "tuning cpu_bwd" in out and "TFLOP/s" in out
    with TuningDatabase(db_path) as db:
        assert [e.key.family for e in db.entries()] == ["cpu_bwd"]


def test_parse_lengths():
    assert parse_lengths("1k,4k, 2k:8k,100") == [(1024, 1024), (4096, 4096), (2048, 8192), (100, 100)]
    for bad in ("", "0", "1x", "1:2:3", "-4"):
        with pytest.raises(InputError):
            parse_lengths(bad)


def test_tune_command_tunes_exports_and_imports(tmp_path, capsys):
    spec_file = tmp_path / "causal_spec.py"
    spec_file.write_text(textwrap.dedent("""
        import attnc
        spec = attnc.Attention(2, qk_dim=16, v_dim=16, mask_mod=attnc.mods.causal(), name="tuner_causal")
    """))
    first, second, exported = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "tuned.jsonl"
    # --max-candidates 2: the default and its nearest neighbour (SMALL), both already in the kernel cache.
    status = tuner.tune_command([str(spec_file), "--target", "cpu", "--lengths", "40", "--batch", "1",
                                 "--max-candidates", "2", "--workers", "0", "--database", str(first),
                                 "--export", str(exported), "--quiet"])
    out = capsys.readouterr().out
    assert status == 0 and "TFLOP/s" in out and "exported 1 entries" in out
    line = json.loads(exported.read_text())
    assert line["key"]["q_bucket"] == 64 and line["key"]["gpu"] == "cpu" and line["candidates"] == 2
    assert tuner.tune_command(["--database", str(second), "--import", str(exported)]) == 0
    assert "imported 1 entries" in capsys.readouterr().out
    with TuningDatabase(first) as a, TuningDatabase(second) as b:
        assert [e.to_json() for e in a.entries()] == [e.to_json() for e in b.entries()]

    assert tuner.tune_command(["--database", str(second)]) == 2  # nothing to do
    assert "needs a SPEC.py" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text("not json\n")
    assert tuner.tune_command(["--database", str(second), "--import", str(bad)]) == 2
    with pytest.raises(SystemExit):
        tuner.tune_command([str(spec_file), "--lengths", "abc"])


# --- on a GPU ------------------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_tuning_a_causal_spec_on_cuda_beats_or_matches_the_default(tmp_path):
    from attnc.codegen import render

    if not (render.TEMPLATE_DIR / render.template_name("fwd")).is_file():
        pytest.skip("no cuda forward template yet")
    spec = attnc.Attention(16, qk_dim=128, mask_mod=attnc.mods.causal(), name="tuner_gpu_causal")
    batch, length = 2, 2048
    result = tuner.tune(spec, target="cuda", dtype=torch.bfloat16, batch=batch, q_len=length, budget_s=120,
                        max_candidates=16, database=tmp_path / "t.sqlite", progress=False)
    assert result.count("timed") >= 1 and result.tflops > 0
    assert result.default_ms is not None and result.ms <= result.default_ms

    # Measured again, one after the other: the tuned config holds up against the default's (10% for noise).
    op = attnc.compile(spec, target="cuda")
    sets = [tuple(t.cuda() for t in (torch.randn(batch, length, 16, 128, dtype=torch.bfloat16) for _ in range(3)))
            for _ in range(4)]
    out, lse = torch.empty_like(sets[0][0]), torch.empty(batch, 16, length, device="cuda")
    times = {}
    for config in (result.default, result.best):
        kernel = op.kernel(torch.bfloat16, config).build()
        times[config] = timing.measure(lambda q, k, v, kernel=kernel: kernel(q, k, v, out, lse), sets).median_ms
    assert times[result.best] <= 1.1 * times[result.default]


@pytest.mark.gpu
def test_tuning_a_causal_backward_on_cuda_records_a_checked_config_the_backward_runs(tmp_path):
    spec = attnc.Attention(16, qk_dim=128, mask_mod=attnc.mods.causal(), name="tuner_gpu_causal_backward")
    db_path = tmp_path / "t.sqlite"
    result = tuner.tune(spec, target="cuda", dtype=torch.bfloat16, batch=2, q_len=2048, budget_s=120,
                        max_candidates=4, database=db_path, progress=False, backward=True)
    assert result.key.family == "bwd" and result.count("timed") >= 1 and result.tflops > 0
    assert result.default_ms is not None and result.ms <= result.default_ms
    op = attnc.compile(spec, target="cuda", tune_options={"database": db_path})
    assert op.backward_config_for(torch.bfloat16, 2, 2048, 2048) == (result.best, "database")
    q, k, v, g = (torch.randn(2, 2048, 16, 128, device="cuda").to(torch.bfloat16) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    op(*leaves).backward(g)
    assert all(t.grad is not None and torch.isfinite(t.grad.float()).all() for t in leaves)
