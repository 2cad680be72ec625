"""The prepare pipeline: a source's documents -> train/val pieces -> tokens, written atomically.

`prepare` splits the documents into train and validation, tokenizes them in batches on worker
processes (gpt/data/workers.py) and streams the ids to a `PreparedDataWriter`, so memory stays
bounded whatever the corpus size. A fingerprint of the settings and of the source's identity
decides whether a folder already holds this data; a lock in the folder keeps a second prepare
from writing it at once.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from gpt.config import DataConfig
from gpt.data.chat import (
    BestFitPacker,
    ChatItem,
    SplitStats,
    chat_report,
    encode_chats,
    messages_of,
)
from gpt.data.prepared import (
    FORMAT_VERSION,
    SPLITS,
    PreparedData,
    PreparedDataWriter,
    has_prepared_data,
)
from gpt.data.sources import Source, open_source
from gpt.data.workers import in_order
from gpt.errors import GPTError
from gpt.lock import FolderLock
from gpt.tokenizer import (
    BPETokenizer,
    CharTokenizer,
    Tokenizer,
    check_same_tokenizer,
    get_tokenizer,
    tokenizer_from_dict,
    with_chat_tokens,
)

PREPARE_LOCK = ".prepare.lock"  # in the data folder: one prepare writes it at a time
BATCH_CHARS = 2_000_000  # text per worker task: amortises the round trip, bounds memory
NEAR = 1.25  # a random choice of validation documents within this factor of val_fraction is kept
FAR = 2.0  # a validation share of the text further off than this factor is warned about

CHAT_BATCH = 1000  # conversations per worker task

Piece = tuple[str, str, bool]  # (split, text, ends_document): a unit of tokenizer work
ChatRow = tuple[str, str, "list[dict[str, str]] | GPTError"]  # (split, where, messages or why not)


def _settings(cfg: DataConfig, block_size: int) -> dict[str, Any]:
    """The settings that decide the token files' contents (num_proc does not); a learned
    vocabulary's size only where one is learned, and chat data's settings (its rows' block_size
    among them) only for chat data, so other folders keep their fingerprints."""
    learned = {"bpe_vocab_size": cfg.bpe_vocab_size} if cfg.tokenizer == BPETokenizer.name else {}
    chat = {
        "format": cfg.format,
        "block_size": block_size,
        "bad_rows": cfg.bad_rows,
        "long_conversations": cfg.long_conversations,
    } if cfg.format == "chat" else {}
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
        **learned,
        **chat,
    }


def _fingerprint(cfg: DataConfig, source: Source, block_size: int) -> str:
    """A hash of the settings and of the source's identity (its files' sizes and times)."""
    record = {**_settings(cfg, block_size), "identity": source.identity}
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def _what_changed(meta: dict[str, Any], cfg: DataConfig, block_size: int) -> str:
    """The settings that differ from those `meta` was prepared with, for the refusal message."""
    before = meta.get("settings")
    if not isinstance(before, dict):  # prepared before meta.json recorded its settings
        return f"tokenizer {meta['tokenizer']['name']!r}, source {meta.get('source')!r}"
    now = json.loads(json.dumps(_settings(cfg, block_size)))  # as meta.json holds them
    was = before.get("format", "text")  # a folder prepared without the key holds text
    changed = [f"format {was!r} -> {cfg.format!r}"] if was != cfg.format else []
    changed += [f"{key} {before.get(key)!r} -> {now[key]!r}" for key in now
                if before.get(key) != now[key] and (key in before or was == cfg.format)]
    return ", ".join(changed) or "the source's files changed since"


def _is_val(index: int, val_set: set[int] | None, cfg: DataConfig) -> bool:
    """Document-level split: an exact random subset when the count is known, else by hash."""
    if val_set is not None:
        return index in val_set
    digest = hashlib.sha256(f"{cfg.seed}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < cfg.val_fraction


def _choose_val(count: int, sizes: list[int] | None, cfg: DataConfig) -> set[int]:
    """The indices of the validation documents, chosen by `cfg.seed`.

    First round(count * val_fraction) of them (at least one) at random. Where the documents'
    sizes are known and those hold a share of the bytes outside a factor NEAR of val_fraction
    (a 3 MB file among 0.3 MB ones), documents are instead taken in a seeded random order
    whenever one brings the validation bytes closer to val_fraction of the total.
    """
    n_val = max(1, round(count * cfg.val_fraction))
    chosen = set(random.Random(cfg.seed).sample(range(count), n_val))
    total = sum(sizes) if sizes is not None else 0
    if sizes is None or total == 0:
        return chosen
    share = sum(sizes[i] for i in chosen) / total
    if cfg.val_fraction / NEAR <= share <= cfg.val_fraction * NEAR:
        return chosen
    order = list(range(count))
    random.Random(cfg.seed).shuffle(order)
    with_text = [i for i in order if sizes[i]]
    if len(with_text) < 2:
        return chosen
    target = cfg.val_fraction * total
    val: set[int] = set()
    held = 0
    for i in with_text:
        closer = abs(held + sizes[i] - target) < abs(held - target)
        if closer and len(val) + 1 < len(with_text):  # train keeps a document with text
            val.add(i)
            held += sizes[i]
    if not val:  # each document alone is over twice the target: the smallest is closest
        val.add(min(with_text, key=lambda i: sizes[i]))
    return val


def _warn_if_uneven(chars: dict[str, int], documents: int, cfg: DataConfig) -> None:
    """Say on stderr when a document-level split put a share of the text in validation far
    from val_fraction (few documents of unequal sizes), rather than train on it unnoticed."""
    total = chars["train"] + chars["val"]
    if total == 0:
        return
    share = chars["val"] / total
    if cfg.val_fraction / FAR <= share <= cfg.val_fraction * FAR:
        return
    print(
        f"warning: the validation split holds {share:.1%} of the text where val_fraction asks "
        f"for {cfg.val_fraction:.1%}: {documents} documents are too few or too unequal in size "
        "to split closer; add documents, or join them into one text file (split by characters)",
        file=sys.stderr,
    )


def _split_pieces(source: Source, cfg: DataConfig, warn: bool = True) -> Iterator[Piece]:
    """(split, text, ends_document) pieces in corpus order.

    A running text (or a corpus of one document) is split by characters, the first
    1 - val_fraction to train; documents are split whole, each by its index among all of them
    (empty and skipped ones included, so one unreadable file does not reshuffle the others),
    as `_choose_val` says when their count is known, else by a seeded hash of the index. The
    characters of each split are counted as they go, for `_warn_if_uneven` (unless not `warn`:
    a second pass over the same split).
    """
    count = None if source.single_text else source.count()  # a URL's text is not loaded twice
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
    val_set = _choose_val(count, source.sizes(), cfg) if count is not None and count > 1 else None
    chars = dict.fromkeys(SPLITS, 0)
    documents = 0
    for index, text in enumerate(source.rows()):
        if text:
            split = "val" if _is_val(index, val_set, cfg) else "train"
            chars[split] += len(text)
            documents += 1
            yield split, text, True
    if warn:
        _warn_if_uneven(chars, documents, cfg)


def _train_texts(source: Source, cfg: DataConfig) -> Iterator[str]:
    """The texts of the train split alone, what a learned tokenizer may see: the validation
    text never shapes the vocabulary it is measured with."""
    for split, text, _ in _split_pieces(source, cfg, warn=False):
        if split == "train":
            yield text


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


def _encode_stream(
    pieces: Iterator[Piece],
    tokenizer: Tokenizer,
    writer: PreparedDataWriter,
    workers: int,
    bar: tqdm,
) -> None:
    """Tokenize pieces in batches of about BATCH_CHARS on `workers` processes, written in
    corpus order (`workers.in_order`)."""
    dtype = writer.dtype

    def write(encoded: tuple[dict[str, np.ndarray], int]) -> None:
        ids, n_bytes = encoded
        for split, split_ids in ids.items():
            writer.write(split, split_ids)
        bar.update(n_bytes)
        bar.set_postfix(tokens=f"{sum(writer.tokens.values()):,}")

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

    for encoded in in_order(batches(), _encode_batch, workers, tokenizer, dtype):
        write(encoded)


def _conversations(source: Source, cfg: DataConfig) -> Iterator[ChatRow]:
    """(split, where, messages or what is wrong with the row) of each chat row, in order. Rows
    go to train or validation whole, as documents do: by their index among all rows (bad ones
    included, so that skipping one does not reshuffle the others)."""
    count = source.count()
    val_set = _choose_val(count, None, cfg) if count is not None and count > 1 else None
    for index, (where, row) in enumerate(source.records()):
        split = "val" if _is_val(index, val_set, cfg) else "train"
        try:
            yield split, where, messages_of(row)
        except GPTError as e:
            yield split, where, e


def chat_texts(source: Source, cfg: DataConfig, split: str | None = None) -> Iterator[str]:
    """The roles and contents of the readable conversations (of `split` only, when given):
    what a char vocabulary is built from, and a BPE learned from (the train split)."""
    for in_split, _, messages in _conversations(source, cfg):
        if isinstance(messages, GPTError) or split not in (None, in_split):
            continue
        for message in messages:
            yield message["role"]
            yield message["content"]


def _write_chats(
    source: Source, cfg: DataConfig, block_size: int, writer: PreparedDataWriter, workers: int,
    bar: tqdm,
) -> dict[str, Any]:
    """Encode the conversations (on `workers` processes), best-fit pack each split's into rows
    of block_size + 1 tokens and write them with their masks; returns what went in, for
    meta.json and the report. A bad row (or one over a row's length) fails or is counted as
    `cfg` says."""
    row_len, tokenizer = block_size + 1, writer.tokenizer
    packers = {split: BestFitPacker(row_len, tokenizer.eot_id) for split in SPLITS}
    stats = {split: SplitStats() for split in SPLITS}
    skipped: list[str] = []

    def refuse_or_skip(where: str, problem: str) -> None:
        if cfg.bad_rows == "fail":
            raise GPTError(f"{where}: {problem}; fix the row, or set data.bad_rows = \"skip\" to "
                           "skip such rows")
        skipped.append(f"{where}: {problem}")

    def batches() -> Iterator[list[ChatItem]]:
        batch: list[ChatItem] = []
        for split, where, messages in _conversations(source, cfg):
            if isinstance(messages, GPTError):
                refuse_or_skip(where, str(messages))
                continue
            batch.append((split, where, messages))
            if len(batch) == CHAT_BATCH:
                yield batch
                batch = []
        if batch:
            yield batch

    def write(split: str, rows: Iterator[tuple[np.ndarray, np.ndarray]]) -> None:
        for ids, mask in rows:
            writer.write(split, ids.astype(writer.dtype, copy=False), mask)
            stats[split].rows += 1
            stats[split].trained += int(mask[1:].sum())  # a row's first token is no target

    for encoded in in_order(batches(), encode_chats, workers, tokenizer, writer.dtype):
        for split, where, result in encoded:
            if isinstance(result, str):
                refuse_or_skip(where, result)
                continue
            ids, mask, turns = result
            if len(ids) > row_len:
                if cfg.long_conversations == "fail":
                    raise GPTError(
                        f"{where}: the conversation has {len(ids):,} tokens, more than a row of "
                        f"model.block_size + 1 = {row_len}; shorten it, raise model.block_size, "
                        "or set data.long_conversations = \"truncate\""
                    )
                stats[split].truncated += 1
                ids, mask = ids[:row_len], mask[:row_len]
                if not mask[1:].any():  # nothing of the assistant's is left to train on
                    stats[split].dropped += 1
                    continue
            stats[split].conversations += 1
            stats[split].turns += turns
            write(split, packers[split].add(ids, mask))
            bar.update(1)
    dropped = sum(st.dropped for st in stats.values())
    if dropped and not any(st.conversations for st in stats.values()):
        raise GPTError(
            f"[data] source: {source.description}: each of its {dropped:,} conversations is "
            f"longer than a row of model.block_size + 1 = {row_len} tokens, and no assistant "
            "token is left in the row; raise model.block_size, or shorten the conversations"
        )
    for split, packer in packers.items():
        write(split, packer.finish())
        stats[split].tokens = stats[split].rows * row_len
        stats[split].padding = packer.padding
    if skipped:
        bar.write(f"warning: skipped {len(skipped):,} bad row(s), the first: {skipped[0]}",
                  file=sys.stderr)  # on a line of its own, not after the progress bar
    return {**{split: st.as_dict() for split, st in stats.items()}, "skipped": len(skipped)}


def prepare(
    cfg: DataConfig,
    block_size: int = 0,
    force: bool = False,
    progress: bool = True,
    tokenizer_record: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Tokenize `cfg.source` into `cfg.resolved_data_dir` and return its meta; a no-op when the
    folder already holds intact data prepared from the same source and settings.

    A data folder prepared from other settings is left alone unless `force`. With `block_size`,
    each split must hold at least `block_size + 1` tokens. `tokenizer_record` (a `to_dict()`:
    a char vocabulary, an HF model's tokenizer) is the tokenizer used instead of the one
    `cfg.tokenizer` names or builds from the text: finetuning keeps the base model's ids.
    Chat data (`cfg.format`) is packed into rows of `block_size + 1` tokens, so it needs one,
    and its tokenizer is that tokenizer with the chat layout's tokens (`with_chat_tokens`).
    """
    if cfg.format == "chat":
        if block_size < 1:
            raise GPTError("[data] format = \"chat\" packs conversations into rows of "
                           "model.block_size + 1 tokens; prepare it with a block_size")
        if tokenizer_record is not None:
            tokenizer_record = with_chat_tokens(tokenizer_from_dict(tokenizer_record)).to_dict()
    source = open_source(cfg)
    fingerprint = _fingerprint(cfg, source, block_size)
    data_dir = cfg.resolved_data_dir
    # finished data is read without the lock (meta.json is written last), so a read-only
    # folder of prepared data still works
    checked = (cfg, fingerprint, tokenizer_record, block_size, force, progress)
    if (existing := _existing_data(*checked)) is not None:
        return existing
    created = _missing_folders(data_dir)
    had_lock = (data_dir / PREPARE_LOCK).exists()  # an earlier prepare's, in its folder: stays
    # one writer per folder: a second prepare (or gpt train) of the same folder waits, then
    # finds the data ready instead of writing the same temporary files
    with FolderLock(
        data_dir, "gpt prepare", "data.data_dir", name=PREPARE_LOCK, wait=True
    ) as lock:
        try:
            if (existing := _existing_data(*checked)) is not None:
                return existing
            return _tokenize(cfg, source, fingerprint, block_size, progress, tokenizer_record)
        except BaseException:
            if created or not had_lock:
                _remove_unused(lock, created)
            raise


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, innermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _remove_unused(lock: FolderLock, created: list[Path]) -> None:
    """After a failed prepare, still holding the lock it created: remove the lock file, then
    the folders this prepare created where they are empty, so that a failure leaves the folder
    as it was, or none (a process waiting on the removed lock file locks a new one: see
    gpt/lock.py)."""
    try:
        lock.path.unlink()
        for folder in created:
            folder.rmdir()  # stops at the first that is not empty
    except OSError:
        pass


def _existing_data(
    cfg: DataConfig, fingerprint: str, tokenizer_record: dict[str, Any] | None, block_size: int,
    force: bool, progress: bool,
) -> dict[str, Any] | None:
    """The meta of data already prepared from these settings; None if there is none yet (or
    `force` rebuilds it).

    Data prepared from other settings is an error that names what changed.
    """
    data_dir = cfg.resolved_data_dir
    if force or not has_prepared_data(data_dir):
        return None
    meta = PreparedData(data_dir).meta
    fix = "rebuild it with gpt prepare --force, or set data.data_dir to another folder"
    if tokenizer_record is not None:
        check_same_tokenizer(meta["tokenizer"], tokenizer_record,
                             f"{data_dir} holds data prepared from other settings, with",
                             "the base model", fix)
    if meta.get("fingerprint") == fingerprint:
        _check_split_sizes(meta["tokens"], block_size, data_dir)
        if progress:
            print(f"{data_dir} is already prepared from these settings; nothing to do "
                  "(--force rebuilds)")
        return meta
    changed = _what_changed(meta, cfg, block_size)
    raise GPTError(f"{data_dir} holds data prepared from other settings ({changed}); {fix}")


def _tokenize(
    cfg: DataConfig, source: Source, fingerprint: str, block_size: int, progress: bool,
    tokenizer_record: dict[str, Any] | None,
) -> dict[str, Any]:
    """Encode the source into data_dir's token files and meta.json (the caller holds the lock),
    with the tokenizer of `tokenizer_record` when given, else the one `cfg.tokenizer` names."""
    data_dir = cfg.resolved_data_dir
    chat = cfg.format == "chat"
    tokenizer: Tokenizer
    if tokenizer_record is not None:
        tokenizer = tokenizer_from_dict(tokenizer_record)
    elif cfg.tokenizer == CharTokenizer.name:
        tokenizer = CharTokenizer.from_texts(
            chat_texts(source, cfg) if chat else source.documents())
    elif cfg.tokenizer == BPETokenizer.name:
        if block_size and not chat:  # learning takes long: none for a text whose splits
            bound = _token_bound(source, cfg, block_size + 1)  # cannot be long enough
            _check_split_sizes(bound, block_size, data_dir, at_most=True)
        if progress:
            print(f"learning a {cfg.bpe_vocab_size}-id BPE from the train split of "
                  f"{source.description}")
        started = time.perf_counter()
        texts = chat_texts(source, cfg, "train") if chat else _train_texts(source, cfg)
        tokenizer = BPETokenizer.learn(texts, cfg.bpe_vocab_size)
        if progress:
            print(f"learned {tokenizer.vocab_size} ids in {time.perf_counter() - started:.1f} s")
    else:
        tokenizer = get_tokenizer(cfg.tokenizer)
    if chat:
        tokenizer = with_chat_tokens(tokenizer)
    workers = cfg.num_proc or os.cpu_count() or 1
    bar = tqdm(desc=f"tokenizing {source.description}", unit=" conversations" if chat else "B",
               unit_scale=not chat, disable=not progress)
    try:
        with _write_errors(data_dir), PreparedDataWriter(
            data_dir, tokenizer, block_size if chat else None
        ) as writer:
            if chat:
                report = {"chat": _write_chats(source, cfg, block_size, writer, workers, bar)}
            else:
                _encode_stream(_split_pieces(source, cfg), tokenizer, writer, workers, bar)
                report = {}
            counts = writer.tokens
            if sum(counts.values()) == 0:
                what = "no conversations" if chat else "no text"
                raise GPTError(
                    f"[data] source: {source.description} holds {what}; point it at a corpus"
                )
            _check_split_sizes(counts, block_size, data_dir)
            meta = writer.commit({
                "source": cfg.source,
                "fingerprint": fingerprint,
                "settings": _settings(cfg, block_size),
                "skipped_files": len(source.skipped),
                **report,
            })
    finally:
        bar.close()
    if progress:
        print(_wrote_line(meta, cfg, data_dir, source))
    return meta


def _wrote_line(meta: dict[str, Any], cfg: DataConfig, data_dir: Path, source: Source) -> str:
    """What prepare wrote, in a line: each split's tokens, or a chat set's report."""
    if "chat" in meta:
        return f"wrote {data_dir} ({meta['dtype']}, {cfg.tokenizer}): {chat_report(meta['chat'])}"
    skipped = f", skipped {len(source.skipped)} non-UTF-8 file(s)" if source.skipped else ""
    counts = meta["tokens"]
    return (f"wrote {data_dir}: train {counts['train']:,} tokens, val {counts['val']:,} tokens "
            f"({meta['dtype']}, {cfg.tokenizer}){skipped}")


WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


@contextlib.contextmanager
def _write_errors(data_dir: Path) -> Iterator[None]:
    """A token file that cannot be written (a full disk, say) as one line; the writer has
    removed its temporary files by then, and data prepared there before is untouched."""
    try:
        yield
    except OSError as e:
        where = Path(e.filename).resolve() if isinstance(e.filename, str) else None
        ours = where is not None and data_dir.resolve() in (where, *where.parents)
        if e.errno not in WRITE_ERRNOS and not ours:  # reading the source: its own error
            raise
        full = e.errno in (errno.ENOSPC, errno.EDQUOT)
        fix = "free some space" if full else "make it writable"
        raise GPTError(
            f"cannot write the token files into {data_dir} ({e.strerror or e}); {fix}, or set "
            "data.data_dir to another folder (data prepared there before is kept)"
        ) from None


def _token_bound(source: Source, cfg: DataConfig, enough: int) -> dict[str, int]:
    """Each split's UTF-8 bytes plus its documents' end-of-text ids: at least as many as the
    tokens a byte-level tokenizer gives it (each token holds one byte or more). Counted until
    both splits reach `enough`, so a long corpus is read only as far as that."""
    bound = dict.fromkeys(SPLITS, 0)
    for split, text, ends_document in _split_pieces(source, cfg, warn=False):
        bound[split] += len(text.encode("utf-8")) + ends_document
        if min(bound.values()) >= enough:
            break
    return bound


def _check_split_sizes(
    counts: dict[str, int], block_size: int, data_dir: Path, at_most: bool = False
) -> None:
    """Each split must hold a block and its next token; `at_most`: `counts` bound the tokens
    from above (before a tokenizer is learned), a bound below that already fails."""
    for split in SPLITS:
        n = counts[split]
        if n < block_size + 1:
            raise GPTError(
                f"{data_dir}: the {split} split has {'at most ' * at_most}{n} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}; add text, lower model.block_size, or change "
                "data.val_fraction"
            )


