"""Chat data: rows in the formats people have -> checked conversations -> ids with a loss mask
-> rows of block_size + 1 tokens, best-fit packed.

A row is OpenAI's `{"messages": [{"role": ..., "content": ...}, ...]}` (HF's conversational
datasets use it too), or TRL's `{"prompt": ..., "completion": ...}`, each a string (a user
message, an assistant message) or a list of messages. A conversation is laid out with the
tokenizer's chat template (`gpt.template.conversation_ids`); its mask is 1 on the tokens of each
assistant message and its end-of-turn token, the tokens the loss counts.

Conversations are packed as nanochat packs them: each row takes, while one fits, the longest
buffered conversation that fits the space left, and the rest of the row is padding, masked, so
no conversation is split between rows.
"""

from __future__ import annotations

import bisect
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gpt.data.prepared import MASK_DTYPE
from gpt.errors import GPTError
from gpt.template import check_messages, conversation_ids
from gpt.tokenizer import Tokenizer

PACK_BUFFER = 1000  # conversations the packer chooses among: fuller rows, bounded memory

ChatItem = tuple[str, str, list[dict[str, str]]]  # (split, where, messages)
# (split, where, (ids, mask, turns) or what the template refused)
Encoded = tuple[str, str, "tuple[np.ndarray, np.ndarray, int] | str"]


def messages_of(row: Any) -> list[dict[str, str]]:
    """The conversation of one row (a JSON line, or a dataset's row as a dict), checked; a
    GPTError saying what is wrong with it otherwise."""
    if isinstance(row, bytes):
        try:
            row = row.decode("utf-8")
        except UnicodeDecodeError:
            raise GPTError("is not UTF-8 text") from None
    if isinstance(row, str):
        try:
            row = json.loads(row)
        except json.JSONDecodeError as e:
            raise GPTError(f"is not JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(row, Mapping):
        raise GPTError(f"is a JSON {type(row).__name__}, not an object with \"messages\" or "
                       "\"prompt\" and \"completion\"")
    if row.get("messages") is not None:
        messages = row["messages"]
    elif row.get("prompt") is not None and row.get("completion") is not None:
        messages = [*_turns(row, "prompt", "user"), *_turns(row, "completion", "assistant")]
    else:
        raise GPTError("has neither \"messages\" nor \"prompt\" and \"completion\"")
    checked = check_messages(messages)
    if not any(message["role"] == "assistant" for message in checked):
        raise GPTError("has no assistant turn, so nothing to train on")
    return checked


def _turns(row: Mapping[str, Any], key: str, role: str) -> list[Any]:
    """A row's prompt or completion as messages: a string is one message of `role`; a list is
    messages already (TRL's conversational prompt-completion format)."""
    part = row[key]
    if isinstance(part, str):
        return [{"role": role, "content": part}]
    if not isinstance(part, list):
        raise GPTError(f"has a {key} of type {type(part).__name__}; give a string or a list of "
                       "messages")
    return part


def encode_chats(batch: list[ChatItem], tokenizer: Tokenizer, dtype: np.dtype) -> list[Encoded]:
    """Each conversation's ids (in the token files' dtype) and mask laid out by the tokenizer's
    chat template, and its number of messages; or, where the template refuses it, why."""
    encoded: list[Encoded] = []
    for split, where, messages in batch:
        try:
            ids, mask = conversation_ids(tokenizer, messages)
        except GPTError as e:
            encoded.append((split, where, str(e)))
            continue
        arrays = np.asarray(ids, dtype=dtype), np.asarray(mask, dtype=MASK_DTYPE)
        encoded.append((split, where, (*arrays, len(messages))))
    return encoded


@dataclass
class SplitStats:
    """What went into one split of a chat set, for the report and meta.json."""

    conversations: int = 0
    turns: int = 0  # messages of every role
    rows: int = 0
    tokens: int = 0  # rows * (block_size + 1), padding included
    trained: int = 0  # tokens the loss counts (mask 1)
    padding: int = 0
    truncated: int = 0  # conversations cut to a row's length
    dropped: int = 0  # of those, the ones left with no assistant token: not packed

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


def chat_report(report: dict[str, Any]) -> str:
    """A chat set's report in a line: conversations, turns, the share of tokens trained on, and
    how many were truncated (and bad rows skipped)."""
    total = {key: sum(report[split][key] for split in ("train", "val"))
             for key in report["train"]}
    tokens = max(total["tokens"], 1)
    row_len = total["tokens"] // max(total["rows"], 1)
    line = (
        f"{total['conversations']:,} conversations ({report['train']['conversations']:,} train, "
        f"{report['val']['conversations']:,} val), {total['turns']:,} turns, {total['rows']:,} "
        f"rows of {row_len} tokens; trained on {total['trained'] / tokens:.1%} of the tokens "
        f"(padding {total['padding'] / tokens:.1%}); {total['truncated']:,} truncated"
    )
    if total["dropped"]:
        line += f" ({total['dropped']:,} left out: no assistant token in the row)"
    return line + f"; {report['skipped']:,} bad rows skipped"


@dataclass
class BestFitPacker:
    """Packs (ids, mask) conversations of at most `row_len` tokens into rows of exactly
    `row_len`: for each row, the longest buffered conversation that fits the space left (the
    earliest of equal ones), until none fits; the rest `pad_id`, masked. The buffer is refilled
    to `buffer` conversations before each choice."""

    row_len: int
    pad_id: int
    buffer: int = PACK_BUFFER
    _keys: list[tuple[int, int]] = field(default_factory=list)  # (length, -arrival), sorted
    _held: dict[int, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    _arrivals: int = 0
    _row: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)
    _used: int = 0
    padding: int = 0  # pad tokens written so far

    def add(self, ids: np.ndarray, mask: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Buffer a conversation; the rows that became complete."""
        if len(ids) > self.row_len:
            raise ValueError(f"a conversation of {len(ids)} tokens does not fit a row")
        bisect.insort(self._keys, (len(ids), -self._arrivals))
        self._held[self._arrivals] = (ids, mask)
        self._arrivals += 1
        while len(self._keys) >= self.buffer:
            yield from self._place_one()

    def finish(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The remaining rows, the last one padded."""
        while self._keys:
            yield from self._place_one()
        if self._row:
            yield self._close_row()

    def _place_one(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Put the longest buffered conversation that fits into the row; when none fits,
        close the row (the next one, empty, takes any)."""
        at = bisect.bisect_right(self._keys, (self.row_len - self._used, 1)) - 1
        if at < 0:
            yield self._close_row()
            return
        length, arrival = self._keys.pop(at)
        self._row.append(self._held.pop(-arrival))
        self._used += length
        if self._used == self.row_len:
            yield self._close_row()

    def _close_row(self) -> tuple[np.ndarray, np.ndarray]:
        pad = self.row_len - self._used
        self.padding += pad
        ids = np.concatenate([*(c[0] for c in self._row), np.full(pad, self.pad_id, np.int64)])
        mask = np.concatenate([*(c[1] for c in self._row), np.zeros(pad, MASK_DTYPE)])
        self._row, self._used = [], 0
        return ids, mask
