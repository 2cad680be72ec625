"""The plan step: gpt prepare, gpt info and gpt train resolve a run the same way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gpt.checkpoint import Checkpoint
from gpt.cli import app
from gpt.config import load_config, pad_vocab
from gpt.data.prepared import PreparedData
from gpt.model import GPT
from gpt.parallel import Dist
from gpt.plan import resolve_start
from gpt.tokenizer import tokenizer_from_dict, with_chat_tokens
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


@pytest.mark.parametrize("tokenizer", ["char", "gpt2", "bpe"])
def test_a_finetune_adding_the_chat_tokens_grows_the_vocabulary(
    tiny_run: Path, tokenizer: str
) -> None:
    """Chat data, prepared with the base's tokenizer plus the chat tokens, finetunes the base
    (gpt info counts the grown vocabulary before the data exists): the vocabulary
    grows by two ids (a learned BPE of 320 ids pads to 384 rows now), their rows begin as the
    mean of the base's token rows, the base's rows are kept, and every checkpoint of the run,
    resumed too, records the change and carries the grown tokenizer."""
    corpus = Path("corpus.txt")  # a char base must know the letters of the roles' names
    corpus.write_text(corpus.read_text() + "# the user asks, the assistant answers\n" * 20)
    sets = [f"data.tokenizer={tokenizer}", "data.bpe_vocab_size=320", "train.max_iters=1"]
    vocab = agreed_vocabulary(sets, "out")
    base = Checkpoint.open("out")
    chat = with_chat_tokens(tokenizer_from_dict(base.tokenizer)).to_dict()
    turn = [{"role": "user", "content": "f(x)"}, {"role": "assistant", "content": "x * 2"}]
    Path("chats.jsonl").write_text((json.dumps({"messages": turn}) + "\n") * 20)
    tuned = [*sets, "train.init_from=out", "train.out_dir=tuned", "data.data_dir=chat-data",
             "data.format=chat", "data.source=chats.jsonl"]
    if tokenizer == "gpt2":  # a named tokenizer: known before the data is prepared
        info = runner.invoke(app, ["info", "--config", "tiny.toml", *(f"--set={s}" for s in tuned)])
        assert f"vocab_size {vocab + 2} from the gpt2 tokenizer" in info.output, info.output
    start = resolve_start(load_config("tiny.toml", tuned), resume=True, world=Dist())
    assert start.tokenizer == chat and start.cfg.model.vocab_size == vocab + 2
    assert start.cfg.model.padded_vocab_size == pad_vocab(vocab + 2)
    model = GPT(start.cfg.model)
    start.load_into(model)
    rows, before = model.transformer.wte.weight, base.load_model().transformer.wte.weight
    torch.testing.assert_close(rows[:vocab], before[:vocab])
    torch.testing.assert_close(rows[vocab:vocab + 2], before[:vocab].mean(0).expand(2, -1))
    assert train(load_config("tiny.toml", tuned)) == 0
    assert train(load_config("tiny.toml", [*tuned, "train.max_iters=2"])) == 0  # resumed
    saved = Checkpoint.open("tuned")
    assert saved.state["iter"] == 2 and saved.tokenizer == chat
    assert saved.state["chat_tokens_added"]["ids"] == [vocab, vocab + 1]
    assert saved.config.model.vocab_size == vocab + 2
    transformers = pytest.importorskip("transformers")
    from gpt.hf.export import export

    export(saved, Path("exported"), force=False)
    hf = transformers.AutoTokenizer.from_pretrained("exported")
    assert hf.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [vocab, vocab + 1]
    generation = json.loads(Path("exported/generation_config.json").read_text())
    assert generation["eos_token_id"][-1] == vocab + 1
