"""The one exception type `gpt` raises for problems a user can fix."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class GPTError(Exception):
    """A user-facing error: the CLI prints its message on one line and exits with code 2.

    Messages name the problem and the fix (the key, the file, the allowed values).
    """


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of a third-party exception's message (its type if it has none), for
    one-line errors that wrap it."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__


@contextlib.contextmanager
def compile_errors(option: str) -> Iterator[None]:
    """torch.compile fails at the first call, not at `torch.compile(...)` (no C++ compiler, an
    op it cannot trace): one line naming the option that turned it on, not pages of traceback."""
    try:
        yield
    except Exception as e:
        from torch._dynamo.exc import TorchDynamoException

        if not isinstance(e, TorchDynamoException):
            raise
        raise GPTError(f"torch.compile failed ({first_line(e)}); run without {option}") from e
