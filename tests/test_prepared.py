"""The prepared-data format: writing a folder, opening it checked, and the batch sampler."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.data.prepared import BatchSampler, PreparedData, PreparedDataWriter, token_dtype
from gpt.errors import GPTError
from gpt.tokenizer import CharTokenizer

ROOT = Path(__file__).resolve().parents[1]


def write_data(data_dir: Path, train: str, val: str) -> CharTokenizer:
    """A data folder of two char-level splits, written as prepare writes one."""
    tokenizer = CharTokenizer.from_texts([train, val])
    with PreparedDataWriter(data_dir, tokenizer) as writer:
        writer.write("train", tokenizer.encode_array(train))
        writer.write("val", tokenizer.encode_array(val))
        writer.commit({"source": "test"})
    return tokenizer


def test_written_data_reads_back(tmp_path: Path) -> None:
    tokenizer = write_data(tmp_path, "hello world\n", "bye\n")
    data = PreparedData(tmp_path)
    assert data.tokenizer == tokenizer.to_dict() and data.vocab_size == tokenizer.vocab_size
    assert tokenizer.decode(data.tokens("train").tolist()) == "hello world\n"
    assert tokenizer.decode(data.tokens("val").tolist()) == "bye\n"
    assert data.meta["tokens"] == {"train": 12, "val": 4} and data.meta["dtype"] == "uint16"
    assert data.meta["source"] == "test"  # what the caller records is kept


def test_tokens_are_read_only(tmp_path: Path) -> None:
    write_data(tmp_path, "abc", "d")
    tokens = PreparedData(tmp_path).tokens("train")
    with pytest.raises(ValueError, match="read-only"):
        tokens[0] = 1
    with pytest.raises(GPTError, match=r"unknown split 'test'; use one of train, val"):
        PreparedData(tmp_path).tokens("test")


def test_an_uncommitted_writer_leaves_nothing(tmp_path: Path) -> None:
    tokenizer = CharTokenizer.from_texts(["abc"])
    with pytest.raises(KeyboardInterrupt), PreparedDataWriter(tmp_path, tokenizer) as writer:
        writer.write("train", tokenizer.encode_array("abc"))
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(GPTError, match=r"has no prepared data \(no meta.json\); run gpt prepare"):
        PreparedData(tmp_path)


def test_token_dtype_never_overflows() -> None:
    assert token_dtype(50257) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32 and token_dtype(100277) == np.uint32


def test_truncated_and_corrupted_bins_are_detected(tmp_path: Path) -> None:
    write_data(tmp_path, "some training text\n" * 20, "validation\n")
    raw = bytearray((tmp_path / "train.bin").read_bytes())
    raw[0] ^= 0xFF
    (tmp_path / "train.bin").write_bytes(raw)
    PreparedData(tmp_path)  # same size: the cheap check passes
    with pytest.raises(GPTError, match=r"train.bin does not match its sha256"):
        PreparedData(tmp_path, verify_hash=True)
    (tmp_path / "train.bin").write_bytes(raw[:-2])
    with pytest.raises(GPTError, match=r"train.bin has .* bytes but meta.json says .* truncated or corrupted"):
        PreparedData(tmp_path)
    (tmp_path / "train.bin").write_bytes(raw)
    (tmp_path / "val.bin").unlink()
    with pytest.raises(GPTError, match=r"val.bin is missing"):
        PreparedData(tmp_path)


def test_a_damaged_meta_json_is_refused(tmp_path: Path) -> None:
    write_data(tmp_path, "abc", "d")
    meta = json.loads((tmp_path / "meta.json").read_text())
    del meta["dtype"]
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(GPTError, match=r"meta.json is damaged .*gpt prepare --force"):
        PreparedData(tmp_path)


def test_tokenizer_mismatch_is_refused(tmp_path: Path) -> None:
    tokenizer = write_data(tmp_path, "abc", "d")
    data = PreparedData(tmp_path)
    data.check_tokenizer(tokenizer.to_dict())
    with pytest.raises(GPTError, match=r"prepared with the 'char' tokenizer but the model uses 'gpt2'"):
        data.check_tokenizer({"name": "gpt2"})


def test_sampler_batches_are_shifted_windows(tmp_path: Path) -> None:
    write_data(tmp_path, "abcdefghijklmnopqrstuvwxyz" * 20, "abcdefghijklmnopqrstuvwxyz")
    sampler = BatchSampler(tmp_path, "train", block_size=8, batch_size=4, seed=1)
    x, y = sampler.next_batch()
    assert x.shape == y.shape == (4, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.all((y - x) % 26 == 1)  # consecutive letters: windows of the real text


def test_sampler_state_round_trip_gives_the_same_next_batches(tmp_path: Path) -> None:
    write_data(tmp_path, "".join(chr(33 + i % 90) for i in range(4500)), "x" * 500)
    sampler = BatchSampler(tmp_path, "train", block_size=16, batch_size=4, seed=7)
    sampler.next_batch()
    state = json.loads(json.dumps(sampler.state_dict()))  # plain data, as checkpoints store it
    expected = [sampler.next_batch() for _ in range(3)]
    resumed = BatchSampler(tmp_path, "train", block_size=16, batch_size=4, seed=999)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, [resumed.next_batch() for _ in range(3)], strict=True):
        assert torch.equal(x, rx) and torch.equal(y, ry)


def test_prefetch_keeps_the_stream_and_its_state_is_before_the_held_batch(tmp_path: Path) -> None:
    write_data(tmp_path, "".join(chr(33 + i % 90) for i in range(4500)), "x" * 500)
    plain = BatchSampler(tmp_path, "train", block_size=16, batch_size=4, seed=7)
    ahead = BatchSampler(tmp_path, "train", block_size=16, batch_size=4, seed=7)
    expected = [plain.next_batch() for _ in range(4)]
    got = []
    for _ in range(2):
        got.append(ahead.next_batch())
        ahead.prefetch()
        ahead.prefetch()  # a second call holds the same batch, draws nothing
    state = json.loads(json.dumps(ahead.state_dict()))  # one batch held: the state before it
    got += [ahead.next_batch(), ahead.next_batch()]
    for (x, y), (ex, ey) in zip(got, expected, strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)
    resumed = BatchSampler(tmp_path, "train", block_size=16, batch_size=4, seed=999)
    resumed.prefetch()  # a held batch of another stream is dropped by load_state_dict
    resumed.load_state_dict(state)
    for x, ex in zip([resumed.next_batch()[0] for _ in range(2)], [b[0] for b in expected[2:]], strict=True):
        assert torch.equal(x, ex)


def test_ranks_split_the_single_process_stream(tmp_path: Path) -> None:
    """Two ranks get different batches, together exactly those of one process's two calls."""
    write_data(tmp_path, "".join(chr(33 + i % 90) for i in range(4500)), "x" * 500)
    single = BatchSampler(tmp_path, "train", block_size=16, batch_size=4, seed=7)
    ranks = [BatchSampler(tmp_path, "train", 16, 4, seed=7, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        expected = [single.next_batch()[0], single.next_batch()[0]]
        got = [sampler.next_batch()[0] for sampler in ranks]
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
        assert not torch.equal(got[0], got[1])


def test_sampler_rejects_a_split_shorter_than_a_window(tmp_path: Path) -> None:
    write_data(tmp_path, "x" * 90, "x" * 10)
    with pytest.raises(GPTError, match=r"the val split has 10 tokens, fewer than block_size \+ 1 = 17"):
        BatchSampler(tmp_path, "val", block_size=16, batch_size=2, seed=0)


def test_only_the_format_module_names_or_maps_token_files() -> None:
    """One owner of the on-disk format: no other module builds a token file's or meta.json's
    name, or maps a file of ids itself (prose such as "train.bin, val.bin" in help is fine)."""
    owner = ROOT / "gpt" / "data" / "prepared.py"
    # writes nanoGPT's own layout (its train.bin, val.bin, meta.pkl) for nanoGPT to read
    other_format = ROOT / "scripts" / "bench_vs_nanogpt.py"
    pattern = re.compile(r"""\.bin["']|meta\.json["']|np\.memmap|np\.fromfile""")
    assert pattern.search(owner.read_text())  # the pattern finds what the owner does
    offenders = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in sorted([*ROOT.glob("gpt/**/*.py"), *ROOT.glob("scripts/*.py")])
        if path not in (owner, other_format)
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert offenders == []
