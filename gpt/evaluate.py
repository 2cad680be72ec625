"""`gpt eval`: loss, perplexity and bits per byte of a checkpoint over a whole split or a text.

Deterministic: consecutive, non-overlapping windows of block_size targets cover every token once
(each window's first token is predicted from the previous window's last), unlike the random
batches training evaluates on.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gpt.config import RunConfig
from gpt.data import check_tokenizer, load_meta, open_source
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.tokenizer import Tokenizer


def tokens_of_split(config: RunConfig, split: str, tokenizer: dict[str, Any]) -> np.ndarray:
    """The prepared split the checkpoint was trained on."""
    data_dir = config.data.resolved_data_dir
    meta = load_meta(data_dir)
    check_tokenizer(meta, tokenizer, data_dir)
    return np.memmap(Path(data_dir) / f"{split}.bin", dtype=meta["dtype"], mode="r")


def tokens_of_source(config: RunConfig, source: str, tokenizer: Tokenizer) -> np.ndarray:
    """A text file or any `[data] source`, tokenized with the checkpoint's tokenizer."""
    data_cfg = dataclasses.replace(config.data, source=source, data_dir=None)
    found = open_source(data_cfg)
    pieces = []
    for text in found.documents():
        pieces.append(np.asarray(tokenizer.encode(text), dtype=np.int64))
        if not found.single_text:
            pieces.append(np.array([tokenizer.eot_id]))
    if not pieces:
        raise GPTError(f"--data {source} holds no text")
    return np.concatenate(pieces)


@torch.inference_mode()
def evaluate(
    model: GPT, tokens: np.ndarray, tokenizer: Tokenizer, batch_size: int = 8, progress: bool = True
) -> dict[str, float]:
    """Mean loss, perplexity and bits per byte over all of `tokens`."""
    T = model.config.block_size
    n_windows = (len(tokens) - 1) // T
    if n_windows == 0:
        raise GPTError(f"{len(tokens)} tokens are too few to evaluate with block_size = {T}")
    device = next(model.parameters()).device
    total_nll, total_tokens, total_bytes = 0.0, 0, 0
    for first in tqdm(range(0, n_windows, batch_size), disable=not progress, unit="batch"):
        rows = range(first, min(first + batch_size, n_windows))
        windows = np.stack([tokens[r * T : r * T + T + 1] for r in rows]).astype(np.int64)
        batch = torch.from_numpy(windows).to(device)  # (B, T + 1)
        logits, _ = model(batch[:, :-1])
        nll = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_nll += nll.item()
        total_tokens += batch[:, 1:].numel()
        for row in windows:
            total_bytes += len(tokenizer.decode(row[1:].tolist()).encode("utf-8"))
    loss = total_nll / total_tokens
    return {
        "loss": loss,
        "perplexity": math.exp(loss),
        "bits_per_byte": total_nll / math.log(2) / max(total_bytes, 1),
        "tokens": total_tokens,
        "bytes": total_bytes,
    }
