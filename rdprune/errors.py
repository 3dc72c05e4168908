"""The error type for mistakes a user can fix (bad config, missing data, corrupt checkpoint).

The CLI prints its message as one line on stderr and exits with code 2, without a traceback.
It subclasses ``ValueError`` so that library callers can catch both alike.
"""


class UserError(ValueError):
    """A problem with the user's input; the message says what is wrong and what is allowed."""
