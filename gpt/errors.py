"""The one exception type `gpt` raises for problems a user can fix."""


class GPTError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2.

    Messages name the problem and the fix (the key, the file, the allowed values).
    """
