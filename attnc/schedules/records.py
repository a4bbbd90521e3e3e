"""What the tuning database stores: the key of one tuned shape bucket (`TuningKey`, with `bucket` rounding
lengths) and the entry recorded for it (`TuningEntry`), with their JSON form for export and import."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields

from attnc.codegen.cache import versions
from attnc.errors import InputError
from attnc.schedules.config import KernelConfig

EXPORT_FORMAT = 1
"""The ``format`` field of every exported JSON line."""


def bucket(n: int, minimum: int = 16) -> int:
    """The shape bucket of a length: the next power of two at or above ``n``, and at least ``minimum``.

    ``bucket(1) == 16``, ``bucket(1000) == 1024``, ``bucket(1024) == 1024``, ``bucket(1025) == 2048``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InputError(f"a shape bucket needs a non-negative integer length, got {n!r}")
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 1:
        raise InputError(f"bucket's minimum must be a positive integer, got {minimum!r}")
    return max(minimum, 1 << max(0, n - 1).bit_length())


@dataclass(frozen=True)
class TuningKey:
    """What a tuned config is valid for.

    spec_key: the IR's hash (`AttentionIR.key`); family: the template family (``'fwd'``, ``'decode'``, …);
    gpu: the device name (``'NVIDIA H200'``, or ``'cpu'``); capability: the compute capability (``'9.0'``, or
    ``'cpu'``); dtype: the input dtype (``'bfloat16'``); q_bucket, kv_bucket: the query and key lengths' buckets;
    bh_bucket: the bucket of batch × q heads; attnc_version, tilelang_version: the versions that built the kernel.
    Use `TuningKey.make` to bucket raw lengths and fill in the versions.
    """

    spec_key: str
    family: str
    gpu: str
    capability: str
    dtype: str
    q_bucket: int
    kv_bucket: int
    bh_bucket: int
    attnc_version: str
    tilelang_version: str

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.endswith("_bucket"):
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    raise InputError(f"TuningKey.{f.name} must be a positive integer, got {value!r}")
            elif not isinstance(value, str) or not value:
                raise InputError(f"TuningKey.{f.name} must be a non-empty string, got {value!r}")

    @classmethod
    def make(
        cls,
        spec_key: str,
        family: str,
        *,
        gpu: str,
        capability: str,
        dtype: str,
        q_len: int,
        kv_len: int,
        batch_heads: int,
        attnc_version: str | None = None,
        tilelang_version: str | None = None,
    ) -> TuningKey:
        """A key from raw lengths (bucketed: lengths with `bucket`, batch × heads with ``bucket(n, minimum=1)``).

        The versions default to the installed ones (`versions`).
        """
        current_attnc, current_tilelang = versions()
        return cls(
            spec_key=spec_key,
            family=family,
            gpu=gpu,
            capability=capability,
            dtype=dtype,
            q_bucket=bucket(q_len),
            kv_bucket=bucket(kv_len),
            bh_bucket=bucket(batch_heads, minimum=1),
            attnc_version=attnc_version or current_attnc,
            tilelang_version=tilelang_version or current_tilelang,
        )

    def as_dict(self) -> dict:
        return asdict(self)

    def short(self) -> str:
        """A readable label: ``fwd/NVIDIA H200/bfloat16/q4096 kv4096 bh128/3f2a…``."""
        return (
            f"{self.family}/{self.gpu}/{self.dtype}/q{self.q_bucket} kv{self.kv_bucket} bh{self.bh_bucket}/"
            f"{self.spec_key[:12]}"
        )


KEY_COLUMNS = tuple(f.name for f in fields(TuningKey))


@dataclass(frozen=True)
class TuningEntry:
    """One row: the best config for ``key``, its median time (ms), its TFLOP/s, when it was measured (Unix time)
    and how many candidates the tuner tried."""

    key: TuningKey
    config: KernelConfig
    ms: float
    tflops: float | None = None
    timestamp: float = 0.0
    candidates: int | None = None

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": EXPORT_FORMAT,
                "key": self.key.as_dict(),
                "config": json.loads(self.config.to_json()),
                "ms": self.ms,
                "tflops": self.tflops,
                "timestamp": self.timestamp,
                "candidates": self.candidates,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> TuningEntry:
        """Parse one exported line; raises `InputError` saying what is wrong."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"not JSON ({exc.msg})") from None
        if not isinstance(data, dict):
            raise InputError("not a JSON object")
        if data.get("format") != EXPORT_FORMAT:
            raise InputError(f"format {data.get('format')!r}, expected {EXPORT_FORMAT}")
        key_data = data.get("key")
        if not isinstance(key_data, dict) or set(key_data) != set(KEY_COLUMNS):
            raise InputError(f"'key' must be an object with exactly the fields {', '.join(KEY_COLUMNS)}")
        key = TuningKey(**key_data)
        config = config_from_obj(data.get("config"))
        return cls(
            key=key,
            config=config,
            ms=check_ms(data.get("ms")),
            tflops=optional_number(data.get("tflops"), "tflops"),
            timestamp=optional_number(data.get("timestamp"), "timestamp") or 0.0,
            candidates=optional_count(data.get("candidates")),
        )


def config_from_obj(obj: object) -> KernelConfig:
    if not isinstance(obj, dict):
        raise InputError("'config' must be a JSON object")
    known = {f.name: f for f in fields(KernelConfig)}
    values = {}
    for name, value in obj.items():
        if name not in known:
            continue
        if name == "pack_gqa":
            if not isinstance(value, bool):
                raise InputError(f"config.pack_gqa must be true or false, got {value!r}")
        elif isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(f"config.{name} must be a positive integer, got {value!r}")
        values[name] = value
    return KernelConfig(**values)


def check_ms(ms: object) -> float:
    if isinstance(ms, bool) or not isinstance(ms, (int, float)) or not math.isfinite(ms) or ms <= 0:
        raise InputError(f"a measured time must be a finite number of milliseconds > 0, got {ms!r}")
    return float(ms)


def optional_number(value: object, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{name} must be a finite number or null, got {value!r}")
    return float(value)


def optional_count(value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InputError(f"candidates must be a non-negative integer or null, got {value!r}")
    return value
