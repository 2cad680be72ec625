"""Atomic writes and file hashes: the helpers checkpoints and prepared data rely on."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
from pathlib import Path

import pytest

from gpt import fileio


@pytest.mark.parametrize("content", ["new text\n", b"\x00new bytes\xff"])
def test_write_atomic_replaces_the_content(tmp_path: Path, content: str | bytes) -> None:
    path = tmp_path / "file"
    path.write_text("old")
    fileio.write_atomic(path, content)
    assert path.read_bytes() == (content.encode() if isinstance(content, str) else content)
    assert [p.name for p in tmp_path.iterdir()] == ["file"]  # no temporary file left


def test_a_failed_atomic_write_keeps_the_old_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "file"
    path.write_text("old")

    def crash(*args: object) -> None:
        raise OSError("simulated crash")

    monkeypatch.setattr(fileio.os, "replace", crash)  # the new content is written, not renamed
    with pytest.raises(OSError, match="simulated crash"):
        fileio.write_atomic(path, "new")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["file"]


def test_write_json_atomic_round_trips(tmp_path: Path) -> None:
    data = {"tokens": {"train": 3, "val": 1}, "name": "café"}
    fileio.write_json_atomic(tmp_path / "meta.json", data)
    assert json.loads((tmp_path / "meta.json").read_text()) == data


@pytest.mark.parametrize("size", [0, 5, (1 << 24) + 3])  # empty, small, more than one block
def test_sha256_file_equals_hashlib_of_the_bytes(tmp_path: Path, size: int) -> None:
    raw = (bytes(range(251)) * (size // 251 + 1))[:size]
    (tmp_path / "blob").write_bytes(raw)
    assert fileio.sha256_file(tmp_path / "blob") == hashlib.sha256(raw).hexdigest()


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
@pytest.mark.parametrize("proc", [True, False], ids=["proc", "no-proc"])
def test_new_file_mode_is_what_open_gives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int, proc: bool
) -> None:
    if not proc:  # another OS: no /proc/self/status
        monkeypatch.setattr(fileio, "PROC_STATUS", tmp_path / "no-such-file")
    previous = os.umask(umask)
    try:
        (tmp_path / "opened").touch()
        assert fileio.new_file_mode() == 0o666 & ~umask
        assert os.umask(umask) == umask  # the umask is left as it was
    finally:
        os.umask(previous)
    assert (tmp_path / "opened").stat().st_mode & 0o777 == 0o666 & ~umask


@pytest.mark.parametrize("make, kind", [
    (lambda p: os.mkfifo(p), "a FIFO"),
    (lambda p: p.symlink_to("/dev/zero"), "a character device"),
])
def test_open_regular_refuses_what_may_block_or_never_end(tmp_path: Path, make, kind: str) -> None:
    path = tmp_path / "input"
    make(path)
    with pytest.raises(fileio.NotAFileError) as refused:  # at once: a FIFO has no writer
        fileio.open_regular(path)
    assert refused.value.strerror == f"{kind}, not a regular file"
    assert refused.value.filename == str(path)


def test_open_regular_keeps_the_os_errors_of_folders_and_missing_files(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError):
        fileio.open_regular(tmp_path)
    with pytest.raises(FileNotFoundError):
        fileio.open_regular(tmp_path / "missing")


def test_read_bounded_reads_up_to_its_limit_and_refuses_past_it(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"x" * 100)
    assert fileio.read_bounded(path, 100, "a test") == b"x" * 100
    with pytest.raises(fileio.TooLargeError) as refused:
        fileio.read_bounded(path, 99, "a test")
    assert refused.value.strerror == "over 99 bytes, the limit for a test"


def test_read_bounded_stops_at_the_limit_of_a_file_that_grows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The size on opening is under the limit, but more comes (a file being appended to)."""
    path = tmp_path / "file"
    path.write_bytes(b"x" * 1000)
    real_fstat = os.fstat
    monkeypatch.setattr(fileio.os, "fstat", lambda fd: os.stat_result(
        (*real_fstat(fd)[:6], 10, *real_fstat(fd)[7:])))  # st_size as it was on opening
    with pytest.raises(fileio.TooLargeError):
        fileio.read_bounded(path, 100, "a test")


def test_read_stream_bounded_stops_an_endless_stream() -> None:
    with open("/dev/zero", "rb") as endless, pytest.raises(fileio.TooLargeError) as refused:
        fileio.read_stream_bounded(endless, 3 * fileio.MiB, "a prompt", "stdin")
    assert refused.value.strerror == "over 3 MiB, the limit for a prompt"
    assert fileio.read_stream_bounded(io.BytesIO(b"abc"), 3, "a prompt", "stdin") == b"abc"
    assert fileio.read_stream_bounded(io.StringIO("abc"), 3, "a prompt", "stdin") == "abc"
    assert fileio.read_stream_bounded(io.BytesIO(b""), 3, "a prompt", "stdin") == b""


@pytest.mark.parametrize("n, text", [(4096, "4 KiB"), (2**20, "1 MiB"), (256 * 2**20, "256 MiB"),
                                     (1000, "1,000 bytes"), (3 * 2**30, "3 GiB")])
def test_size_text(n: int, text: str) -> None:
    assert fileio.size_text(n) == text


class SafetensorError(Exception):
    """Named as safetensors names its own error, which is no OSError."""


@pytest.mark.parametrize("error, number", [
    (OSError(errno.ENOSPC, "No space left on device"), errno.ENOSPC),
    (SafetensorError("Error while serializing: I/O error: File too large (os error 27)"),
     errno.EFBIG),
    (RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0"),
     errno.EIO),  # torch.save, with space left: a write that failed otherwise
    (ValueError("a bug"), None),
])
def test_write_failure_tells_write_errors_from_bugs(
    tmp_path: Path, error: Exception, number: int | None
) -> None:
    failure = fileio.write_failure(error, tmp_path)
    assert (failure.errno if failure is not None else None) == number
