"""scripts/bench_quant.py: its windows, KL and greedy agreement on tiny models, and its figures
for int8 on a tiny trained run."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt.checkpoint import Checkpoint
from gpt.config import load_config
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.quant import quantize
from gpt.tokenizer import tokenizer_from_dict
from gpt.train import train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # it imports doc_tables from its folder
    spec = importlib.util.spec_from_file_location("bench_quant", ROOT / "scripts" / "bench_quant.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_quant", module)  # its dataclass looks it up
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, write_tiny_run: Callable[..., Path]) -> Path:
    """A tiny char-level run trained for 30 steps (about a second); its out_dir."""
    folder = write_tiny_run(tmp_path_factory.mktemp("quant"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        assert train(load_config("tiny.toml", ["model.dropout=0.0"])) == 0
    return folder / "out"


def int8_or_skip(model: GPT) -> GPT:
    try:
        return quantize(model, "int8")
    except GPTError as e:  # no VNNI or no C compiler here
        pytest.skip(str(e))


def test_windows_are_the_inputs_evaluate_feeds(bench, tiny: Callable[..., GPT]) -> None:
    """Consecutive block_size windows of every token but the last, the shorter last one alone."""
    model = tiny()  # block_size 16
    tokens = np.arange(16 * 9 + 6)  # 149 targets: 9 full windows and 5 more
    batches = list(bench.windows(tokens, model))
    assert [tuple(b.shape) for b in batches] == [(8, 16), (1, 16), (1, 5)]
    assert torch.cat([b.flatten() for b in batches]).tolist() == tokens[:-1].tolist()


def test_a_model_against_itself_differs_nowhere(bench, tiny: Callable[..., GPT]) -> None:
    model = tiny()
    tokens = np.random.default_rng(0).integers(0, 50, size=100)
    same = copy.deepcopy(model)  # its own forward passes, on the same weights
    kl, top1 = bench.compare_logits(model, {"same": same}, tokens)["same"]
    assert kl.shape == (99,) and bool((kl == 0).all()) and top1 == 1.0
    prompts = bench.prompts_from(tokens, 3, 4)
    assert prompts.shape == (3, 4) and prompts[-1].tolist() == tokens[-4:].tolist()
    text = bench.greedy(model, prompts, 20)
    assert text.shape == (3, 20)
    assert bench.agreeing_prefix(text, bench.greedy(same, prompts, 20)) == [20, 20, 20]


def test_the_agreeing_prefix_ends_at_the_first_difference(bench) -> None:
    reference = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4], [1, 2, 3, 4]])
    other = torch.tensor([[9, 2, 3, 4], [1, 2, 9, 9], [1, 2, 3, 4]])
    assert bench.agreeing_prefix(reference, other) == [0, 2, 4]


def test_int8_of_a_trained_run_is_close_to_float32(bench, run: Path) -> None:
    """The float32 row is the reference itself; int8's figures are finite and small."""
    found = Checkpoint.open(run)
    int8_or_skip(found.load_model("cpu"))
    tokenizer = tokenizer_from_dict(found.tokenizer)
    tokens, what = bench.text_of(found, "unused", tokenizer)
    assert what == "its validation split" and len(tokens) > 1000
    models = {name: bench.load(found, name) for name in ("float32", "int8")}
    prompts = bench.prompts_from(tokens, 4, 8)
    reference, int8 = bench.measure(models, tokens, tokenizer, prompts, 16)
    assert reference.precision == "float32" and bool((reference.kl == 0).all())
    assert reference.top1 == 1.0 and reference.greedy == [16] * 4
    assert 1.0 < reference.loss < 4.0 and reference.bits_per_byte > 0
    assert int8.kl.shape == reference.kl.shape == (len(tokens) - 1,)
    assert bool(torch.isfinite(int8.kl).all()) and 0 < int8.kl.mean() < 0.01
    assert int8.top1 > 0.95 and math.isclose(int8.loss, reference.loss, abs_tol=0.02)
    assert all(0 <= n <= 16 for n in int8.greedy) and len(int8.greedy) == 4
    cells = int8.cells(16)
    assert cells[0] == "int8" and cells[-1].endswith("of 16") and len(cells) == len(bench.HEADER)
