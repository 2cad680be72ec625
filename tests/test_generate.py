"""Sampling on ids: KV-cached decoding equals full recomputation; the sampling filters."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable

import pytest
import torch

from gpt.config import ModelConfig, SampleConfig
from gpt.generate import cache_dtype, decoding_bytes, draw, generate, sample_next
from gpt.model import GPT
from gpt.onednn import PackedLinear, pack_linears, packing_works
from gpt.sample import sample_text, stop_ids
from gpt.tokenizer import CharTokenizer, tokenizer_from_dict

VARIANTS = [
    dict(norm=n, norm_position=p, mlp=m, pos_embedding=pe, attention=a, n_kv_head=kv)
    for n, p, m, pe, a, kv in itertools.product(
        ["layernorm", "rmsnorm"], ["pre", "post"], ["standard", "swiglu"], ["learned", "rope"],
        ["sdpa", "manual"], [None, 2],
    )
]


def naive_greedy(model: GPT, prompt: torch.Tensor, steps: int) -> list[list[int]]:
    """nanoGPT's loop: recompute the whole (cropped) context for every token; the tokenizer's
    ids only (the padding rows past vocab_size are not tokens)."""
    seq = prompt
    for _ in range(steps):
        logits, _ = model(seq[:, -model.config.block_size :])
        next_ids = logits[:, -1, : model.config.vocab_size].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_ids], dim=1)
    return seq[:, prompt.size(1) :].tolist()


CROSS = [dict(cross_attention=True, pos_embedding=pe, attention=a) for pe in ["learned", "rope"] for a in ["sdpa", "manual"]]
# modded-nanogpt's switches: the cache holds normalised keys, and sampling sees capped logits
RECIPE = [dict(qk_norm=True, logit_softcap=3.0, pos_embedding=pe, attention=a, n_kv_head=kv)
          for pe, a, kv in [("learned", "sdpa", None), ("rope", "sdpa", 2), ("rope", "manual", None)]]
RECIPE += [dict(qk_norm=True, cross_attention=True, pos_embedding="rope", attention="sdpa")]


@pytest.mark.parametrize("variant", VARIANTS + CROSS + RECIPE, ids=lambda v: "-".join(map(str, v.values())))
def test_cached_logits_equal_uncached(variant: dict, tiny: Callable[..., GPT]) -> None:
    """Prefill 6 positions, then one at a time: the logits of a full pass, for the model as
    trained and for its packed-weight copy that sampling uses."""
    model = tiny(**variant)
    idx = torch.randint(0, 50, (2, 16))
    context = torch.randn(2, 5, 32) if model.config.cross_attention else None
    full, _ = model(idx, context=context)
    packed = pack_linears(copy.deepcopy(model))
    assert isinstance(packed.lm_head, PackedLinear) == packing_works(torch.float32)
    for m in (model, packed):
        cache = m.new_cache(2)
        prefill, _ = m(idx[:, :6], context=context, cache=cache)
        steps = [prefill]
        for t in range(6, 16):
            logits, _ = m(idx[:, t : t + 1], context=context, cache=cache)
            steps.append(logits)
        torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "manual"])
def test_float32_cache_under_bfloat16_weights(attention: str, tiny: Callable[..., GPT]) -> None:
    """A bfloat16 CPU model decodes against a float32 cache; its logits stay those of a full
    bfloat16 pass, and sampling gives the same greedy ids as full recomputation."""
    model = tiny(attention=attention, pos_embedding="rope").to(torch.bfloat16)
    assert cache_dtype(model) == torch.float32
    idx = torch.randint(0, 50, (2, 16))
    full, _ = model(idx)
    cache = model.new_cache(2, dtype=torch.float32)
    assert cache.k.dtype == torch.float32
    steps = [model(idx[:, :6], cache=cache)[0]]
    steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(6, 16)]
    cached = torch.cat(steps, dim=1)
    assert cached.dtype == torch.bfloat16
    torch.testing.assert_close(cached.float(), full.float(), rtol=0, atol=0.05)


def test_chunked_prefill_after_cache(tiny: Callable[..., GPT]) -> None:
    """Several new positions at once against a cache (offset causal mask)."""
    model = tiny(pos_embedding="rope")
    idx = torch.randint(0, 50, (1, 16))
    full, _ = model(idx)
    cache = model.new_cache(1)
    a, _ = model(idx[:, :5], cache=cache)
    b, _ = model(idx[:, 5:12], cache=cache)
    torch.testing.assert_close(torch.cat([a, b], dim=1), full[:, :12], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant", [
    dict(pos_embedding="learned"), dict(pos_embedding="rope"),
    dict(pos_embedding="rope", qk_norm=True, logit_softcap=3.0),
], ids=lambda v: "-".join(map(str, v.values())))
def test_greedy_equals_naive_loop_including_the_slide(variant: dict, tiny: Callable[..., GPT]) -> None:
    model = tiny(**variant)
    prompt = torch.randint(0, 50, (2, 5))
    steps = 30  # well past block_size = 16: the context slides
    reference = naive_greedy(model, prompt, steps)
    ours = torch.stack(list(generate(model, prompt, steps, temperature=0)), dim=1).tolist()
    assert ours == reference
    packed = pack_linears(copy.deepcopy(model))
    assert torch.stack(list(generate(packed, prompt, steps, temperature=0)), dim=1).tolist() == reference


def test_long_prompt_is_cropped_to_block_size(tiny: Callable[..., GPT]) -> None:
    model = tiny()
    prompt = torch.randint(0, 50, (1, 40))
    ours = torch.stack(list(generate(model, prompt, 5, temperature=0)), dim=1).tolist()
    assert ours == naive_greedy(model, prompt, 5)


def test_same_seed_same_sample_and_max_new_tokens(tiny: Callable[..., GPT]) -> None:
    model = tiny()
    prompt = torch.randint(0, 50, (3, 4))

    def run(seed: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(seed)
        out = list(generate(model, prompt, 12, temperature=1.0, top_k=10, generator=g))
        return torch.stack(out, dim=1).tolist()

    assert run(1) == run(1)
    assert run(1) != run(2)
    assert all(len(row) == 12 for row in run(1))
    assert list(generate(model, prompt, 0)) == []


@pytest.mark.parametrize("top_k", [None, 40])
def test_padding_ids_past_the_tokenizer_are_never_drawn(top_k: int | None, tiny: Callable[..., GPT]) -> None:
    """A model's vocabulary padded past its tokenizer's: ids with no text must not be sampled."""
    unpadded = tiny(vocab_size=64, tie_embeddings=False)  # all 64 rows are real ids
    with torch.no_grad():
        unpadded.lm_head.weight.zero_()  # every logit 0: a uniform draw over the 64 ids
        unpadded.lm_head.weight[50:, 0] = 5.0  # and more weight on the ids 50..63
    padded = GPT(ModelConfig(**{**unpadded.config.__dict__, "vocab_size": 50})).eval()
    padded.load_state_dict(unpadded.state_dict())  # the same weights; ids 50..63 are padding
    assert padded.config.padded_vocab_size == 64
    prompt = torch.zeros(8, 1, dtype=torch.long)

    def drawn(model: GPT, **kw: object) -> set[int]:
        g = torch.Generator().manual_seed(0)
        steps = generate(model, prompt, 10, top_k=top_k, generator=g, **kw)  # type: ignore[arg-type]
        return set(torch.stack(list(steps)).flatten().tolist())

    assert max(drawn(unpadded)) >= 50  # the check below could fail
    assert max(drawn(padded)) < 50
    assert max(drawn(padded, temperature=0)) < 50


def test_sample_text_gives_one_character_per_token_with_a_padded_vocabulary(tiny: Callable[..., GPT]) -> None:
    """Through sample_text: a char model padded to 64 ids never spends a token on padding."""
    model = tiny(vocab_size=27, tie_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    tokenizer = CharTokenizer("abcdefghijklmnopqrstuvwxyz")  # 27 ids with the newline
    settings = SampleConfig(max_new_tokens=40, temperature=1.0, top_k=None, num_samples=3)
    for text in sample_text(model, tokenizer, "a", settings):
        assert len(text) == 40


@pytest.mark.parametrize(("prompt_len", "new_tokens"), [(3, 5), (10, 30), (16, 4), (1, 1)])
def test_decoding_bytes_counts_the_cache_the_sampler_allocates(
    prompt_len: int, new_tokens: int, tiny: Callable[..., GPT], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The KV cache that sampling really allocates for 3 samples (at most block_size 16
    positions each, past which the window slides), plus one step's float32 logits."""
    model = tiny(n_kv_head=2)
    tokenizer = CharTokenizer("abcdefgh\n")
    allocated = []
    new_cache = model.new_cache

    def recorded(*args: object, **kwargs: object) -> list:
        cache = new_cache(*args, **kwargs)  # type: ignore[arg-type]
        allocated.append(cache.k.nbytes + cache.v.nbytes)
        return cache

    monkeypatch.setattr(model, "new_cache", recorded)
    settings = SampleConfig(max_new_tokens=new_tokens, num_samples=3, temperature=0)
    sample_text(model, tokenizer, "a" * prompt_len, settings)
    positions = min(16, prompt_len + new_tokens - 1)
    assert decoding_bytes(model, 3, positions) == (
        allocated[0] + 3 * model.config.padded_vocab_size * 4)


def test_top_k_never_leaves_its_set() -> None:
    logits = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(4000, 1)
    g = torch.Generator().manual_seed(0)
    ids = sample_next(logits, 1.0, top_k=3, top_p=1.0, generator=g)
    assert set(ids.tolist()) == {0, 1, 2}


def sampled_set(logits: torch.Tensor, top_k: int | None, top_p: float) -> set[int]:
    """The ids drawn in 4000 samples of one crafted distribution."""
    g = torch.Generator().manual_seed(0)
    return set(sample_next(logits.repeat(4000, 1), 1.0, top_k, top_p, g).tolist())


@pytest.mark.parametrize(
    "top_p, kept", [(0.8, {0, 1}), (0.81, {0, 1, 2}), (0.1, {0}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_keeps_the_smallest_nucleus(top_p: float, kept: set[int]) -> None:
    logits = torch.tensor([[0.3, 0.05, 0.5, 0.15]]).log()[:, [2, 0, 3, 1]]  # 0.5, 0.3, 0.15, 0.05
    assert sampled_set(logits, None, top_p) == kept  # 0.5 + 0.3 reaches 0.8


def test_top_p_over_a_large_vocabulary_with_and_without_top_k() -> None:
    """The nucleus found among the top 256 equals the one of the fully sorted vocabulary."""
    logits = torch.full((1, 1000), -30.0)
    logits[0, [7, 500, 999]] = torch.tensor([0.6, 0.3, 0.1]).log()
    assert sampled_set(logits, None, 0.85) == {7, 500}
    flat = torch.zeros(1, 1000)  # the nucleus holds 900 tokens: beyond the top 256
    assert len(sampled_set(flat, None, 0.9)) > 256
    logits[0, 500] = 0.4
    assert sampled_set(logits, 2, 0.5) == {500}  # top-p within the renormalized top-k


def test_draw_follows_the_distribution_and_skips_zeros() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0]]).repeat(20000, 1)
    ids = draw(probs, torch.Generator().manual_seed(0))
    freq = torch.bincount(ids, minlength=6) / 20000
    torch.testing.assert_close(freq, probs[0], atol=0.015, rtol=0)
    assert freq[[0, 2, 5]].sum() == 0


def test_temperature_zero_is_argmax() -> None:
    logits = torch.tensor([[0.1, 3.0, 2.9], [5.0, 0.0, 0.0]])
    assert sample_next(logits, 0.0, None, 1.0, None).tolist() == [1, 0]


def test_sampling_stops_at_the_end_of_text_id_unless_told_not_to(
    tiny: Callable[..., GPT]
) -> None:
    """A tokenizer with an end-of-text id ends a sample there (a char vocabulary's newline is
    text): the id is made certain to win from the third token on."""
    tok = tokenizer_from_dict({"name": "gpt2"})
    model = tiny(vocab_size=tok.vocab_size)
    calls = []

    class Ending(torch.nn.Module):  # lm_head stand-in: the eot id wins from the third call on
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(1)
            logits = torch.zeros(*x.shape[:-1], model.config.padded_vocab_size)
            logits[..., 10 + len(calls)] = 5.0
            if len(calls) >= 3:
                logits[..., tok.eot_id] = 10.0
            return logits

    model.lm_head = Ending()
    settings = SampleConfig(max_new_tokens=10, temperature=0.0)
    assert sample_text(model, tok, "a", settings) == [tok.decode([11, 12])]
    calls.clear()
    settings = SampleConfig(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    assert sample_text(model, tok, "a", settings) == [tok.decode([11, 12] + [tok.eot_id] * 8)]
    chars = CharTokenizer("ab\n")
    assert stop_ids(chars, ignore_eos=False) == frozenset()  # its newline is text


@pytest.mark.parametrize("temperature", [1e-6, 1e-40, 5e-324])
def test_temperatures_too_small_to_divide_by_are_greedy(temperature: float) -> None:
    """Dividing by them overflows float32 (NaN probabilities); below 1e-5 is argmax."""
    logits = torch.randn(4, 50)
    for top_k, top_p in [(None, 1.0), (5, 1.0), (None, 0.9)]:
        ids = sample_next(logits, temperature, top_k, top_p, torch.Generator().manual_seed(0))
        assert torch.equal(ids, logits.argmax(-1))
