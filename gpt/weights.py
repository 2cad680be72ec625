"""A model's weights read by rows, so that no process of a sharded run holds them whole.

A start's weights (a checkpoint's model.safetensors, an HF model's safetensors files) are a
`Weights`: each one's shape, as our keys name it, and a function that reads any rows of it.
`Weights.load_into` checks them against a model and copies each process's rows in; a finetune
that adds the chat tokens grows the vocabulary tables on the way (`load_with_chat_tokens`).
Where the weights come from, and the words of their errors, are the caller's:
gpt/checkpoint.py's and gpt/hf/pretrained.py's.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from gpt.config import ModelConfig
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.parallel import unwrap
from gpt.parallel.sharding import fill_rows
from gpt.tokenizer import CHAT_TOKENS, tokenizer_from_dict


class Base(Protocol):
    """A checkpoint or an HF model, as a finetune starts from it."""

    @property
    def tokenizer(self) -> dict[str, Any]: ...

    def weights_for(self, config: ModelConfig) -> Weights: ...


class SafetensorsFiles:
    """safetensors files read in parts: every tensor's shape, and any slice of one, which is all
    that is read; so a process reads its rows of a model, never the whole. Each read maps the
    file only while it copies the slice out, so no more than one tensor's pages count in the
    process's memory at a time. A file that cannot be parsed is refused with
    `damaged(path, error)`."""

    def __init__(self, paths: Sequence[Path],
                 damaged: Callable[[Path, Exception], GPTError]) -> None:
        self.damaged = damaged
        self.shapes: dict[str, tuple[int, ...]] = {}
        self._path: dict[str, Path] = {}  # key -> the file that holds it
        for path in paths:
            with self._open(path) as file:
                for key in file.keys():
                    self._path[key] = path
                    self.shapes[key] = tuple(file.get_slice(key).get_shape())

    @contextlib.contextmanager
    def _open(self, path: Path) -> Iterator[Any]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as file:
                yield file
        except GPTError:
            raise
        except Exception as e:
            raise self.damaged(path, e) from None

    def read(self, key: str, index: slice | tuple[slice, ...]) -> torch.Tensor:
        """`tensor[index]` of tensor `key`, a copy read from its file alone."""
        with self._open(self._path[key]) as file:
            return file.get_slice(key)[index]


@dataclass(frozen=True)
class Weights:
    """A start's weights as our keys name them (a tied head left out), read by rows: each one's
    shape, and `read(key, rows)`, its rows [start:stop] in float32. A weight that does not fit
    the model is refused with `misfit(detail)`, the message of the start's kind."""

    shapes: Mapping[str, tuple[int, ...]]
    read: Callable[[str, slice], torch.Tensor]
    misfit: Callable[[str], GPTError]

    def load_into(self, model: torch.nn.Module, keep: Callable[[str], bool] | None = None) -> None:
        """Check the weights against `model`'s (those whose key `keep` keeps), then copy each
        in: a sharded model's processes read only the rows they hold (`fill_rows`)."""
        model = unwrap(model)
        params = {k: p for k, p in model.named_parameters(remove_duplicate=False)
                  if keep is None or keep(k)}
        for key, shape in self.shapes.items():
            if key in params and shape != tuple(params[key].shape):
                raise self.misfit(f"{key}: {shape} saved, {tuple(params[key].shape)} expected")
        tied = "lm_head.weight" if model.config.tie_embeddings else None
        missing = [k for k in params if k not in self.shapes and k != tied]
        unexpected = [k for k in self.shapes if k not in params]
        if missing or unexpected:
            raise self.misfit(f"missing {missing[:3]}, unexpected {unexpected[:3]}")
        for key, param in params.items():
            if key in self.shapes:
                fill_rows(param, functools.partial(self.read, key))


VOCABULARY_KEYS = ("vocab_size", "padded_vocab_size")  # what adding the chat tokens grows


def load_with_chat_tokens(start: Base, model: GPT) -> None:
    """Copy `start`'s weights into `model`, whose vocabulary is the start's plus the chat
    tokens (a finetune that adds them): their rows begin as the mean of the start's token rows,
    so the new tokens start as an average token rather than at random; new padding rows are
    zero (not `model`'s own initialisation, so that a LoRA finetune's base hashes the same at
    every load). Each process reads only its rows (the mean reads one table's token rows)."""
    tokens = tokenizer_from_dict(start.tokenizer).vocab_size
    vocab = model.config.padded_vocab_size
    assert vocab is not None
    _with_chat_token_rows(start.weights_for(model.config), tokens, vocab).load_into(model)


def _with_chat_token_rows(weights: Weights, tokens: int, vocab: int) -> Weights:
    """`weights` with the embedding and head (vocab, C) grown to `vocab` rows: the chat tokens'
    (ids tokens, tokens + 1) the mean of the first `tokens` rows, the others past the saved
    rows zero."""
    tables = ("transformer.wte.weight", "lm_head.weight")
    shapes = {k: (vocab, *shape[1:]) if k in tables else shape
              for k, shape in weights.shapes.items()}

    def read(key: str, rows: slice) -> torch.Tensor:
        if key not in tables:
            return weights.read(key, rows)
        saved = weights.shapes[key]
        grown = torch.zeros(rows.stop - rows.start, *saved[1:])  # (rows, C)
        kept = max(min(rows.stop, saved[0]) - rows.start, 0)
        if kept:
            grown[:kept] = weights.read(key, slice(rows.start, rows.start + kept))
        chat = range(max(rows.start, tokens), min(rows.stop, tokens + len(CHAT_TOKENS)))
        if chat:
            mean = weights.read(key, slice(0, tokens)).mean(dim=0)  # (C,)
            grown[chat.start - rows.start: chat.stop - rows.start] = mean
        return grown

    return Weights(shapes, read, weights.misfit)
