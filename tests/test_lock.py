"""FolderLock: one holder at a time, named in the refusal; unwritable folders and filesystems
without flock handled in one line; `holder` looks without creating, waiting or turning anyone away."""

from __future__ import annotations

import errno
import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import gpt.lock
from gpt.errors import GPTError
from gpt.lock import FolderLock, _alive, holder


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


def _python(script: str, *args: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env,
                            stdout=subprocess.PIPE, text=True)


FORKS_THEN_DIES = """
import os, sys, time
from pathlib import Path
from gpt.lock import FolderLock
lock = FolderLock(Path(sys.argv[1]), "gpt prepare", "data.data_dir")
child = os.fork()
if child == 0:  # a worker that outlives its parent (no die_with_parent here)
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
os.kill(os.getpid(), 9)
"""


@pytest.mark.slow
def test_a_forked_child_does_not_keep_its_killed_parents_lock(tmp_path: Path) -> None:
    """An flock belongs to the open file, which a fork shares: the child closes its copy."""
    process = _python(FORKS_THEN_DIES, str(tmp_path))
    child = int(process.stdout.readline())  # type: ignore[union-attr]
    process.wait()
    try:
        assert _alive(child)
        FolderLock(tmp_path, "gpt prepare", "data.data_dir").release()  # free at once
    finally:
        os.kill(child, 9)


ORPHAN_HOLDS_IT = """
import fcntl, os, sys, time
path = sys.argv[1]
with open(path, "a+") as f:  # what a process of another program, or an older gpt, leaves
    fcntl.flock(f, fcntl.LOCK_EX)
    f.write(f"gpt prepare (pid {sys.argv[2]} on {os.uname().nodename})")
    f.flush()
    child = os.fork()
    if child == 0:
        time.sleep(60)
        os._exit(0)
print(child, flush=True)
"""


def _dead_pid() -> int:
    """The pid of a process that has ended."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


@pytest.mark.skipif(not Path("/proc/self/fdinfo").exists(), reason="reads /proc")
def test_a_lock_message_names_a_pid_only_while_it_holds_the_lock(tmp_path: Path) -> None:
    """The recorded holder has exited; the live process left holding the lock is named instead."""
    dead = _dead_pid()
    process = _python(ORPHAN_HOLDS_IT, str(tmp_path / ".lock"), str(dead))
    orphan = int(process.stdout.readline())  # type: ignore[union-attr]
    process.wait()
    try:
        with pytest.raises(GPTError) as refused:
            FolderLock(tmp_path, "gpt prepare", "data.data_dir")
        message = str(refused.value)
        assert f"pid {dead}" not in message
        assert f"another process (pid {orphan}, left running by a gpt prepare that has exited; " \
               "stop it)" in message
        assert holder(tmp_path) == message.split("another ", 1)[1].split("; wait")[0]
    finally:
        os.kill(orphan, 9)
    time.sleep(0.2)
    FolderLock(tmp_path, "gpt prepare", "data.data_dir").release()  # free once it is gone
