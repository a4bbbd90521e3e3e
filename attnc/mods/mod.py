"""`Mod`: a named score_mod or mask_mod; masks compose with ``&``, ``|`` and ``~``."""

from __future__ import annotations

from typing import Callable

from attnc.errors import SpecError


class Mod:
    """A callable with a name (``sliding_window_256``) and a kind ('mask' or 'score').

    A mask Mod is called as ``mod(b, h, q_idx, kv_idx)``, a score Mod as ``mod(score, b, h, q_idx, kv_idx)``,
    exactly like the plain functions FlexAttention takes.
    """

    def __init__(self, fn: Callable, name: str, kind: str, doc: str | None = None):
        if kind not in ("mask", "score"):
            raise SpecError(f"Mod kind must be 'mask' or 'score'; got {kind!r}")
        self.fn, self.name, self.kind = fn, name, kind
        self.__doc__ = doc or fn.__doc__

    def __call__(self, *args):
        return self.fn(*args)

    def __repr__(self):
        return f"<{self.kind}_mod {self.name}>"

    def _mask_operand(self, other: object, op: str) -> Mod:
        if self.kind != "mask" or not isinstance(other, Mod) or other.kind != "mask":
            raise SpecError(f"`{op}` combines two mask mods; got {self!r} and {other!r}")
        return other

    def __and__(self, other: Mod) -> Mod:
        other = self._mask_operand(other, "&")
        return Mod(lambda b, h, q, k: self.fn(b, h, q, k) & other.fn(b, h, q, k), f"{self.name}_and_{other.name}",
                   "mask", f"({self.__doc__}) and ({other.__doc__})")

    def __or__(self, other: Mod) -> Mod:
        other = self._mask_operand(other, "|")
        return Mod(lambda b, h, q, k: self.fn(b, h, q, k) | other.fn(b, h, q, k), f"{self.name}_or_{other.name}",
                   "mask", f"({self.__doc__}) or ({other.__doc__})")

    def __invert__(self) -> Mod:
        self._mask_operand(self, "~")
        return Mod(lambda b, h, q, k: ~self.fn(b, h, q, k), f"not_{self.name}", "mask", f"not ({self.__doc__})")


def mask_mod(name: str, doc: str):
    """Decorate a ``(b, h, q_idx, kv_idx)`` function into a named mask Mod."""
    return lambda fn: Mod(fn, name, "mask", doc)


def score_mod(name: str, doc: str):
    """Decorate a ``(score, b, h, q_idx, kv_idx)`` function into a named score Mod."""
    return lambda fn: Mod(fn, name, "score", doc)
