"""The prepared-data format: the one module that knows how a data folder is laid out on disk.

    meta.json     format version, tokenizer record, vocab size, eot id, dtype, token counts and
                  sha256 per split, plus what `prepare` records of the source and settings
    train.bin     the train split's token ids, flat, in `dtype` (uint16, or uint32 for vocabularies
    val.bin       over 65,536 ids); documents separated by the eot id

Chat data (meta.json's `format` is "chat"; without the key a folder holds text) holds rows of
exactly `block_size + 1` tokens, conversations best-fit packed into them and padded, and beside
each split a mask of one byte per token, 1 where the loss counts the token (the assistant's):

    train.mask    uint8, one per token of train.bin
    val.mask

`PreparedDataWriter` writes a folder: token files under temporary names, renamed into place on
`commit`, meta.json last, so a folder with a meta.json is complete. `PreparedData` opens one,
checked against its meta.json, and hands out read-only memmaps; `BatchSampler` draws training
batches from them.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt.errors import GPTError, first_line
from gpt.fileio import MiB, read_bounded, sha256_file, write_json_atomic
from gpt.tokenizer import Tokenizer, check_same_tokenizer

FORMAT_VERSION = 2  # 2: a folder's documents are split by their sizes, not their count
SPLITS = ("train", "val")
META_FILE = "meta.json"
META_LIMIT = 256 * MiB  # bytes of a meta.json: the tokenizer's record is most of it
MASK_DTYPE = np.dtype(np.uint8)  # chat data's loss mask: 0 or 1 per token


def _token_path(data_dir: Path, split: str) -> Path:
    return data_dir / f"{split}.bin"


def _mask_path(data_dir: Path, split: str) -> Path:
    return data_dir / f"{split}.mask"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32: never a silent overflow."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def has_prepared_data(data_dir: str | Path) -> bool:
    """Whether a prepare finished in `data_dir` (meta.json is written last), intact or not."""
    try:
        return (Path(data_dir) / META_FILE).exists()
    except OSError as e:  # it, or a folder above it, cannot be read
        raise GPTError(f"cannot read {data_dir} ({e.strerror}); make it readable, or set "
                       "data.data_dir to another folder") from None


class PreparedData:
    """A prepared data folder, checked on opening: meta.json readable, every split's file the size
    meta.json says (and, with `verify_hash`, the sha256 it says)."""

    def __init__(self, data_dir: str | Path, verify_hash: bool = False) -> None:
        self.data_dir = Path(data_dir)
        meta_path = self.data_dir / META_FILE
        if not meta_path.exists():
            raise GPTError(
                f"{self.data_dir} has no prepared data (no meta.json); run gpt prepare first"
            )
        try:
            self.meta: dict[str, Any] = json.loads(
                read_bounded(meta_path, META_LIMIT, "a data folder's meta.json"))
            self.dtype = np.dtype(self.meta["dtype"])
            self._counts = {split: int(self.meta["tokens"][split]) for split in SPLITS}
            int(self.meta["vocab_size"])
            self.meta["tokenizer"]["name"]
            self.format: str = self.meta.get("format", "text")
            if self.format not in ("text", "chat"):
                raise ValueError(f"unknown format {self.format!r}")
            self.block_size: int | None = (
                int(self.meta["block_size"]) if self.format == "chat" else None
            )
        except OSError as e:
            raise GPTError(
                f"cannot read {meta_path} ({e.strerror}); make it readable, or rebuild with gpt "
                "prepare --force"
            ) from None
        except (ValueError, KeyError, TypeError, RecursionError) as e:
            raise GPTError(
                f"{meta_path} is damaged ({first_line(e, 120)}); rebuild with gpt prepare --force"
            ) from None
        for split in SPLITS:
            hashes = self.meta["sha256"] if verify_hash else {}
            self._check_file(_token_path(self.data_dir, split), self.dtype, split, hashes)
            if self.format == "chat":
                hashes = self.meta["mask_sha256"] if verify_hash else {}
                self._check_file(_mask_path(self.data_dir, split), MASK_DTYPE, split, hashes)

    def _check_file(
        self, path: Path, dtype: np.dtype, split: str, hashes: dict[str, str]
    ) -> None:
        """The file holds the split's count of `dtype` values, and the sha256 `hashes` gives
        (when given: checking it reads the whole file)."""
        count = self._counts[split]
        expected = count * dtype.itemsize
        actual = path.stat().st_size if path.exists() else None
        if actual != expected:
            found = "is missing" if actual is None else f"has {actual:,} bytes"
            raise GPTError(
                f"{path} {found} but meta.json says {count:,} tokens ({expected:,} bytes): "
                "truncated or corrupted; rebuild with gpt prepare --force"
            )
        if hashes and sha256_file(path) != hashes[split]:
            raise GPTError(
                f"{path} does not match its sha256 in meta.json; rebuild with gpt prepare --force"
            )

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The record of the tokenizer the data was built with (`tokenizer_from_dict` reads it)."""
        return self.meta["tokenizer"]

    @property
    def vocab_size(self) -> int:
        """The tokenizer's vocabulary size, before the model pads it."""
        return int(self.meta["vocab_size"])

    @property
    def eot_id(self) -> int:
        """The end-of-text id that ends each document, which document masking splits rows at
        (read only then: data without it trains as before)."""
        found = self.meta.get("eot_id")
        if not isinstance(found, int) or isinstance(found, bool):
            raise GPTError(
                f"{self.data_dir / META_FILE} records no end-of-text id (eot_id), where "
                "train.document_masking starts each document; rebuild with gpt prepare --force, "
                "or set train.document_masking = false"
            )
        return found

    def tokens(self, split: str) -> np.ndarray:
        """A split's token ids as a read-only memmap: nothing is read until it is indexed."""
        return self._map(_token_path(self.data_dir, split), self.dtype, split)

    def mask(self, split: str) -> np.ndarray | None:
        """Chat data: a split's loss mask (1 where the loss counts the token), as a read-only
        memmap beside its tokens; None for text, every token of which is trained on."""
        if self.format != "chat":
            return None
        return self._map(_mask_path(self.data_dir, split), MASK_DTYPE, split)

    def _map(self, path: Path, dtype: np.dtype, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise GPTError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
        if self._counts[split] == 0:  # a file of no bytes cannot be mapped
            return np.empty(0, dtype=dtype)
        try:
            return np.memmap(path, dtype=dtype, mode="r")
        except OSError as e:  # not readable by this user
            raise GPTError(
                f"cannot read {path} ({e.strerror}); make it readable, or rebuild with gpt "
                "prepare --force"
            ) from None

    def check_tokenizer(self, expected: dict[str, Any]) -> None:
        """Refuse data tokenized differently from what the model was trained with."""
        check_same_tokenizer(
            self.tokenizer, expected, f"{self.data_dir} was prepared with", "the model",
            "prepare the data with the model's tokenizer (data.tokenizer, gpt prepare --force)",
        )


def check_chat_rows(data: PreparedData, block_size: int) -> None:
    """Chat data's rows hold block_size + 1 tokens: a model of another block_size cannot read
    them as rows."""
    if data.block_size != block_size:
        raise GPTError(
            f"{data.data_dir} holds chat data packed for model.block_size = {data.block_size}, "
            f"the model's is {block_size}; prepare it again for this block_size (gpt prepare "
            "--force), or set data.data_dir to another folder"
        )


class _TokenFile:
    """Appends token ids to `<name>.tmp`, hashing as it goes."""

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


class PreparedDataWriter:
    """Writes a data folder for `tokenizer`; used as a context manager, it removes everything it
    wrote unless `commit` was reached, so an error or an interrupt leaves nothing that looks
    finished. With `block_size`, chat data: rows of block_size + 1 tokens, each with its mask."""

    def __init__(self, data_dir: Path, tokenizer: Tokenizer, block_size: int | None = None) -> None:
        self.data_dir = data_dir
        self.tokenizer = tokenizer
        self.block_size = block_size
        self.dtype = token_dtype(tokenizer.vocab_size)
        data_dir.mkdir(parents=True, exist_ok=True)
        self._files = {s: _TokenFile(_token_path(data_dir, s), self.dtype) for s in SPLITS}
        self._masks = {} if block_size is None else {
            s: _TokenFile(_mask_path(data_dir, s), MASK_DTYPE) for s in SPLITS
        }
        self._committed = False

    def write(self, split: str, ids: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append ids (already checked to fit `dtype`) to a split, and for chat data their
        mask."""
        self._files[split].write(ids)
        if mask is not None:
            self._masks[split].write(mask)

    @property
    def tokens(self) -> dict[str, int]:
        """Tokens written so far, per split."""
        return {split: f.tokens for split, f in self._files.items()}

    def commit(self, info: dict[str, Any]) -> dict[str, Any]:
        """Move the token files into place, then write meta.json (with `info`, what the caller
        records of how the data was made) last; returns the meta."""
        files = [*self._files.values(), *self._masks.values()]
        for f in files:
            f.close()
        chat = {} if self.block_size is None else {
            "format": "chat",
            "block_size": self.block_size,
            "mask_sha256": {split: f.sha.hexdigest() for split, f in self._masks.items()},
        }
        meta = {
            "format_version": FORMAT_VERSION,
            **chat,
            **info,
            "tokenizer": self.tokenizer.to_dict(),
            "vocab_size": self.tokenizer.vocab_size,
            "eot_id": self.tokenizer.eot_id,
            "dtype": self.dtype.name,
            "tokens": self.tokens,
            "sha256": {split: f.sha.hexdigest() for split, f in self._files.items()},
        }
        meta_path = self.data_dir / META_FILE
        meta_path.unlink(missing_ok=True)  # a crash between the renames leaves "not prepared"
        for f in files:
            os.replace(f.tmp, f.path)
        write_json_atomic(meta_path, meta)  # flushes the folder, the renames with it
        self._committed = True
        return meta

    def discard(self) -> None:
        """Remove the temporary token (and mask) files."""
        for f in [*self._files.values(), *self._masks.values()]:
            f.discard()

    def __enter__(self) -> PreparedDataWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.discard()


class BatchSampler:
    """Random windows of block_size + 1 tokens from one split, reproducible and resumable; of
    chat data, random rows, whose targets are -1 (ignored by the loss) where the mask is 0.

    All ranks of a distributed run share one generator stream per (seed, split): each call draws
    the start positions of `world_size` batches and rank r reads the r-th, so every rank sees
    different data and N ranks see exactly the batches one process would see over N micro-steps.
    `state_dict()` is plain data (JSON-able); `load_state_dict` restores the stream exactly.

    `prefetch()` draws the next batch ahead of time (on CUDA its copy to the device is queued
    behind the work already launched) and `next_batch` hands it out; the stream is the same
    with or without it, and `state_dict()` is the state before a held batch, so a run resumed
    from it draws that batch again.
    """

    def __init__(
        self,
        data: PreparedData | str | Path,
        split: str,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        prepared = data if isinstance(data, PreparedData) else PreparedData(data)  # opened once
        self.data = prepared.tokens(split)
        self.mask = prepared.mask(split)
        if self.mask is not None:
            check_chat_rows(prepared, block_size)
        if len(self.data) < block_size + 1:
            raise GPTError(
                f"{prepared.data_dir}: the {split} split has {len(self.data)} tokens, fewer than "
                f"block_size + 1 = {block_size + 1}; add text or lower model.block_size"
            )
        self.block_size, self.batch_size = block_size, batch_size
        self.rank, self.world_size = rank, world_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(self._stream_seed(seed, split))
        self._offsets = np.arange(block_size + 1)  # (T + 1,)
        # a batch drawn ahead by `prefetch`, with the generator state from before it
        self._held: tuple[tuple[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @staticmethod
    def _stream_seed(seed: int, split: str) -> int:
        key = f"{seed}:{split}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y: (batch_size, block_size) int64, y being x shifted left by one token."""
        if self._held is not None:
            batch, self._held = self._held[0], None
            return batch
        return self._draw()

    def prefetch(self) -> None:
        """Draw the next batch now, for `next_batch` to return (nothing if one is held)."""
        if self._held is None:
            state = self.generator.get_state()
            self._held = (self._draw(), state)

    def _draw(self) -> tuple[torch.Tensor, torch.Tensor]:
        row = self.block_size + 1
        starts = torch.randint(
            len(self.data) - self.block_size if self.mask is None else len(self.data) // row,
            (self.world_size, self.batch_size),
            generator=self.generator,
        )[self.rank]  # (B,): this rank's row of the world's batches
        if self.mask is not None:  # chat data: whole packed rows
            starts = starts * row
        index = starts.numpy()[:, None] + self._offsets  # (B, T + 1)
        batch = torch.from_numpy(self.data[index].astype(np.int64))
        x, y = batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
        if self.mask is not None:
            y[torch.from_numpy(self.mask[index[:, 1:]] == 0)] = -1  # trained on the assistant's
        if self.device.type == "cuda":  # page-locked host memory lets the copy overlap compute
            return (
                x.pin_memory().to(self.device, non_blocking=True),
                y.pin_memory().to(self.device, non_blocking=True),
            )
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict[str, Any]:
        state = self._held[1] if self._held is not None else self.generator.get_state()
        return {"generator": state.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self._held = None
