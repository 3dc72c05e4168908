"""The error type for mistakes a user can fix (bad config, missing data, corrupt checkpoint).

The CLI prints its message as one line on stderr and exits with code 2, without a traceback.
It subclasses ``ValueError`` so that library callers can catch both alike.
"""


class UserError(ValueError):
    """A problem with the user's input; the message says what is wrong and what is allowed."""


def one_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message, shortened, to quote inside a one-line UserError."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
