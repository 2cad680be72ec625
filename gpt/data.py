"""Data: any text source -> token files (`train.bin`, `val.bin`, `meta.json`) -> training batches.

`prepare` reads documents from a source (a text file, a folder or glob of files, tabular files
or a saved dataset read with HF `datasets`, a hub dataset, or the interpreter's own standard
library), splits them into train and validation, tokenizes them in parallel batches and streams
the ids to disk, so memory stays bounded whatever the corpus size. Files are written under
temporary names and renamed into place only when complete, `meta.json` last.

`BatchSampler` draws random `block_size + 1` windows from a memmap with a seeded generator whose
state is plain data, so a resumed run draws exactly the batches it would have drawn.
"""

from __future__ import annotations

import dataclasses
import functools
import glob as globlib
import hashlib
import json
import multiprocessing
import os
import random
import sysconfig
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gpt.config import DataConfig
from gpt.errors import GPTError, first_line
from gpt.fileio import sha256_file, write_json_atomic
from gpt.lock import FolderLock
from gpt.tokenizer import CharTokenizer, Tokenizer, get_tokenizer, tokenizer_from_dict

FORMAT_VERSION = 1
SPLITS = ("train", "val")
TABULAR = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
STDLIB_EXCLUDE = {"test", "tests", "idlelib", "site-packages", "__pycache__"}
BATCH_CHARS = 2_000_000  # text per worker task: amortises the round trip, bounds memory
CHUNK_CHARS = 1_000_000  # pieces a single large text file is cut into (at line ends)

Piece = tuple[str, str, bool]  # (split, text, ends_document): a unit of tokenizer work


# ---------------------------------------------------------------------------------------------
# Sources: each yields documents (str) and describes itself (cheaply) for the fingerprint


@dataclass
class Source:
    """Documents of a corpus, re-readable (char vocabularies need a first pass).

    Opening a source reads nothing: datasets are loaded on the first call to `documents` or
    `count`, so deciding that a folder is already prepared needs neither the network nor a scan.
    """

    description: str
    rows: Callable[[], Iterator[str]]  # every document in order; "" for empty or skipped ones
    identity: Any  # what the fingerprint hashes: paths with sizes and times, or a dataset name
    count: Callable[[], int | None] = lambda: None  # number of documents when known in advance
    single_text: bool = False  # one running text, split by characters rather than documents
    skipped: list[str] = field(default_factory=list)  # files skipped as not UTF-8

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


def _read_text(path: Path, decode_errors: str, skipped: list[str]) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        if decode_errors == "fail":
            raise GPTError(
                f"{path} is not UTF-8 text; convert it, or set data.decode_errors=skip to skip it"
            ) from None
        if str(path) not in skipped:
            skipped.append(str(path))
        return None
    except OSError as e:
        raise GPTError(f"cannot read {path}: {e.strerror}") from None


def _file_source(paths: list[Path], description: str, cfg: DataConfig) -> Source:
    paths = sorted(paths)
    skipped: list[str] = []

    def rows() -> Iterator[str]:
        for path in paths:
            yield _read_text(path, cfg.decode_errors, skipped) or ""

    return Source(
        description, rows, _stat_identity(paths), lambda: len(paths), skipped=skipped
    )


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


def _text_file_source(path: Path, cfg: DataConfig) -> Source:
    """One text file is one running text, read in chunks of about CHUNK_CHARS."""

    def rows() -> Iterator[str]:
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
            raise GPTError(f"{path} is not UTF-8 text; convert it to UTF-8") from None

    return Source(f"text file {path}", rows, _stat_identity([path]), single_text=True)


def _dataset_source(
    load: Callable[[], Any], description: str, identity: Any, cfg: DataConfig
) -> Source:
    """Rows of an HF `datasets` Dataset (or IterableDataset) that `load` returns when first
    needed, the text in `text_column`."""

    @functools.cache
    def dataset() -> Any:
        ds = load()
        columns = getattr(ds, "column_names", None)
        if columns is not None and cfg.text_column not in columns:
            raise GPTError(
                f"{description} has no column {cfg.text_column!r}; its columns are "
                f"{', '.join(map(str, columns))}: set data.text_column to one of them"
            )
        return ds

    def rows() -> Iterator[str]:
        for batch in dataset().iter(batch_size=1000):
            if cfg.text_column not in batch:
                raise GPTError(
                    f"{description} has no column {cfg.text_column!r}; set data.text_column"
                )
            for text in batch[cfg.text_column]:
                yield "" if text is None else str(text)

    def count() -> int | None:
        ds = dataset()
        return len(ds) if hasattr(ds, "__len__") else None  # streaming: unknown

    return Source(description, rows, identity, count)


def stdlib_files() -> list[Path]:
    """The running interpreter's standard-library .py files, without tests and idlelib."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [
        p
        for p in root.rglob("*.py")
        if not STDLIB_EXCLUDE.intersection(p.relative_to(root).parts)
    ]


def open_source(cfg: DataConfig) -> Source:
    """Interpret `[data] source` and return its documents."""
    spec = cfg.source
    if spec == "python-stdlib":
        return _file_source(stdlib_files(), "the Python standard library", cfg)
    if spec.startswith("hf:"):
        return _hub_source(spec, cfg)
    if spec.startswith(("http://", "https://")):
        return _url_source(spec, cfg)
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
            return _saved_dataset(path, cfg)
        patterns = [g.strip() for g in cfg.glob.split(",") if g.strip()]
        paths = sorted({p for g in patterns for p in path.glob(g) if p.is_file()})
        if not paths:
            raise GPTError(
                f"[data] source: no files in {path} match glob {cfg.glob!r}; set data.glob"
            )
        return _many_files(paths, f"folder {path}", cfg)
    if path.suffix.lower() in TABULAR:
        return _tabular([path], cfg)
    return _text_file_source(path, cfg)


def _many_files(paths: list[Path], description: str, cfg: DataConfig) -> Source:
    tabular = [p for p in paths if p.suffix.lower() in TABULAR]
    if tabular and len(tabular) == len(paths):
        return _tabular(paths, cfg)
    if len(paths) == 1:
        return _text_file_source(paths[0], cfg)
    return _file_source(paths, description, cfg)


def _tabular(paths: list[Path], cfg: DataConfig) -> Source:
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

    return _dataset_source(load, description, _stat_identity(paths), cfg)


def _saved_dataset(path: Path, cfg: DataConfig) -> Source:
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
    return _dataset_source(load, f"saved dataset {path}", _stat_identity(files), cfg)


def _hub_source(spec: str, cfg: DataConfig) -> Source:
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

    return _dataset_source(load, f"hub dataset {name}", [spec, cfg.split], cfg)


def _url_source(url: str, cfg: DataConfig) -> Source:
    """A text file at a URL (e.g. tiny Shakespeare), downloaded and cached by `datasets`."""

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

    text_cfg = dataclasses.replace(cfg, text_column="text")
    source = _dataset_source(load, f"text at {url}", [url], text_cfg)
    source.single_text = True  # one running text: split by characters
    source.count = lambda: None
    return source


# ---------------------------------------------------------------------------------------------
# Writing token files


class _TokenFile:
    """Appends token ids to `<name>.tmp`, hashing as it goes; `commit` renames it into place."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.tmp = path, path.with_name(path.name + ".tmp")
        self.dtype = dtype
        self.file = open(self.tmp, "wb")
        self.sha = hashlib.sha256()
        self.tokens = 0

    def write(self, ids: np.ndarray) -> None:
        data = ids.astype(self.dtype, copy=False).tobytes()
        self.file.write(data)
        self.sha.update(data)
        self.tokens += len(ids)

    def close(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        self.tmp.unlink(missing_ok=True)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32: never a silent overflow."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def _settings(cfg: DataConfig) -> dict[str, Any]:
    """The settings that decide the token files' contents (num_proc does not)."""
    return {
        "version": FORMAT_VERSION,
        "source": cfg.source,
        "tokenizer": cfg.tokenizer,
        "glob": cfg.glob,
        "text_column": cfg.text_column,
        "split": cfg.split,
        "val_fraction": cfg.val_fraction,
        "seed": cfg.seed,
        "decode_errors": cfg.decode_errors,
    }


def _fingerprint(cfg: DataConfig, source: Source) -> str:
    """A hash of the settings and of the source's identity (its files' sizes and times)."""
    record = {**_settings(cfg), "identity": source.identity}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _what_changed(meta: dict[str, Any], cfg: DataConfig) -> str:
    """The settings that differ from those `meta` was prepared with, for the refusal message."""
    before = meta.get("settings")
    if not isinstance(before, dict):  # prepared before meta.json recorded its settings
        return f"tokenizer {meta['tokenizer']['name']!r}, source {meta.get('source')!r}"
    now = json.loads(json.dumps(_settings(cfg)))  # as meta.json holds them
    changed = [f"{key} {before.get(key)!r} -> {now[key]!r}" for key in now
               if before.get(key) != now[key]]
    return ", ".join(changed) or "the source's files changed since"


def _is_val(index: int, val_set: set[int] | None, cfg: DataConfig) -> bool:
    """Document-level split: an exact random subset when the count is known, else by hash."""
    if val_set is not None:
        return index in val_set
    digest = hashlib.sha256(f"{cfg.seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < cfg.val_fraction


def _split_pieces(source: Source, cfg: DataConfig) -> Iterator[Piece]:
    """(split, text, ends_document) pieces in corpus order.

    A running text (or a corpus of one document) is split by characters, the first
    1 - val_fraction to train; documents are split whole, each by its index among all of them
    (empty and skipped ones included, so one unreadable file does not reshuffle the others).
    """
    count = source.count()
    if source.single_text or count == 1:
        total = sum(len(chunk) for chunk in source.documents())
        n_train = int(total * (1 - cfg.val_fraction))  # first 90%: train, last 10%: val
        seen = 0
        for chunk in source.documents():
            head = max(0, min(len(chunk), n_train - seen))
            if head:
                yield "train", chunk[:head], False
            if head < len(chunk):
                yield "val", chunk[head:], False
            seen += len(chunk)
        return
    val_set = None
    if count is not None and count > 1:
        n_val = max(1, round(count * cfg.val_fraction))
        val_set = set(random.Random(cfg.seed).sample(range(count), n_val))
    for index, text in enumerate(source.rows()):
        if text:
            yield ("val" if _is_val(index, val_set, cfg) else "train"), text, True


def _encode_batch(
    batch: list[Piece], tokenizer: Tokenizer, dtype: np.dtype
) -> tuple[dict[str, np.ndarray], int]:
    """A batch's ids joined per split in corpus order, an eot after each document, already in
    the files' dtype (so half the bytes travel back from a worker); and its UTF-8 size."""
    parts: dict[str, list[np.ndarray]] = {split: [] for split in SPLITS}
    eot = np.array([tokenizer.eot_id], dtype=dtype)
    n_bytes = 0
    for split, text, ends_document in batch:
        ids = tokenizer.encode_array(text)
        if len(ids) and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
            bad = int(ids.max() if ids.max() >= tokenizer.vocab_size else ids.min())
            raise GPTError(
                f"tokenizer {tokenizer.name!r} gave id {bad}, outside its vocabulary of "
                f"{tokenizer.vocab_size}; check data.tokenizer"
            )
        parts[split].append(ids.astype(dtype, copy=False))
        if ends_document:
            parts[split].append(eot)  # separates documents
        n_bytes += len(text.encode("utf-8"))
    joined = {split: np.concatenate(p) if p else np.empty(0, dtype) for split, p in parts.items()}
    return joined, n_bytes


_worker_state: tuple[Tokenizer, np.dtype] | None = None


def _init_worker(tokenizer_state: dict[str, Any], dtype_name: str) -> None:
    global _worker_state
    _worker_state = (tokenizer_from_dict(tokenizer_state), np.dtype(dtype_name))


def _encode_in_worker(batch: list[Piece]) -> tuple[dict[str, np.ndarray], int]:
    """Worker-process side of `_encode_stream`."""
    assert _worker_state is not None
    return _encode_batch(batch, *_worker_state)


def _worker_pool(workers: int, tokenizer: Tokenizer, dtype: np.dtype) -> ProcessPoolExecutor:
    """Processes rather than threads: tiktoken keeps the GIL for part of its work, so threads
    leave part of every extra core idle where processes use all of it."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(tokenizer.to_dict(), dtype.name),
    )


def _encode_stream(
    pieces: Iterator[Piece],
    tokenizer: Tokenizer,
    writers: dict[str, _TokenFile],
    workers: int,
    bar: tqdm,
) -> None:
    """Tokenize pieces in batches of about BATCH_CHARS on `workers` processes.

    Batches are written in corpus order; while workers encode, this process reads the next
    batch and writes finished ones, so reading, encoding and writing overlap. At most
    `workers + 1` batches are in memory at once, whatever the corpus size.
    """
    dtype = writers["train"].dtype

    def write(encoded: tuple[dict[str, np.ndarray], int]) -> None:
        ids, n_bytes = encoded
        for split, split_ids in ids.items():
            writers[split].write(split_ids)
        bar.update(n_bytes)
        bar.set_postfix(tokens=f"{sum(w.tokens for w in writers.values()):,}")

    def batches() -> Iterator[list[Piece]]:
        batch: list[Piece] = []
        size = 0
        for piece in pieces:
            batch.append(piece)
            size += len(piece[1])
            if size >= BATCH_CHARS:
                yield batch
                batch, size = [], 0
        if batch:
            yield batch

    if workers <= 1:
        for batch in batches():
            write(_encode_batch(batch, tokenizer, dtype))
        return
    in_flight: deque[Future[tuple[dict[str, np.ndarray], int]]] = deque()
    with _worker_pool(workers, tokenizer, dtype) as pool:
        for batch in batches():
            in_flight.append(pool.submit(_encode_in_worker, batch))
            while len(in_flight) > workers:
                write(in_flight.popleft().result())
        while in_flight:
            write(in_flight.popleft().result())


def prepare(
    cfg: DataConfig,
    block_size: int = 0,
    force: bool = False,
    progress: bool = True,
    vocabulary: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize `cfg.source` into `cfg.resolved_data_dir` and return its meta; a no-op when the
    folder already holds intact data prepared from the same source and settings.

    A data folder prepared from other settings is left alone unless `force`. With `block_size`,
    each split must hold at least `block_size + 1` tokens. `vocabulary` (a char tokenizer's
    record) fixes the char vocabulary instead of building it from the text: finetuning keeps the
    base model's ids.
    """
    source = open_source(cfg)
    fingerprint = _fingerprint(cfg, source)
    data_dir = cfg.resolved_data_dir
    # finished data is read without the lock (meta.json is written last), so a read-only
    # folder of prepared data still works
    checked = (cfg, fingerprint, vocabulary, block_size, force, progress)
    if (existing := _existing_data(*checked)) is not None:
        return existing
    # one writer per folder: a second prepare (or gpt train) of the same folder waits, then
    # finds the data ready instead of writing the same temporary files
    with FolderLock(data_dir, "gpt prepare", "data.data_dir", name=".prepare.lock", wait=True):
        if (existing := _existing_data(*checked)) is not None:
            return existing
        return _tokenize(cfg, source, fingerprint, block_size, progress, vocabulary)


def _existing_data(
    cfg: DataConfig, fingerprint: str, vocabulary: dict[str, Any] | None, block_size: int,
    force: bool, progress: bool,
) -> dict[str, Any] | None:
    """The meta of data already prepared from these settings; None if there is none yet (or
    `force` rebuilds it).

    Data prepared from other settings is an error that names what changed.
    """
    data_dir = cfg.resolved_data_dir
    if force or not (data_dir / "meta.json").exists():
        return None
    meta = load_meta(data_dir)
    same_vocabulary = vocabulary is None or meta["tokenizer"] == vocabulary
    if meta.get("fingerprint") == fingerprint and same_vocabulary:
        _check_split_sizes(meta, block_size, data_dir)
        if progress:
            print(f"{data_dir} is already prepared from these settings; nothing to do "
                  "(--force rebuilds)")
        return meta
    what = _what_changed(meta, cfg)
    if not same_vocabulary:
        what = "a char vocabulary other than the base model's"
    raise GPTError(
        f"{data_dir} holds data prepared from other settings ({what}); rebuild it with "
        "gpt prepare --force, or set data.data_dir to another folder"
    )


def _tokenize(
    cfg: DataConfig, source: Source, fingerprint: str, block_size: int, progress: bool,
    vocabulary: dict[str, Any] | None,
) -> dict[str, Any]:
    """Encode the source into data_dir's .bin files and meta.json (the caller holds the lock)."""
    data_dir = cfg.resolved_data_dir
    meta_path = data_dir / "meta.json"
    tokenizer: Tokenizer
    if cfg.tokenizer == "char" and vocabulary is not None:
        tokenizer = tokenizer_from_dict(vocabulary)
    elif cfg.tokenizer == "char":
        tokenizer = CharTokenizer.from_texts(source.documents())
    else:
        tokenizer = get_tokenizer(cfg.tokenizer)
    dtype = token_dtype(tokenizer.vocab_size)
    data_dir.mkdir(parents=True, exist_ok=True)
    writers = {split: _TokenFile(data_dir / f"{split}.bin", dtype) for split in SPLITS}
    workers = cfg.num_proc or os.cpu_count() or 1
    bar = tqdm(
        desc=f"tokenizing {source.description}", unit="B", unit_scale=True, disable=not progress
    )
    try:
        _encode_stream(_split_pieces(source, cfg), tokenizer, writers, workers, bar)
        for w in writers.values():
            w.close()
        if sum(w.tokens for w in writers.values()) == 0:
            raise GPTError(
                f"[data] source: {source.description} holds no text; point it at a corpus"
            )
        counts = {split: writers[split].tokens for split in SPLITS}
        _check_split_sizes({"tokens": counts}, block_size, data_dir)
    except BaseException:
        for w in writers.values():
            w.discard()
        raise
    finally:
        bar.close()

    meta = {
        "format_version": FORMAT_VERSION,
        "source": cfg.source,
        "fingerprint": fingerprint,
        "settings": _settings(cfg),
        "tokenizer": tokenizer.to_dict(),
        "vocab_size": tokenizer.vocab_size,
        "eot_id": tokenizer.eot_id,
        "dtype": dtype.name,
        "tokens": counts,
        "sha256": {split: writers[split].sha.hexdigest() for split in SPLITS},
        "skipped_files": len(source.skipped),
    }
    meta_path.unlink(missing_ok=True)  # a crash between the renames leaves "not prepared"
    for w in writers.values():
        os.replace(w.tmp, w.path)
    write_json_atomic(meta_path, meta)
    if progress:
        skipped = f", skipped {len(source.skipped)} non-UTF-8 file(s)" if source.skipped else ""
        print(
            f"wrote {data_dir}: train {counts['train']:,} tokens, val {counts['val']:,} tokens "
            f"({dtype.name}, {cfg.tokenizer}){skipped}"
        )
    return meta


def data_is_ready(cfg: DataConfig) -> bool:
    """Whether `cfg`'s data folder holds intact data prepared from this source and these
    settings (sizes checked, not hashes; hub datasets are not contacted)."""
    try:
        meta = load_meta(cfg.resolved_data_dir)
        return meta.get("fingerprint") == _fingerprint(cfg, open_source(cfg))
    except GPTError:
        return False


def _check_split_sizes(meta: dict[str, Any], block_size: int, data_dir: Path) -> None:
    for split in SPLITS:
        n = meta["tokens"][split]
        if n < block_size + 1:
            raise GPTError(
                f"{data_dir}: the {split} split has {n} tokens, fewer than block_size + 1 = "
                f"{block_size + 1}; add text, lower model.block_size, or change data.val_fraction"
            )


def load_meta(data_dir: str | Path, verify_hash: bool = False) -> dict[str, Any]:
    """Read meta.json and check the .bin files against it (sizes; sha256 with `verify_hash`)."""
    data_dir = Path(data_dir)
    meta_path = data_dir / "meta.json"
    if not meta_path.exists():
        raise GPTError(f"{data_dir} has no prepared data (no meta.json); run gpt prepare first")
    try:
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        tokens = {split: int(meta["tokens"][split]) for split in SPLITS}
        meta["tokenizer"]["name"]
    except (ValueError, KeyError, TypeError) as e:
        raise GPTError(f"{meta_path} is damaged ({e}); rebuild with gpt prepare --force") from None
    for split in SPLITS:
        path = data_dir / f"{split}.bin"
        expected = tokens[split] * dtype.itemsize
        actual = path.stat().st_size if path.exists() else None
        if actual != expected:
            found = "is missing" if actual is None else f"has {actual:,} bytes"
            raise GPTError(
                f"{path} {found} but meta.json says {tokens[split]:,} tokens ({expected:,} bytes): "
                "truncated or corrupted; rebuild with gpt prepare --force"
            )
        if verify_hash:
            if sha256_file(path) != meta["sha256"][split]:
                raise GPTError(
                    f"{path} does not match its sha256 in meta.json; "
                    "rebuild with gpt prepare --force"
                )
    return meta


def check_tokenizer(meta: dict[str, Any], expected: dict[str, Any], data_dir: str | Path) -> None:
    """Refuse data tokenized differently from what the model was trained with."""
    if meta["tokenizer"] != expected:
        raise GPTError(
            f"{data_dir} was prepared with the {meta['tokenizer']['name']!r} tokenizer but the "
            f"model uses {expected.get('name')!r} (or another vocabulary); prepare the data with "
            "the model's tokenizer (data.tokenizer, gpt prepare --force)"
        )


# ---------------------------------------------------------------------------------------------
# Batches for training


class BatchSampler:
    """Random windows of block_size + 1 tokens from one split, reproducible and resumable.

    All ranks of a distributed run share one generator stream per (seed, split): each call draws
    the start positions of `world_size` batches and rank r reads the r-th, so every rank sees
    different data and N ranks see exactly the batches one process would see over N micro-steps.
    `state_dict()` is plain data (JSON-able); `load_state_dict` restores the stream exactly.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        if split not in SPLITS:
            raise GPTError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        meta = load_meta(data_dir)
        self.data = np.memmap(Path(data_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r")
        if len(self.data) < block_size + 1:
            raise GPTError(
                f"{data_dir}: the {split} split has {len(self.data)} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}; add text or lower model.block_size"
            )
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(self._stream_seed(seed, split))
        self._offsets = np.arange(block_size + 1)  # (T + 1,)

    @staticmethod
    def _stream_seed(seed: int, split: str) -> int:
        key = f"{seed}:{split}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, block_size) int64, y being x shifted left by one token."""
        starts = torch.randint(
            len(self.data) - self.block_size,
            (self.world_size, self.batch_size),
            generator=self.generator,
        )[self.rank]  # (B,): this rank's row of the world's batches
        windows = self.data[starts.numpy()[:, None] + self._offsets]  # (B, T + 1)
        batch = torch.from_numpy(windows.astype(np.int64))
        x, y = batch[:, :-1], batch[:, 1:]
        if self.device.type == "cuda":  # page-locked host memory lets the copy overlap compute
            return (
                x.pin_memory().to(self.device, non_blocking=True),
                y.pin_memory().to(self.device, non_blocking=True),
            )
        return x.contiguous().to(self.device), y.contiguous().to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
