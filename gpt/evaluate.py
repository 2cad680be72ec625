"""`gpt eval`: loss, perplexity and bits per byte of a checkpoint over a whole split or a text.

Deterministic: consecutive, non-overlapping windows of block_size targets (the last one shorter)
cover every token but the first once (each window's first token is predicted from the previous
window's last), unlike the random batches training evaluates on. Chat data is evaluated row by
row, on the tokens its mask trains on (the assistant's), as training counts them.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from gpt.checkpoint import Checkpoint
from gpt.config import RunConfig
from gpt.data.prepared import PreparedData, check_chat_rows, has_prepared_data
from gpt.data.sources import open_source
from gpt.errors import GPTError
from gpt.hf.pretrained import Pretrained
from gpt.model import GPT
from gpt.tokenizer import Tokenizer


def tokens_of_split(
    config: RunConfig, split: str, found: Checkpoint | Pretrained
) -> tuple[np.ndarray, np.ndarray | None]:
    """The prepared split the checkpoint was trained on, and for chat data its mask. An HF
    model has none of its own: data prepared with its tokenizer (through a finetune's config),
    or a text with --data."""
    folder = data_folder(config, found)
    if isinstance(found, Pretrained) and not has_prepared_data(folder):
        raise GPTError(
            f"{found.path} is an HF model, not a run: no data was prepared for it ({folder} "
            f"holds none); evaluate it on a text with --data FILE, or prepare a split with its "
            f"tokenizer (gpt prepare --config FILE whose [train] init_from = \"{found.path}\") "
            f"and pass the folder it writes with --set data.data_dir=FOLDER"
        )
    data = PreparedData(folder)
    data.check_tokenizer(found.tokenizer)
    if data.format == "chat":
        check_chat_rows(data, found.config.model.block_size)
    return data.tokens(split), data.mask(split)


def data_folder(config: RunConfig, found: Checkpoint | Pretrained) -> Path:
    """The prepared data folder of `config`, absolute, so that messages name it. The run's own
    (as its checkpoint saved the keys that name it) is found where `gpt train` found it, from
    any folder: a relative one starts in the folder training ran in. One named now (--set,
    --config) starts here, as every path on a command line does."""
    folder = config.data.resolved_data_dir
    if isinstance(found, Checkpoint) and (root := found.trained_in) is not None:
        saved = found.config.data
        if all(getattr(config.data, k) == getattr(saved, k) for k in FOLDER_KEYS):
            folder = root / folder
    return Path(os.path.abspath(folder))


FOLDER_KEYS = ("data_dir", "source", "tokenizer")  # the [data] keys resolved_data_dir reads


def tokens_of_source(config: RunConfig, source: str, tokenizer: Tokenizer) -> np.ndarray:
    """A text file or any `[data] source`, read as text (a chat run's too) and tokenized with
    the checkpoint's tokenizer."""
    data_cfg = dataclasses.replace(config.data, source=source, data_dir=None, format="text")
    found = open_source(data_cfg)
    pieces = []
    for text in found.documents():
        pieces.append(np.asarray(tokenizer.encode(text), dtype=np.int64))
        if not found.single_text:
            pieces.append(np.array([tokenizer.eot_id]))
    if not pieces:
        raise GPTError(f"--data {source} holds no text")
    return np.concatenate(pieces)


LOGITS_BYTES = 2**28  # float32 logits held at once: batches shrink for large vocabularies


@torch.inference_mode()
def evaluate(
    model: GPT, tokens: np.ndarray, tokenizer: Tokenizer, batch_size: int = 8,
    progress: bool = True, mask: np.ndarray | None = None,
) -> dict[str, float]:
    """Mean loss, perplexity and bits per byte over all of `tokens`; with a chat split's `mask`,
    over its rows' trained targets only (tokens and bytes counted of those).

    Up to `batch_size` windows run together (`window_batches`).
    """
    T = model.config.block_size
    batches = window_batches(model, len(tokens), batch_size, rows=mask is not None)
    device = next(model.parameters()).device
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for rows in tqdm(batches, disable=not progress, unit="batch"):
        windows = np.stack([tokens[s : s + T + 1] for s in rows]).astype(np.int64)
        targets = windows[:, 1:].copy()  # (B, T), or (1, shorter) for the last
        if mask is not None:
            targets[np.stack([mask[s + 1 : s + T + 1] for s in rows]) == 0] = -1
        batch = torch.from_numpy(windows).to(device)  # (B, T + 1)
        logits, _ = model(batch[:, :-1])
        nll = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)),
            torch.from_numpy(targets).to(device).reshape(-1), ignore_index=-1, reduction="sum",
        )
        total_nll += nll.item()
        total_tokens += int((targets != -1).sum())
        for row in targets:
            total_bytes += len(tokenizer.decode(row[row != -1].tolist()).encode("utf-8"))
    if total_tokens == 0:
        raise GPTError("the split's mask trains on no token, so there is nothing to evaluate; "
                       "prepare it again (gpt prepare --force)")
    loss = total_nll / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nll / math.log(2) / max(total_bytes, 1),
        "tokens": total_tokens,
        "bytes": total_bytes,
    }


def window_batches(
    model: GPT, n_tokens: int, batch_size: int = 8, rows: bool = False
) -> list[list[int]]:
    """The start of each window of block_size + 1 tokens `evaluate` reads, in batches of up to
    `batch_size`, fewer when their logits would pass LOGITS_BYTES (one window of GPT-2's 50k
    vocabulary at block 1024 is 206 MB): chat data's rows one after another (`rows`); else
    windows overlapping by one token, the last one shorter and alone."""
    T = model.config.block_size
    per_batch = max(1, min(batch_size, LOGITS_BYTES // (T * model.config.padded_vocab_size * 4)))
    if rows:
        starts = list(range(0, n_tokens, T + 1))
        return [starts[i : i + per_batch] for i in range(0, len(starts), per_batch)]
    n_targets = n_tokens - 1
    if n_targets < 1:
        raise GPTError(f"{n_tokens} token(s) are too few to evaluate; give at least 2")
    starts = range(0, n_targets, T)
    full = [s for s in starts if s + T <= n_targets]
    batches = [full[i : i + per_batch] for i in range(0, len(full), per_batch)]
    if starts[-1] + T > n_targets:
        batches.append([starts[-1]])  # the shorter last window, alone
    return batches
