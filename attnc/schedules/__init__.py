"""Schedules: config spaces, the resource model, default heuristics, the autotuner and its database."""

from attnc.schedules.config import KernelConfig

__all__ = ["KernelConfig", "TuneError", "TuneResult", "tune"]


def __getattr__(name: str):
    # The tuner pulls in torch and the runtime's reference: loaded on first use, not with the package.
    if name in ("TuneError", "TuneResult", "tune"):
        from attnc.schedules import tuner

        return getattr(tuner, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
