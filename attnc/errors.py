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
