"""Sources: which documents each kind of `[data] source` yields (no network: the hub is faked, URLs
are served by a local web server)."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


SHAKESPEARE = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 20


@pytest.fixture
def web(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, list[str]]]:
    """A web server on 127.0.0.1 (a thread, stopped after the test): /input.txt, a binary file,
    an HTML page, a body cut short, 404 for anything else. Yields its URL and the paths asked for."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "input.txt").write_text(SHAKESPEARE)
    (site / "blob.bin").write_bytes(bytes(range(256)) * 4)
    (site / "page.html").write_text("<html><body>not the raw file</body></html>")
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, directory=str(site), **kwargs)

        def do_GET(self) -> None:
            requested.append(self.path)
            if self.path == "/short.txt":  # says 1000 bytes, sends 19, hangs up
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", "1000")
                self.end_headers()
                self.wfile.write(b"only a little text\n")
                return
            super().do_GET()

        def log_message(self, *args: Any) -> None:
            pass

    monkeypatch.setenv("no_proxy", "*")  # a proxy in the environment is not for 127.0.0.1
    monkeypatch.setattr(sources, "DOWNLOAD_TIMEOUT", 10.0)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", requested
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def no_name_lookups(monkeypatch: pytest.MonkeyPatch) -> None:
    """Offline: every host name fails to resolve, as without a network."""

    def getaddrinfo(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_url_source_is_one_running_text_downloaded_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, web: tuple[str, list[str]]) -> None:
    base, requested = web
    url = f"{base}/input.txt"
    source = open_source(cfg(tmp_path, url, text_column="body"))  # the column is not used
    assert requested == []  # opening reads nothing
    assert source.single_text and "".join(source.documents()) == SHAKESPEARE
    assert requested == ["/input.txt"]
    data = tmp_path / "data"
    meta = prepare(cfg(tmp_path, url, tokenizer="char", data_dir=str(data / "char")), progress=False)
    n_train = int(len(SHAKESPEARE) * 0.9)
    assert meta["tokens"] == {"train": n_train, "val": len(SHAKESPEARE) - n_train}  # split by characters
    prepare(cfg(tmp_path, url, data_dir=str(data / "gpt2")), progress=False)
    assert requested == ["/input.txt", "/input.txt"]  # one download per cache folder, no more
    [cached] = (data / "downloads").iterdir()
    assert cached.name.startswith("input-") and cached.read_text() == SHAKESPEARE
    (tmp_path / "plain").write_text("")
    assert cached.stat().st_mode == (tmp_path / "plain").stat().st_mode  # readable as any file
    no_name_lookups(monkeypatch)
    monkeypatch.setattr(sources, "_fetch", lambda *args: pytest.fail("downloaded again"))
    again = prepare(cfg(tmp_path, url, tokenizer="char", data_dir=str(data / "char")), force=True, progress=False)
    assert again["sha256"] == meta["sha256"]  # offline, from the cache


@pytest.mark.parametrize(("path", "message"), [
    ("/missing.txt", r"the server answered HTTP 404 File not found; check the URL"),
    ("/blob.bin", r"it is not UTF-8 text \(Content-Type application/octet-stream\)"),
    ("/page.html", r"it is an HTML page, not a plain text file; give the URL of the raw text"),
    ("/short.txt", r"the transfer broke off \(19 of 1,000 bytes received\); check the network"),
])
def test_url_failures_say_what_failed_and_leave_nothing(tmp_path: Path, web: tuple[str, list[str]], path: str, message: str) -> None:
    base, requested = web
    config = cfg(tmp_path, base + path, tokenizer="char", data_dir=str(tmp_path / "data" / "x"))
    with pytest.raises(GPTError, match=message) as failed:
        prepare(config, progress=False)
    assert "offline" not in str(failed.value) and "cannot reach" not in str(failed.value)
    assert requested == [path]
    assert not (tmp_path / "data").exists()  # no partial download, no empty folder


def test_url_offline_says_cannot_reach(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    no_name_lookups(monkeypatch)
    with pytest.raises(GPTError, match=r"cannot download https://example.org/input.txt: cannot reach "
                                       r"example.org \(its name does not resolve: Temporary failure "
                                       r"in name resolution\); check the network \(offline\?\), or "
                                       r"download the file and set data.source to its path"):
        prepare(cfg(tmp_path, "https://example.org/input.txt"), progress=False)
    assert not (tmp_path / "downloads").exists() and not (tmp_path / "prepared").exists()


def test_url_with_nothing_listening_says_cannot_reach(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("no_proxy", "*")
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(GPTError, match=r"cannot reach 127.0.0.1 \(Connection refused\); check the network"):
        list(open_source(cfg(tmp_path, f"http://127.0.0.1:{port}/a.txt")).documents())


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
