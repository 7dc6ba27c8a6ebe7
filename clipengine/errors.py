"""The errors a user can cause and fix. The CLI prints their message as one line and exits non-zero,
so each message says what went wrong *and* what to do about it."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (or its type's name): what a one-line error can quote."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class ClipEngineError(Exception):
    """Base class: a problem with the user's input or environment, never a bug in clipengine."""


class IndexNotFound(ClipEngineError):
    pass


class IndexCorrupt(ClipEngineError):
    pass


class IndexLocked(ClipEngineError):
    pass


class ModelMismatch(ClipEngineError):
    pass


class ModelUnavailable(ClipEngineError):
    pass


class BadInput(ClipEngineError):
    pass


class FallbackNotice(UserWarning):
    """Something works, but more slowly than it could, and the user can fix that (the CLI prints it as a
    one-line note): e.g. a search that must load torch because the index's exported encoders are missing."""
