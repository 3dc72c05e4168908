"""The error type for mistakes a user can fix (bad config, missing data, corrupt checkpoint).

The CLI prints its message as one line on stderr and exits with code 2, without a traceback.
It subclasses ``ValueError`` so that library callers can catch both alike.
"""
from __future__ import annotations

from collections.abc import Sequence


class UserError(ValueError):
    """A problem with the user's input; the message says what is wrong and what is allowed."""


class ConfigError(UserError):
    """A config value is invalid; ``key`` (e.g. ``prune.levels``) and, for a conflict between
    fields, ``related`` keys say which, so the loader can name the file or override they came from."""

    def __init__(self, key: str, message: str, related: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.key = key
        self.related = tuple(related)


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened, to quote inside a one-line UserError."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
