"""The one exception type `gpt` raises for problems a user can fix."""


class GPTError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2.

    Messages name the problem and the fix (the key, the file, the allowed values).
    """


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of a third-party exception's message (its type if it has none), for
    one-line errors that wrap it."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
