"""The tuning database: the best config measured for each (spec, template, GPU, dtype, shape bucket, versions).

One sqlite3 file, by default ``cache_dir() / "tuning.sqlite"``. Later compiles read it instead of tuning;
``export``/``import_`` move entries between machines as JSON lines.

Safety rules:

- **Concurrent processes.** The file is in WAL mode with a ``busy_timeout``; every write is one short transaction
  (``BEGIN IMMEDIATE`` … ``COMMIT``), and "keep the faster" is a single ``INSERT … ON CONFLICT DO UPDATE … WHERE``
  statement, so two tuners racing on one key leave the faster result whatever the interleaving. Opening (the
  health check, any rebuild, the schema) happens under an exclusive lock on ``<name>.lock`` so that two processes
  never both move a file aside.
- **Corruption.** On open, a file that is not an sqlite database (bad header, garbage, truncated), that fails
  ``PRAGMA integrity_check``, or that sqlite reports as malformed later on, is never trusted: it is moved aside to
  ``<name>.corrupt-<timestamp>`` (with its ``-wal``/``-shm`` files) and rebuilt empty, with a logged warning.
- **Schema.** A ``meta`` table records ``SCHEMA_VERSION``; a file with another version, or without the expected
  tables and columns, is rebuilt empty in place (with a warning).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from attnc.codegen.cache import cache_dir
from attnc.errors import InputError
from attnc.schedules.config import KernelConfig
from attnc.schedules.records import (
    KEY_COLUMNS, TuningEntry, TuningKey, check_ms, config_from_obj, optional_count, optional_number,
)

try:  # POSIX advisory locks; elsewhere sqlite's own locking is all there is.
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
"""Bump when the table layout changes; a file with another version is rebuilt."""

BUSY_TIMEOUT_MS = 30_000
"""How long a writer waits for another process's transaction before giving up."""

def default_path() -> Path:
    """``cache_dir() / "tuning.sqlite"``."""
    return cache_dir() / "tuning.sqlite"


_TUNING_COLUMNS = (*KEY_COLUMNS, "config", "ms", "tflops", "timestamp", "candidates")

_SCHEMA = f"""
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE tuning (
    spec_key TEXT NOT NULL,
    family TEXT NOT NULL,
    gpu TEXT NOT NULL,
    capability TEXT NOT NULL,
    dtype TEXT NOT NULL,
    q_bucket INTEGER NOT NULL,
    kv_bucket INTEGER NOT NULL,
    bh_bucket INTEGER NOT NULL,
    attnc_version TEXT NOT NULL,
    tilelang_version TEXT NOT NULL,
    config TEXT NOT NULL,
    ms REAL NOT NULL,
    tflops REAL,
    timestamp REAL NOT NULL,
    candidates INTEGER,
    PRIMARY KEY ({", ".join(KEY_COLUMNS)})
);
INSERT INTO meta (key, value) VALUES ('schema_version', '{SCHEMA_VERSION}');
"""

_UPSERT = f"""
INSERT INTO tuning ({", ".join(_TUNING_COLUMNS)}) VALUES ({", ".join("?" for _ in _TUNING_COLUMNS)})
ON CONFLICT ({", ".join(KEY_COLUMNS)}) DO UPDATE SET
    config = excluded.config, ms = excluded.ms, tflops = excluded.tflops,
    timestamp = excluded.timestamp, candidates = excluded.candidates
WHERE excluded.ms < tuning.ms
"""

_KEY_WHERE = " AND ".join(f"{c} = ?" for c in KEY_COLUMNS)

# sqlite messages that mean the file cannot be trusted (as opposed to "database is locked").
_CORRUPT_MARKERS = ("malformed", "not a database", "corrupt", "no such table", "no such column", "disk i/o error")


class _CorruptDatabase(Exception):
    """Internal: the file failed a health check (the message says how)."""


class TuningDatabase:
    """The persistent store of tuned configs; see the module docstring for the safety rules.

    ``path`` defaults to `default_path` (``$ATTNC_CACHE_DIR/tuning.sqlite``); its directory is created. Use one
    instance per process (or thread); it is a context manager and closes its connection on exit.
    """

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn: sqlite3.Connection | None = None
        self._open()

    # -- public API -------------------------------------------------------------------------------------------

    def lookup(self, key: TuningKey) -> KernelConfig | None:
        """The best config recorded for ``key``, or None."""
        entry = self.get(key)
        return entry.config if entry is not None else None

    def get(self, key: TuningKey) -> TuningEntry | None:
        """The full entry for ``key`` (config, time, TFLOP/s, timestamp, candidates), or None.

        An entry whose stored config cannot be decoded is deleted (with a warning) and reported as absent.
        """
        rows = self._run(lambda c: c.execute(f"SELECT * FROM tuning WHERE {_KEY_WHERE}", _key_values(key)).fetchall())
        if not rows:
            return None
        try:
            return _entry_from_row(rows[0])
        except (InputError, ValueError, TypeError) as exc:
            log.warning("tuning database %s: dropping an unreadable entry for %s (%s)", self.path, key.short(), exc)
            self._write(lambda c: c.execute(f"DELETE FROM tuning WHERE {_KEY_WHERE}", _key_values(key)))
            return None

    def record(
        self,
        key: TuningKey,
        config: KernelConfig,
        ms: float,
        *,
        tflops: float | None = None,
        candidates: int | None = None,
        timestamp: float | None = None,
    ) -> bool:
        """Store ``config`` for ``key`` unless an entry at least as fast is already there; True when stored.

        ``ms`` is the measured time in milliseconds (finite, > 0); ``timestamp`` defaults to now.
        """
        entry = TuningEntry(
            key=key,
            config=config,
            ms=check_ms(ms),
            tflops=optional_number(tflops, "tflops"),
            timestamp=time.time() if timestamp is None else float(timestamp),
            candidates=optional_count(candidates),
        )
        return self._write(lambda c: c.execute(_UPSERT, _entry_values(entry)).rowcount) > 0

    def entries(self) -> list[TuningEntry]:
        """Every readable entry, ordered by key."""
        rows = self._run(lambda c: c.execute(f"SELECT * FROM tuning ORDER BY {', '.join(KEY_COLUMNS)}").fetchall())
        result = []
        for row in rows:
            try:
                result.append(_entry_from_row(row))
            except (InputError, ValueError, TypeError) as exc:
                log.warning("tuning database %s: skipping an unreadable entry (%s)", self.path, exc)
        return result

    def export(self, file: str | os.PathLike[str] | IO[str]) -> int:
        """Write every entry as JSON lines (one `TuningEntry.to_json` per line) to a path or text file; returns
        the number written. A path is written atomically (temporary file, then rename)."""
        lines = [e.to_json() + "\n" for e in self.entries()]
        if hasattr(file, "write"):
            file.writelines(lines)  # type: ignore[union-attr]
            return len(lines)
        target = Path(file)  # type: ignore[arg-type]
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            out.writelines(lines)
        os.replace(tmp, target)
        return len(lines)

    def import_(self, file: str | os.PathLike[str] | IO[str]) -> int:
        """Merge the JSON lines of ``file`` (a path or text file), keeping the faster entry per key; returns how
        many entries were added or replaced.

        Every line is validated before anything is written; a malformed line raises `InputError` naming the line
        and nothing is imported. Blank lines are skipped.
        """
        if hasattr(file, "read"):
            text = file.read()  # type: ignore[union-attr]
            name = getattr(file, "name", "<stream>")
        else:
            name = str(file)
            try:
                text = Path(file).read_text(encoding="utf-8")  # type: ignore[arg-type]
            except OSError as exc:
                raise InputError(f"cannot read tuning export {name!r}: {exc.strerror}") from None
            except UnicodeDecodeError:
                raise InputError(f"tuning export {name!r} is not UTF-8 text") from None
        parsed = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                parsed.append(TuningEntry.from_json(line))
            except InputError as exc:
                raise InputError(f"line {number} of {name} is not a tuning entry: {exc}") from None
        if not parsed:
            return 0

        def merge(conn: sqlite3.Connection) -> int:
            return sum(conn.execute(_UPSERT, _entry_values(e)).rowcount for e in parsed)

        return self._write(merge)

    def integrity_check(self) -> str:
        """``PRAGMA integrity_check``'s verdict (``'ok'`` for a healthy file)."""
        rows = self._run(lambda c: c.execute("PRAGMA integrity_check").fetchall())
        return "; ".join(str(r[0]) for r in rows)

    def __len__(self) -> int:
        return self._run(lambda c: c.execute("SELECT COUNT(*) FROM tuning").fetchone()[0])

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def __enter__(self) -> TuningDatabase:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"{len(self)} entries"
        return f"TuningDatabase({str(self.path)!r}, {state})"

    # -- opening, health, recovery ----------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
        except Exception:
            conn.close()
            raise
        return conn

    def _open(self) -> None:
        with self._open_lock():
            try:
                self._conn = self._connect()
                self._health_check(self._conn)
            except (_CorruptDatabase, sqlite3.DatabaseError) as exc:
                if isinstance(exc, sqlite3.OperationalError) and not _is_corruption(exc):
                    self.close()
                    raise
                self.close()
                self._move_aside(str(exc))
                self._conn = self._connect()
            self._ensure_schema(self._conn)

    @contextlib.contextmanager
    def _open_lock(self) -> Iterator[None]:
        if fcntl is None:  # pragma: no cover
            yield
            return
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _health_check(self, conn: sqlite3.Connection) -> None:
        # The file is never opened with open(): closing any descriptor of it would drop the POSIX locks sqlite
        # holds for this process's connections (sqlite's "how to corrupt" §2.2). sqlite itself rejects a bad
        # header ("file is not a database") when the connection first reads it.
        rows = conn.execute("PRAGMA integrity_check").fetchall()
        verdict = "; ".join(str(r[0]) for r in rows)
        if verdict != "ok":
            raise _CorruptDatabase(f"integrity_check failed: {verdict[:200]}")

    def _ensure_schema(self, conn: sqlite3.Connection) -> None:
        """Create the tables in a fresh file; rebuild them when the schema version or layout differs."""
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            problem = None
            if tables:
                problem = _schema_problem(conn, tables)
                if problem:
                    log.warning("tuning database %s: %s; rebuilding it empty", self.path, problem)
                    for (name,) in conn.execute(
                        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
                    ).fetchall():
                        conn.execute(f'DROP TABLE "{name}"')
            if not tables or problem:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _move_aside(self, why: str) -> None:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while target.exists():
            target = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{n}")
            n += 1
        if self.path.exists():
            os.replace(self.path, target)
        for suffix in ("-wal", "-shm", "-journal"):
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():
                os.replace(side, target.with_name(target.name + suffix))
        log.warning(
            "tuning database %s is corrupt (%s); moved it aside to %s and started an empty one",
            self.path,
            why,
            target,
        )

    # -- running statements -----------------------------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise InputError(f"the tuning database {self.path} is closed")
        return self._conn

    def _run(self, action):  # type: ignore[no-untyped-def]
        """Run a read; on corruption, rebuild and run it once more on the empty file."""
        try:
            return action(self._connection())
        except sqlite3.DatabaseError as exc:
            if not _is_corruption(exc):
                raise
            self._recover(exc)
            return action(self._connection())

    def _write(self, action):  # type: ignore[no-untyped-def]
        """Run ``action`` in one short ``BEGIN IMMEDIATE`` transaction; on corruption, rebuild and retry once."""

        def transaction(conn: sqlite3.Connection):  # type: ignore[no-untyped-def]
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = action(conn)
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return result

        return self._run(transaction)

    def _recover(self, exc: BaseException) -> None:
        log.warning("tuning database %s failed while in use (%s); rebuilding it", self.path, exc)
        self.close()
        with self._open_lock():
            # Another process may have rebuilt it already: check again before moving anything aside.
            conn = None
            try:
                conn = self._connect()
                self._health_check(conn)
            except (_CorruptDatabase, sqlite3.DatabaseError) as again:
                if isinstance(again, sqlite3.OperationalError) and not _is_corruption(again):
                    raise
                if conn is not None:
                    conn.close()
                    conn = None
                self._move_aside(str(again))
            finally:
                if conn is not None:
                    conn.close()
        self._open()


def _is_corruption(exc: BaseException) -> bool:
    if not isinstance(exc, sqlite3.DatabaseError):
        return False
    if not isinstance(exc, sqlite3.OperationalError):
        return True  # DatabaseError proper: "file is not a database", "database disk image is malformed"
    message = str(exc).lower()
    return any(marker in message for marker in _CORRUPT_MARKERS)


def _schema_problem(conn: sqlite3.Connection, tables: set[str]) -> str | None:
    if "meta" not in tables:
        return "no schema version (not an attnc tuning database)"
    try:
        row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError as exc:
        return f"unreadable meta table ({exc})"
    if row is None or row[0] != str(SCHEMA_VERSION):
        found = None if row is None else row[0]
        return f"schema version {found!r}, this attnc uses {SCHEMA_VERSION}"
    if "tuning" not in tables:
        return "no tuning table"
    columns = tuple(r[1] for r in conn.execute("PRAGMA table_info(tuning)"))
    if columns != _TUNING_COLUMNS:
        return f"unexpected tuning columns {columns}"
    return None


def _key_values(key: TuningKey) -> tuple:
    return tuple(getattr(key, c) for c in KEY_COLUMNS)


def _entry_values(entry: TuningEntry) -> tuple:
    return (
        *_key_values(entry.key),
        entry.config.to_json(),
        entry.ms,
        entry.tflops,
        entry.timestamp,
        entry.candidates,
    )


def _entry_from_row(row: tuple) -> TuningEntry:
    values = dict(zip(_TUNING_COLUMNS, row))
    key = TuningKey(**{c: values[c] for c in KEY_COLUMNS})
    config = config_from_obj(json.loads(values["config"]))
    return TuningEntry(
        key=key,
        config=config,
        ms=check_ms(values["ms"]),
        tflops=values["tflops"],
        timestamp=values["timestamp"],
        candidates=values["candidates"],
    )
