"""FolderLock: one holder at a time, named in the refusal; unwritable folders and filesystems
without flock handled in one line; `holder` looks without creating, waiting or turning anyone away."""

from __future__ import annotations

import errno
import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

import gpt.lock
from gpt.errors import GPTError
from gpt.lock import FolderLock, holder


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


def test_holder_names_the_process_holding_the_lock(tmp_path: Path) -> None:
    lock = FolderLock(tmp_path / "run", "gpt train", "train.out_dir")
    assert holder(tmp_path / "run") == f"gpt train (pid {os.getpid()} on {os.uname().nodename})"
    lock.release()
    assert holder(tmp_path / "run") is None
    FolderLock(tmp_path / "run", "gpt train", "train.out_dir").release()  # the look left it free


def test_holder_creates_nothing(tmp_path: Path) -> None:
    assert holder(tmp_path) is None and holder(tmp_path / "missing") is None
    assert list(tmp_path.iterdir()) == []


def test_a_look_at_the_lock_does_not_turn_a_trainer_away(tmp_path: Path) -> None:
    """`holder` holds the lock shared for an instant; a FolderLock asked for then tries again."""
    FolderLock(tmp_path, "gpt train", "train.out_dir").release()
    look = open(tmp_path / ".lock")
    fcntl.flock(look, fcntl.LOCK_SH | fcntl.LOCK_NB)  # a look, caught in its instant
    threading.Timer(0.02, look.close).start()
    FolderLock(tmp_path, "gpt train", "train.out_dir").release()
