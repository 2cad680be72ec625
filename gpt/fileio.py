"""Files that survive a crash (atomic replacement, flushed folders, hashes to check them), and
files read with a bound (never a device, a FIFO or more bytes than their purpose needs)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any, BinaryIO

from gpt.errors import first_line

MiB = 2**20
LOW_SPACE = 256 * MiB  # free bytes below which a failed write is taken for a full disk


def cache_folder() -> Path | None:
    """gpt's folder in the user's cache (the CPU's peak figures, built kernels): $GPT_CACHE_DIR,
    else $XDG_CACHE_HOME/gpt, else ~/.cache/gpt; None when there is no home folder for it."""
    if folder := os.environ.get("GPT_CACHE_DIR"):
        return Path(folder)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "gpt"
    try:
        return Path.home() / ".cache" / "gpt"
    except RuntimeError:  # no HOME and no password entry
        return None


def fsync_dir(path: Path) -> None:
    """Flush a folder's entries, so that a rename or a new file in it survives a power loss."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


PROC_STATUS = Path("/proc/self/status")  # Linux: holds the process's umask (since 4.7)


def new_file_mode() -> int:
    """The permissions `open()` gives a new file: 0o666 less the umask. For files that a library
    writes more narrowly (safetensors: 0o600, through a private temporary file).

    Read from /proc where it can be, because elsewhere reading the umask means setting it and
    back, which for an instant applies to files that other threads create.
    """
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o077)  # the narrowest, should another thread create a file meanwhile
    os.umask(umask)
    return 0o666 & ~umask


def write_atomic(path: Path, content: str | bytes) -> None:
    """Replace `path` with `content` so that readers see the old or the new content, never a mix.

    The content goes to a temporary file in the same folder, flushed to disk, renamed over `path`,
    and the folder flushed; a failure on the way removes the temporary file and keeps the old one.
    """
    data = content.encode("utf-8") if isinstance(content, str) else content
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json_atomic(path: Path, data: Any) -> None:
    """`write_atomic` of `data` as indented JSON."""
    write_atomic(path, json.dumps(data, indent=2))


def sha256_file(path: Path) -> str:
    """The hex sha256 of a regular file (`open_regular`), read in blocks so that memory stays
    small whatever its size."""
    digest = hashlib.sha256()
    with open_regular(path) as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


class NotAFileError(OSError):
    """A path to read that is not a regular file: a character device (/dev/zero), a FIFO or a
    socket, whose reading may block or never end. An OSError, so that every caller's message
    for a file it cannot read covers it: "cannot read X (a FIFO, not a regular file); ..."."""


class TooLargeError(OSError):
    """A file over the size limit of what it is read for (`limit`, in bytes)."""

    def __init__(self, path: str | Path, limit: int, purpose: str) -> None:
        why = f"over {size_text(limit)}, the limit for {purpose}"
        super().__init__(errno.EFBIG, why, str(path))
        self.limit = limit


FILE_KINDS = ((stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
              (stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"))


def open_regular(path: str | Path) -> BinaryIO:
    """`path` opened for reading in binary, refused unless it is a regular file.

    Opened without blocking (a FIFO would wait for a writer), then checked on the open file:
    a folder is an IsADirectoryError, a device, FIFO or socket a `NotAFileError`.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
        if not stat.S_ISREG(mode):
            kind = next((name for test, name in FILE_KINDS if test(mode)), "special file")
            raise NotAFileError(errno.EINVAL, f"a {kind}, not a regular file", str(path))
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path: str | Path, limit: int, purpose: str) -> bytes:
    """The bytes of a regular file of at most `limit` bytes: a `TooLargeError` (naming
    `purpose`, "a config file") past it, however large the file or fast it grows."""
    with open_regular(path) as f:
        if os.fstat(f.fileno()).st_size > limit:
            raise TooLargeError(path, limit, purpose)
        data = f.read(limit + 1)
    if len(data) > limit:
        raise TooLargeError(path, limit, purpose)
    return data


def read_text_bounded(path: str | Path, limit: int, purpose: str) -> str:
    """`read_bounded`, decoded as UTF-8 (a UnicodeDecodeError where it is not)."""
    return read_bounded(path, limit, purpose).decode("utf-8")


def read_stream_bounded(stream: Any, limit: int, purpose: str, name: str) -> bytes | str:
    """At most `limit` bytes (characters, from a text stream) of a stream such as stdin, read
    in blocks: a `TooLargeError` past it, rather than reading an endless stream until memory
    runs out."""
    blocks, size = [], 0
    while size <= limit and (block := stream.read(min(MiB, limit + 1 - size))):
        blocks.append(block)
        size += len(block)
    if size > limit:
        raise TooLargeError(name, limit, purpose)
    return type(blocks[0])().join(blocks) if blocks else b""


def size_text(n: int) -> str:
    """A limit in bytes as people write it: 4 KiB, 1 MiB, 256 MiB, 1,000 bytes."""
    for unit, scale in (("GiB", 2**30), ("MiB", MiB), ("KiB", 2**10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale:,} {unit}"
    return f"{n:,} bytes"


def write_failure(error: Exception, folder: Path) -> OSError | None:
    """The OSError behind a failed write into `folder`, or None if it was no write failure.
    safetensors and torch.save report a full disk in their own words ("I/O error", "unexpected
    pos"), without an errno: the free space on folder's disk tells a full one from another
    failure."""
    if isinstance(error, OSError):
        return error
    text = str(error)
    written = type(error).__name__ == "SafetensorError" or (
        isinstance(error, RuntimeError)
        and any(mark in text for mark in ("unexpected pos", "failed writing", "write failed"))
    )
    if not written:
        return None
    if code := re.search(r"os error (\d+)", text):  # safetensors quotes the OS's own error
        number = int(code.group(1))
        return OSError(number, os.strerror(number))
    try:
        full = shutil.disk_usage(folder).free < LOW_SPACE
    except OSError:
        full = False
    return OSError(errno.ENOSPC if full else errno.EIO, first_line(error, 80))
