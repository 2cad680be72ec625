"""Exclusive folder locks: one training run per out_dir, one tokenizer writing a data_dir.

An `flock` on a file inside the folder; the OS releases it when the last process holding the
file open ends, however it ends. A child forked while the lock is held would hold it too (an
flock belongs to the open file, which a fork shares), so children close their copies at once
(`_forget_in_child`): a killed run never leaves a stale lock behind, even when it had worker
processes. The file names the holder (what it is, its pid and host) for the message the next
process shows, which names that pid only while it is alive. The file stays after release,
except where a holder removes the folder it created (a prepare that failed): a process that was
waiting on the removed file then sees that the file it locked is gone and locks the new one, so
it and a newcomer never both hold "the" lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from gpt.errors import GPTError

# How long a process refused the lock waits before trying once more: `holder` takes the lock
# shared for an instant to look, and a look must never turn a trainer away.
LOOK_GRACE_S = 0.1
RECORD = re.compile(r"^(?P<what>.*) \(pid (?P<pid>\d+) on (?P<host>.*)\)$")  # what the file says

_held: weakref.WeakSet[FolderLock] = weakref.WeakSet()  # the locks this process holds now


class FolderLock:
    """Hold `folder/name` exclusively, as `what` (say "gpt train"), until `release()`.

    `option` is the setting that names the folder, for the errors: a folder in use (with
    `wait=False`) or one that cannot be written. `wait=True` says once on stderr whom it waits
    for, then blocks until the holder is done.
    """

    def __init__(
        self, folder: Path, what: str, option: str, name: str = ".lock", wait: bool = False
    ) -> None:
        self.path = folder / name
        while True:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                self.file = open(self.path, "a+")
            except OSError as e:
                raise GPTError(
                    f"cannot write {folder} ({e.strerror}); set {option} to a folder you can write"
                ) from None
            try:
                self._lock_now()
            except BlockingIOError:
                self._wait_or_refuse(folder, what, option, wait)
            except OSError as e:  # a filesystem without flock (some network mounts): go on unlocked
                print(f"note: {folder} cannot be locked ({e.strerror}); nothing stops a second "
                      f"process from writing it at the same time", file=sys.stderr)
                break
            if self._still_in_place():
                break
            self.file.close()  # its holder removed it while we waited: lock the new file
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{what} (pid {os.getpid()} on {os.uname().nodename})")
        self.file.flush()
        _held.add(self)

    def _lock_now(self) -> None:
        """Lock without waiting, trying once more after LOOK_GRACE_S, since the holder may be
        a reader's instant look (`holder`) rather than a process that writes the folder."""
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            time.sleep(LOOK_GRACE_S)
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _wait_or_refuse(self, folder: Path, what: str, option: str, wait: bool) -> None:
        """The lock is held elsewhere: name the holder, then wait for it or refuse."""
        holder = _describe_holder(self.file, what)
        if not wait:
            self.file.close()
            raise GPTError(
                f"{folder} is in use by another {holder}; wait for it to finish, or set "
                f"{option} to another folder"
            )
        print(f"waiting for another {holder} to finish writing {folder}", file=sys.stderr)
        fcntl.flock(self.file, fcntl.LOCK_EX)

    def _still_in_place(self) -> bool:
        """Whether the file this process locked is still the one at `path`."""
        try:
            return os.path.samestat(os.fstat(self.file.fileno()), os.stat(self.path))
        except FileNotFoundError:
            return False

    def release(self) -> None:
        _held.discard(self)
        with contextlib.suppress(OSError):  # never locked, on a filesystem without flock
            fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def holder(folder: Path, name: str = ".lock") -> str | None:
    """Who holds `folder/name` now, as its file names them ("gpt train (pid 12 on host)"), or
    None when no one does (or it cannot be told: an unreadable file, no flock).

    It never creates the file and never waits: it takes the lock shared and releases it at once,
    and a `FolderLock` asked for in that instant tries again before refusing.
    """
    try:
        file = open(folder / name)
    except OSError:  # no file: never locked
        return None
    with file:
        try:
            fcntl.flock(file, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _describe_holder(file, "process")
        except OSError:
            return None
        fcntl.flock(file, fcntl.LOCK_UN)
    return None


def _describe_holder(file: Any, what: str) -> str:
    """Who holds the lock on `file`, for a message: what its file records ("gpt train (pid 12
    on host)") when that process is alive or on another host (where it cannot be checked);
    else the live processes found holding it, or none by pid: a pid is named only while it can
    be the holder."""
    file.seek(0)
    recorded = file.read(1024).strip()
    match = RECORD.match(recorded)
    if match is None:
        return recorded or what
    if match["host"] != os.uname().nodename or _alive(int(match["pid"])):
        return recorded
    holders = _processes_holding(file)
    if holders:
        pids = ", ".join(map(str, holders))
        return (f"process (pid {pids}, left running by a {match['what']} that has exited; stop "
                "it)")
    return f"process (the {match['what']} that took the lock has exited)"


def _alive(pid: int) -> bool:
    """Whether a process `pid` exists (one of another user's too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, but is not ours to signal
        return True
    return True


def _processes_holding(file: Any) -> list[int]:
    """The processes whose open files hold an flock on `file`'s inode, from /proc (Linux; the
    processes this user may look into); [] where that cannot be told."""
    held = os.fstat(file.fileno())
    device = f"{os.major(held.st_dev):02x}:{os.minor(held.st_dev):02x}:{held.st_ino}"
    found = set()
    for fdinfo in Path("/proc").glob("[0-9]*/fdinfo/*"):
        try:
            text = fdinfo.read_text()
        except OSError:  # gone, or another user's
            continue
        if any(line.startswith("lock:") and f" {device} " in line for line in text.splitlines()):
            found.add(int(fdinfo.parts[2]))
    found.discard(os.getpid())
    return sorted(found)


def _forget_in_child() -> None:
    """In a child just forked (a tokenizer worker): close its copies of the parent's lock files,
    so that it never holds the parent's locks, nor keeps them held after the parent is killed."""
    for lock in list(_held):
        with contextlib.suppress(OSError):
            lock.file.close()
    _held.clear()


if hasattr(os, "register_at_fork"):  # every POSIX Python; Windows has no fork
    os.register_at_fork(after_in_child=_forget_in_child)
