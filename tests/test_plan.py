"""The plan step: gpt prepare, gpt info and gpt train resolve a run the same way."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpt.checkpoint import Checkpoint
from gpt.cli import app
from gpt.config import load_config
from gpt.data.prepared import PreparedData
from gpt.train import train

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")


def agreed_vocabulary(sets: list[str], out_dir: str) -> int:
    """The vocabulary gpt prepare's data holds, checked to be the one gpt info takes from the
    tokenizer and the one gpt train's model is built with."""
    args = [a for s in sets for a in ("--set", s)]
    prepared = runner.invoke(app, ["prepare", "--config", "tiny.toml", *args])
    assert prepared.exit_code == 0, prepared.output
    cfg = load_config("tiny.toml", sets)
    vocab = PreparedData(cfg.data.resolved_data_dir).vocab_size
    info = runner.invoke(app, ["info", "--config", "tiny.toml", *args])
    assert info.exit_code == 0, info.output
    assert f"vocab_size {vocab} from the {cfg.data.tokenizer} tokenizer" in info.output
    assert train(cfg) == 0
    assert Checkpoint.open(out_dir).config.model.vocab_size == vocab
    return vocab


@pytest.mark.parametrize("tokenizer", ["char", "gpt2"])
def test_prepare_info_and_train_agree_on_the_vocabulary(tiny_run: Path, tokenizer: str) -> None:
    agreed_vocabulary([f"data.tokenizer={tokenizer}", "train.max_iters=1"], "out")


def test_a_finetune_is_prepared_with_its_base_models_characters(tiny_run: Path) -> None:
    """Text of fewer characters than the base run's is tokenized with the base's vocabulary, by
    gpt prepare as by gpt train, so their ids mean the same."""
    base = agreed_vocabulary(["train.max_iters=1"], "out")
    Path("fewer.txt").write_text("def f(x):\n    return x\n\n" * 200)
    sets = ["data.source=fewer.txt", "train.init_from=out", "train.out_dir=tuned",
            "train.max_iters=1"]
    assert agreed_vocabulary(sets, "tuned") == base
