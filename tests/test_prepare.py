"""gpt prepare on tiny corpora made in tmp_path (no network): splits, reruns, the lock, errors."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import gpt.data.prepare as prepare_module
import gpt.data.sources as sources
from gpt.cli import app
from gpt.config import DataConfig
from gpt.data.prepare import prepare
from gpt.data.prepared import PreparedData
from gpt.errors import GPTError
from gpt.lock import FolderLock
from gpt.tokenizer import get_tokenizer, tokenizer_from_dict

runner = CliRunner()


def cfg(tmp_path: Path, source: str | Path, **kw: object) -> DataConfig:
    values = {"data_dir": str(tmp_path / "prepared"), **kw}
    return DataConfig(source=str(source), **values)  # type: ignore[arg-type]


def read_split(data_dir: Path, split: str) -> np.ndarray:
    return np.array(PreparedData(data_dir).tokens(split))


def leftovers(data_dir: Path) -> list[str]:
    """What a failed prepare left in data_dir besides the lock file of a process that holds it
    (none when it removed the folder it made)."""
    if not data_dir.exists():
        return []
    return sorted(p.name for p in data_dir.iterdir() if p.name != ".prepare.lock")


def test_text_file_split_is_first_90_percent_of_characters(tmp_path: Path) -> None:
    text = "".join(chr(97 + i % 26) for i in range(1000)) + "\n"
    (tmp_path / "a.txt").write_text(text)
    meta = prepare(cfg(tmp_path, tmp_path / "a.txt", tokenizer="char"), progress=False)
    assert meta["tokens"] == {"train": 900, "val": 101}
    tok = tokenizer_from_dict(meta["tokenizer"])
    out = tmp_path / "prepared"
    assert tok.decode(read_split(out, "train").tolist()) == text[:900]
    assert tok.decode(read_split(out, "val").tolist()) == text[900:]
    assert meta["dtype"] == "uint16" and meta["source"] == str(tmp_path / "a.txt")


def test_large_text_file_is_chunked_without_losing_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "CHUNK_CHARS", 50)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 120)
    text = "".join(f"line {i} of the file\n" for i in range(200))
    (tmp_path / "a.txt").write_text(text)
    meta = prepare(cfg(tmp_path, tmp_path / "a.txt"), progress=False)
    tok = get_tokenizer("gpt2")
    decoded = tok.decode(read_split(tmp_path / "prepared", "train").tolist() + read_split(tmp_path / "prepared", "val").tolist())
    assert decoded == text
    assert meta["tokens"]["train"] > 8 * meta["tokens"]["val"]


def test_text_file_chunks_encode_like_the_whole_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks end where no BPE piece can span the cut, so ids equal encoding each split whole."""
    monkeypatch.setattr(sources, "CHUNK_CHARS", 40)
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 100)
    text = "".join(
        f"def f{i}(x):\n" + "\n" * (i % 3) + f"    return x{'  ' * (i % 2)}\n\n\nclass C{i}:\n    pass\n"
        for i in range(60)
    )  # cut after any newline, this text encodes differently (e.g. "\n\n" is one GPT-2 token)
    (tmp_path / "a.py").write_text(text)
    meta = prepare(cfg(tmp_path, tmp_path / "a.py"), progress=False)
    tok = get_tokenizer("gpt2")
    n_train = int(len(text) * 0.9)
    assert read_split(tmp_path / "prepared", "train").tolist() == tok.encode(text[:n_train])
    assert read_split(tmp_path / "prepared", "val").tolist() == tok.encode(text[n_train:])
    assert meta["tokens"]["val"] == len(tok.encode(text[n_train:]))


def test_folder_documents_split_whole_by_seed(tmp_path: Path, capsys: pytest.CaptureFixture, docs_folder: Callable[..., Path]) -> None:
    folder = docs_folder()
    meta = prepare(cfg(tmp_path, folder, val_fraction=0.2, seed=3), progress=False)
    tok = get_tokenizer("gpt2")
    val = read_split(tmp_path / "prepared", "val")
    train = read_split(tmp_path / "prepared", "train")
    assert (val == tok.eot_id).sum() + (train == tok.eot_id).sum() == 10  # one eot per document
    lengths = {i: len(tok.encode(f"document {i} " * (i + 1))) + 1 for i in range(10)}
    assert meta["tokens"]["train"] + meta["tokens"]["val"] == sum(lengths.values())
    assert 0.15 <= meta["tokens"]["val"] / sum(lengths.values()) <= 0.25  # sizes 1 to 10: near 0.2
    assert "warning" not in capsys.readouterr().err
    again = prepare(cfg(tmp_path, folder, val_fraction=0.2, seed=3, data_dir=str(tmp_path / "b")), progress=False)
    assert again["sha256"] == meta["sha256"]  # deterministic


@pytest.mark.parametrize("seed", [1337, 3, 11])
def test_equal_documents_keep_the_seeded_random_choice(tmp_path: Path, seed: int) -> None:
    """Where the random choice holds about val_fraction of the text, it stays as it always was."""
    (tmp_path / "docs").mkdir()
    texts = [f"document {i} says hello\n" * 5 for i in range(10)]
    for i, text in enumerate(texts):
        (tmp_path / "docs" / f"doc{i}.txt").write_text(text)
    meta = prepare(cfg(tmp_path, tmp_path / "docs", tokenizer="char", val_fraction=0.2, seed=seed), progress=False)
    tok = tokenizer_from_dict(meta["tokenizer"])
    expected = sorted(random.Random(seed).sample(range(10), 2))  # round(10 * 0.2) files by seed
    assert tok.decode(read_split(tmp_path / "prepared", "val").tolist()) == "".join(texts[i] + "\n" for i in expected)


@pytest.mark.parametrize("seed", [1337, 0, 1])  # each of the three files was once the one chosen
def test_few_unequal_files_split_by_their_sizes(tmp_path: Path, capsys: pytest.CaptureFixture, seed: int) -> None:
    """0.3 MB of text, a binary file (skipped) and 3 MB: one file of three was drawn, and with the
    default seed the 3 MB one, so validation held 91% of the tokens."""
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("a short play in verse\n" * 15_000)  # 0.3 MB
    (folder / "b.txt").write_bytes(bytes(range(256)) * 1200)  # 0.3 MB, not UTF-8
    (folder / "c.txt").write_text("the collected works, in prose\n" * 100_000)  # 3 MB
    meta = prepare(cfg(tmp_path, folder, tokenizer="char", seed=seed, num_proc=1), progress=False)
    share = meta["tokens"]["val"] / sum(meta["tokens"].values())
    assert 0.08 <= share <= 0.1  # the 0.3 MB file: as near to val_fraction 0.1 as whole files get
    assert meta["skipped_files"] == 1 and "warning" not in capsys.readouterr().err


def test_a_split_far_from_val_fraction_is_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two files of one size cannot be split 90/10 by whole documents: say so, with the share."""
    (tmp_path / "docs").mkdir()
    for name in ("a", "b"):
        (tmp_path / "docs" / f"{name}.txt").write_text(f"file {name} holds this line\n" * 50)
    meta = prepare(cfg(tmp_path, tmp_path / "docs", tokenizer="char"), progress=False)
    assert meta["tokens"]["val"] == meta["tokens"]["train"]
    err = capsys.readouterr().err
    assert "warning: the validation split holds 50.0% of the text where val_fraction asks for 10.0%: " \
           "2 documents are too few or too unequal in size to split closer" in err


def test_rows_of_unknown_size_split_at_random_with_a_warning_when_far_off(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A dataset's row sizes are not known before reading: the seeded random rows stay, and a
    share far from val_fraction, measured while writing, is a warning."""
    import datasets

    texts = ["a long row " * 500] + [f"short row {i}" for i in range(9)]
    datasets.Dataset.from_dict({"text": texts}).to_json(str(tmp_path / "rows.jsonl"))
    seed = next(s for s in range(100) if random.Random(s).sample(range(10), 1) == [0])  # the long row
    meta = prepare(cfg(tmp_path, tmp_path / "rows.jsonl", tokenizer="char", seed=seed), progress=False)
    assert meta["tokens"]["val"] == len(texts[0]) + 1
    assert "warning: the validation split holds 98." in capsys.readouterr().err


def test_tabular_rows_are_documents(tmp_path: Path) -> None:
    import datasets

    texts = [f"row number {i} says hello" for i in range(12)]
    datasets.Dataset.from_dict({"body": texts}).to_json(str(tmp_path / "table.jsonl"))
    meta = prepare(cfg(tmp_path, tmp_path / "table.jsonl", tokenizer="char", text_column="body"), progress=False)
    assert sum(meta["tokens"].values()) == sum(len(t) + 1 for t in texts)  # an eot after each


def test_one_row_dataset_is_split_by_characters(tmp_path: Path) -> None:
    import datasets

    path = tmp_path / "one.jsonl"
    datasets.Dataset.from_dict({"text": ["x" * 200]}).to_json(str(path))
    meta = prepare(cfg(tmp_path, path, tokenizer="char"), progress=False)
    assert meta["tokens"] == {"train": 180, "val": 20}


def test_streaming_hub_source_splits_by_hash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    texts = [f"story number {i}" for i in range(200)]

    def fake_load_dataset(name, config=None, split=None, streaming=False):
        assert streaming
        return datasets.Dataset.from_dict({"text": texts}).to_iterable_dataset()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    meta = prepare(cfg(tmp_path, "hf:someone/stories", streaming=True, tokenizer="char"), progress=False)
    val_docs = (read_split(tmp_path / "prepared", "val") == meta["eot_id"]).sum()
    assert 5 <= val_docs <= 40  # about 10% of 200 documents, chosen without knowing the count
    assert sum(meta["tokens"].values()) == sum(len(t) + 1 for t in texts)


def test_python_stdlib_source_prepares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [f for f in sources.stdlib_files() if f.name in ("os.py", "abc.py", "bisect.py")]
    monkeypatch.setattr(sources, "stdlib_files", lambda: files)
    meta = prepare(cfg(tmp_path, "python-stdlib"), progress=False)
    assert meta["tokens"]["train"] > 1000 and meta["tokens"]["val"] > 0


def test_large_vocabularies_are_written_as_uint32(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docs_folder: Callable[..., Path]) -> None:
    class Big:
        name, vocab_size, eot_id = "big", 70000, 69999

        def encode_array(self, text):
            return np.array([65535 + len(text), 3])

        def to_dict(self):
            return {"name": "big"}

    monkeypatch.setattr(prepare_module, "get_tokenizer", lambda name: Big())
    folder = docs_folder()
    meta = prepare(cfg(tmp_path, folder, num_proc=1), progress=False)  # Big lives in this process
    assert meta["dtype"] == "uint32"
    ids = np.concatenate([read_split(tmp_path / "prepared", s) for s in ("train", "val")])
    assert ids.max() > 65535 and 69999 in ids


def test_worker_processes_give_the_same_tokens_as_one_process(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docs_folder: Callable[..., Path]) -> None:
    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 100)  # many batches in flight
    folder = docs_folder(n=30)
    one = prepare(cfg(tmp_path, folder, num_proc=1, data_dir=str(tmp_path / "one")), progress=False)
    two = prepare(cfg(tmp_path, folder, num_proc=2, data_dir=str(tmp_path / "two")), progress=False)
    assert one["sha256"] == two["sha256"] and one["tokens"] == two["tokens"]


def test_rerun_is_a_noop_and_force_rebuilds(tmp_path: Path, capsys: pytest.CaptureFixture, docs_folder: Callable[..., Path]) -> None:
    folder = docs_folder()
    prepare(cfg(tmp_path, folder), progress=False)
    train = tmp_path / "prepared" / "train.bin"
    stamp = train.stat().st_mtime_ns
    prepare(cfg(tmp_path, folder), progress=True)
    assert "already prepared" in capsys.readouterr().out
    assert train.stat().st_mtime_ns == stamp
    prepare(cfg(tmp_path, folder), force=True, progress=False)
    assert train.stat().st_mtime_ns != stamp


def test_a_second_prepare_of_the_same_folder_waits_then_finds_it_ready(tmp_path: Path, capsys: pytest.CaptureFixture, docs_folder: Callable[..., Path]) -> None:
    """Two prepares of one data_dir (two runs started together) must not interleave writes."""
    folder = docs_folder()
    first = FolderLock(tmp_path / "prepared", "gpt prepare", "data.data_dir", name=".prepare.lock")
    second = threading.Thread(target=prepare, args=(cfg(tmp_path, folder),))
    second.start()
    second.join(timeout=1.0)
    assert second.is_alive()  # waiting for the first
    assert leftovers(tmp_path / "prepared") == []  # and writing nothing meanwhile
    # the first writes the data (here: prepared elsewhere from the same settings), then lets go
    prepare(cfg(tmp_path, folder, data_dir=str(tmp_path / "elsewhere")), progress=False)
    shutil.copytree(tmp_path / "elsewhere", tmp_path / "prepared", dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".prepare.lock"))
    first.release()
    second.join(timeout=60)
    assert not second.is_alive()
    captured = capsys.readouterr()
    assert f"waiting for another gpt prepare (pid {os.getpid()}" in captured.err
    assert "already prepared" in captured.out  # the second found the first's data
    assert PreparedData(tmp_path / "prepared", verify_hash=True).meta["tokens"]["train"] > 0


def test_prepared_data_is_reused_without_writing_to_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docs_folder: Callable[..., Path]) -> None:
    """A read-only folder of prepared data (a shared mount) needs no lock to be reused."""
    folder = docs_folder()
    meta = prepare(cfg(tmp_path, folder), progress=False)

    def no_writes(*args: object, **kwargs: object) -> None:
        raise AssertionError("the lock was taken")

    monkeypatch.setattr(prepare_module, "FolderLock", no_writes)
    assert prepare(cfg(tmp_path, folder), progress=False) == meta


def test_an_unwritable_data_dir_is_a_one_line_error(tmp_path: Path, docs_folder: Callable[..., Path]) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    args = ["prepare", "--set", f"data.source={docs_folder()}",
            "--set", f"data.data_dir={tmp_path / 'a_file' / 'data'}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "cannot write" in result.output and "set data.data_dir to a folder you can write" in result.output


def test_other_settings_are_refused_and_data_kept(tmp_path: Path, docs_folder: Callable[..., Path]) -> None:
    folder = docs_folder()
    meta = prepare(cfg(tmp_path, folder), progress=False)
    with pytest.raises(GPTError, match=r"prepared from other settings \(tokenizer 'gpt2'.*--force"):
        prepare(cfg(tmp_path, folder, tokenizer="char"), progress=False)
    assert PreparedData(tmp_path / "prepared", verify_hash=True).meta["sha256"] == meta["sha256"]


def test_refusal_names_what_changed(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("some text\n" * 50)
    prepare(cfg(tmp_path, tmp_path / "a.txt"), progress=False)
    with pytest.raises(GPTError, match=r"val_fraction 0.1 -> 0.2.*gpt prepare --force"):
        prepare(cfg(tmp_path, tmp_path / "a.txt", val_fraction=0.2), progress=False)
    (tmp_path / "a.txt").write_text("other text\n" * 50)
    with pytest.raises(GPTError, match=r"the source's files changed.*gpt prepare --force"):
        prepare(cfg(tmp_path, tmp_path / "a.txt"), progress=False)


def test_interrupted_prepare_leaves_nothing_that_looks_finished(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docs_folder: Callable[..., Path]) -> None:
    gpt2 = get_tokenizer("gpt2")
    calls, files_at_the_interrupt = [], []

    class InterruptedAfterOneBatch:
        name, vocab_size, eot_id = gpt2.name, gpt2.vocab_size, gpt2.eot_id

        def encode_array(self, text):
            calls.append(text)
            if len(calls) > 1:  # the first batch is written: Ctrl-C
                files_at_the_interrupt.extend(leftovers(tmp_path / "prepared"))
                raise KeyboardInterrupt
            return gpt2.encode_array(text)

        def to_dict(self):
            return gpt2.to_dict()

    monkeypatch.setattr(prepare_module, "BATCH_CHARS", 1)  # one document per batch
    monkeypatch.setattr(prepare_module, "get_tokenizer", lambda name: InterruptedAfterOneBatch())
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg(tmp_path, docs_folder(), num_proc=1), progress=False)
    assert files_at_the_interrupt != []  # the token files were being written
    assert leftovers(tmp_path / "prepared") == []


class Interrupt:
    """A tokenizer interrupted (Ctrl-C) at its first text."""

    name, vocab_size, eot_id = "gpt2", 50257, 50256

    def encode_array(self, text: str) -> np.ndarray:
        raise KeyboardInterrupt

    def to_dict(self) -> dict[str, str]:
        return {"name": "gpt2"}


@pytest.mark.parametrize("failure", ["empty source", "block_size", "interrupt"])
def test_a_failed_prepare_leaves_no_folder_it_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    (tmp_path / "a.txt").write_text("" if failure == "empty source" else "some text\n" * 20)
    monkeypatch.setattr(prepare_module, "get_tokenizer", lambda name: Interrupt() if failure == "interrupt" else get_tokenizer(name))
    config = cfg(tmp_path, tmp_path / "a.txt", data_dir=str(tmp_path / "data" / "a"), num_proc=1)
    with pytest.raises((GPTError, KeyboardInterrupt)):
        prepare(config, block_size=1000 if failure == "block_size" else 0, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]  # no data/, no data/a/


def test_a_failed_prepare_leaves_a_folder_that_existed_as_it_was(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.md").write_text("the user's own file")
    with pytest.raises(GPTError, match="holds no text"):
        prepare(cfg(tmp_path, tmp_path / "empty.txt", data_dir=str(tmp_path / "mine")), progress=False)
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.md"]


def test_too_little_text_for_block_size(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("tiny text here\n")
    with pytest.raises(GPTError, match=r"the val split has 2 tokens, fewer than block_size \+ 1 = 9"):
        prepare(cfg(tmp_path, tmp_path / "a.txt", tokenizer="char"), progress=False, block_size=8)
    assert not (tmp_path / "prepared" / "train.bin").exists()
    assert leftovers(tmp_path / "prepared") == []


def test_too_little_text_for_a_learned_bpe_is_refused_before_learning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """20 ASCII bytes, 18 in train: no byte-level BPE can make the 33 tokens a block of 32
    needs, so nothing is learned."""
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("learned a BPE from text that cannot fill a block")

    monkeypatch.setattr(prepare_module.BPETokenizer, "learn", never)
    (tmp_path / "a.txt").write_text("abc\n" * 5)
    with pytest.raises(GPTError, match=r"the train split has at most 18 tokens, fewer than "
                                       r"block_size \+ 1 = 33; add text"):
        prepare(cfg(tmp_path, tmp_path / "a.txt", tokenizer="bpe"), progress=False, block_size=32)
    assert leftovers(tmp_path / "prepared") == []


def test_the_token_bound_holds_every_split_and_stops_once_both_are_enough(
    tmp_path: Path, docs_folder: Callable[..., Path]
) -> None:
    """The bound is each split's UTF-8 bytes and one end-of-text per document, at least the
    tokens a learned BPE gives; asked for little, it reads no further than it needs."""
    folder = docs_folder(12)
    (folder / "sub" / "wide.txt").write_text("ω🙂 " * 40)  # more bytes than characters
    settings = cfg(tmp_path, folder, tokenizer="bpe", bpe_vocab_size=320, num_proc=1)
    meta = prepare(settings, progress=False)
    source = sources.open_source(settings)
    bound = prepare_module._token_bound(source, settings, 10**9)
    expected = dict.fromkeys(("train", "val"), 0)
    for split, text, _ in prepare_module._split_pieces(source, settings, warn=False):
        expected[split] += len(text.encode("utf-8")) + 1  # every piece here is a document
    assert bound == expected
    assert all(bound[s] >= meta["tokens"][s] for s in ("train", "val"))
    small = prepare_module._token_bound(source, settings, 1)
    assert min(small.values()) >= 1 and sum(small.values()) < sum(bound.values())


def test_empty_source_and_unknown_tokenizer_are_errors(tmp_path: Path, docs_folder: Callable[..., Path]) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GPTError, match=r"holds no text"):
        prepare(cfg(tmp_path, tmp_path / "empty.txt"), progress=False)
    assert leftovers(tmp_path / "prepared") == []
    with pytest.raises(GPTError, match=r"unknown tokenizer 'bpe2'"):
        prepare(cfg(tmp_path, docs_folder(), tokenizer="bpe2"), progress=False)


def test_non_utf8_files_skip_with_count_or_fail(tmp_path: Path, capsys: pytest.CaptureFixture, docs_folder: Callable[..., Path]) -> None:
    folder = docs_folder()
    (folder / "latin1.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    meta = prepare(cfg(tmp_path, folder), progress=True)
    assert meta["skipped_files"] == 1
    assert "skipped 1 non-UTF-8 file(s)" in capsys.readouterr().out
    with pytest.raises(GPTError, match=r"latin1.txt is not UTF-8 text; .*data.decode_errors=skip"):
        prepare(cfg(tmp_path, folder, decode_errors="fail", data_dir=str(tmp_path / "b")), progress=False)
    assert not (tmp_path / "b" / "train.bin").exists()


def test_ids_outside_the_vocabulary_are_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, docs_folder: Callable[..., Path]) -> None:
    class Broken:
        name, vocab_size, eot_id = "broken", 100, 99

        def encode_array(self, text):
            return np.array([1, 65536 + 5])  # would wrap to 5 in a uint16 file

        def to_dict(self):
            return {"name": "broken"}

    monkeypatch.setattr(prepare_module, "get_tokenizer", lambda name: Broken())
    with pytest.raises(GPTError, match=r"tokenizer 'broken' gave id 65541, outside its vocabulary of 100"):
        prepare(cfg(tmp_path, docs_folder(), num_proc=1), progress=False)
    assert leftovers(tmp_path / "prepared") == []


def test_fixed_char_vocabulary_names_foreign_characters_from_a_worker(tmp_path: Path, docs_folder: Callable[..., Path]) -> None:
    """Finetuning keeps the base model's characters; text with others fails, nothing written."""
    folder = docs_folder()
    vocabulary = {"name": "char", "chars": "\n documen0123456789"}
    with pytest.raises(GPTError, match=r"1 character\(s\) not in the char vocabulary: 't'"):
        prepare(cfg(tmp_path, folder, tokenizer="char", num_proc=2), progress=False, tokenizer_record=vocabulary)
    assert leftovers(tmp_path / "prepared") == []
    meta = prepare(cfg(tmp_path, folder, tokenizer="char"), progress=False, tokenizer_record={**vocabulary, "chars": vocabulary["chars"] + "t"})
    assert meta["vocab_size"] == 20


def test_hub_rerun_is_a_noop_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Deciding that a hub dataset is already prepared must not need the network."""
    import datasets

    monkeypatch.setattr(
        datasets, "load_dataset",
        lambda *a, **k: datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(20)]}),
    )
    config = cfg(tmp_path, "hf:someone/corpus")
    meta = prepare(config, progress=False)

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    assert prepare(config, progress=False) == meta
    with pytest.raises(GPTError, match=r"cannot load hub dataset"):
        prepare(config, force=True, progress=False)
    assert PreparedData(tmp_path / "prepared", verify_hash=True).meta == meta  # a failed rebuild keeps the data


def test_cli_prepare_and_its_errors(tmp_path: Path, docs_folder: Callable[..., Path]) -> None:
    folder = docs_folder()
    args = ["prepare", "--set", f"data.source={folder}", "--set", f"data.data_dir={tmp_path / 'd'}",
            "--set", "model.block_size=4"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "meta.json").exists()
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "nothing to do" in again.output
    bad = runner.invoke(app, ["prepare", "--set", f"data.source={tmp_path / 'missing'}"])
    assert bad.exit_code == 2 and "does not exist" in bad.output and "Traceback" not in bad.output
    other = runner.invoke(app, [*args, "--set", "data.tokenizer=char"])
    assert other.exit_code == 2 and "--force" in other.output
    forced = runner.invoke(app, [*args, "--set", "data.tokenizer=char", "--force"])
    assert forced.exit_code == 0 and PreparedData(tmp_path / "d").tokenizer["name"] == "char"


# ---------------------------------------------------------------------------------------------
# Killed with workers running: no worker outlives its parent, no lock is left held

HELD_IN_A_WORKER = """
import os, sys, time
from pathlib import Path
import gpt.data.prepare as prepare_module
prepare_module.BATCH_CHARS = 200  # many batches, so that every worker gets one
encode = prepare_module._encode_batch
def held(batch, *args):
    if os.getpid() != PARENT:  # a worker: say so, then take far longer than the test waits
        Path("workers", str(os.getpid())).touch()
        time.sleep(120)
    return encode(batch, *args)
prepare_module._encode_batch = held
PARENT = os.getpid()
sys.argv[0] = "gpt"
from gpt.cli import main
main()
"""


def running(pid: int) -> bool:
    """Whether `pid` is a process that still runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def kill_once_workers_run(args: list[str], folder: Path, workers: int = 2) -> list[int]:
    """`gpt ARGS` in a process of its own (in `folder`) whose tokenizer workers stop in their
    first batch; once `workers` of them are there, SIGKILL the parent, as the OOM killer
    would. The workers' pids."""
    (folder / "workers").mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", HELD_IN_A_WORKER, *args], cwd=folder,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while len(list((folder / "workers").iterdir())) < workers:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise AssertionError(f"no workers started: {process.communicate()[1].decode()}")
        time.sleep(0.05)
    process.kill()
    process.wait()
    return [int(p.name) for p in (folder / "workers").iterdir()]


def assert_gone_soon(pids: list[int], seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while any(map(running, pids)) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [pid for pid in pids if running(pid)]
    for pid in survivors:  # not left behind for the rest of the session
        os.kill(pid, signal.SIGKILL)
    assert not survivors, f"workers {survivors} outlived their killed parent"


needs_proc = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@needs_proc
@pytest.mark.slow
def test_a_killed_prepare_leaves_no_worker_and_the_next_one_proceeds(
    tmp_path: Path, write_tiny_run: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_run(tmp_path)
    args = ["prepare", "--config", "tiny.toml", "--set", "data.num_proc=2"]
    assert_gone_soon(kill_once_workers_run(args, tmp_path))
    data_dir = tmp_path / "data" / "corpus-char"
    assert leftovers(data_dir)  # the killed prepare's temporary files: it did not finish
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert PreparedData(data_dir, verify_hash=True).meta["tokens"]["train"] > 0


@needs_proc
@pytest.mark.slow
def test_a_train_killed_while_it_prepares_leaves_no_worker_and_its_out_dir_free(
    tmp_path: Path, write_tiny_run: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_tiny_run(tmp_path)
    args = ["train", "--config", "tiny.toml", "--set", "data.num_proc=2",
            "--set", "train.max_iters=2"]
    assert_gone_soon(kill_once_workers_run(args, tmp_path))
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, args)  # neither the data's lock nor out_dir's is held
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "ckpt-0000002").is_dir()


@pytest.mark.parametrize("use_prctl", [True, False], ids=["prctl", "polling"])
@needs_proc
@pytest.mark.slow
def test_a_worker_ends_with_its_parent(use_prctl: bool, tmp_path: Path) -> None:
    """die_with_parent: by the kernel's signal on Linux, and by the polling thread elsewhere
    (forced here), a worker whose parent is SIGKILLed ends within seconds."""
    script = f"""
import os, sys, time
from gpt.data.workers import die_with_parent
parent = os.getpid()
child = os.fork()
if child == 0:
    die_with_parent(parent, use_prctl={use_prctl})
    time.sleep(120)
    os._exit(0)
print(child, flush=True)
time.sleep(120)
"""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    process = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                               text=True)
    child = int(process.stdout.readline())  # type: ignore[union-attr]
    time.sleep(0.3)  # the child is past die_with_parent
    assert running(child)
    process.kill()
    process.wait()
    assert_gone_soon([child])


@pytest.mark.slow
def test_ctrl_c_ends_a_prepare_that_waits_for_the_lock(
    tmp_path: Path, write_tiny_run: Callable[..., Path]
) -> None:
    write_tiny_run(tmp_path)
    lock = FolderLock(tmp_path / "data" / "corpus-char", "gpt prepare", "data.data_dir",
                      name=".prepare.lock")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    # Ctrl-C as a terminal delivers it, even where this suite runs as a background job (whose
    # shell set SIGINT to be ignored, which a child inherits)
    process = subprocess.Popen([sys.executable, "-m", "gpt", "prepare", "--config", "tiny.toml"],
                               cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    first_line: list[str] = []
    reader = threading.Thread(target=lambda: first_line.append(process.stderr.readline()))  # type: ignore[union-attr]
    reader.start()
    try:
        reader.join(timeout=60)
        assert first_line and "waiting for another gpt prepare" in first_line[0], first_line
        process.send_signal(signal.SIGINT)
        try:
            stdout, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:  # say where it stood: its state, signal masks, threads
            status = Path(f"/proc/{process.pid}/status").read_text()
            raise AssertionError("a waiting prepare did not stop on Ctrl-C:\n" + "\n".join(
                line for line in status.splitlines()
                if line.startswith(("State", "Threads", "SigBlk", "SigIgn", "SigCgt")))) from None
    finally:
        process.kill()
        lock.release()
    assert process.returncode == 130 and "Traceback" not in stderr, stderr
