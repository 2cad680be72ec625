"""Sampling on token ids: a KV-cached decoding loop, temperature, top-k and nucleus (top-p).

Knows nothing of tokenizers or text: it takes and yields ids, so it is tested with any model.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

from gpt.model import GPT


def cache_dtype(model: GPT) -> torch.dtype:
    """float32 keys and values for a bfloat16 model on the CPU, else the weights' dtype.

    CPU attention in bfloat16 is many times slower than in float32 and grows with the context;
    the cache is small next to the weights, so float32 there costs little memory.
    """
    weight = model.transformer.wte.weight
    if weight.device.type == "cpu" and weight.dtype == torch.bfloat16:
        return torch.float32
    return weight.dtype


def cache_length(block_size: int, prompt_len: int, max_new_tokens: int) -> int:
    """Positions `generate`'s KV cache holds: up to the last token fed in (the final one never
    is), at most block_size (past it the window slides)."""
    return min(block_size, min(prompt_len, block_size) + max_new_tokens - 1)


def decoding_bytes(model: GPT, rows: int, positions: int) -> int:
    """Bytes that decoding `rows` sequences of up to `positions` cached positions holds at
    least: the KV cache and one step's logits, so that a batch too large for the device is
    refused before any of it is built."""
    cfg = model.config
    cache = (2 * cfg.n_layer * rows * cfg.kv_heads * cfg.head_dim * cache_dtype(model).itemsize
             * positions)  # keys and values
    return cache + rows * cfg.padded_vocab_size * 4


# Temperatures this small are greedy decoding: dividing by them overflows float32 (as vLLM does)
GREEDY_BELOW = 1e-5


def sample_next(
    logits: Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float,
    generator: torch.Generator | None = None,
    uniforms: Tensor | None = None,
) -> Tensor:
    """Next ids (B,) from the last position's logits (B, V); temperature 0 (below 1e-5) is
    greedy.

    The draw takes one uniform number per row: `uniforms` (B, 1) where each row has its own
    generator (the engine's requests), else drawn from `generator` for the whole batch.

    Draws among the candidates only (the top k, sorted, when top_k is set) with one uniform
    number per row: `torch.multinomial` over a whole 50k vocabulary draws a random number per
    entry, which on a CPU costs as much as a small model's forward pass.
    """
    if temperature < GREEDY_BELOW:
        return logits.float().argmax(dim=-1)  # the same ids; float32's kernel is twice as fast
    candidates = None  # (B, k) ids of `logits`' columns; None = the whole vocabulary
    if top_k is not None and top_k < logits.size(-1):  # before scaling: k values, not V
        logits, candidates = torch.topk(logits, top_k, dim=-1)  # (B, k), descending
    logits = logits.float() / temperature
    if top_p < 1.0:  # the nucleus of the distribution left after top-k
        total = torch.logsumexp(logits, dim=-1, keepdim=True)  # (B, 1)
        if candidates is None:
            logits, candidates = _head_holding(logits, total, top_p)
        probs = (logits - total).exp()  # (B, k) each candidate's probability, descending
        mass_before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above
        logits = logits.masked_fill(mass_before >= top_p, float("-inf"))  # keeps the first
    choice = draw(torch.softmax(logits, dim=-1), generator, uniforms)  # (B,)
    return choice if candidates is None else candidates.gather(-1, choice[:, None]).squeeze(-1)


def _head_holding(
    logits: Tensor, total: Tensor, top_p: float, k: int = 256
) -> tuple[Tensor, Tensor]:
    """The most likely tokens (values, ids), descending, enough to hold a nucleus of mass top_p.

    Usually the top 256 hold it, which spares sorting the whole vocabulary.
    """
    if k < logits.size(-1):
        values, ids = torch.topk(logits, k, dim=-1)  # (B, k)
        if bool(((values - total).exp().sum(dim=-1) >= top_p).all()):
            return values, ids
    return torch.sort(logits, dim=-1, descending=True)  # (B, V)


def draw(
    probs: Tensor, generator: torch.Generator | None, uniforms: Tensor | None = None
) -> Tensor:
    """One index per row of probs (B, N), by inverting the cumulative distribution at a uniform
    number per row (`uniforms` (B, 1), or drawn from `generator`)."""
    cdf = probs.cumsum(dim=-1)  # (B, N)
    u = uniforms if uniforms is not None else torch.rand(
        (probs.size(0), 1), generator=generator, device=probs.device
    )  # (B, 1)
    choice = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)  # zero-width bins never hit
    choice = choice.clamp_(max=probs.size(-1) - 1)  # u * total rounded up to the total
    # that clamp could land on a zero-probability tail entry (~1e-7 of draws): take the mode
    choice = torch.where(probs.gather(-1, choice) > 0, choice, probs.argmax(-1, keepdim=True))
    return choice.squeeze(-1)


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

    Only the tokenizer's ids (`config.vocab_size`) are ever drawn: the rows the model is padded
    with (`config.padded_vocab_size`) have no text.

    The prompt is prefilled in one pass; each later step runs one position against the KV cache.
    Once the text outgrows block_size, the context slides: each step rebuilds the cache from the
    last block_size tokens (positions are absolute, so the window must be recomputed), which
    is exactly what a model that only saw block_size positions during training expects.
    """
    if max_new_tokens == 0:
        return
    block_size, vocab_size = model.config.block_size, model.config.vocab_size
    window = prompt[:, -block_size:]  # (B, T) the context the model sees
    # positions up to the last token fed in (the final one is not), or the whole sliding window
    cache = model.new_cache(
        prompt.size(0), cache_length(block_size, prompt.size(1), max_new_tokens),
        cache_dtype(model),
    )
    logits, _ = model(window, cache=cache, last_only=True)  # prefill
    for step in range(max_new_tokens):
        last = logits[:, -1, :vocab_size]  # (B, V) the tokenizer's ids only
        next_ids = sample_next(last, temperature, top_k, top_p, generator)  # (B,)
        yield next_ids
        if step == max_new_tokens - 1:
            break  # no forward pass for a token nobody will read
        if window.size(1) < block_size:  # one new position against the cache
            logits, _ = model(next_ids[:, None], cache=cache, last_only=True)
            window = torch.cat([window, next_ids[:, None]], dim=1)
        else:  # slide: the window drops its oldest token and is computed afresh
            window = torch.cat([window[:, 1:], next_ids[:, None]], dim=1)
            cache.reset()
            logits, _ = model(window, cache=cache, last_only=True)
