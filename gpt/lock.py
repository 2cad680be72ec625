"""Exclusive folder locks: one training run per out_dir, one tokenizer writing a data_dir.

An `flock` on a file inside the folder; the OS releases it when the process ends, however it
ends, so a killed run never leaves a stale lock behind. The file names the holder (what it is,
its pid and host) for the message the next process shows. It stays after release, except where
a holder removes the folder it created (a prepare that failed): a process that was waiting on
the removed file then sees that the file it locked is gone and locks the new one, so it and a
newcomer never both hold "the" lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from pathlib import Path

from gpt.errors import GPTError

# How long a process refused the lock waits before trying once more: `holder` takes the lock
# shared for an instant to look, and a look must never turn a trainer away.
LOOK_GRACE_S = 0.1


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
        self.file.seek(0)
        holder = self.file.read().strip() or what
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
            return file.read().strip() or "another process"
        except OSError:
            return None
        fcntl.flock(file, fcntl.LOCK_UN)
    return None
