"""Tokenizers: GPT-2 BPE from the bundled vocabulary, character-level, a byte-level BPE learned
from the training text, any tiktoken encoding, or an HF model's own tokenizer (tokenizer.json,
through the `tokenizers` library).

All share one small interface (`name`, `vocab_size`, `eot_id`, `bos_id`, `chat_template`,
`encode`, `encode_batch`, `decode`, `to_dict`) and are rebuilt from `to_dict()` with
`tokenizer_from_dict`, which is how datasets (meta.json) and checkpoints carry them: sampling
needs no data and no network. `with_chat_tokens` gives any of them ChatML's turn boundaries as
two new ids (`ChatTokenizer`), which its record carries. `same_tokenizer` is the one rule for
whether two records are one tokenizer, `adds_chat_tokens` for whether one is the other plus
the turn boundaries; `check_same_tokenizer` and `check_tokenizer_setting` are their refusals,
each with one message per kind of mismatch.
"""

from __future__ import annotations

import hashlib
import json
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
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")  # ChatML's start and end of a turn
# the built-in layout as a Jinja chat template, what an export writes for HF's apply_chat_template
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_CHAT = " and ".join(CHAT_TOKENS)  # for messages
ENCODE_THREADS = 2


class Tokenizer(Protocol):
    """What the data pipeline, the trainer and the sampler need of a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int
    bos_id: int | None  # what the tokenizer puts before a text (Llama's <s>); the sampler does too
    # the Jinja template an HF model lays chat messages out with (gpt/template.py); None: the
    # plain layout
    chat_template: str | None

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
        self.bos_id: int | None = None
        self.chat_template: str | None = None

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
    bos_id: int | None = None
    chat_template: str | None = None

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
        try:
            utf32 = text.encode("utf-32-le")
        except UnicodeEncodeError as e:  # a lone surrogate: what undecodable input bytes become
            raise GPTError(
                f"the text is not valid Unicode (it holds {text[e.start]!r}, a lone surrogate, as "
                "undecodable bytes become); give UTF-8 text"
            ) from None
        cps = np.frombuffer(utf32, dtype=np.uint32).astype(np.int64)
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


HF_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


class HFTokenizer:
    """An HF model's own tokenizer: a `tokenizers.Tokenizer` rebuilt from its tokenizer.json text.

    Text is encoded as ordinary text, as by the others: nothing is added around it (no <s>),
    and the literal string of a special token in a document ("</s>", "<|im_start|>") is encoded
    as the text it is, not as the special id, so documents cannot forge separators. Added tokens
    that are not special (extensions of the vocabulary) are still matched, as HF matches them.
    The record also carries what writing the HF folder back needs: the special tokens' strings
    and the useful keys of tokenizer_config.json (chat template, model_max_length, ...), and a
    `label` (the model's folder or hub name) for messages.
    """

    name = "hf"

    def __init__(
        self,
        tokenizer_json: str,
        special_tokens: dict[str, str | None] | None = None,
        config: dict[str, Any] | None = None,
        label: str = "",
    ) -> None:
        self.label = label
        try:
            from tokenizers import Tokenizer as Backend
        except ImportError:
            raise GPTError(
                "the hf tokenizer needs the tokenizers library: pip install tokenizers"
            ) from None
        try:
            backend = Backend.from_str(tokenizer_json)
        except Exception as e:
            raise GPTError(
                f"{self._what} does not load ({first_line(e)}); import the model again"
            ) from None
        backend.no_truncation()  # a tokenizer.json may cut texts to the model's length
        backend.no_padding()
        self.tokenizer_json: str = backend.to_str()  # one spelling: equal tokenizers, equal dicts
        backend.encode_special_tokens = True  # special tokens' strings are text (not serialised)
        self.backend = backend
        given = special_tokens or {}
        self.special_tokens = {key: given.get(key) for key in HF_SPECIAL_TOKENS}
        try:
            self.config: dict[str, Any] = json.loads(json.dumps(config or {}))  # as JSON reads it
        except (TypeError, ValueError) as e:
            raise GPTError(
                f"{self._what}: its settings are not JSON ({e}); import the model again"
            ) from None
        vocab = backend.get_vocab(with_added_tokens=True)
        self.vocab_size: int = max(vocab.values(), default=-1) + 1  # ids may have gaps
        self._special_ids: dict[str, int | None] = {}
        for key, token in self.special_tokens.items():
            if token is not None and token not in vocab:
                raise GPTError(
                    f"{self._what}: its {key} {token!r} is not in its vocabulary; fix "
                    "tokenizer_config.json in the model folder and import it again"
                )
            self._special_ids[key] = None if token is None else vocab[token]
        self.bos_id: int | None = self._added_before_text()
        self._special_backend: Any = None  # built when first needed

    @property
    def _what(self) -> str:
        return f"HF tokenizer {self.label!r}" if self.label else "HF tokenizer"

    @property
    def chat_template(self) -> str | None:
        """The model's chat template: tokenizer_config.json's `chat_template` (or the folder's
        chat_template.jinja); of several named ones, "default", as transformers picks it."""
        template = self.config.get("chat_template")
        if isinstance(template, dict):
            if "default" not in template:
                names = ", ".join(repr(name) for name in template)
                raise GPTError(
                    f"{self._what} has chat templates named {names} but none named 'default'; "
                    "name the one to use 'default' in the model folder and import it again"
                )
            template = template["default"]
        if template is not None and not isinstance(template, str):
            raise GPTError(
                f"{self._what}: its chat_template is not text; fix tokenizer_config.json in the "
                "model folder and import it again"
            )
        return template or None

    def encode_with_special_tokens(self, text: str) -> list[int]:
        """Ids of `text` in which special tokens' strings are the special ids, as HF encodes a
        rendered chat template ("<|im_start|>" is one id here, text in `encode`)."""
        if self._special_backend is None:
            from tokenizers import Tokenizer as Backend

            self._special_backend = Backend.from_str(self.tokenizer_json)  # matches specials
        try:
            return self._special_backend.encode(text, add_special_tokens=False).ids
        except Exception as e:
            raise self._cannot_encode(e) from None

    @property
    def eot_id(self) -> int:
        """The end-of-sequence id (eos, else bos) that separates documents and ends samples."""
        for key in ("eos_token", "bos_token"):
            if (token_id := self._special_ids[key]) is not None:
                return token_id
        raise GPTError(
            f"{self._what} has neither an eos nor a bos token to end texts with; set eos_token "
            "in the model folder's tokenizer_config.json and import it again"
        )

    def _added_before_text(self) -> int | None:
        """The id the post-processor puts before a text when asked for special tokens (Llama's
        <s>), found by encoding a one-token text with them; None when it puts none."""
        if self.backend.post_processor is None:
            return None
        for text in ("a", "0", " "):
            try:
                encoding = self.backend.encode(text, add_special_tokens=True)
            except Exception:  # not in a vocabulary without an unknown token: try another
                continue
            sequences = encoding.sequence_ids  # None for the ids the post-processor added
            start = next((i for i, seq in enumerate(sequences) if seq is not None), None)
            if start is None:
                continue
            if start > 1:
                raise GPTError(
                    f"{self._what} puts {start} tokens before every text; only one (a bos "
                    "token) is supported: set its post-processor to add at most one"
                )
            return encoding.ids[0] if start == 1 else None
        return None

    def _cannot_encode(self, error: Exception) -> GPTError:
        return GPTError(
            f"{self._what} cannot encode the text ({first_line(error)}); remove what it "
            "cannot encode, or use a tokenizer that covers it"
        )

    def encode(self, text: str) -> list[int]:
        try:
            return self.backend.encode(text, add_special_tokens=False).ids
        except Exception as e:
            raise self._cannot_encode(e) from None

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.uint32)

    def encode_batch(self, texts: list[str], num_threads: int = ENCODE_THREADS) -> list[list[int]]:
        """Encode many texts in parallel on the library's own thread pool, which sizes itself
        (RAYON_NUM_THREADS); `num_threads` is not used."""
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)  # no offsets
        try:
            return [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
        except Exception as e:
            raise self._cannot_encode(e) from None

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, special tokens written out as text; ids past the vocabulary (a model's
        padding) decode to nothing."""
        kept = [i for i in ids if 0 <= i < self.vocab_size]
        return self.backend.decode(kept, skip_special_tokens=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "label": self.label,
            "tokenizer_json": self.tokenizer_json,
            "special_tokens": dict(self.special_tokens),
            "config": json.loads(json.dumps(self.config)),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HFTokenizer:
        if not isinstance(d.get("tokenizer_json"), str):
            raise GPTError("hf tokenizer record has no tokenizer_json; import the model again")
        return cls(
            d["tokenizer_json"], d.get("special_tokens"), d.get("config"), d.get("label", "")
        )


def byte_chars() -> list[str]:
    """GPT-2's printable stand-in for each byte (its `bytes_to_unicode`), as byte-level BPE
    vocabularies spell tokens: printable Latin-1 bytes stand for themselves, the others for code
    points from 256 up, in byte order."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)}
    chars = []
    shifted = 0
    for byte in range(256):
        if byte in printable:
            chars.append(chr(byte))
        else:
            chars.append(chr(256 + shifted))
            shifted += 1
    return chars


BPE_MIN_VOCAB = 257  # the 256 bytes and the end-of-text token
# the longest piece of a word BPE learns from: the trainer's time grows with the square of a
# word's length (200,000 repeated letters, one word to the split pattern, took 33 s), and no
# word of ordinary text is this long (the Python library's longest is 1,864 bytes)
BPE_LEARNED_WORD_BYTES = 4096


class BPETokenizer(TiktokenTokenizer):
    """A byte-level BPE learned from the training text (`learn`), GPT-2's kind: any UTF-8 text
    encodes (every byte is a token), GPT-2's split pattern, <|endoftext|> as the last id.

    The record holds the library's tokenizer.json and its sha256, so a data folder or a
    checkpoint carries the whole vocabulary. Text is encoded as by gpt2 (a literal
    "<|endoftext|>" is text), through tiktoken built from the learned ranks (each token's bytes
    -> its id), which gives the library's ids and encoded a few MB of Python source several
    times faster than the library's batched encoder (scripts/bench_bpe.py measures both); only
    text that is not Unicode is refused first.
    """

    name = "bpe"

    def __init__(self, tokenizer_json: str, sha256: str | None = None) -> None:
        try:
            from tokenizers import Tokenizer as Backend

            backend = Backend.from_str(tokenizer_json)
        except ImportError:
            raise GPTError(
                "the bpe tokenizer needs the tokenizers library: pip install tokenizers"
            ) from None
        except Exception as e:
            raise GPTError(
                f"the learned bpe tokenizer does not load ({first_line(e)}); rebuild the data "
                "with gpt prepare --force"
            ) from None
        self.tokenizer_json: str = backend.to_str()
        self.sha256 = hashlib.sha256(self.tokenizer_json.encode()).hexdigest()
        if sha256 is not None and sha256 != self.sha256:
            raise GPTError(
                "the learned bpe tokenizer does not match its sha256 (damaged record); rebuild "
                "the data with gpt prepare --force"
            )
        backend.encode_special_tokens = True  # "<|endoftext|>" in a text is text, as for gpt2
        self.backend = backend
        vocab = backend.get_vocab(with_added_tokens=True)
        if GPT2_EOT not in vocab:
            raise GPTError(
                f"the learned bpe tokenizer has no {GPT2_EOT} token; rebuild the data with "
                "gpt prepare --force"
            )
        stand_in = {c: b for b, c in enumerate(byte_chars())}
        ranks = {
            bytes(stand_in[c] for c in token): i for token, i in vocab.items() if token != GPT2_EOT
        }
        import tiktoken

        encoding = tiktoken.Encoding(
            name=self.name,
            pat_str=GPT2_SPLIT_PATTERN,
            mergeable_ranks=ranks,
            special_tokens={GPT2_EOT: vocab[GPT2_EOT]},
            explicit_n_vocab=max(vocab.values()) + 1,
        )
        super().__init__(self.name, encoding)  # eot_id, vocab_size from the encoding

    @classmethod
    def learn(cls, texts: Iterable[str], vocab_size: int) -> BPETokenizer:
        """Learn a byte-level BPE of at most `vocab_size` ids (the end-of-text one included)
        from `texts` with the tokenizers library's trainer; the same texts learn the same one.

        The trainer sees words longer than BPE_LEARNED_WORD_BYTES in pieces of that length;
        the tokenizer it gives splits text by the pattern alone, as gpt2 does, and encodes
        words of any length.
        """
        from tokenizers import (
            AddedToken,
            Regex,
            Tokenizer,
            decoders,
            models,
            pre_tokenizers,
            trainers,
        )

        if vocab_size < BPE_MIN_VOCAB:
            raise GPTError(
                f"[data] bpe_vocab_size: must be at least {BPE_MIN_VOCAB} (the 256 bytes and "
                f"the end-of-text token), got {vocab_size}"
            )
        backend = Tokenizer(models.BPE())
        split = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        pieces = pre_tokenizers.Split(  # a byte-level word holds one character a byte
            Regex(f"(?m).{{1,{BPE_LEARNED_WORD_BYTES}}}"), behavior="isolated"
        )
        backend.pre_tokenizer = pre_tokenizers.Sequence([split, pieces])
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 1,  # the end-of-text token is added after, as the last id
            min_frequency=2,
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: no unknowns
            special_tokens=[],
        )
        backend.train_from_iterator(texts, trainer=trainer)
        backend.pre_tokenizer = split
        backend.add_special_tokens([AddedToken(GPT2_EOT, special=True, normalized=False)])
        return cls(backend.to_str())

    def _check_text(self, text: str) -> None:
        """Refuse a str that is not Unicode text (a lone surrogate such as "\\ud800"), which
        tiktoken would quietly replace."""
        if text.isascii():
            return
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise GPTError(
                f"text holds {text[e.start:e.end]!r} at character {e.start}, which is not "
                "Unicode text (a lone surrogate); remove it, or read the text as UTF-8"
            ) from None

    def encode(self, text: str) -> list[int]:
        self._check_text(text)
        return super().encode(text)

    def encode_array(self, text: str) -> np.ndarray:
        self._check_text(text)
        return super().encode_array(text)

    def encode_batch(self, texts: list[str], num_threads: int = ENCODE_THREADS) -> list[list[int]]:
        for text in texts:
            self._check_text(text)
        return super().encode_batch(texts, num_threads)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "tokenizer_json": self.tokenizer_json, "sha256": self.sha256}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BPETokenizer:
        if not isinstance(d.get("tokenizer_json"), str):
            raise GPTError("bpe tokenizer record has no tokenizer_json; re-run gpt prepare --force")
        return cls(d["tokenizer_json"], d.get("sha256"))


class ChatTokenizer:
    """A tokenizer with ChatML's turn boundaries, `<|im_start|>` and `<|im_end|>`, as two new
    ids right after its own (gpt2: 50257 and 50258).

    Text is still encoded by the tokenizer it extends, as text: a literal "<|im_start|>" in a
    message is never the special id, which only the chat layout puts in (gpt/template.py).
    Decoding writes the two ids out as their strings. The record is the extended tokenizer's
    with `chat_tokens` added, so data and checkpoints carry the layout.
    """

    def __init__(self, base: Tokenizer) -> None:
        if isinstance(base, HFTokenizer):
            vocab = base.backend.get_vocab(with_added_tokens=True)
            if present := [token for token in CHAT_TOKENS if token in vocab]:
                raise GPTError(
                    f"{base._what} has {present[0]} in its vocabulary but no chat template to "
                    "use it with; add the model's chat_template to its tokenizer_config.json and "
                    "import it again"
                )
        self.base = base
        self.name = base.name
        self.eot_id: int = base.eot_id
        self.bos_id: int | None = base.bos_id
        self.chat_template: str | None = CHATML_TEMPLATE
        self.chat_ids: tuple[int, int] = (base.vocab_size, base.vocab_size + 1)
        self.vocab_size: int = base.vocab_size + len(CHAT_TOKENS)

    def encode(self, text: str) -> list[int]:
        return self.base.encode(text)

    def encode_array(self, text: str) -> np.ndarray:
        return self.base.encode_array(text)

    def encode_batch(self, texts: list[str], num_threads: int = ENCODE_THREADS) -> list[list[int]]:
        return self.base.encode_batch(texts, num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`, the turn boundaries written out as their strings."""
        pieces: list[str] = []
        run: list[int] = []
        for token in ids:
            if token in self.chat_ids:
                pieces += [self.base.decode(run), CHAT_TOKENS[token - self.chat_ids[0]]]
                run = []
            else:
                run.append(token)
        return "".join([*pieces, self.base.decode(run)])

    def to_dict(self) -> dict[str, Any]:
        return {**self.base.to_dict(), "chat_tokens": list(CHAT_TOKENS)}


def with_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """The tokenizer that lays out chats: `tokenizer` itself when it has a layout already (the
    turn boundaries, or an HF model's own chat template), else it with ChatML's turn boundaries
    as two new ids."""
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer
    if isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template is not None:
        return tokenizer
    return ChatTokenizer(tokenizer)


def gpt2_ranks() -> dict[bytes, int]:
    """GPT-2's BPE ranks (token bytes -> id) from the bundled file, checked against its
    published hash; also what an HF export of the gpt2 tokenizer is derived from."""
    from tiktoken.load import load_tiktoken_bpe

    data = GPT2_VOCAB_FILE.read_bytes()
    if hashlib.sha256(data).hexdigest() != GPT2_VOCAB_SHA256:
        raise GPTError(f"{GPT2_VOCAB_FILE} is damaged (sha256 mismatch); reinstall gpt")
    return load_tiktoken_bpe(str(GPT2_VOCAB_FILE), expected_hash=GPT2_VOCAB_SHA256)


def _gpt2_encoding() -> Any:
    """GPT-2's BPE built from the bundled ranks file."""
    import tiktoken

    ranks = gpt2_ranks()
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
    if name == BPETokenizer.name:
        raise GPTError("the bpe tokenizer is learned from data: run gpt prepare with tokenizer=bpe")
    if name == HFTokenizer.name or name.startswith(f"{HFTokenizer.name}-"):
        raise GPTError(
            f"tokenizer {name!r} is an HF model's own, which comes with the model, not by name: "
            "set train.init_from = \"hf:MODEL\" and gpt prepare or gpt train tokenizes with it"
        )
    if name == "gpt2":
        tok = TiktokenTokenizer("gpt2", _gpt2_encoding())
    else:
        import tiktoken

        known = tiktoken.list_encoding_names()
        if name not in known:
            choices = ", ".join(["gpt2", "char", "bpe", *[k for k in known if k != "gpt2"]])
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


def same_tokenizer(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether two tokenizer records give the same ids, the one rule for data, checkpoints and
    finetunes: equal but for an HF record's chat template, which lays out chats and changes no
    id (a model whose template was updated keeps its prepared data)."""
    return _identity(a) == _identity(b)


def adds_chat_tokens(found: dict[str, Any], base: dict[str, Any]) -> bool:
    """Whether `found` is `base` plus the turn boundaries (`with_chat_tokens`): its ids are the
    base's and two more, which a finetune of a model of `base` adds to the model."""
    if not isinstance(found, dict) or "chat_tokens" not in found:
        return False
    if isinstance(base, dict) and "chat_tokens" in base:
        return False
    return same_tokenizer(_without_chat_tokens(found), base)


def _without_chat_tokens(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k != "chat_tokens"}


def _identity(record: dict[str, Any]) -> Any:
    """The record without what changes no id."""
    if not isinstance(record, dict) or not isinstance(record.get("config"), dict):
        return record
    config = {k: v for k, v in record["config"].items() if k != "chat_template"}
    return {**record, "config": config}


def check_same_tokenizer(
    found: dict[str, Any], expected: dict[str, Any], data: str, model: str, fix: str,
    models: str | None = None, chat_tokens_added: bool = False,
) -> None:
    """Refuse data tokenized as `found` for a model of tokenizer `expected` unless both give
    the same ids (same_tokenizer), or, with `chat_tokens_added` (a finetune, which adds them to
    the model), `found` is `expected` plus the turn boundaries (adds_chat_tokens): the one check
    of data against a model, one message per kind of mismatch (another tokenizer; another
    vocabulary of the same one; the turn boundaries, which only a finetune adds).

    `data` begins the sentence ("data/x was prepared with"), `model` names the model ("the
    model"), `models` its tokenizer (default "the model's"), `fix` says how to mend it.
    """
    if same_tokenizer(found, expected):
        return
    if adds_chat_tokens(found, expected):
        if chat_tokens_added:
            return
        raise GPTError(
            f"{data} the {found.get('name')!r} tokenizer with the chat tokens {_CHAT} added, "
            f"which {model} lacks and only a finetune adds; {fix}"
        )
    name, wanted = found.get("name"), expected.get("name")
    if adds_chat_tokens(expected, found):
        raise GPTError(f"{data} the {name!r} tokenizer without the chat tokens {_CHAT} "
                       f"{model} has; {fix}")
    if name != wanted:
        problem = f"the {name!r} tokenizer but {model} uses {wanted!r}"
    else:  # an HF model's tokenizer is its own, not one vocabulary of a kind
        what = "tokenizer" if name == HFTokenizer.name else f"{name!r} vocabulary"
        whose = models or f"{model}'s"
        problem = f"a {what} other than {whose}"
    raise GPTError(f"{data} {problem}; {fix}")


def check_tokenizer_setting(setting: str, expected: dict[str, Any], model: str, fix: str) -> None:
    """Refuse a `[data] tokenizer` setting of another kind than `expected`, the tokenizer of
    `model` (a run's checkpoint), before any data is prepared with it; only the kind can be
    compared then (a char or bpe vocabulary is built from the text)."""
    saved = expected.get("name")
    if tokenizer_kind(setting) != saved:
        raise GPTError(
            f"{model} was trained with the {saved!r} tokenizer, the config now says "
            f"data.tokenizer = {setting!r}; set data.tokenizer = {tokenizer_setting(expected)!r}, "
            f"or {fix}"
        )


def tokenizer_kind(setting: str) -> str:
    """The record name of the tokenizer a `[data] tokenizer` setting names (an HF model's
    "hf-NAME": hf)."""
    return HFTokenizer.name if setting.startswith(f"{HFTokenizer.name}-") else setting


def tokenizer_setting(record: dict[str, Any]) -> str:
    """The `[data] tokenizer` setting that names a record's tokenizer: an HF model's is
    "hf-LABEL" (the data folder's default name follows it)."""
    name = record["name"]
    return f"{name}-{record.get('label') or 'model'}" if name == HFTokenizer.name else name


def tokenizer_from_dict(d: dict[str, Any]) -> Tokenizer:
    """Rebuild a tokenizer saved with `to_dict()` (in meta.json or a checkpoint)."""
    if not isinstance(d, dict) or "name" not in d:
        raise GPTError(f"tokenizer record {d!r} has no name; re-run gpt prepare")
    if "chat_tokens" in d:
        if d["chat_tokens"] != list(CHAT_TOKENS):
            raise GPTError(
                f"tokenizer record has chat_tokens {d['chat_tokens']!r}, not ChatML's "
                f"{list(CHAT_TOKENS)!r}; re-run gpt prepare"
            )
        return ChatTokenizer(tokenizer_from_dict(_without_chat_tokens(d)))
    if d["name"] == "char":
        return CharTokenizer(d.get("chars", ""))
    if d["name"] == HFTokenizer.name:
        return HFTokenizer.from_dict(d)
    if d["name"] == BPETokenizer.name:
        return BPETokenizer.from_dict(d)
    return get_tokenizer(d["name"])

