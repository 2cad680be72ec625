"""Sources: what text to read, as documents, and a cheap identity of it for the fingerprint.

`open_source` interprets `[data] source`: a text file (one running text), a folder or glob of
text files (one document each), tabular files (.jsonl/.json/.parquet/.csv) or a saved dataset
read with HF `datasets`, `hf:NAME[:CONFIG]` on the hub, an http(s) URL of a text file
(downloaded once with the standard library into a `downloads` folder beside the data folder),
or `python-stdlib`, the running interpreter's standard library. With `[data] format = "chat"`
the same sources hold conversations, read as rows by `Source.records` (a .jsonl file line by
line, so that a bad row is named by its line), and `python-docstrings` is the built-in chat set.
"""

from __future__ import annotations

import codecs
import contextlib
import functools
import glob as globlib
import hashlib
import http.client
import os
import re
import socket
import ssl
import sys
import sysconfig
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from gpt.config import DataConfig
from gpt.errors import GPTError, first_line
from gpt.fileio import NotAFileError, fsync_dir, open_regular

TABULAR = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
STDLIB_EXCLUDE = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
CHUNK_CHARS = 1_000_000  # pieces a single large text file is cut into (at line ends)
DOWNLOADS = "downloads"  # the folder beside the data folder where URL sources are kept
DOWNLOAD_TIMEOUT = 60.0  # seconds a connection may stay silent before a download gives up
DOWNLOAD_CHUNK = 1 << 20  # bytes read from the network at a time


class Source:
    """Documents of a corpus, re-readable (char vocabularies need a first pass).

    Opening a source reads nothing: datasets are loaded on the first call to `documents` or
    `count`, so deciding that a folder is already prepared needs neither the network nor a scan.
    """

    single_text = False  # one running text, split by characters rather than documents

    def __init__(self, description: str, identity: Any) -> None:
        self.description = description
        self.identity = identity  # what the fingerprint hashes: paths with sizes and times, a name
        self.skipped: list[str] = []  # files skipped as not UTF-8

    def rows(self) -> Iterator[str]:
        """Every document in order, "" for empty or skipped ones (so indices stay stable)."""
        raise NotImplementedError

    def count(self) -> int | None:
        """The number of documents when known in advance, for an exact validation split."""
        return None

    def sizes(self) -> list[int] | None:
        """Each document's size in bytes where it is known without reading the corpus (so the
        validation split can hold its share of the text); None where it is not."""
        return None

    def documents(self) -> Iterator[str]:
        """The non-empty documents, in order."""
        return (text for text in self.rows() if text)

    def records(self) -> Iterator[tuple[str, Any]]:
        """Chat rows in order (a JSON line or a dataset's row), each with where it is, for a
        message naming a bad one: a file and line, or a dataset's row."""
        raise GPTError(
            f"[data] source: {self.description} holds text, not conversations; give a .jsonl "
            "file or a dataset of chat rows, or set data.format = \"text\""
        )


def _stat_identity(paths: list[Path]) -> list[tuple[str, int, int]]:
    """Paths with sizes and modification times: a changed file changes the fingerprint."""
    identity = []
    for path in paths:
        stat = path.stat()
        identity.append((str(path), stat.st_size, stat.st_mtime_ns))
    return identity


class FileSource(Source):
    """Text files, one document each; files that are not UTF-8 are skipped (and counted) or
    refused, as `decode_errors` says."""

    def __init__(self, paths: list[Path], description: str, decode_errors: str) -> None:
        self.paths = sorted(paths)
        super().__init__(description, _stat_identity(self.paths))
        self.decode_errors = decode_errors

    def rows(self) -> Iterator[str]:
        for path in self.paths:
            yield self._read(path) or ""

    def count(self) -> int | None:
        return len(self.paths)

    def sizes(self) -> list[int] | None:
        return [_text_size(path) for path in self.paths]

    def _read(self, path: Path) -> str | None:
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            if self.decode_errors == "fail":
                raise GPTError(
                    f"{path} is not UTF-8 text; convert it, or set data.decode_errors=skip to "
                    "skip it"
                ) from None
            if str(path) not in self.skipped:
                self.skipped.append(str(path))
            return None
        except OSError as e:
            raise GPTError(
                f"cannot read {path} ({e.strerror}); make it readable, or leave it out of "
                "data.source (data.glob)"
            ) from None


def _text_size(path: Path) -> int:
    """A file's size in bytes, or 0 when its first 8 KB are not UTF-8 (it will be skipped, so
    it holds no text): a stat and one small read, not the whole file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8192)
            size = os.fstat(f.fileno()).st_size
        codecs.getincrementaldecoder("utf-8")().decode(head)  # a character cut at the end is fine
    except (UnicodeDecodeError, OSError):  # reading it for the text says what is wrong, if fatal
        return 0
    return size


def _chunk_end(text: str) -> int:
    """Where to end a chunk of a running text so that its ids do not depend on the cut.

    After a newline that has a non-space before it and a letter or digit after it, no piece of
    the GPT-2 (or cl100k/o200k) split pattern spans the cut, so encoding the chunks one by one
    gives exactly the ids of encoding the whole text. Failing that (a chunk of one long line,
    or only indented lines), the last newline, else the whole chunk.
    """
    end = len(text) - 1  # the character after the cut must be in this chunk
    for _ in range(10_000):
        nl = text.rfind("\n", 0, end)
        if nl <= 0:
            break
        if not text[nl - 1].isspace() and text[nl + 1].isalnum():
            return nl + 1
        end = nl
    return text.rfind("\n") + 1 or len(text)


def _text_chunks(path: Path) -> Iterator[str]:
    """A text file in chunks of about CHUNK_CHARS cut by `_chunk_end`: bounded memory."""
    try:
        with open(path, encoding="utf-8") as f:
            carry = ""
            while chunk := f.read(CHUNK_CHARS):
                chunk = carry + chunk
                cut = _chunk_end(chunk)
                carry = chunk[cut:]
                yield chunk[:cut]
            if carry:
                yield carry
    except UnicodeDecodeError:
        raise GPTError(
            f"{path} is not UTF-8 text (a binary file, or another encoding); give a text file, "
            "or convert it to UTF-8"
        ) from None
    except OSError as e:
        raise GPTError(
            f"cannot read {path} ({e.strerror}); make it readable, or set data.source to another "
            "file"
        ) from None


class TextFileSource(Source):
    """One text file is one running text, read in chunks so that memory stays bounded whatever
    its size."""

    single_text = True

    def __init__(self, path: Path) -> None:
        super().__init__(f"text file {path}", _stat_identity([path]))
        self.path = path

    def rows(self) -> Iterator[str]:
        return _text_chunks(self.path)


class UrlSource(Source):
    """A text file at an http(s) URL (e.g. tiny Shakespeare): one running text, downloaded on
    first read into `cache_dir` and read from there ever after, offline included.

    The fingerprint is the URL, so deciding that a folder is already prepared makes no request.
    """

    single_text = True

    def __init__(self, url: str, cache_dir: Path) -> None:
        super().__init__(f"text at {url}", [url])
        self.url = url
        self.path = cache_dir / _download_name(url)

    def rows(self) -> Iterator[str]:
        if not self.path.exists():
            download_text(self.url, self.path)
        yield from _text_chunks(self.path)


def _download_name(url: str) -> str:
    """The cached file's name: the URL's file name (`input.txt`) with a hash of the whole URL, so
    that two URLs ending in the same name are kept apart."""
    name = Path(urllib.parse.urlsplit(url).path).name
    stem, suffix = os.path.splitext(re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_."))
    digest = hashlib.sha256(url.encode()).hexdigest()[:12]
    return f"{stem or 'download'}-{digest}{suffix or '.txt'}"


def download_text(url: str, path: Path) -> None:
    """Download `url` to `path` with the standard library, checking that it is UTF-8 text.

    The body streams to a temporary file beside `path`, renamed into place once complete, so an
    interrupted or refused download leaves no file (and no folder it made).
    """
    folder = path.parent
    made = not folder.exists()
    part = path.with_name(f".{path.name}.part-{os.getpid()}-{threading.get_ident()}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        out = open(part, "wb")
    except OSError as e:
        raise GPTError(
            f"cannot write {folder} ({e.strerror}), where downloads are kept beside the data "
            "folder; set data.data_dir to a folder whose parent you can write"
        ) from None
    print(f"downloading {url} to {path}", file=sys.stderr)
    try:
        with out:
            _fetch(url, out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        if made:
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    fsync_dir(folder)


def _fetch(url: str, out: BinaryIO) -> None:
    """Copy the body of `url` into `out`; a failure is a GPTError saying what failed."""
    try:
        response = urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT)
    except urllib.error.HTTPError as e:
        raise GPTError(
            f"cannot download {url}: the server answered HTTP {e.code} {e.reason}; check the "
            f"URL, {GET_IT_YOURSELF}"
        ) from None
    except urllib.error.URLError as e:  # its reason: a socket error, or words about the URL
        if isinstance(e.reason, OSError):
            raise _network_error(url, e.reason) from None
        raise GPTError(f"cannot download {url}: {e.reason}; check the URL") from None
    except (http.client.HTTPException, ValueError) as e:  # a malformed URL or answer
        raise GPTError(f"cannot download {url}: {first_line(e)}; check the URL") from None
    except OSError as e:  # a timeout while waiting for the answer
        raise _network_error(url, e) from None
    with response:
        kind = response.headers.get_content_type()
        if kind == "text/html":
            raise GPTError(
                f"cannot use {url}: it is an HTML page, not a plain text file; give the URL of "
                "the raw text (on GitHub: the Raw button), or set data.source to a local file"
            )
        expected = response.headers.get("Content-Length")
        decoder = codecs.getincrementaldecoder("utf-8")()
        received = 0
        while True:
            try:
                chunk = response.read(DOWNLOAD_CHUNK)
            except (http.client.HTTPException, OSError) as e:
                raise _broken_off(url, first_line(e)) from None
            try:
                decoder.decode(chunk, final=not chunk)
            except UnicodeDecodeError:
                raise GPTError(
                    f"cannot use {url}: it is not UTF-8 text (Content-Type {kind}); give the URL "
                    "of a plain text file, or set data.source to a local file"
                ) from None
            if not chunk:
                break
            out.write(chunk)
            received += len(chunk)
    if expected is not None and expected.isdigit() and int(expected) != received:
        raise _broken_off(url, f"{received:,} of {int(expected):,} bytes received")


GET_IT_YOURSELF = "or download the file and set data.source to its path"


def _network_error(url: str, error: OSError) -> GPTError:
    """A socket error in words: "cannot reach" (offline?) only where the network failed, not
    for a certificate the system does not trust."""
    host = urllib.parse.urlsplit(url).hostname or url
    if isinstance(error, ssl.SSLError):  # an OSError too
        return GPTError(
            f"cannot download {url}: the secure connection to {host} failed "
            f"({error.reason or error}); check the URL and the system's certificates, "
            f"{GET_IT_YOURSELF}"
        )
    if isinstance(error, socket.gaierror):
        why = f"its name does not resolve: {error.strerror}"
    else:
        why = error.strerror or first_line(error)
    return GPTError(
        f"cannot download {url}: cannot reach {host} ({why}); check the network (offline?), "
        f"{GET_IT_YOURSELF}"
    )


def _broken_off(url: str, why: str) -> GPTError:
    return GPTError(
        f"cannot download {url}: the transfer broke off ({why}); check the network and run "
        f"again, {GET_IT_YOURSELF}"
    )


class JsonlSource(Source):
    """Chat rows in JSON Lines files, read line by line so that a bad row is named by its file
    and line (HF `datasets` would refuse the whole file)."""

    def __init__(self, paths: list[Path], description: str) -> None:
        self.paths = sorted(paths)
        super().__init__(description, _stat_identity(self.paths))

    def records(self) -> Iterator[tuple[str, Any]]:
        for path in self.paths:
            for number, line in _lines(path):
                yield f"{path}, line {number}", line

    def count(self) -> int | None:
        return sum(1 for path in self.paths for _ in _lines(path))


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    """The non-blank lines of a JSON Lines file, stripped, with their numbers; a byte order
    mark (as Windows editors write) begins the file, not its first row."""
    with _reading(path) as f:
        for number, line in enumerate(f, 1):
            if number == 1:
                line = line.removeprefix(codecs.BOM_UTF8)
            if line.strip():
                yield number, line.strip()


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[BinaryIO]:
    """`path` open for reading in binary (each line is decoded as a row); a failure to read it
    as one line."""
    try:
        with open(path, "rb") as f:
            yield f
    except OSError as e:
        raise GPTError(
            f"cannot read {path} ({e.strerror}); make it readable, or leave it out of data.source"
        ) from None


class GeneratedChats(Source):
    """A chat set built by a function (the built-in `python-docstrings`), rows in a fixed
    order; `identity` is what it is built from."""

    def __init__(
        self, rows: Callable[[], Iterator[dict[str, Any]]], description: str, identity: Any
    ) -> None:
        super().__init__(description, identity)
        self.build = rows

    def rows(self) -> Iterator[str]:
        raise GPTError(
            f"[data] source: {self.description} is a chat set; set data.format = \"chat\""
        )

    def records(self) -> Iterator[tuple[str, Any]]:
        for number, row in enumerate(self.build(), 1):
            yield f"{self.description}, row {number}", row


class DatasetSource(Source):
    """Rows of an HF `datasets` Dataset (or IterableDataset), the text in `text_column` (None
    for chat rows, read whole by `records`).

    `load` returns the dataset and runs when it is first needed; the kinds of dataset source
    (tabular files, a saved dataset, the hub) differ only by it.
    """

    def __init__(
        self, load: Callable[[], Any], description: str, identity: Any, text_column: str | None
    ) -> None:
        super().__init__(description, identity)
        self.load, self.text_column = load, text_column

    @functools.cached_property
    def dataset(self) -> Any:
        """The loaded dataset, checked for the text column where its columns are known."""
        ds = self.load()
        columns = getattr(ds, "column_names", None)
        if None not in (self.text_column, columns) and self.text_column not in columns:
            raise GPTError(
                f"{self.description} has no column {self.text_column!r}; its columns are "
                f"{', '.join(map(str, columns))}: set data.text_column to one of them"
            )
        return ds

    def rows(self) -> Iterator[str]:
        for batch in self.dataset.iter(batch_size=1000):
            if self.text_column not in batch:
                raise GPTError(
                    f"{self.description} has no column {self.text_column!r}; set data.text_column"
                )
            for text in batch[self.text_column]:
                yield "" if text is None else str(text)

    def records(self) -> Iterator[tuple[str, Any]]:
        number = 0
        for batch in self.dataset.iter(batch_size=1000):
            for values in zip(*batch.values(), strict=True):
                number += 1
                yield f"{self.description}, row {number}", dict(zip(batch, values, strict=True))

    def count(self) -> int | None:
        ds = self.dataset
        return len(ds) if hasattr(ds, "__len__") else None  # streaming: unknown


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files, without tests and idlelib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [
        p
        for p in root.rglob("*.py")
        if not STDLIB_EXCLUDE.intersection(p.relative_to(root).parts)
    ]


def open_source(cfg: DataConfig) -> Source:
    """Interpret `[data] source`; nothing is read yet."""
    spec = cfg.source
    if spec == "python-docstrings":
        from gpt.data import docstrings  # it reads the library through this module

        return GeneratedChats(docstrings.conversations, "python-docstrings",
                              _stat_identity(stdlib_files()))
    if spec == "python-stdlib":
        return FileSource(stdlib_files(), "the Python standard library", cfg.decode_errors)
    if spec.startswith("hf:"):
        return _hub_source(spec, cfg)
    if spec.startswith(("http://", "https://")):
        return UrlSource(spec, cfg.resolved_data_dir.parent / DOWNLOADS)
    if any(ch in spec for ch in "*?["):
        paths = [Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file()]
        if not paths:
            raise GPTError(f"[data] source: no files match {spec!r}; check the pattern")
        return _many_files(paths, f"files matching {spec}", cfg)
    path = Path(spec).expanduser()
    try:
        exists, is_dir = path.exists(), path.is_dir()
        saved = is_dir and any((path / name).exists()
                               for name in ("dataset_info.json", "dataset_dict.json"))
    except OSError as e:  # it, or a folder above it, cannot be read
        raise GPTError(f"cannot read {spec} ({e.strerror}); make it readable, or set data.source "
                       "to another file or folder") from None
    if not exists:
        raise GPTError(
            f"[data] source: {spec} does not exist; give a text file, a folder, a glob, "
            "hf:NAME or python-stdlib"
        )
    if is_dir:
        if saved:
            return _saved_source(path, cfg)
        patterns = [g.strip() for g in cfg.glob.split(",") if g.strip()]
        paths = sorted({p for g in patterns for p in path.glob(g) if p.is_file()})
        if not paths:
            raise GPTError(
                f"[data] source: no files in {path} match glob {cfg.glob!r}; set data.glob"
            )
        return _many_files(paths, f"folder {path}", cfg)
    _check_regular(path, spec)
    if path.suffix.lower() in TABULAR:
        return _tabular_source([path], cfg)
    return TextFileSource(path)


def _check_regular(path: Path, spec: str) -> None:
    """Refuse a source that is no regular file: a device such as /dev/zero or a FIFO may never
    end (or block), and a corpus is read more than once."""
    try:
        open_regular(path).close()
    except NotAFileError as e:
        raise GPTError(
            f"[data] source: {spec} is {e.strerror}; give a text file, a folder, a glob, "
            "hf:NAME or python-stdlib"
        ) from None
    except OSError as e:  # unreadable: said the same way as when its text is read
        raise GPTError(
            f"cannot read {path} ({e.strerror}); make it readable, or set data.source to another "
            "file"
        ) from None


def _many_files(paths: list[Path], description: str, cfg: DataConfig) -> Source:
    tabular = [p for p in paths if p.suffix.lower() in TABULAR]
    if tabular and len(tabular) == len(paths):
        return _tabular_source(paths, cfg)
    if len(paths) == 1:
        return TextFileSource(paths[0])
    return FileSource(paths, description, cfg.decode_errors)


def _tabular_source(paths: list[Path], cfg: DataConfig) -> Source:
    if cfg.format == "chat" and all(p.suffix.lower() == ".jsonl" for p in paths):
        description = f"{len(paths)} jsonl file(s)" if len(paths) > 1 else str(paths[0])
        return JsonlSource(paths, description)
    builders = {TABULAR[p.suffix.lower()] for p in paths}
    if len(builders) > 1:
        raise GPTError(
            "[data] source mixes file types; point it at one kind (jsonl, parquet or csv)"
        )
    builder = builders.pop()
    description = f"{len(paths)} {builder} file(s)" if len(paths) > 1 else str(paths[0])

    def load() -> Any:
        import datasets

        try:
            return datasets.load_dataset(
                builder, data_files=[str(p) for p in paths], split="train"
            )
        except Exception as e:
            raise GPTError(f"cannot read {description}: {first_line(e)}") from None

    return DatasetSource(load, description, _stat_identity(paths), _text_column(cfg))


def _saved_source(path: Path, cfg: DataConfig) -> DatasetSource:
    def load() -> Any:
        import datasets

        try:
            ds = datasets.load_from_disk(str(path))
        except Exception as e:
            raise GPTError(f"cannot load the saved dataset {path}: {first_line(e)}") from None
        if isinstance(ds, datasets.DatasetDict):
            if cfg.split not in ds:
                raise GPTError(
                    f"{path} has splits {', '.join(ds)}; set data.split to one of them"
                )
            ds = ds[cfg.split]
        return ds

    files = sorted(p for p in path.rglob("*") if p.is_file())
    return DatasetSource(load, f"saved dataset {path}", _stat_identity(files), _text_column(cfg))


def _hub_source(spec: str, cfg: DataConfig) -> DatasetSource:
    name, _, config_name = spec[3:].partition(":")
    if not name:
        raise GPTError(
            "[data] source: hf: needs a dataset name, for example hf:roneneldan/TinyStories"
        )

    def load() -> Any:
        import datasets

        try:
            return datasets.load_dataset(
                name, config_name or None, split=cfg.split, streaming=cfg.streaming
            )
        except Exception as e:
            raise GPTError(
                f"cannot load hub dataset {name!r} (split {cfg.split!r}): {first_line(e)}; "
                "check the name and the network, or download it and point data.source at the "
                "local files"
            ) from None

    return DatasetSource(load, f"hub dataset {name}", [spec, cfg.split], _text_column(cfg))


def _text_column(cfg: DataConfig) -> str | None:
    """The column a dataset's text is in; None for chat rows, whose columns say their format."""
    return cfg.text_column if cfg.format == "text" else None

