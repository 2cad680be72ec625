"""HF tokenizers: our ids equal those of the folders we export, as transformers loads them, and
an HF model's tokenizer imports into a record that gives HF's ids (all offline, tiny vocabularies
trained in the test)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from gpt.config import DataConfig, pad_vocab  # noqa: E402
from gpt.data.prepare import prepare  # noqa: E402
from gpt.data.prepared import PreparedData  # noqa: E402
from gpt.errors import GPTError  # noqa: E402
from gpt.hf.tokenizers import save_hf_tokenizer, tokenizer_record_from_folder  # noqa: E402
from gpt.tokenizer import CharTokenizer, HFTokenizer, get_tokenizer, tokenizer_from_dict  # noqa: E402

TEXT = (
    "Hello, World! Ünïcödé café naïve, 日本語のテキスト, 한국어 and emoji 🙂👍🏽 ok.\n"
    "Numbers 0 7 42 3.14159 1,000,000 2024-06-01; punctuation (a) [b] {c} <d> @#$%^&*_+=|~`\n"
    "  leading spaces, trailing spaces   \n\ttabs\tand\t\tmore\n\n\nblank lines above\r\n"
    "Contractions: don't, I'm, we'll, they've, she'd, it's, you're. 'quoted' \"double\"\n"
    "    indented code: return x**2  # comment\n"
)
SAMPLES = [TEXT, "", " ", "\n", "a", "  two leading", "don't stop", "日本"]


@pytest.fixture(autouse=True)
def transformers_warnings(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """transformers logs through its own root logger; let pytest see it, and fail on warnings."""
    transformers.utils.logging.enable_propagation()
    with caplog.at_level(logging.WARNING, logger="transformers"):
        yield
    transformers.utils.logging.disable_propagation()
    records = caplog.get_records("setup") + caplog.get_records("call")
    warned = [r.getMessage() for r in records if r.name.startswith("transformers")]
    assert not warned, warned


def train_bpe(tmp_path: Path, name: str = "tiny-bpe", add_bos: bool = True) -> Path:
    """A byte-level BPE unlike GPT-2's, with <s> and </s>, saved as transformers saves a model's
    tokenizer (with a post-processor that puts <s> before a text)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    backend.train_from_iterator([TEXT] * 3 + ["the quick brown fox jumps over the lazy dog"], trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))],
        )
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
        chat_template="{% for m in messages %}{{ m['content'] }}</s>{% endfor %}",
    )
    folder = tmp_path / name
    hf.save_pretrained(str(folder))
    return folder


def hf_record(tmp_path: Path) -> dict[str, Any]:
    record = tokenizer_record_from_folder(train_bpe(tmp_path), "tiny-bpe")
    assert record is not None and record["name"] == "hf"
    return record


def record_of(kind: str, tmp_path: Path) -> dict[str, Any]:
    if kind == "gpt2":
        return {"name": "gpt2"}
    if kind == "char":
        return CharTokenizer.from_texts(SAMPLES).to_dict()
    return hf_record(tmp_path)


def load(folder: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(folder))


@pytest.mark.parametrize("kind", ["gpt2", "char", "hf"])
def test_exported_folder_encodes_and_decodes_as_ours(kind: str, tmp_path: Path) -> None:
    record = record_of(kind, tmp_path)
    ours = tokenizer_from_dict(record)
    ids = save_hf_tokenizer(record, tmp_path / "export", model_max_length=4096)
    hf = load(tmp_path / "export")
    added = [] if ours.bos_id is None else [ours.bos_id]
    for text in SAMPLES:
        expected = ours.encode(text)
        assert hf(text, add_special_tokens=False)["input_ids"] == expected, text
        assert hf(text)["input_ids"] == added + expected, text
        assert hf.decode(expected) == text == ours.decode(expected)
    assert hf.model_max_length == 4096
    assert ids["eos_token_id"] == hf.eos_token_id == ours.eot_id


def test_exported_special_ids(tmp_path: Path) -> None:
    assert save_hf_tokenizer({"name": "gpt2"}, tmp_path / "gpt2", 1024) == {
        "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": None,
    }
    char = CharTokenizer("ab")
    assert save_hf_tokenizer(char.to_dict(), tmp_path / "char", 16) == {
        "bos_token_id": None, "eos_token_id": char.eot_id, "pad_token_id": None,
    }


def test_exported_gpt2_is_recognised_as_gpt2(tmp_path: Path) -> None:
    """So that an exported GPT-2 model imports back onto the bundled tiktoken encoding."""
    save_hf_tokenizer({"name": "gpt2"}, tmp_path / "gpt2", 1024)
    assert tokenizer_record_from_folder(tmp_path / "gpt2", "gpt2") == {"name": "gpt2"}
    assert load(tmp_path / "gpt2")(TEXT, add_special_tokens=False)["input_ids"] == (
        get_tokenizer("gpt2").encode(TEXT)
    )


def test_exported_char_vocabulary_imports_as_itself(tmp_path: Path) -> None:
    record = CharTokenizer.from_texts(SAMPLES).to_dict()
    save_hf_tokenizer(record, tmp_path / "char", 16)
    assert tokenizer_record_from_folder(tmp_path / "char", "char") == record


def test_another_bpe_is_not_gpt2(tmp_path: Path) -> None:
    assert tokenizer_record_from_folder(train_bpe(tmp_path, add_bos=False), "bpe")["name"] == "hf"


def test_hf_record_gives_hf_ids_and_round_trips(tmp_path: Path) -> None:
    folder = train_bpe(tmp_path)
    hf = load(folder)
    record = tokenizer_record_from_folder(folder, "tiny-bpe")
    ours = tokenizer_from_dict(record)
    assert isinstance(ours, HFTokenizer) and ours.label == "tiny-bpe"
    for text in SAMPLES:
        assert ours.encode(text) == hf(text, add_special_tokens=False)["input_ids"]
        assert [ours.bos_id, *ours.encode(text)] == hf(text)["input_ids"]
    assert ours.encode_batch(SAMPLES) == [ours.encode(t) for t in SAMPLES]
    assert ours.encode_array(TEXT).tolist() == ours.encode(TEXT)
    assert ours.bos_id == hf.convert_tokens_to_ids("<s>") == hf.bos_token_id
    assert ours.eot_id == hf.convert_tokens_to_ids("</s>") == hf.eos_token_id
    assert ours.vocab_size == len(hf)
    assert ours.to_dict() == record
    assert json.loads(json.dumps(record)) == record
    assert tokenizer_from_dict(json.loads(json.dumps(record))).to_dict() == record
    assert record["special_tokens"] == {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": None, "pad_token": None,
    }
    assert record["config"]["chat_template"] == hf.chat_template


def test_hf_record_exports_again_unchanged(tmp_path: Path) -> None:
    record = hf_record(tmp_path)
    save_hf_tokenizer(record, tmp_path / "again", model_max_length=4096)
    hf = load(tmp_path / "again")
    ours = tokenizer_from_dict(record)
    assert hf(TEXT)["input_ids"] == [ours.bos_id, *ours.encode(TEXT)]
    assert hf.chat_template == record["config"]["chat_template"]
    again = tokenizer_record_from_folder(tmp_path / "again", "tiny-bpe")
    assert again["tokenizer_json"] == record["tokenizer_json"]
    assert again["special_tokens"] == record["special_tokens"]
    assert again["config"] == {**record["config"], "model_max_length": 4096}


def test_literal_special_tokens_in_text_are_text(tmp_path: Path) -> None:
    """As tiktoken's gpt2 does with <|endoftext|>: a document cannot forge a separator."""
    ours = tokenizer_from_dict(hf_record(tmp_path))
    text = "one</s>two<s>"
    ids = ours.encode(text)
    assert ours.eot_id not in ids and ours.bos_id not in ids
    assert ours.decode(ids) == text
    assert ours.decode([ours.bos_id, *ids, ours.eot_id]) == "<s>" + text + "</s>"


def test_hf_decode_drops_padding_ids(tmp_path: Path) -> None:
    ours = tokenizer_from_dict(hf_record(tmp_path))
    ids = ours.encode("ab")
    padded = pad_vocab(ours.vocab_size)
    assert ours.decode([*ids, ours.vocab_size, padded - 1, *ids]) == "abab"


def test_hf_tokenizer_without_eos_or_bos_has_no_eot(tmp_path: Path) -> None:
    record = hf_record(tmp_path)
    record["special_tokens"] = {"bos_token": None, "eos_token": None}
    with pytest.raises(GPTError, match=r"'tiny-bpe' has neither an eos nor a bos token"):
        _ = tokenizer_from_dict(record).eot_id


def test_special_token_outside_the_vocabulary_is_an_error(tmp_path: Path) -> None:
    record = hf_record(tmp_path)
    record["special_tokens"]["eos_token"] = "<|end|>"
    with pytest.raises(GPTError, match=r"its eos_token '<\|end\|>' is not in its vocabulary"):
        tokenizer_from_dict(record)


def test_slow_only_folder_loads(tmp_path: Path) -> None:
    """vocab.json and merges.txt with no tokenizer.json: transformers builds the fast one."""
    folder = train_bpe(tmp_path, add_bos=False)
    fast = Tokenizer.from_file(str(folder / "tokenizer.json"))
    slow = tmp_path / "slow"
    slow.mkdir()
    fast.model.save(str(slow))  # vocab.json, merges.txt
    (slow / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GPT2Tokenizer", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": None,
    }))
    assert sorted(p.name for p in slow.iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    ours = tokenizer_from_dict(tokenizer_record_from_folder(slow, "slow"))
    hf = load(slow)
    assert ours.encode(TEXT) == hf(TEXT, add_special_tokens=False)["input_ids"]
    assert ours.encode(TEXT) == HFTokenizer(fast.to_str()).encode(TEXT)
    assert ours.eot_id == fast.token_to_id("</s>")


def test_gpt2_hub_layout_is_recognised_as_gpt2(tmp_path: Path) -> None:
    """HF's gpt2 folder: vocab.json and merges.txt (and config.json), no tokenizer_config.json."""
    from gpt.hf.tokenizers import _gpt2_merges, _gpt2_vocab

    (tmp_path / "vocab.json").write_text(json.dumps(_gpt2_vocab()))
    merges = "".join(f"{a} {b}\n" for a, b in _gpt2_merges())
    (tmp_path / "merges.txt").write_text("#version: 0.2\n" + merges)
    (tmp_path / "config.json").write_text('{"model_type": "gpt2"}')
    assert tokenizer_record_from_folder(tmp_path, "gpt2") == {"name": "gpt2"}


def test_llama_style_folder_gives_hf_ids(tmp_path: Path) -> None:
    """A SentencePiece-like BPE (Metaspace, byte fallback) that transformers loads through
    LlamaTokenizer, which rebuilds the pipeline and keeps tokenizer.json's post-processor."""
    backend = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first", split=False)
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    backend.train_from_iterator([TEXT.replace("🙂", "")], trainer)  # 🙂 falls back to bytes
    pipeline = json.loads(backend.to_str())
    vocab = pipeline["model"]["vocab"]
    vocab.update({f"<0x{b:02X}>": len(vocab) + b for b in range(256)})
    backend = Tokenizer.from_str(json.dumps(pipeline))
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)],
    )
    folder = tmp_path / "llama"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": False,  # as Llama folders say; transformers 4.x warns without it
    }))
    hf = load(folder)
    ours = tokenizer_from_dict(tokenizer_record_from_folder(folder, "llama"))
    assert (ours.bos_id, ours.eot_id) == (1, 2)
    for text in SAMPLES:
        assert [1, *ours.encode(text)] == hf(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == hf.decode(ours.encode(text))


def test_folder_without_tokenizer_files_gives_none(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    assert tokenizer_record_from_folder(tmp_path, "weights-only") is None


def test_sentencepiece_folder_without_sentencepiece_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gpt.hf.tokenizers as hf_tokenizers

    monkeypatch.setattr(hf_tokenizers, "_installed", lambda module: module != "sentencepiece")
    (tmp_path / "tokenizer.model").write_bytes(b"\n\x05hello")  # no real model: it cannot load
    (tmp_path / "tokenizer_config.json").write_text('{"tokenizer_class": "LlamaTokenizer"}')
    with pytest.raises(GPTError, match=r"needs sentencepiece: pip install sentencepiece$"):
        tokenizer_record_from_folder(tmp_path, "llama")


def test_a_missing_module_names_its_pip_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(*args: object, **kwargs: object) -> None:
        raise ModuleNotFoundError("No module named 'google.protobuf'", name="google.protobuf")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", missing)
    folder = train_bpe(tmp_path)
    with pytest.raises(GPTError, match=r"needs protobuf: pip install protobuf$"):
        tokenizer_record_from_folder(folder, "bpe")


@pytest.mark.parametrize("record", [{"name": "cl100k_base"}, {"name": "p50k_base"}, {}])
def test_export_of_another_tokenizer_is_refused(record: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(GPTError, match=r"export writes the gpt2, char, bpe and HF tokenizers"):
        save_hf_tokenizer(record, tmp_path, 64)


def test_hf_is_not_a_tokenizer_name() -> None:
    with pytest.raises(GPTError, match=r"tokenizer .hf. is an HF model.s own, which comes with the model"):
        get_tokenizer("hf")


def test_prepare_with_an_hf_record_in_workers_gives_direct_ids(tmp_path: Path) -> None:
    """prepare's worker processes rebuild the tokenizer from its record."""
    record = hf_record(tmp_path)
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = [f"document {i}: {TEXT}".replace("\r\n", "\n") * (i + 1) for i in range(6)]  # as read
    for i, text in enumerate(texts):
        (docs / f"{i}.txt").write_text(text)
    cfg = DataConfig(source=str(docs), tokenizer="hf", data_dir=str(tmp_path / "data"),
                     num_proc=2, val_fraction=0.2)
    meta = prepare(cfg, progress=False, tokenizer_record=record)
    assert meta["tokenizer"] == record
    ours = tokenizer_from_dict(record)
    data = PreparedData(tmp_path / "data")
    ids = [*data.tokens("train").tolist(), *data.tokens("val").tolist()]
    expected = sorted(ours.encode(text) + [ours.eot_id] for text in texts)
    documents = []
    while ids:
        end = ids.index(ours.eot_id) + 1
        documents.append(ids[:end])
        ids = ids[end:]
    assert sorted(documents) == expected
    assert prepare(cfg, progress=False, tokenizer_record=record) == meta  # already prepared
    with pytest.raises(GPTError, match=r"a tokenizer other than the base model's"):
        prepare(cfg, progress=False, tokenizer_record={**record, "label": "another"})
    updated = {**record, "config": {**record["config"], "chat_template": "{{ 'new' }}"}}
    assert prepare(cfg, progress=False, tokenizer_record=updated) == meta  # the same ids
