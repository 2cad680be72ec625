"""The byte-level BPE learned from the train split (data.tokenizer = "bpe")."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from gpt.cli import app
from gpt.config import DataConfig
from gpt.data.prepare import prepare
from gpt.data.prepared import PreparedData
from gpt.errors import GPTError
from gpt.tokenizer import GPT2_EOT, BPETokenizer, get_tokenizer, tokenizer_from_dict

runner = CliRunner()

CODE = "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(300))
MIXED = [
    "plain ASCII text, with punctuation!",
    "emoji 🙂👍🏽🧑‍🚀 and flags 🇫🇷",
    "한국어 텍스트: 안녕하세요, 세계",
    "mixed: Ελληνικά, русский, 日本語, العربية, हिन्दी",
    "code:\n\tif x != 0:\n\t\treturn {'k': [1, 2]}  # ok\n",
    f"a literal {GPT2_EOT} is text",
    "  leading and trailing spaces  \n\n\r\n",
    "\x00\x01 control bytes \x7f and a combining e\u0301",
]


@pytest.fixture(scope="module")
def learned() -> BPETokenizer:
    return BPETokenizer.learn([CODE, *MIXED], 320)


def data_cfg(tmp_path: Path, **kw: object) -> DataConfig:
    values = {"source": str(tmp_path / "corpus.txt"), "data_dir": str(tmp_path / "prepared"),
              "tokenizer": "bpe", "bpe_vocab_size": 320, "num_proc": 1, **kw}
    return DataConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("text", [*MIXED, "", "🙂" * 50, "never seen: ѬѭѮ ꙮ 𓀀 🜁"])
def test_any_utf8_text_round_trips(learned: BPETokenizer, text: str) -> None:
    ids = learned.encode(text)
    assert all(0 <= i < learned.vocab_size for i in ids)
    assert learned.decode(ids) == text
    assert learned.encode_array(text).tolist() == ids
    assert learned.encode_batch([text, text]) == [ids, ids]


def test_tiktoken_gives_the_ids_of_the_library_encoder(learned: BPETokenizer) -> None:
    for text in [CODE, *MIXED]:
        assert learned.encode(text) == learned.backend.encode(text, add_special_tokens=False).ids


def test_eot_is_last_and_never_forged_by_text(learned: BPETokenizer) -> None:
    assert learned.eot_id == learned.vocab_size - 1
    assert learned.vocab_size == 320
    assert learned.eot_id not in learned.encode(f"x{GPT2_EOT}y")
    assert learned.decode([learned.eot_id]) == GPT2_EOT


def test_ids_past_the_vocabulary_decode_to_nothing(learned: BPETokenizer) -> None:
    ids = learned.encode("hello")
    assert learned.decode([*ids, learned.vocab_size, learned.vocab_size + 40]) == "hello"


@pytest.mark.parametrize("text", ["\ud800", "ok \udfff then", "🙂\udc80"])
def test_lone_surrogates_are_refused(learned: BPETokenizer, text: str) -> None:
    for encode in (learned.encode, learned.encode_array, lambda t: learned.encode_batch([t])):
        with pytest.raises(GPTError, match="lone surrogate"):
            encode(text)


def test_record_round_trips_and_a_changed_record_is_refused(learned: BPETokenizer) -> None:
    record = json.loads(json.dumps(learned.to_dict()))
    again = tokenizer_from_dict(record)
    assert again.to_dict() == learned.to_dict()
    assert again.encode(CODE) == learned.encode(CODE)
    with pytest.raises(GPTError, match="sha256"):
        tokenizer_from_dict({**record, "sha256": "0" * 64})


def test_the_same_texts_learn_the_same_vocabulary(learned: BPETokenizer) -> None:
    assert BPETokenizer.learn([CODE, *MIXED], 320).to_dict() == learned.to_dict()


def plain_learn(texts: list[str], vocab_size: int) -> str:
    """The tokenizer.json the library's trainer learns with GPT-2's settings, words whole."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 1, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(texts, trainer=trainer)
    backend.add_special_tokens([AddedToken(GPT2_EOT, special=True, normalized=False)])
    return backend.to_str()


def test_words_of_ordinary_length_learn_what_the_library_learns(learned: BPETokenizer) -> None:
    """Learning in pieces changes nothing for words shorter than a piece."""
    assert learned.tokenizer_json == BPETokenizer(plain_learn([CODE, *MIXED], 320)).tokenizer_json


def test_a_huge_word_is_learned_in_pieces_in_a_moment() -> None:
    """200,000 repeated letters are one word to the split pattern: learned whole, the trainer
    took 33 s; in pieces, a moment. Such words still encode as the library does, and back."""
    started = time.perf_counter()
    tokenizer = BPETokenizer.learn(["a" * 200_000], 8192)
    assert time.perf_counter() - started < 5
    assert len(tokenizer.encode("a" * 4096)) == 1  # a whole piece is one learned token
    text = "b" * 10_000 + " then " + "a" * 50_001
    ids = tokenizer.encode(text)
    assert ids == tokenizer.backend.encode(text, add_special_tokens=False).ids
    assert tokenizer.decode(ids) == text


@pytest.mark.parametrize(("asked", "rounded"), [(257, 320), (320, 320), (321, 384), (8192, 8192)])
def test_vocab_size_rounds_up_to_a_multiple_of_64(asked: int, rounded: int) -> None:
    assert DataConfig(bpe_vocab_size=asked).bpe_vocab_size == rounded


def test_too_small_a_vocab_size_is_refused() -> None:
    with pytest.raises(GPTError, match=r"\[data\] bpe_vocab_size: must be at least 257"):
        DataConfig(bpe_vocab_size=256)


def test_bpe_is_not_a_tokenizer_by_name() -> None:
    with pytest.raises(GPTError, match="learned from data"):
        get_tokenizer("bpe")


def test_validation_text_never_shapes_the_vocabulary(tmp_path: Path) -> None:
    """Two corpora alike in their first 90% (the train split) and unlike after it learn the same
    vocabulary; one unlike in the train split learns another."""
    train = CODE
    tail = len(train) // 9  # the last 10% of train + tail is the tail
    corpora = {"a": train + "x" * tail, "b": train + "🙂 validation only 한국어 " * (tail // 20)}
    corpora["b"] = corpora["b"][: len(corpora["a"])]
    records = {}
    for name, text in corpora.items():
        folder = tmp_path / name
        folder.mkdir()
        (folder / "corpus.txt").write_text(text)
        meta = prepare(data_cfg(folder), progress=False)
        assert meta["settings"]["bpe_vocab_size"] == 320
        records[name] = meta["tokenizer"]
    assert records["a"] == records["b"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "corpus.txt").write_text(corpora["b"][::-1])
    assert prepare(data_cfg(other), progress=False)["tokenizer"] != records["a"]


def test_prepared_ids_decode_to_the_corpus(tmp_path: Path) -> None:
    text = (CODE + "".join(MIXED) * 20).replace("\r", "")  # a text file reads "\r\n" as "\n"
    (tmp_path / "corpus.txt").write_text(text)
    prepare(data_cfg(tmp_path, num_proc=2), progress=False)
    data = PreparedData(tmp_path / "prepared")
    tokenizer = tokenizer_from_dict(data.tokenizer)
    joined = "".join(tokenizer.decode(np.array(data.tokens(s)).tolist()) for s in ("train", "val"))
    assert joined == text


def test_a_folder_of_another_learned_vocabulary_is_refused(tmp_path: Path) -> None:
    (tmp_path / "corpus.txt").write_text(CODE)
    meta = prepare(data_cfg(tmp_path), progress=False)
    with pytest.raises(GPTError, match=r"other settings \(bpe_vocab_size 320 -> 384\)"):
        prepare(data_cfg(tmp_path, bpe_vocab_size=384), progress=False)
    other = BPETokenizer.learn([CODE[::-1]], 320).to_dict()
    with pytest.raises(GPTError, match="prepared from other settings"):
        prepare(data_cfg(tmp_path), progress=False, tokenizer_record=other)
    assert prepare(data_cfg(tmp_path), progress=False, tokenizer_record=meta["tokenizer"]) == meta


def test_a_checkpoint_samples_after_its_data_folder_is_deleted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_tiny_run: Callable[..., Path]
) -> None:
    monkeypatch.chdir(tmp_path)
    write_tiny_run(tmp_path, extra="")
    settings = ["--set", "data.tokenizer=bpe", "--set", "data.bpe_vocab_size=320",
                "--set", "data.data_dir=prepared", "--set", "train.max_iters=5"]
    result = runner.invoke(app, ["train", "--config", "tiny.toml", *settings])
    assert result.exit_code == 0, result.output
    record = PreparedData(tmp_path / "prepared").tokenizer
    assert record["name"] == "bpe"
    shutil.rmtree(tmp_path / "prepared")
    result = runner.invoke(app, ["sample", "--checkpoint", "out", "--prompt", "def f",
                                 "--max-new-tokens", "8", "--no-stream"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("def f")


def test_export_loads_in_transformers_with_the_same_ids(
    learned: BPETokenizer, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    from gpt.hf.tokenizers import check_exportable_tokenizer, save_hf_tokenizer

    record = learned.to_dict()
    check_exportable_tokenizer(record)
    ids = save_hf_tokenizer(record, tmp_path, 1024)
    assert ids["eos_token_id"] == learned.eot_id
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    text = "".join(MIXED[:5]) + CODE[:300]
    assert hf(text)["input_ids"] == learned.encode(text)
    assert hf.decode(learned.encode(text)) == text
    assert hf.eos_token_id == learned.eot_id


def test_gpt_tokenizer_reports_bytes_per_token_and_splits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(CODE)
    settings = ["--set", "data.source=corpus.txt", "--set", "data.data_dir=prepared",
                "--set", "data.tokenizer=bpe", "--set", "data.bpe_vocab_size=320"]
    before = runner.invoke(app, ["tokenizer", *settings])
    assert before.exit_code == 0, before.output
    assert "no learned bpe in prepared: run gpt prepare" in before.output
    prepare(data_cfg(tmp_path), progress=False)
    result = runner.invoke(app, ["tokenizer", *settings])
    assert result.exit_code == 0, result.output
    rates = {line.split()[0]: float(line.split()[-1]) for line in result.output.splitlines()
             if line.startswith("  ") and line.split()[-1][0].isdigit()}
    assert set(rates) == {"bpe", "gpt2", "char"} and rates["char"] == 1.0
    assert rates["bpe"] > rates["char"]
    assert result.output.count("example: ") == 3
    assert "  bpe   |" in result.output and "  gpt2  |def| function" in result.output
