"""Sources: what text to read, as documents, and a cheap identity of it for the fingerprint.

`open_source` interprets `[data] source`: a text file (one running text), a folder or glob of
text files (one document each), tabular files (.jsonl/.json/.parquet/.csv) or a saved dataset
read with HF `datasets`, `hf:NAME[:CONFIG]` on the hub, an http(s) URL of a text file, or
`python-stdlib`, the running interpreter's standard library.
"""

from __future__ import annotations

import functools
import glob as globlib
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gpt.config import DataConfig
from gpt.errors import GPTError, first_line

TABULAR = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
STDLIB_EXCLUDE = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
CHUNK_CHARS = 1_000_000  # pieces a single large text file is cut into (at line ends)


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

    def documents(self) -> Iterator[str]:
        """The non-empty documents, in order."""
        return (text for text in self.rows() if text)


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
            raise GPTError(f"cannot read {path}: {e.strerror}") from None


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


class TextFileSource(Source):
    """One text file is one running text, read in chunks of about CHUNK_CHARS so that memory
    stays bounded whatever its size."""

    single_text = True

    def __init__(self, path: Path) -> None:
        super().__init__(f"text file {path}", _stat_identity([path]))
        self.path = path

    def rows(self) -> Iterator[str]:
        try:
            with open(self.path, encoding="utf-8") as f:
                carry = ""
                while chunk := f.read(CHUNK_CHARS):
                    chunk = carry + chunk
                    cut = _chunk_end(chunk)
                    carry = chunk[cut:]
                    yield chunk[:cut]
                if carry:
                    yield carry
        except UnicodeDecodeError:
            raise GPTError(f"{self.path} is not UTF-8 text; convert it to UTF-8") from None


class DatasetSource(Source):
    """Rows of an HF `datasets` Dataset (or IterableDataset), the text in `text_column`.

    `load` returns the dataset and runs when it is first needed; the kinds of dataset source
    (tabular files, a saved dataset, the hub, a URL) differ only by it.
    """

    def __init__(
        self,
        load: Callable[[], Any],
        description: str,
        identity: Any,
        text_column: str,
        single_text: bool = False,
    ) -> None:
        super().__init__(description, identity)
        self.load, self.text_column, self.single_text = load, text_column, single_text

    @functools.cached_property
    def dataset(self) -> Any:
        """The loaded dataset, checked for the text column where its columns are known."""
        ds = self.load()
        columns = getattr(ds, "column_names", None)
        if columns is not None and self.text_column not in columns:
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
    if spec == "python-stdlib":
        return FileSource(stdlib_files(), "the Python standard library", cfg.decode_errors)
    if spec.startswith("hf:"):
        return _hub_source(spec, cfg)
    if spec.startswith(("http://", "https://")):
        return _url_source(spec)
    if any(ch in spec for ch in "*?["):
        paths = [Path(p) for p in globlib.glob(spec, recursive=True) if Path(p).is_file()]
        if not paths:
            raise GPTError(f"[data] source: no files match {spec!r}; check the pattern")
        return _many_files(paths, f"files matching {spec}", cfg)
    path = Path(spec).expanduser()
    if not path.exists():
        raise GPTError(
            f"[data] source: {spec} does not exist; give a text file, a folder, a glob, "
            "hf:NAME or python-stdlib"
        )
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return _saved_source(path, cfg)
        patterns = [g.strip() for g in cfg.glob.split(",") if g.strip()]
        paths = sorted({p for g in patterns for p in path.glob(g) if p.is_file()})
        if not paths:
            raise GPTError(
                f"[data] source: no files in {path} match glob {cfg.glob!r}; set data.glob"
            )
        return _many_files(paths, f"folder {path}", cfg)
    if path.suffix.lower() in TABULAR:
        return _tabular_source([path], cfg)
    return TextFileSource(path)


def _many_files(paths: list[Path], description: str, cfg: DataConfig) -> Source:
    tabular = [p for p in paths if p.suffix.lower() in TABULAR]
    if tabular and len(tabular) == len(paths):
        return _tabular_source(paths, cfg)
    if len(paths) == 1:
        return TextFileSource(paths[0])
    return FileSource(paths, description, cfg.decode_errors)


def _tabular_source(paths: list[Path], cfg: DataConfig) -> DatasetSource:
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

    return DatasetSource(load, description, _stat_identity(paths), cfg.text_column)


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
    return DatasetSource(load, f"saved dataset {path}", _stat_identity(files), cfg.text_column)


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

    return DatasetSource(load, f"hub dataset {name}", [spec, cfg.split], cfg.text_column)


def _url_source(url: str) -> DatasetSource:
    """A text file at a URL (e.g. tiny Shakespeare), downloaded and cached by `datasets`: one
    running text, split by characters."""

    def load() -> Any:
        import datasets

        try:
            return datasets.load_dataset(
                "text", data_files=url, sample_by="document", split="train"
            )
        except Exception as e:
            raise GPTError(
                f"cannot download {url}: {first_line(e)}; check the network, or download the "
                "file and set data.source to its path"
            ) from None

    return DatasetSource(load, f"text at {url}", [url], "text", single_text=True)
