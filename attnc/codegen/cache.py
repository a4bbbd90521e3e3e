"""Where attnc keeps what it builds, and how entries are named and written.

Keys are derived, never chosen by a caller: a readable prefix and the first 16 hex digits of the sha256 of the
canonical JSON of everything the entry depends on. Writes are atomic (temp file, rename) under a file lock with a
second check, so concurrent processes never see half a file.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import tempfile
from pathlib import Path

from filelock import FileLock


def cache_dir() -> Path:
    """The directory every attnc cache lives under, created on first use.

    ``$ATTNC_CACHE_DIR`` when set and non-empty; else ``$XDG_CACHE_HOME/attnc`` when ``XDG_CACHE_HOME`` is an
    absolute path (the XDG spec ignores relative ones); else ``~/.cache/attnc``. Read from the environment each call.
    """
    explicit = os.environ.get("ATTNC_CACHE_DIR", "").strip()
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if explicit:
        path = Path(explicit).expanduser()
    elif xdg and os.path.isabs(xdg):
        path = Path(xdg) / "attnc"
    else:
        path = Path.home() / ".cache" / "attnc"
    path.mkdir(parents=True, exist_ok=True)
    return path


@functools.cache
def versions() -> tuple[str, str]:
    """(attnc's version, tilelang's version): every cache key and tuning key carries both, so an upgrade of either
    never reuses an old build or measurement. Read from package metadata (tilelang is not imported)."""
    from attnc import __version__

    try:
        tilelang = importlib.metadata.version("tilelang")
    except importlib.metadata.PackageNotFoundError:
        tilelang = "unknown"
    return __version__, tilelang


def derive_key(prefix: str, payload: dict) -> str:
    """``<prefix>_<sha256(canonical json)[:16]>``."""
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":"), default=str)
    return f"{prefix}_{hashlib.sha256(blob.encode()).hexdigest()[:16]}"


def write_atomic(path: Path, text: str) -> None:
    """Make ``path`` hold exactly ``text``; a concurrent writer of the same text is harmless."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if path.exists() and path.read_text() == text:
            return
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(text)
            os.replace(temp, path)
        except BaseException:
            if os.path.exists(temp):
                os.unlink(temp)
            raise
