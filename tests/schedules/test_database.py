"""The tuning database: round trip, best-kept, export/import, concurrency, corruption, schema, cache dir."""

import json
import logging
import multiprocessing
import sqlite3
from pathlib import Path

import pytest

from attnc.errors import InputError
from attnc.schedules.config import KernelConfig
from attnc.codegen.cache import cache_dir, versions
from attnc.schedules.database import SCHEMA_VERSION, TuningDatabase, default_path
from attnc.schedules.records import TuningEntry, TuningKey, bucket

A = KernelConfig(block_m=128, block_n=128, stages=2, threads=256)
B = KernelConfig(block_m=192, block_n=128, stages=2, threads=384)
C = KernelConfig(block_m=64, block_n=64, stages=1, threads=128, pack_gqa=True, split=4)


def key(q_len: int = 4096, spec: str = "a" * 64, family: str = "fwd", batch_heads: int = 128) -> TuningKey:
    return TuningKey.make(
        spec,
        family,
        gpu="NVIDIA H200",
        capability="9.0",
        dtype="bfloat16",
        q_len=q_len,
        kv_len=q_len,
        batch_heads=batch_heads,
        attnc_version="0.1.0",
        tilelang_version="0.1.15",
    )


@pytest.fixture
def db(tmp_path):
    with TuningDatabase(tmp_path / "tuning.sqlite") as database:
        yield database


def test_bucket():
    assert [bucket(n) for n in (0, 1, 16, 17, 1000, 1024, 1025)] == [16, 16, 16, 32, 1024, 1024, 2048]
    assert bucket(3, minimum=1) == 4 and bucket(1, minimum=1) == 1
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(InputError):
            bucket(bad)


def test_key_make_buckets_and_versions():
    k = TuningKey.make("s" * 64, "fwd", gpu="cpu", capability="cpu", dtype="float32", q_len=1000, kv_len=5000,
                       batch_heads=24)
    assert (k.q_bucket, k.kv_bucket, k.bh_bucket) == (1024, 8192, 32)
    assert (k.attnc_version, k.tilelang_version) == versions()
    assert versions()[1] == "0.1.15"
    with pytest.raises(InputError, match="q_bucket"):
        TuningKey("s", "fwd", "g", "9.0", "bf16", 0, 16, 16, "1", "1")
    with pytest.raises(InputError, match="gpu"):
        TuningKey("s", "fwd", "", "9.0", "bf16", 16, 16, 16, "1", "1")


def test_round_trip_and_persistence(tmp_path):
    path = tmp_path / "tuning.sqlite"
    with TuningDatabase(path) as database:
        assert database.lookup(key()) is None
        assert database.record(key(), C, 0.5, tflops=612.5, candidates=40, timestamp=123.0)
        assert database.lookup(key()) == C
        assert database.lookup(key(q_len=8192)) is None  # another bucket
        assert database.lookup(key(spec="b" * 64)) is None  # another spec
    with TuningDatabase(path) as database:
        entry = database.get(key())
        assert entry == TuningEntry(key(), C, 0.5, tflops=612.5, timestamp=123.0, candidates=40)
        assert len(database) == 1 and database.entries() == [entry]
        assert database.integrity_check() == "ok"
        with sqlite3.connect(path) as raw:
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_same_bucket_shares_an_entry(db):
    db.record(key(q_len=3000), A, 1.0)
    assert db.lookup(key(q_len=4096)) == A
    assert db.lookup(key(q_len=2048)) is None


def test_best_is_kept(db):
    assert db.record(key(), A, 2.0)
    assert not db.record(key(), B, 3.0)  # slower: ignored
    assert not db.record(key(), B, 2.0)  # a tie keeps the first
    assert db.lookup(key()) == A
    assert db.record(key(), B, 1.5, tflops=700.0)  # faster: replaces
    entry = db.get(key())
    assert (entry.config, entry.ms, entry.tflops) == (B, 1.5, 700.0)
    assert len(db) == 1


def test_record_rejects_bad_times(db):
    for bad in (float("nan"), float("inf"), 0.0, -1.0):
        with pytest.raises(InputError, match="milliseconds"):
            db.record(key(), A, bad)
    assert len(db) == 0


def test_export_import_between_databases(tmp_path):
    src_path, dst_path, file = tmp_path / "a.sqlite", tmp_path / "b.sqlite", tmp_path / "export.jsonl"
    with TuningDatabase(src_path) as src, TuningDatabase(dst_path) as dst:
        src.record(key(1024), A, 1.0, tflops=400.0, candidates=12)
        src.record(key(2048), A, 2.0)
        src.record(key(4096), A, 4.0)
        dst.record(key(2048), B, 1.0)  # faster than the export's
        dst.record(key(4096), B, 9.0)  # slower than the export's
        dst.record(key(8192), B, 8.0)  # only here
        assert src.export(file) == 3
        lines = file.read_text().splitlines()
        assert len(lines) == 3 and all(json.loads(line)["format"] == 1 for line in lines)
        assert dst.import_(file) == 2  # 1024 added, 4096 replaced
        assert {e.key.q_bucket: (e.config, e.ms) for e in dst.entries()} == {
            1024: (A, 1.0), 2048: (B, 1.0), 4096: (A, 4.0), 8192: (B, 8.0)
        }
        assert dst.get(key(1024)).candidates == 12 and dst.get(key(1024)).tflops == 400.0
        assert dst.import_(file) == 0  # idempotent


def test_import_rejects_malformed_lines_atomically(db, tmp_path):
    good = TuningEntry(key(), A, 1.0, timestamp=1.0).to_json()
    bad = json.loads(good)
    bad["config"]["block_m"] = -4
    file = tmp_path / "bad.jsonl"
    file.write_text(good + "\n\n" + json.dumps(bad) + "\n")
    with pytest.raises(InputError, match="line 3 .*block_m"):
        db.import_(file)
    assert len(db) == 0
    file.write_text("not json\n")
    with pytest.raises(InputError, match="line 1"):
        db.import_(file)
    with pytest.raises(InputError, match="cannot read"):
        db.import_(tmp_path / "missing.jsonl")


def _writer(path: str, worker: int, count: int, start) -> None:
    start.wait()
    database = TuningDatabase(path)
    for i in range(count):
        if i % 10 == 9:  # reopen now and then: opening (health check, schema) races with the other writers
            database.close()
            database = TuningDatabase(path)
        database.record(key(spec=f"{worker:02d}{i:062d}"), A, 1.0 + i)
        database.record(key(spec="shared" + "0" * 58), B, 10.0 + worker * count + i)
        database.lookup(key(spec=f"{(worker + 1) % 4:02d}{i:062d}"))
    database.close()


def test_concurrent_writers(tmp_path):
    path = tmp_path / "tuning.sqlite"
    TuningDatabase(path).close()
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(str(path), w, 50, start)) for w in range(4)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with TuningDatabase(path) as database:
        assert database.integrity_check() == "ok"
        assert len(database) == 4 * 50 + 1
        assert database.get(key(spec="shared" + "0" * 58)).ms == 10.0  # the fastest of all 200 attempts
        assert database.get(key(spec=f"{3:02d}{49:062d}")).ms == 50.0
    assert _corrupt_files(path) == []  # nothing was ever found corrupt and moved aside


def _corrupt_files(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".corrupt-*"))


def test_garbage_file_is_moved_aside_and_rebuilt(tmp_path, caplog):
    path = tmp_path / "tuning.sqlite"
    garbage = bytes(range(256)) * 64
    path.write_bytes(garbage)
    with caplog.at_level(logging.WARNING, logger="attnc.schedules.database"):
        with TuningDatabase(path) as database:
            assert len(database) == 0
            assert database.record(key(), A, 1.0)
            assert database.lookup(key()) == A
    assert any("corrupt" in r.message and "moved it aside" in r.message for r in caplog.records)
    aside = _corrupt_files(path)
    assert len(aside) == 1 and aside[0].read_bytes() == garbage


def test_truncated_file_is_moved_aside_and_rebuilt(tmp_path, caplog):
    path = tmp_path / "tuning.sqlite"
    with TuningDatabase(path) as database:
        for n in range(4, 14):
            database.record(key(1 << n, batch_heads=n), A, 1.0)
        for i in range(100):
            database.record(key(spec=f"{i:064d}"), B, 1.0)
    size = path.stat().st_size
    assert size > 8192
    with open(path, "r+b") as f:
        f.truncate(size // 2)
    with caplog.at_level(logging.WARNING, logger="attnc.schedules.database"):
        with TuningDatabase(path) as database:
            assert len(database) == 0
            assert database.integrity_check() == "ok"
    assert len(_corrupt_files(path)) == 1
    assert any("moved it aside" in r.message for r in caplog.records)


def test_corruption_found_in_use_is_recovered(db):
    db.record(key(), A, 1.0)
    with sqlite3.connect(db.path) as raw:
        raw.execute("DROP TABLE tuning")
    assert db.lookup(key()) is None
    assert db.record(key(), B, 2.0)
    assert db.lookup(key()) == B


def test_schema_mismatch_rebuilds(tmp_path, caplog):
    path = tmp_path / "tuning.sqlite"
    with TuningDatabase(path) as database:
        database.record(key(), A, 1.0)
    raw = sqlite3.connect(path)
    raw.execute("UPDATE meta SET value = '0' WHERE key = 'schema_version'")
    raw.commit()
    raw.close()
    with caplog.at_level(logging.WARNING, logger="attnc.schedules.database"):
        with TuningDatabase(path) as database:
            assert len(database) == 0
            database.record(key(), B, 1.0)
    assert any("schema version '0'" in r.message for r in caplog.records)
    raw = sqlite3.connect(path)
    assert raw.execute("SELECT value FROM meta").fetchone()[0] == str(SCHEMA_VERSION)
    raw.close()
    assert _corrupt_files(path) == []  # a valid file of another version is not "corrupt"


def test_foreign_sqlite_file_rebuilds(tmp_path):
    path = tmp_path / "tuning.sqlite"
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE tuning (x INTEGER)")
    raw.commit()
    raw.close()
    with TuningDatabase(path) as database:
        assert len(database) == 0
        assert database.record(key(), A, 1.0)


def test_cache_dir_respects_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "explicit"
    assert default_path() == tmp_path / "explicit" / "tuning.sqlite"
    with TuningDatabase() as database:
        assert database.path == tmp_path / "explicit" / "tuning.sqlite"
        database.record(key(), A, 1.0)
    assert (tmp_path / "explicit" / "tuning.sqlite").exists()
    monkeypatch.setenv("ATTNC_CACHE_DIR", "")
    assert cache_dir() == tmp_path / "xdg" / "attnc"
    monkeypatch.delenv("ATTNC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # not absolute: ignored, as the XDG spec says
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "attnc"


def test_closed_database_says_so(tmp_path):
    database = TuningDatabase(tmp_path / "t.sqlite")
    database.close()
    with pytest.raises(InputError, match="closed"):
        database.lookup(key())
    assert "closed" in repr(database)
