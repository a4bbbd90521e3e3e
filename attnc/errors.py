"""The errors attnc raises: one small hierarchy, so callers can catch all of attnc's with one class."""


class AttncError(Exception):
    """Base class of every error attnc raises on purpose."""


class SpecError(AttncError, ValueError):
    """An attention spec or one of its mods is malformed or uses an operation attnc cannot trace."""


class UnsupportedError(AttncError, NotImplementedError):
    """The spec or shape is valid but no template serves it on the chosen target."""


class InputError(AttncError, ValueError):
    """A tensor passed to a compiled op does not match what the spec expects."""


class BuildError(AttncError, RuntimeError):
    """Rendering or building a kernel failed; the message carries the source file to inspect."""


def one_line(error: BaseException) -> str:
    """``<type>: <message>`` with the message's lines joined: how a failure is reported in a log line or a result."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
