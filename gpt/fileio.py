"""Files that survive a crash: atomic replacement, flushed folders, and hashes to check them."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any


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
    """The hex sha256 of a file, read in blocks so that memory stays small whatever its size."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()
