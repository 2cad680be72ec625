"""Tokenizers: GPT-2 ids equal tiktoken's published encoding, offline; char vocabularies."""

from __future__ import annotations

import pytest

from gpt.config import pad_vocab
from gpt.errors import GPTError
from gpt.sample import stop_ids
from gpt.tokenizer import (
    CHAT_TOKENS,
    CharTokenizer,
    adds_chat_tokens,
    check_same_tokenizer,
    check_tokenizer_setting,
    get_tokenizer,
    same_tokenizer,
    tokenizer_from_dict,
    with_chat_tokens,
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
CHAT_CHARS = {**CHARS, "chat_tokens": list(CHAT_TOKENS)}


@pytest.mark.parametrize(
    ("found", "problem"),
    [({"name": "gpt2"}, "the 'gpt2' tokenizer but the model uses 'char'"),
     ({"name": "char", "chars": "abd"}, "a 'char' vocabulary other than the model's"),
     (CHAT_CHARS, "the 'char' tokenizer with the chat tokens <|im_start|> and <|im_end|> added, "
                  "which the model lacks and only a finetune adds"),
     ({**CHAT_CHARS, "chars": "abd"}, "a 'char' vocabulary other than the model's")],
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


@pytest.mark.parametrize("make", [lambda: get_tokenizer("gpt2"), lambda: CharTokenizer("ab")])
def test_chat_tokens_are_two_ids_after_the_tokenizers_own(make) -> None:
    """The chat tokens extend a tokenizer by two ids that decode to their strings; text is
    encoded as before (their strings too), and the record carries them and rebuilds."""
    base = make()
    chat = with_chat_tokens(base)
    assert chat.vocab_size == base.vocab_size + 2 and chat.eot_id == base.eot_id
    assert chat.chat_ids == (base.vocab_size, base.vocab_size + 1)
    assert chat.encode("ab") == base.encode("ab")
    ids = [*base.encode("ab"), *chat.chat_ids, pad_vocab(chat.vocab_size) - 1, *base.encode("b")]
    assert chat.decode(ids) == "ab<|im_start|><|im_end|>b"
    assert chat.to_dict() == {**base.to_dict(), "chat_tokens": ["<|im_start|>", "<|im_end|>"]}
    assert tokenizer_from_dict(chat.to_dict()).to_dict() == chat.to_dict()
    assert tokenizer_from_dict(base.to_dict()).to_dict() == base.to_dict()  # as ever
    assert with_chat_tokens(chat) is chat
    assert stop_ids(chat, ignore_eos=False) == stop_ids(base, False) | {chat.chat_ids[1]}
    assert stop_ids(chat, ignore_eos=True) == frozenset()


def test_chat_tokens_are_not_the_same_tokenizer_but_extend_it() -> None:
    """A record with the chat tokens is another tokenizer than without them (old records keep
    their identity), but one a finetune may add to its base: check_same_tokenizer lets it
    through only then, and names data without the tokens of a model that has them."""
    assert same_tokenizer(CHAT_CHARS, dict(CHAT_CHARS)) and same_tokenizer(CHARS, dict(CHARS))
    assert not same_tokenizer(CHAT_CHARS, CHARS)
    assert adds_chat_tokens(CHAT_CHARS, CHARS)
    assert not adds_chat_tokens(CHARS, CHAT_CHARS) and not adds_chat_tokens(CHAT_CHARS, CHAT_CHARS)
    assert not adds_chat_tokens({**CHAT_CHARS, "chars": "abd"}, CHARS)
    check_same_tokenizer(CHAT_CHARS, CHARS, "data/x holds", "out", "fix it", chat_tokens_added=True)
    with pytest.raises(GPTError) as refused:
        check_same_tokenizer(CHARS, CHAT_CHARS, "data/x holds", "out", "fix it",
                             chat_tokens_added=True)
    assert str(refused.value) == ("data/x holds the 'char' tokenizer without the chat tokens "
                                  "<|im_start|> and <|im_end|> out has; fix it")


def test_a_record_with_other_chat_tokens_is_refused() -> None:
    with pytest.raises(GPTError, match=r"has chat_tokens \['<s>'\], not ChatML's"):
        tokenizer_from_dict({"name": "gpt2", "chat_tokens": ["<s>"]})
