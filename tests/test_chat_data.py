"""Chat data: rows in each format, their masks by hand, bad rows, best-fit packing, the chat
sampler and masked evaluation, and gpt prepare then gpt train on a chat set."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gpt.cli import app
from gpt.config import DataConfig, load_config
from gpt.data.chat import BestFitPacker, messages_of
from gpt.data.prepare import prepare
from gpt.data.prepared import BatchSampler, PreparedData, PreparedDataWriter
from gpt.data.sources import open_source
from gpt.errors import GPTError
from gpt.evaluate import evaluate
from gpt.tokenizer import CharTokenizer, tokenizer_from_dict
from gpt.train import train

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

HI = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
FORMATS = {  # the same conversation in each format a row may take
    "messages": HI,
    "prompt-completion strings": {"prompt": "Hi", "completion": "Yo"},
    "prompt-completion messages": {"prompt": HI["messages"][:1], "completion": HI["messages"][1:]},
}


def write_rows(path: Path, rows: list[Any]) -> Path:
    """A JSONL file of `rows` (a str is written as the line it is)."""
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def chat_cfg(tmp_path: Path, source: Path | str, **kw: Any) -> DataConfig:
    values = {"data_dir": str(tmp_path / "prepared"), "format": "chat", "num_proc": 1, **kw}
    return DataConfig(source=str(source), **values)


def rows_of(data_dir: Path, split: str, block_size: int) -> list[tuple[list[str], str]]:
    """Each row of a split as its tokens (decoded one by one) and its mask as a 0/1 string."""
    data = PreparedData(data_dir)
    tokenizer = tokenizer_from_dict(data.tokenizer)
    ids, mask = np.array(data.tokens(split)), np.array(data.mask(split))
    n = block_size + 1
    return [([tokenizer.decode([i]) for i in ids[r : r + n]], "".join(map(str, mask[r : r + n])))
            for r in range(0, len(ids), n)]


# ---------------------------------------------------------------------------------------------
# Rows and their masks


@pytest.mark.parametrize("row", FORMATS.values(), ids=FORMATS.keys())
def test_each_format_gives_the_conversation(row: dict) -> None:
    assert messages_of(json.dumps(row)) == HI["messages"]


def test_a_conversational_prompt_keeps_its_system_message() -> None:
    row = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
           "completion": [{"role": "assistant", "content": "Yo"}]}
    assert [m["role"] for m in messages_of(row)] == ["system", "user", "assistant"]


@pytest.mark.parametrize("row", FORMATS.values(), ids=FORMATS.keys())
def test_the_mask_by_hand(tmp_path: Path, row: dict) -> None:
    """ChatML, one id a character: the loss counts "Yo" and its <|im_end|>, nothing else; the
    row is padded (masked) after the conversation."""
    source = write_rows(tmp_path / "chat.jsonl", [row, row])
    prepare(chat_cfg(tmp_path, source, tokenizer="char", val_fraction=0.5), block_size=29,
            progress=False)
    (tokens, mask), = rows_of(tmp_path / "prepared", "train", 29)
    S, E = "<|im_start|>", "<|im_end|>"
    assert tokens[:25] == [S, *"user\nHi", E, "\n", S, *"assistant\nYo", E, "\n"]
    assert mask == "0" * 21 + "111" + "0" + "0" * 5  # "Yo<|im_end|>"; "\n"; 5 of padding


def test_every_assistant_turn_is_trained_on(tmp_path: Path) -> None:
    row = {"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "a"},
                        {"role": "assistant", "content": "b"}, {"role": "user", "content": "c"},
                        {"role": "assistant", "content": "d"}]}
    source = write_rows(tmp_path / "chat.jsonl", [row, row])
    prepare(chat_cfg(tmp_path, source, tokenizer="char", val_fraction=0.5), block_size=79,
            progress=False)
    (tokens, mask), = rows_of(tmp_path / "prepared", "val", 79)
    runs = "".join(m if m == "0" else "1" for m in mask).split("0")
    at, trained = 0, []
    for run in runs:  # each run of trained tokens, as text
        if run:
            trained.append("".join(tokens[at : at + len(run)]))
        at += len(run) + 1
    assert trained == ["b<|im_end|>", "d<|im_end|>"]


def test_gpt2_chat_data_carries_the_chat_tokens(tmp_path: Path) -> None:
    source = write_rows(tmp_path / "chat.jsonl", [HI, HI])
    meta = prepare(chat_cfg(tmp_path, source, val_fraction=0.5), block_size=31, progress=False)
    assert meta["vocab_size"] == 50259 and meta["format"] == "chat" and meta["block_size"] == 31
    (tokens, mask), = rows_of(tmp_path / "prepared", "train", 31)
    assert [t for t, m in zip(tokens, mask, strict=True) if m == "1"] == ["Yo", "<|im_end|>"]


# ---------------------------------------------------------------------------------------------
# Bad rows


BAD_ROWS = {
    "not JSON": ('{"messages": [', r"is not JSON \(Expecting value, column 15\)"),
    "not an object": ("[1, 2]", r"is a JSON list, not an object"),
    "unknown role": ({"messages": [{"role": "bot", "content": "x"}]}, r"message 0 has role 'bot'"),
    "no assistant turn": ({"messages": [{"role": "user", "content": "x"}]}, "has no assistant turn"),
    "content not text": ({"messages": [{"role": "assistant", "content": 3}]},
                         "message 0 has content of type int"),
    "no conversation": ({"text": "x"}, r'has neither "messages" nor "prompt" and "completion"'),
}


@pytest.mark.parametrize(("row", "problem"), BAD_ROWS.values(), ids=BAD_ROWS.keys())
def test_a_bad_row_is_refused_naming_its_file_and_line(tmp_path: Path, row: Any, problem: str) -> None:
    source = write_rows(tmp_path / "chat.jsonl", [HI, "", row, HI])  # a blank line is no row
    with pytest.raises(GPTError, match=rf"chat\.jsonl, line 3: {problem}.*data\.bad_rows = \"skip\"") as e:
        prepare(chat_cfg(tmp_path, source), block_size=31, progress=False)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "prepared").exists()  # nothing half-written, no folder left


def test_a_file_that_starts_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Editors on Windows write UTF-8 with a BOM; it begins the file, not its first row."""
    source = tmp_path / "chat.jsonl"
    source.write_bytes(b"\xef\xbb\xbf" + write_rows(source, [HI, HI]).read_bytes())
    meta = prepare(chat_cfg(tmp_path, source, val_fraction=0.5), block_size=31, progress=False)
    assert meta["chat"]["train"]["conversations"] + meta["chat"]["val"]["conversations"] == 2


def test_skipping_bad_rows_counts_them(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rows = [row for row, _ in BAD_ROWS.values()]
    source = write_rows(tmp_path / "chat.jsonl", [HI, *rows, HI, HI])
    meta = prepare(chat_cfg(tmp_path, source, bad_rows="skip", val_fraction=0.3), block_size=31)
    assert meta["chat"]["skipped"] == len(rows)
    assert meta["chat"]["train"]["conversations"] + meta["chat"]["val"]["conversations"] == 3
    out, err = capsys.readouterr()
    assert f"{len(rows)} bad rows skipped" in out
    assert "warning: skipped 6 bad row(s), the first: " in err and "chat.jsonl, line 2: is not JSON" in err


def test_the_skipped_rows_warning_is_a_line_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not glued to the end of the progress bar it interrupts."""
    source = write_rows(tmp_path / "chat.jsonl", [HI, "not JSON", HI, HI])
    prepare(chat_cfg(tmp_path, source, bad_rows="skip", val_fraction=0.3), block_size=31)
    err = capsys.readouterr().err
    assert "tokenizing" in err  # the bar was drawn
    assert any(line.startswith("warning: skipped 1 bad row(s)") for line in re.split(r"[\r\n]", err))


def test_a_bad_row_of_a_dataset_is_named_by_its_row(tmp_path: Path) -> None:
    import datasets

    rows = [HI, HI, {"messages": [{"role": "user", "content": "only a question"}]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    with pytest.raises(GPTError, match=r"saved dataset .*saved, row 3: has no assistant turn"):
        prepare(chat_cfg(tmp_path, tmp_path / "saved"), block_size=31, progress=False)
    meta = prepare(chat_cfg(tmp_path, tmp_path / "saved", bad_rows="skip", val_fraction=0.5),
                   block_size=31, progress=False)
    assert meta["chat"]["skipped"] == 1


def test_a_text_source_is_no_chat_set(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("plain text\n")
    with pytest.raises(GPTError, match=r"holds text, not conversations; .*data\.format = \"text\""):
        prepare(chat_cfg(tmp_path, tmp_path / "a.txt"), block_size=31, progress=False)


# ---------------------------------------------------------------------------------------------
# Long conversations and packing


def test_a_long_conversation_is_truncated_and_counted_or_refused(tmp_path: Path) -> None:
    long = {"prompt": "Hi", "completion": "x" * 100}
    unanswered = {"prompt": "y" * 100, "completion": "z"}  # truncated to no assistant token
    source = write_rows(tmp_path / "chat.jsonl", [long, HI, unanswered, HI])
    cfg = chat_cfg(tmp_path, source, tokenizer="char", val_fraction=0.5, seed=1)
    meta = prepare(cfg, block_size=40, progress=False)
    report = meta["chat"]
    assert sum(report[s]["truncated"] for s in ("train", "val")) == 2
    assert sum(report[s]["dropped"] for s in ("train", "val")) == 1
    assert sum(report[s]["conversations"] for s in ("train", "val")) == 3
    with pytest.raises(GPTError, match=r"chat\.jsonl, line 1: the conversation has 123 tokens, "
                       r"more than a row of model\.block_size \+ 1 = 41"):
        prepare(chat_cfg(tmp_path, source, tokenizer="char", long_conversations="fail",
                         data_dir=str(tmp_path / "other")), block_size=40, progress=False)


def naive_best_fit(lengths: list[int], row_len: int, buffer: int) -> list[list[int]]:
    """nanochat's loop, written plainly: before each choice the buffer is refilled; a row takes
    the first of the longest buffered conversations that fit, until none does."""
    pending, held, rows, row = list(range(len(lengths))), [], [], []
    while pending or held:
        while pending and len(held) < buffer:
            held.append(pending.pop(0))
        space = row_len - sum(lengths[i] for i in row)
        fits = [i for i in held if lengths[i] <= space]
        if not fits:
            rows.append(row)
            row = []
            continue
        best = max(fits, key=lambda i: (lengths[i], -held.index(i)))
        held.remove(best)
        row.append(best)
    return [*rows, row] if row else rows


@pytest.mark.parametrize("buffer", [1, 3, 50])
def test_best_fit_packing_matches_a_naive_reference(buffer: int) -> None:
    rng = random.Random(buffer)
    row_len = 64
    lengths = [rng.choice([rng.randint(1, 12), rng.randint(20, 64)]) for _ in range(300)]
    packer = BestFitPacker(row_len, pad_id=0, buffer=buffer)
    rows = []
    for i, n in enumerate(lengths):  # each conversation's ids are its index, to tell them apart
        rows += packer.add(np.full(n, i + 1), np.ones(n, np.uint8))
    rows += packer.finish()
    packed = [[int(i) - 1 for i in dict.fromkeys(ids.tolist()) if i] for ids, _ in rows]
    assert packed == naive_best_fit(lengths, row_len, buffer)
    assert all(len(ids) == len(mask) == row_len for ids, mask in rows)
    assert packer.padding == sum(int((mask == 0).sum()) for _, mask in rows)
    assert packer.padding == len(rows) * row_len - sum(lengths)


# ---------------------------------------------------------------------------------------------
# The prepared format, the sampler, evaluation


def write_chat_data(data_dir: Path, block_size: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A chat folder of `rows` random rows per split, as prepare writes one; train's ids and
    mask."""
    tokenizer = CharTokenizer.from_texts(["abcdefgh"])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, tokenizer.vocab_size, rows * (block_size + 1))
    mask = (rng.random(len(ids)) < 0.3).astype(np.uint8)
    with PreparedDataWriter(data_dir, tokenizer, block_size) as writer:
        for split in ("train", "val"):
            writer.write(split, ids, mask)
        writer.commit({"source": "test"})
    return ids, mask


def test_the_sampler_draws_whole_rows_with_targets_masked(tmp_path: Path) -> None:
    ids, mask = write_chat_data(tmp_path, block_size=8, rows=5)
    sampler = BatchSampler(tmp_path, "train", block_size=8, batch_size=16, seed=0)
    x, y = sampler.next_batch()
    rows, masks = ids.reshape(5, 9), mask.reshape(5, 9)
    for xi, yi in zip(x.numpy(), y.numpy(), strict=True):
        (r,) = [r for r in range(5) if (rows[r, :-1] == xi).all()]
        assert (yi == np.where(masks[r, 1:] == 1, rows[r, 1:], -1)).all()
    state = sampler.state_dict()
    after = [sampler.next_batch() for _ in range(2)]
    sampler.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(a, b) for pair, again in zip(after, [sampler.next_batch() for _ in range(2)], strict=True)
               for a, b in zip(pair, again, strict=True))


def test_chat_rows_of_another_block_size_are_refused(tmp_path: Path) -> None:
    write_chat_data(tmp_path, block_size=8, rows=5)
    with pytest.raises(GPTError, match=r"packed for model\.block_size = 8, the model's is 4; prepare it again"):
        BatchSampler(tmp_path, "train", block_size=4, batch_size=2, seed=0)


def test_a_damaged_mask_is_detected(tmp_path: Path) -> None:
    write_chat_data(tmp_path, block_size=8, rows=5)
    with open(tmp_path / "val.mask", "r+b") as f:
        f.truncate(10)
    with pytest.raises(GPTError, match=r"val\.mask has 10 bytes but meta\.json says 45 tokens"):
        PreparedData(tmp_path)


def test_a_text_folder_has_no_mask(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("some text to train on\n" * 20)
    prepare(DataConfig(source=str(tmp_path / "a.txt"), data_dir=str(tmp_path / "d")), progress=False)
    data = PreparedData(tmp_path / "d")
    assert "format" not in data.meta and data.format == "text" and data.mask("train") is None


def test_evaluation_counts_the_trained_targets_only(tmp_path: Path, tiny) -> None:  # noqa: ANN001
    model = tiny(block_size=8, vocab_size=16).eval()
    ids, mask = write_chat_data(tmp_path, block_size=8, rows=5)
    tokenizer = tokenizer_from_dict(PreparedData(tmp_path).tokenizer)
    result = evaluate(model, ids, tokenizer, batch_size=2, progress=False, mask=mask)
    rows, masks = torch.from_numpy(ids.reshape(5, 9)), torch.from_numpy(mask.reshape(5, 9))
    targets = torch.where(masks[:, 1:] == 1, rows[:, 1:], -1)
    with torch.no_grad():
        _, loss = model(rows[:, :-1], targets)
    assert result["tokens"] == int((targets != -1).sum())
    assert result["loss"] == pytest.approx(loss.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------
# Settings, sources, and the commands end to end


def test_chat_data_for_another_block_size_is_refused_naming_it(tmp_path: Path) -> None:
    source = write_rows(tmp_path / "chat.jsonl", [HI, HI])
    cfg = chat_cfg(tmp_path, source, val_fraction=0.5)
    prepare(cfg, block_size=31, progress=False)
    with pytest.raises(GPTError, match=r"other settings \(block_size 31 -> 63\)"):
        prepare(cfg, block_size=63, progress=False)
    with pytest.raises(GPTError, match=r"other settings \(format 'chat' -> 'text'\)"):
        prepare(DataConfig(source=str(source), data_dir=cfg.data_dir, val_fraction=0.5),
                block_size=31, progress=False)


def test_python_docstrings_is_a_chat_source(tmp_path: Path) -> None:
    where, row = next(open_source(DataConfig(source="python-docstrings", format="chat")).records())
    assert where == "python-docstrings, row 1"
    assert [m["role"] for m in messages_of(row)] == ["user", "assistant"]
    with pytest.raises(GPTError, match=r"python-docstrings is a chat set; set data\.format = \"chat\""):
        prepare(DataConfig(source="python-docstrings", data_dir=str(tmp_path / "d")), progress=False)


def chat_set(n: int) -> list[dict]:
    """Sums: each conversation fits the tiny run's rows of 33 characters."""
    return [{"prompt": f"{i}+{i}?", "completion": f"{2 * i}"} for i in range(n)]


def test_prepare_then_train_on_a_chat_set(tiny_run: Path) -> None:
    """gpt prepare reports the set; gpt train's loss is finite and counts the assistant's
    tokens only (its batches' targets are exactly the masked ones)."""
    write_rows(tiny_run / "chat.jsonl", chat_set(60))
    chat = ["--set", "data.source=chat.jsonl", "--set", "data.format=chat",
            "--set", "data.data_dir=chat-data", "--set", "train.max_iters=4"]
    result = runner.invoke(app, ["prepare", "--config", "tiny.toml", *chat])
    assert result.exit_code == 0, result.output
    assert "60 conversations (" in result.output and "trained on " in result.output
    assert "0 truncated; 0 bad rows skipped" in result.output
    cfg = load_config("tiny.toml", [arg for arg in chat if arg != "--set"])
    assert train(cfg) == 0
    losses = [r["loss"] for r in map(json.loads, (tiny_run / "out" / "metrics.jsonl").read_text().splitlines())
              if "loss" in r]
    assert losses and all(math.isfinite(loss) for loss in losses)
    data = PreparedData(tiny_run / "chat-data")
    tokenizer = tokenizer_from_dict(data.tokenizer)
    _, y = BatchSampler(data, "train", 32, 8, seed=0).next_batch()
    trained = tokenizer.decode(y[y != -1].tolist())
    assert trained.count("<|im_end|>") > 0 and "+" not in trained and "user" not in trained


def test_resuming_on_chat_data_is_bitwise_exact(tiny_run: Path) -> None:
    write_rows(tiny_run / "chat.jsonl", chat_set(60))
    chat = ["data.source=chat.jsonl", "data.format=chat", "train.lr_decay_iters=12"]
    assert train(load_config("tiny.toml", [*chat, "train.out_dir=straight", "train.max_iters=12"])) == 0
    assert train(load_config("tiny.toml", [*chat, "train.out_dir=split", "train.max_iters=10"])) == 0
    assert train(load_config("tiny.toml", [*chat, "train.out_dir=split", "train.max_iters=12"])) == 0
    a = load_file(str(tiny_run / "straight" / "ckpt-0000012" / "model.safetensors"))
    b = load_file(str(tiny_run / "split" / "ckpt-0000012" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_set_whose_every_conversation_is_too_long_is_one_line(tmp_path: Path) -> None:
    source = write_rows(tmp_path / "chat.jsonl", [{"prompt": "y" * 100, "completion": "z"}] * 2)
    with pytest.raises(GPTError, match=r"each of its 2 conversations is longer than a row of "
                       r"model\.block_size \+ 1 = 41 tokens.*raise model\.block_size"):
        prepare(chat_cfg(tmp_path, source, tokenizer="char"), block_size=40, progress=False)
