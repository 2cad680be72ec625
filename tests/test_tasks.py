"""lm-evaluation-harness tasks (gpt/harness.py): the same answers as the harness's own `hf`
backend on the same weights, through `gpt eval --tasks` and through the harness from Python;
batching changes no answer; rolling log-likelihoods are gpt eval's bits per byte."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

lm_eval = pytest.importorskip("lm_eval")
transformers = pytest.importorskip("transformers")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from test_hf_cli import save_gpt2, save_llama  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from gpt import quant  # noqa: E402
from gpt.cli import app  # noqa: E402
from gpt.config import load_config  # noqa: E402
from gpt.evaluate import evaluate  # noqa: E402
from gpt.harness import GPTLM  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.quant import Int8Linear  # noqa: E402
from gpt.tokenizer import CharTokenizer  # noqa: E402
from gpt.train import train  # noqa: E402

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

# A context longer than the tiny HF models' 64 positions: cut from the left, by both backends
LONG = "".join(f"def function_{i}(x):\n    return x * {i}\n" for i in range(30))


def multiple_choice_rows() -> list[dict]:
    rows = [{"ctx": f"def function_{i}(x):\n    return", "label": i % 4,
             "endings": [f" x * {i}", f" x + {i % 7}", " 0", f" x * {i} + {i % 7}\n"]}
            for i in range(10)]
    rows.append({"ctx": LONG + "    return", "endings": [" x", " 1", " x * 2", " 2"], "label": 0})
    return rows


def generation_rows() -> list[dict]:
    return [{"q": f"def function_{i}(x):\n", "a": f"    return x * {i}"} for i in range(5)]


MC_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/mc.jsonl
  cache_dir: {folder}/cache
test_split: test
fewshot_split: test
output_type: multiple_choice
doc_to_text: "{{{{ctx}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: acc_norm
"""

GEN_YAML = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {folder}/gen.jsonl
  cache_dir: {folder}/cache
test_split: test
output_type: generate_until
doc_to_text: "{{{{q}}}}"
doc_to_target: "{{{{a}}}}"
generation_kwargs:
  until: ["\\n\\n", "):"]
  max_gen_toks: 12
  do_sample: false
metric_list:
  - metric: exact_match
"""
TASKS = ["tiny_mc", "tiny_gen"]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of two local tasks (multiple choice, generation) over JSON Lines files."""
    folder = tmp_path_factory.mktemp("tasks")
    for name, rows in (("mc", multiple_choice_rows()), ("gen", generation_rows())):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "mc.yaml").write_text(MC_YAML.format(folder=folder))
    (folder / "gen.yaml").write_text(GEN_YAML.format(folder=folder))
    return folder


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def hf_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random HF model of each family, saved with its tokenizer."""
    save = save_gpt2 if request.param == "gpt2" else save_llama
    return save(tmp_path_factory.mktemp("hf") / request.param)


@pytest.fixture(scope="module")
def hf_results(hf_model: Path, tasks: Path) -> dict:
    """The harness's own `hf` backend on the tasks, one request at a time, with its samples."""
    return lm_eval.simple_evaluate(
        model="hf", model_args=f"pretrained={hf_model},dtype=float32", device="cpu",
        tasks=TASKS, task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
        log_samples=True, batch_size=1,
    )


def ours(model: str | GPTLM, tasks: Path, **options: object) -> dict:
    return lm_eval.simple_evaluate(
        model=model, tasks=TASKS, log_samples=True,
        task_manager=TaskManager(include_path=str(tasks), include_defaults=False), **options,
    )


def assert_same_samples(expected: dict, got: dict) -> None:
    """Per item: log-likelihoods within 1e-4, the same greedy flags, accuracies and texts."""
    for task in TASKS:
        for a, b in zip(expected["samples"][task], got["samples"][task], strict=True):
            assert a["doc_id"] == b["doc_id"]
            if task == "tiny_mc":
                for (lp_a, greedy_a), (lp_b, greedy_b) in zip(
                        [r[0] for r in a["resps"]], [r[0] for r in b["resps"]], strict=True):
                    assert lp_b == pytest.approx(lp_a, abs=1e-4)
                    assert greedy_b == greedy_a
                assert (b["acc"], b["acc_norm"]) == (a["acc"], a["acc_norm"])
            else:
                assert b["resps"] == a["resps"]
                assert b["exact_match"] == a["exact_match"]


def test_gpt_model_answers_as_the_hf_backend(hf_model: Path, tasks: Path, hf_results: dict) -> None:
    lm = GPTLM.load(f"hf:{hf_model}", device="cpu", batch_size=5)
    assert_same_samples(hf_results, ours(lm, tasks))
    assert lm.truncated == 4  # the long context, once per ending, as the hf backend cut it


def test_gpt_eval_tasks_prints_the_hf_backends_scores(
    hf_model: Path, tasks: Path, hf_results: dict, tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    result = runner.invoke(app, ["eval", "--checkpoint", f"hf:{hf_model}", "--tasks",
                                 ",".join(TASKS), "--include-path", str(tasks), "--device", "cpu",
                                 "--batch-size", "3", "--output", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())["results"]
    for task, metric in (("tiny_mc", "acc,none"), ("tiny_mc", "acc_norm,none"),
                         ("tiny_gen", "exact_match,none")):
        assert written[task][metric] == hf_results["results"][task][metric]
    assert "|tiny_mc |" in result.stdout and "|acc_norm   |" in result.stdout
    assert "4 of 49 requests were longer than the model's block_size of 64" in result.stdout


def test_options_pass_through_to_the_harness(tasks: Path, tmp_path: Path) -> None:
    folder = save_gpt2(tmp_path / "gpt2")
    out = tmp_path / "results.json"
    result = runner.invoke(app, ["eval", "--checkpoint", f"hf:{folder}", "--tasks", "tiny_mc",
                                 "--include-path", str(tasks), "--device", "cpu", "--limit", "3",
                                 "--num-fewshot", "1", "--output", str(out)])
    assert result.exit_code == 0, result.output
    written = json.loads(out.read_text())
    assert written["results"]["tiny_mc"]["sample_len"] == 3
    assert written["n-shot"]["tiny_mc"] == 1


def test_the_harness_finds_gpt_by_name(tasks: Path, tmp_path: Path) -> None:
    """`simple_evaluate(model="gpt", model_args="checkpoint=...")` once gpt.harness is imported:
    the same answers as the model object."""
    folder = save_gpt2(tmp_path / "gpt2")
    by_name = ours("gpt", tasks, model_args=f"checkpoint=hf:{folder},device=cpu", limit=4)
    by_object = ours(GPTLM.load(f"hf:{folder}", device="cpu"), tasks, limit=4)
    assert_same_samples(by_object, by_name)


@pytest.mark.usefixtures("int8_kernel")
def test_int8_runs_through_the_command_line_and_by_name(
    tasks: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gpt eval --tasks ... --quantize int8` and `model_args="...,quantize=int8"` run the model
    that `GPTLM.load(..., quantize="int8")` gives: the same answers; its log-likelihoods within
    0.02 nats of the float model's (measured: 0.003 at most)."""
    folder = save_gpt2(tmp_path / "gpt2")
    lm = GPTLM.load(f"hf:{folder}", device="cpu", quantize="int8")
    assert any(isinstance(m, Int8Linear) for m in lm.model.modules())
    by_object = ours(lm, tasks, limit=4)
    by_name = ours("gpt", tasks, limit=4,
                   model_args=f"checkpoint=hf:{folder},device=cpu,quantize=int8")
    assert_same_samples(by_object, by_name)
    out = tmp_path / "results.json"
    methods = []
    real = quant.quantize
    monkeypatch.setattr(quant, "quantize",
                        lambda model, method: methods.append(method) or real(model, method))
    result = runner.invoke(app, ["eval", "--checkpoint", f"hf:{folder}", "--tasks", ",".join(TASKS),
                                 "--include-path", str(tasks), "--device", "cpu", "--limit", "4",
                                 "--quantize", "int8", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert methods == ["int8"]  # the scores alone might be the float model's
    written = json.loads(out.read_text())["results"]
    for task, metric in (("tiny_mc", "acc,none"), ("tiny_gen", "exact_match,none")):
        assert written[task][metric] == by_object["results"][task][metric]
    plain = ours(GPTLM.load(f"hf:{folder}", device="cpu"), tasks, limit=4)
    for a, b in zip(plain["samples"]["tiny_mc"], by_object["samples"]["tiny_mc"], strict=True):
        for (lp_a, _), (lp_b, _) in zip([r[0] for r in a["resps"]], [r[0] for r in b["resps"]],
                                        strict=True):
            assert lp_b == pytest.approx(lp_a, abs=0.02)


MODERN = ["model.norm=rmsnorm", "model.pos_embedding=rope", "model.bias=false",
          "model.qk_norm=true", "model.logit_softcap=15", "model.activation=relu2"]


def test_a_lora_finetune_of_a_modern_run_is_evaluated(tiny_run: Path, tasks: Path) -> None:
    """A char-level run of the modern recipe, finetuned with LoRA: its adapters merged at load,
    its scores printed (the tasks' text is within its vocabulary)."""
    assert train(load_config("tiny.toml", [*MODERN, "train.max_iters=4"])) == 0
    assert train(load_config("tiny.toml", [*MODERN, "train.max_iters=2", "train.out_dir=lora",
                                           "train.init_from=out", "train.finetune=lora"])) == 0
    result = runner.invoke(app, ["eval", "--checkpoint", "lora", "--tasks", ",".join(TASKS),
                                 "--include-path", str(tasks), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "|tiny_mc |" in result.stdout and "|tiny_gen|" in result.stdout


def requests(texts: list[tuple[str, str]]) -> list[Instance]:
    return [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(texts)]


CHARS = "abcdefghij \n"
PAIRS = [  # shared contexts, one-token answers, a context longer than block_size (16)
    ("abc def", " gh"), ("abc def", " ij"), ("abc def", "j"), ("a", "bcdefghij abcdef"),
    ("", "abc"), ("hij\nabc", " de"), ("ghij " * 4 + "ghij", " abc"), ("ghij " * 4 + "ghij", " a"), ("ba", "c"),
]


def reference_loglikelihood(model: GPT, context: list[int], cont: list[int]) -> float:
    """The continuation's log-probability from one plain forward over its last block_size + 1
    tokens: no cache, no batch."""
    whole = (context + cont)[-(model.config.block_size + 1):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole[:-1]]))
    logprobs = torch.log_softmax(logits[0, :, :model.config.vocab_size].float(), dim=-1)
    return sum(logprobs[len(whole) - 1 - len(cont) + k, t].item() for k, t in enumerate(cont))


@pytest.mark.parametrize("recipe", [
    {}, {"qk_norm": True, "logit_softcap": 15.0, "activation": "relu2", "norm": "rmsnorm",
         "pos_embedding": "rope", "bias": False},
], ids=["gpt2", "modern"])
def test_cached_batched_scores_are_a_plain_forwards(tiny: Callable[..., GPT], recipe: dict) -> None:
    """Every batch size gives the log-likelihoods of a plain forward (1e-5), over shared
    contexts, one-token answers and a context cut to block_size."""
    tokenizer = CharTokenizer(CHARS)
    model = tiny(vocab_size=tokenizer.vocab_size, **recipe)
    results = {size: GPTLM(model, tokenizer, size).loglikelihood(requests(PAIRS), True)
               for size in (1, 2, 7)}
    for (context, cont), *scores in zip(PAIRS, *results.values(), strict=True):
        ctx = tokenizer.encode(context) if context else [tokenizer.eot_id]
        expected = reference_loglikelihood(model, ctx, tokenizer.encode(cont))
        for logprob, _ in scores:
            assert logprob == pytest.approx(expected, abs=1e-5)
        assert len({greedy for _, greedy in scores}) == 1


def test_rolling_loglikelihood_is_gpt_evals_bits_per_byte(tiny: Callable[..., GPT]) -> None:
    """A text of 3 blocks: the rolling windows predict each token once, the first from the
    prefix id, as gpt eval's windows do over the prefix id and the text (the same nats). No
    padding rows: gpt eval's softmax spans them, the harness's the vocabulary alone."""
    tokenizer = CharTokenizer(CHARS)
    model = tiny(vocab_size=tokenizer.vocab_size, padded_vocab_size=tokenizer.vocab_size,
                 qk_norm=True, activation="relu2")
    rng = np.random.default_rng(0)
    text = "".join(rng.choice(list(CHARS), 3 * model.config.block_size))
    lm = GPTLM(model, tokenizer, batch_size=2)
    (logprob,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], True)
    tokens = np.array([lm.prefix_token_id, *tokenizer.encode(text)])
    result = evaluate(model, tokens, tokenizer, progress=False)
    assert -logprob == pytest.approx(result["loss"] * result["tokens"], rel=1e-6)
    assert -logprob / math.log(2) / len(text.encode()) == pytest.approx(result["bits_per_byte"],
                                                                        rel=1e-6)
