"""Schedules: config spaces, the resource model, default heuristics, the autotuner and its database."""

from attnc.schedules.config import KernelConfig

__all__ = ["KernelConfig"]
