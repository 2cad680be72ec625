"""Tokenizers: GPT-2 ids equal tiktoken's published encoding, offline; char vocabularies."""

from __future__ import annotations

import pytest

from gpt.config import pad_vocab
from gpt.errors import GPTError
from gpt.tokenizer import (
    CharTokenizer,
    check_same_tokenizer,
    check_tokenizer_setting,
    get_tokenizer,
    tokenizer_from_dict,
)

TEXT = "Hello world! def f(x):\n    return x**2  # ünïcödé 日本語\n\n<|endoftext|>"
# Ids published for tiktoken's "gpt2" encoding (its README's "hello world", tutorials, and the
# well-known "Hello, do you like tea?" example with the special token allowed).
PUBLISHED = {
    "hello world": [31373, 995],
    "Hello, world!": [15496, 11, 995, 0],
    "hii there": [71, 4178, 612],
}
TEA = "Hello, do you like tea? <|endoftext|> In the sunlit terraces of someunknownPlace."
TEA_IDS = [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114,
           286, 617, 34680, 27271, 13]


def test_gpt2_matches_published_ids_offline() -> None:
    tok = get_tokenizer("gpt2")
    for text, ids in PUBLISHED.items():
        assert tok.encode(text) == ids
    assert tok.encoding.encode(TEA, allowed_special={"<|endoftext|>"}) == TEA_IDS
    assert (tok.vocab_size, tok.eot_id, tok.name) == (50257, 50256, "gpt2")


def test_gpt2_text_never_forges_the_separator() -> None:
    tok = get_tokenizer("gpt2")
    ids = tok.encode(TEXT)
    assert tok.eot_id not in ids and tok.decode(ids) == TEXT


def test_gpt2_batch_encoding_equals_one_by_one() -> None:
    tok = get_tokenizer("gpt2")
    texts = [TEXT, "import os\n", "", "a" * 1000]
    assert tok.encode_batch(texts, num_threads=2) == [tok.encode(t) for t in texts]


def test_gpt2_round_trips_through_dict() -> None:
    tok = tokenizer_from_dict(get_tokenizer("gpt2").to_dict())
    assert tok.encode(TEA) == get_tokenizer("gpt2").encode(TEA)


def test_char_round_trip_and_persistence() -> None:
    tok = CharTokenizer.from_texts(["hello world", "dog"])
    assert tok.chars == sorted(set("hello worlddog\n"))
    assert tok.vocab_size == 10  # h e l o space w r d g and the newline
    assert tok.decode(tok.encode("hello dog\nworld")) == "hello dog\nworld"
    again = tokenizer_from_dict(tok.to_dict())
    assert again.chars == tok.chars and again.encode("hello") == tok.encode("hello")
    assert tok.eot_id == tok.chars.index("\n")


def test_char_unknown_characters_are_named() -> None:
    tok = CharTokenizer.from_texts(["abc"])
    with pytest.raises(GPTError, match=r"2 character\(s\) not in the char vocabulary: 'x', 'é'"):
        tok.encode("abcxé")


def test_unknown_tokenizer_lists_choices() -> None:
    with pytest.raises(GPTError, match=r"unknown tokenizer 'bpe2'; choose one of gpt2, char, bpe"):
        get_tokenizer("bpe2")


def test_unavailable_tiktoken_encoding_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import tiktoken

    def offline(name: str) -> None:
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(GPTError, match=r"tokenizer 'cl100k_base' could not be loaded"):
        get_tokenizer("cl100k_base")


@pytest.mark.parametrize("make", [lambda: get_tokenizer("gpt2"), lambda: CharTokenizer("ab")])
def test_padding_ids_decode_to_nothing(make) -> None:
    """A model's vocabulary is padded to a multiple of 64; an untrained model may sample the
    padding ids, which have no text."""
    tok = make()
    ids = tok.encode("ab")
    padded = pad_vocab(tok.vocab_size)
    assert tok.decode([*ids, padded - 1, tok.vocab_size, *ids]) == "abab"


@pytest.mark.parametrize("make", [lambda: get_tokenizer("gpt2"), lambda: CharTokenizer("ab")])
def test_nothing_goes_before_a_text(make) -> None:
    """Only HF tokenizers that add a bos token to texts (Llama's <s>) have a bos_id."""
    assert make().bos_id is None


CHARS = {"name": "char", "chars": "abc"}


@pytest.mark.parametrize(
    ("found", "problem"),
    [({"name": "gpt2"}, "the 'gpt2' tokenizer but the model uses 'char'"),
     ({"name": "char", "chars": "abd"}, "a 'char' vocabulary other than the model's")],
)
def test_data_of_another_tokenizer_is_refused_with_one_message_per_kind(
    found: dict, problem: str
) -> None:
    """Another tokenizer, or another vocabulary of the same one: each said one way, framed by
    the caller's names for the data, the model and the fix."""
    check_same_tokenizer(dict(CHARS), CHARS, "data/x was prepared with", "the model", "fix it")
    with pytest.raises(GPTError) as refused:
        check_same_tokenizer(found, CHARS, "data/x was prepared with", "the model", "fix it")
    assert str(refused.value) == f"data/x was prepared with {problem}; fix it"


def test_a_tokenizer_setting_is_compared_by_kind_before_any_data() -> None:
    check_tokenizer_setting("char", CHARS, "out/ckpt-0000010", "use another train.out_dir")
    with pytest.raises(GPTError, match=r"^out/ckpt-0000010 was trained with the 'char' tokenizer, "
                       r"the config now says data.tokenizer = 'gpt2'; set data.tokenizer = "
                       r"'char', or use another train.out_dir$"):
        check_tokenizer_setting("gpt2", CHARS, "out/ckpt-0000010", "use another train.out_dir")
