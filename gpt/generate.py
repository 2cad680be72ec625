"""Sampling on token ids: a KV-cached decoding loop, temperature, top-k and nucleus (top-p).

Knows nothing of tokenizers or text: it takes and yields ids, so it is tested with any model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from gpt.model import GPT


def filter_logits(logits: Tensor, top_k: int | None = None, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit (B, V) outside the top-k and outside the nucleus of mass top_p."""
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        drop_sorted = mass_before >= top_p  # the first token is always kept
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def sample_next(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Next ids (B,) from the last position's logits (B, V); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate(
    model: GPT,
    prompt: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Iterator[Tensor]:
    """Yield the next token ids (B,) of prompt (B, T0), one step at a time.

    The prompt is prefilled in one pass; each later step runs one position against the KV cache.
    Once the text outgrows block_size, the context slides: each step rebuilds the cache from the
    last block_size tokens (positions are absolute, so the window must be recomputed), which
    is exactly what a model that only saw block_size positions during training expects.
    """
    block_size = model.config.block_size
    window = prompt[:, -block_size:]  # (B, T) the context the model sees
    cache = model.new_cache(prompt.size(0))
    logits, _ = model(window, cache=cache, start=0, last_only=True)  # prefill
    for step in range(max_new_tokens):
        next_ids = sample_next(logits[:, -1], temperature, top_k, top_p, generator)  # (B,)
        yield next_ids
        if step == max_new_tokens - 1:
            break  # no forward pass for a token nobody will read
        if window.size(1) < block_size:  # one new position against the cache
            logits, _ = model(next_ids[:, None], cache=cache, start=window.size(1), last_only=True)
            window = torch.cat([window, next_ids[:, None]], dim=1)
        else:  # slide: the window drops its oldest token and is computed afresh
            window = torch.cat([window[:, 1:], next_ids[:, None]], dim=1)
            logits, _ = model(window, cache=cache, start=0, last_only=True)
