"""FolderLock: one holder at a time, named in the refusal; unwritable folders and filesystems
without flock handled in one line."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path

import pytest

import gpt.lock
from gpt.errors import GPTError
from gpt.lock import FolderLock


def test_second_holder_is_refused_naming_the_first_then_admitted(tmp_path: Path) -> None:
    first = FolderLock(tmp_path / "run", "gpt train", "train.out_dir")
    with pytest.raises(GPTError, match=rf"in use by another gpt train \(pid {os.getpid()} on .*\); "
                                       r"wait for it to finish, or set train.out_dir"):
        FolderLock(tmp_path / "run", "gpt train", "train.out_dir")
    first.release()
    with FolderLock(tmp_path / "run", "gpt train", "train.out_dir"):
        pass


def test_unwritable_folder_names_the_option(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(GPTError, match=r"cannot write .*file/run \(.*\); set data.data_dir to a folder you can write"):
        FolderLock(tmp_path / "file" / "run", "gpt prepare", "data.data_dir")


def test_filesystem_without_flock_goes_on_unlocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    def no_flock(file: object, operation: int) -> None:
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(gpt.lock.fcntl, "flock", no_flock)
    lock = FolderLock(tmp_path / "run", "gpt train", "train.out_dir")
    lock.release()
    assert "cannot be locked" in capsys.readouterr().err


def test_a_waiter_whose_lock_file_is_removed_locks_the_new_one(tmp_path: Path) -> None:
    """A holder that removes the folder it made (a failed prepare) must not let the process that
    waited on the old file and a newcomer on a new file both hold the lock."""
    folder = tmp_path / "data"
    first = FolderLock(folder, "gpt prepare", "data.data_dir")
    waiter: list[FolderLock] = []
    thread = threading.Thread(
        target=lambda: waiter.append(FolderLock(folder, "gpt prepare", "data.data_dir", wait=True))
    )
    thread.start()
    time.sleep(0.5)  # the waiter blocks on the first's file
    first.path.unlink()
    folder.rmdir()
    newcomer = FolderLock(folder, "gpt prepare", "data.data_dir")  # a new file, free
    first.release()
    thread.join(timeout=1.0)
    assert thread.is_alive()  # the old file is gone: the waiter now waits for the newcomer
    newcomer.release()
    thread.join(timeout=30)
    assert not thread.is_alive() and waiter[0]._still_in_place()
    waiter[0].release()
