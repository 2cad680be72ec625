"""Sources: which documents each kind of `[data] source` yields (no network: the hub is faked)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

import gpt.data.sources as sources
from gpt.config import DataConfig
from gpt.data.prepare import prepare
from gpt.data.sources import open_source
from gpt.errors import GPTError


def cfg(tmp_path: Path, source: str | Path, **kw: object) -> DataConfig:
    values = {"data_dir": str(tmp_path / "prepared"), **kw}
    return DataConfig(source=str(source), **values)  # type: ignore[arg-type]


def test_folder_is_one_document_per_file_in_path_order(tmp_path: Path, docs_folder: Callable[..., Path]) -> None:
    folder = docs_folder(n=3)
    source = open_source(cfg(tmp_path, folder))
    assert source.count() == 3 and not source.single_text
    assert list(source.documents()) == ["document 0 ", "document 2 " * 3, "document 1 " * 2]


def test_glob_source_and_glob_filter(tmp_path: Path, docs_folder: Callable[..., Path]) -> None:
    folder = docs_folder()
    found = open_source(cfg(tmp_path, f"{folder}/sub/*.txt"))
    assert list(found.documents()) == [f"document {i} " * (i + 1) for i in range(1, 10, 2)]
    with pytest.raises(GPTError, match=r"no files in .* match glob '\*\*/\*.md'; set data.glob"):
        open_source(cfg(tmp_path, folder, glob="**/*.md"))


@pytest.mark.parametrize("kind", ["jsonl", "csv", "parquet", "saved"])
def test_tabular_sources_read_the_text_column(tmp_path: Path, kind: str) -> None:
    import datasets

    rows = {"body": [f"row number {i} says hello" for i in range(12)], "id": list(range(12))}
    ds = datasets.Dataset.from_dict(rows)
    path = tmp_path / f"table.{kind}"
    if kind == "jsonl":
        ds.to_json(str(path))
    elif kind == "csv":
        ds.to_csv(str(path), index=False)
    elif kind == "parquet":
        ds.to_parquet(str(path))
    else:
        ds.save_to_disk(str(path))
    source = open_source(cfg(tmp_path, path, text_column="body"))
    assert list(source.documents()) == rows["body"] and source.count() == 12
    with pytest.raises(GPTError, match=r"no column 'text'.*set data.text_column"):
        list(open_source(cfg(tmp_path, path)).documents())


def test_hub_source_goes_through_load_dataset_when_first_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    calls = []

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        calls.append((name, config, split, streaming))
        return datasets.Dataset.from_dict({"text": ["alpha beta", "gamma delta", "epsilon"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = open_source(cfg(tmp_path, "hf:someone/corpus:small", split="validation"))
    assert calls == []  # opening reads nothing
    assert list(source.documents()) == ["alpha beta", "gamma delta", "epsilon"]
    assert source.count() == 3
    assert calls == [("someone/corpus", "small", "validation", False)]  # loaded once


def test_hub_source_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GPTError, match=r"cannot load hub dataset 'x/y' .*Couldn't reach the hub"):
        list(open_source(cfg(tmp_path, "hf:x/y")).documents())


def test_python_stdlib_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = sources.stdlib_files()
    assert len(files) > 300
    assert not any(part in ("test", "tests", "idlelib") for f in files for part in f.parts[-3:-1])
    assert any(f.name == "os.py" for f in files)
    chosen = sorted(f for f in files if f.name in ("os.py", "abc.py", "bisect.py"))
    monkeypatch.setattr(sources, "stdlib_files", lambda: chosen)
    source = open_source(cfg(tmp_path, "python-stdlib"))
    assert list(source.documents()) == [f.read_text(encoding="utf-8") for f in chosen]


def test_url_source_is_one_running_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n" * 20

    def fake_load_dataset(builder, data_files=None, sample_by=None, split=None):
        assert (builder, sample_by, data_files) == ("text", "document", "https://example.org/input.txt")
        return datasets.Dataset.from_dict({"text": [text]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    source = open_source(cfg(tmp_path, "https://example.org/input.txt", text_column="body"))
    assert source.single_text and list(source.documents()) == [text]  # the column is always text
    meta = prepare(cfg(tmp_path, "https://example.org/input.txt", tokenizer="char"), progress=False)
    n_train = int(len(text) * 0.9)
    assert meta["tokens"] == {"train": n_train, "val": len(text) - n_train}  # split by characters


def test_url_offline_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GPTError, match=r"cannot download https://x.org/a.txt: no route to host; .*data.source"):
        list(open_source(cfg(tmp_path, "https://x.org/a.txt")).documents())


def test_large_text_file_is_one_running_text_read_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sources, "CHUNK_CHARS", 50)
    text = "".join(f"line {i} of the file\n" for i in range(200))
    (tmp_path / "a.txt").write_text(text)
    source = open_source(cfg(tmp_path, tmp_path / "a.txt"))
    chunks = list(source.documents())
    assert source.single_text and len(chunks) > 50 and "".join(chunks) == text


def test_bad_sources(tmp_path: Path) -> None:
    with pytest.raises(GPTError, match=r"nope.txt does not exist; give a text file, a folder"):
        open_source(cfg(tmp_path, tmp_path / "nope.txt"))
    with pytest.raises(GPTError, match=r"no files match"):
        open_source(cfg(tmp_path, str(tmp_path / "*.nothing")))
    with pytest.raises(GPTError, match=r"hf: needs a dataset name"):
        open_source(cfg(tmp_path, "hf:"))
    (tmp_path / "a.jsonl").write_text("{}")
    (tmp_path / "b.csv").write_text("text\n")
    with pytest.raises(GPTError, match=r"mixes file types"):
        open_source(cfg(tmp_path, str(tmp_path / "[ab].*")))


def test_non_utf8_files_are_skipped_and_named_or_refused(tmp_path: Path, docs_folder: Callable[..., Path]) -> None:
    folder = docs_folder(n=2)
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    source = open_source(cfg(tmp_path, folder))
    assert list(source.rows()) == ["document 0 ", "", "document 1 " * 2]  # the index is kept
    assert source.skipped == [str(folder / "latin1.txt")]
    with pytest.raises(GPTError, match=r"latin1.txt is not UTF-8 text; .*data.decode_errors=skip"):
        list(open_source(cfg(tmp_path, folder, decode_errors="fail")).documents())
