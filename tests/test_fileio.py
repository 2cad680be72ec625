"""Atomic writes and file hashes: the helpers checkpoints and prepared data rely on."""

from __future__ import annotations

import hashlib
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
