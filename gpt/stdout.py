"""Standard output that cannot be written (a full disk, `> /dev/full`, a reader that has gone)
ends any command in one place, instead of a traceback wherever the write happened to fail."""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TextIO


class _StdoutFailed(Exception):
    """A write to standard output failed. Not an OSError, so that nothing on the way up takes
    it for a failure of its own files (click ends a broken pipe itself, without a word)."""

    def __init__(self, error: OSError) -> None:
        super().__init__(error)
        self.error = error


class _Stdout:
    """sys.stdout, whose failed writes (a full disk, a closed pipe) raise `_StdoutFailed`;
    everything else passes through to the stream."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError as e:
            raise _StdoutFailed(e) from e

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError as e:
            raise _StdoutFailed(e) from e

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def failing_stdout_ends_here(debug: Callable[[], bool]) -> Iterator[None]:
    """Run a command whose failed standard output ends it here, exit code 1: a closed pipe
    (`gpt sample | head`) quietly, as Unix tools end; any other failure (`> /dev/full`, a full
    disk) with one line on stderr. With `debug()` true, the OSError goes up as it is."""
    if sys.stdout is not None:  # None: started without one (its descriptor closed)
        sys.stdout = _Stdout(sys.stdout)  # type: ignore[assignment]
    try:
        try:
            yield
        finally:  # what is still buffered fails here, not in the interpreter's flush at exit
            if sys.stdout is not None:
                sys.stdout.flush()
    except _StdoutFailed as failure:
        _discard_stdout()
        if debug():
            raise failure.error from None
        error = failure.error
        if error.errno != errno.EPIPE:  # a closed pipe: its reader wants no more, nor a word
            fix = ("free space on its disk, or redirect it elsewhere"
                   if error.errno in (errno.ENOSPC, errno.EDQUOT) else "redirect it elsewhere")
            with contextlib.suppress(OSError):
                sys.stderr.write(f"error: cannot write to standard output "
                                 f"({error.strerror or error}); {fix}\n")
                sys.stderr.flush()
        sys.exit(1)


def _discard_stdout() -> None:
    """Point standard output at the null device, so that the output still buffered goes
    nowhere instead of failing again when the interpreter flushes it at exit (which would
    print an "Exception ignored" message of its own): the remedy of Python's docs on SIGPIPE."""
    with contextlib.suppress(OSError, ValueError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
