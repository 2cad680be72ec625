"""Tokenizers: GPT-2 BPE from the bundled vocabulary, character-level, or any tiktoken encoding.

All share one small interface (`name`, `vocab_size`, `eot_id`, `encode`, `encode_batch`,
`decode`, `to_dict`) and are rebuilt from `to_dict()` with `tokenizer_from_dict`, which is how
datasets (meta.json) and checkpoints carry them: sampling needs no data and no network.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from gpt.errors import GPTError, first_line

GPT2_VOCAB_FILE = Path(__file__).parent / "assets" / "gpt2.tiktoken"
GPT2_VOCAB_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_SPLIT_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
)
GPT2_EOT = "<|endoftext|>"
ENCODE_THREADS = 2


class Tokenizer(Protocol):
    """What the data pipeline, the trainer and the sampler need of a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...

    def encode_batch(
        self, texts: list[str], num_threads: int = ENCODE_THREADS
    ) -> list[list[int]]: ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; ids with no text (the padding of a model's vocabulary) are dropped."""
        ...

    def to_dict(self) -> dict[str, Any]: ...


class TiktokenTokenizer:
    """A tiktoken BPE encoding. Text is encoded as ordinary text: a literal "<|endoftext|>" in a
    document is not turned into the special token, so documents cannot forge separators."""

    def __init__(self, name: str, encoding: Any) -> None:
        self.name = name
        self.encoding = encoding
        self.vocab_size: int = encoding.n_vocab
        self.eot_id: int = encoding.eot_token

    def encode(self, text: str) -> list[int]:
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = ENCODE_THREADS) -> list[list[int]]:
        """Encode many texts in parallel threads (tiktoken releases the GIL while encoding)."""
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def encode_array(self, text: str) -> np.ndarray:
        """Ids as an array straight from tiktoken's buffer (no Python ints); releases the GIL."""
        if hasattr(self.encoding, "encode_to_numpy"):
            return self.encoding.encode_to_numpy(text, allowed_special=set(), disallowed_special=())
        return np.asarray(self.encoding.encode_ordinary(text), dtype=np.uint32)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; ids with no text (a model's vocabulary padding) decode to nothing."""
        ids = list(ids)
        try:
            return self.encoding.decode(ids)
        except (KeyError, OverflowError):
            return self.encoding.decode([i for i in ids if self._has_text(i)])

    def _has_text(self, token: int) -> bool:
        try:
            self.encoding.decode_single_token_bytes(token)
            return True
        except (KeyError, OverflowError):
            return False

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name}


class CharTokenizer:
    """One id per character of a vocabulary built from the training text (sorted unique chars).

    The newline is always in the vocabulary and doubles as the end-of-text id: it separates
    documents and starts an empty prompt, as in nanoGPT's character-level Shakespeare.
    """

    name = "char"

    def __init__(self, chars: Iterable[str]) -> None:
        self.chars: list[str] = sorted(set(chars) | {"\n"})
        if any(len(c) != 1 for c in self.chars):
            raise GPTError("char tokenizer vocabulary must hold single characters; re-run prepare")
        self.vocab_size = len(self.chars)
        self.eot_id = self.chars.index("\n")
        self._codepoints = np.array([ord(c) for c in self.chars], dtype=np.int64)  # sorted

    @classmethod
    def from_texts(cls, texts: Iterable[str]) -> CharTokenizer:
        seen: set[str] = set()
        for text in texts:
            seen.update(text)
        return cls(seen)

    def encode_array(self, text: str) -> np.ndarray:
        """Ids of `text` as an int64 array, vectorised through the sorted code points."""
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.int64)
        ids = np.searchsorted(self._codepoints, cps)
        ids_clipped = np.minimum(ids, self.vocab_size - 1)
        unknown = self._codepoints[ids_clipped] != cps
        if unknown.any():
            missing = sorted({chr(c) for c in cps[unknown]})
            shown = ", ".join(repr(c) for c in missing[:20]) + (" ..." if len(missing) > 20 else "")
            raise GPTError(
                f"text has {len(missing)} character(s) not in the char vocabulary: {shown}; "
                "remove them, or re-prepare the data with text that contains them"
            )
        return ids_clipped

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: list[str], num_threads: int = ENCODE_THREADS) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; ids past the vocabulary (a model's padding) decode to nothing."""
        return "".join(self.chars[i] for i in ids if 0 <= i < self.vocab_size)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "chars": "".join(self.chars)}


def _gpt2_encoding() -> Any:
    """GPT-2's BPE built from the bundled ranks file, checked against its published hash."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe

    data = GPT2_VOCAB_FILE.read_bytes()
    if hashlib.sha256(data).hexdigest() != GPT2_VOCAB_SHA256:
        raise GPTError(f"{GPT2_VOCAB_FILE} is damaged (sha256 mismatch); reinstall gpt")
    ranks = load_tiktoken_bpe(str(GPT2_VOCAB_FILE), expected_hash=GPT2_VOCAB_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_SPLIT_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={GPT2_EOT: len(ranks)},
        explicit_n_vocab=len(ranks) + 1,
    )


_CACHE: dict[str, TiktokenTokenizer] = {}


def get_tokenizer(name: str) -> TiktokenTokenizer:
    """`gpt2` (bundled, offline) or any tiktoken encoding by name (may need a download)."""
    if name in _CACHE:
        return _CACHE[name]
    if name == "char":
        raise GPTError("the char tokenizer is built from data: run gpt prepare with tokenizer=char")
    if name == "gpt2":
        tok = TiktokenTokenizer("gpt2", _gpt2_encoding())
    else:
        import tiktoken

        known = tiktoken.list_encoding_names()
        if name not in known:
            choices = ", ".join(["gpt2", "char", *[k for k in known if k != "gpt2"]])
            raise GPTError(f"[data] tokenizer: unknown tokenizer {name!r}; choose one of {choices}")
        try:
            tok = TiktokenTokenizer(name, tiktoken.get_encoding(name))
        except Exception as e:  # tiktoken downloads its files on first use
            first = first_line(e)
            raise GPTError(
                f"tokenizer {name!r} could not be loaded ({first[:120]}); it needs a download "
                "on first use: connect once, or use tokenizer = \"gpt2\" (bundled) or \"char\""
            ) from None
    _CACHE[name] = tok
    return tok


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer saved with `to_dict()` (in meta.json or a checkpoint)."""
    if not isinstance(d, dict) or "name" not in d:
        raise GPTError(f"tokenizer record {d!r} has no name; re-run gpt prepare")
    if d["name"] == "char":
        return CharTokenizer(d.get("chars", ""))
    return get_tokenizer(d["name"])

