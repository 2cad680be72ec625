"""gpt sample and gpt eval through the command line, on a tiny trained checkpoint."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from gpt.checkpoint import Checkpoint
from gpt.cli import app
from gpt.config import load_config
from gpt.errors import GPTError
from gpt.tokenizer import tokenizer_from_dict
from gpt.train import train

runner = CliRunner()

SAMPLE = """
[sample]
max_new_tokens = 40
temperature = 0.0
"""
CORPUS = "".join(f"def f{i}(x):\n    return x + {i}\n\n" for i in range(300))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, write_tiny_run) -> Path:
    """The tiny run trained once (60 steps, no dropout) for every test of this module."""
    return train_run(write_tiny_run(tmp_path_factory.mktemp("run"), CORPUS, SAMPLE))


def train_run(root: Path) -> Path:
    """Train the tiny run written in `root` for 60 steps without dropout (tests/test_quant.py
    samples from it too)."""
    longer = ["train.batch_size=8", "train.max_iters=60", "train.eval_interval=30",
              "train.checkpoint_interval=30", "train.log_interval=30", "model.dropout=0.0"]
    cwd = Path.cwd()
    try:
        os.chdir(root)
        assert train(load_config("tiny.toml", longer)) == 0
    finally:
        os.chdir(cwd)
    return root


def invoke(run: Path, *args: str):
    cwd = Path.cwd()
    os.chdir(run)
    try:
        return runner.invoke(app, list(args))
    finally:
        os.chdir(cwd)


def test_sample_greedy_is_deterministic_and_uses_config_defaults(run: Path) -> None:
    a = invoke(run, "sample", "--checkpoint", "out", "--prompt", "def f1", "--no-stream")
    b = invoke(run, "sample", "--config", "tiny.toml", "--prompt", "def f1", "--no-stream")
    assert a.exit_code == 0, a.output
    assert a.output == b.output and a.output.startswith("def f1")
    assert len(a.output.rstrip("\n")) == len("def f1") + 40  # max_new_tokens from [sample]


def test_sample_matches_greedy_ids(run: Path) -> None:
    found = Checkpoint.open(run / "out")
    model, tok = found.load_model(), tokenizer_from_dict(found.tokenizer)
    seq = torch.tensor([tok.encode("def f2")])
    for _ in range(10):
        logits, _ = model(seq[:, -32:])
        next_id = logits[:, -1, : model.config.vocab_size].argmax(-1, keepdim=True)
        seq = torch.cat([seq, next_id], dim=1)
    out = invoke(run, "sample", "--checkpoint", "out", "--prompt", "def f2", "--max-new-tokens", "10",
                 "--no-stream", "--dtype", "float32")
    assert out.output.rstrip("\n") == tok.decode(seq[0].tolist())


def test_seed_controls_sampling_and_num_samples(run: Path) -> None:
    args = ["sample", "--checkpoint", "out", "--prompt", "def", "--temperature", "1.0",
            "--top-k", "5", "--no-stream", "--num-samples", "3"]
    one = invoke(run, *args, "--seed", "3")
    same = invoke(run, *args, "--seed", "3")
    other = invoke(run, *args, "--seed", "4")
    assert one.output == same.output and one.output != other.output
    assert one.output.count("-" * 40) == 2


def test_stop_cuts_before_the_string_and_stream_matches(run: Path) -> None:
    full = invoke(run, "sample", "--checkpoint", "out", "--prompt", "def f3", "--no-stream").output
    generated = full[len("def f3"):].rstrip("\n")
    stop = generated[5:8]
    assert stop and stop in generated
    cut = invoke(run, "sample", "--checkpoint", "out", "--prompt", "def f3", "--stop", stop, "--no-stream")
    assert cut.output == "def f3" + generated[: generated.index(stop)] + "\n"
    streamed = invoke(run, "sample", "--checkpoint", "out", "--prompt", "def f3", "--stop", stop, "--stream")
    assert streamed.output == cut.output


def test_prompt_from_stdin_and_file(run: Path) -> None:
    (run / "prompt.txt").write_text("def f4")
    a = invoke(run, "sample", "--checkpoint", "out", "--prompt-file", "prompt.txt", "--no-stream").output
    b = runner.invoke(app, ["sample", "--checkpoint", str(run / "out"), "--prompt", "-", "--no-stream"], input="def f4")
    assert a == b.output and a.startswith("def f4")
    empty = invoke(run, "sample", "--checkpoint", "out", "--prompt", "", "--no-stream")
    assert empty.exit_code == 0 and len(empty.output.rstrip("\n")) >= 1
    latin1 = subprocess.run([sys.executable, "-m", "gpt", "sample", "--checkpoint", "out",
                             "--prompt", "-"], cwd=run, input="déf".encode("latin-1"),
                            capture_output=True)
    assert latin1.returncode == 2 and latin1.stdout == b""
    assert latin1.stderr == b"error: the prompt on stdin is not UTF-8 text; convert it to UTF-8\n"


def test_running_out_of_memory_while_generating_is_one_line(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_memory(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("gpt.engine.Engine.step", no_memory)
    result = invoke(run, "sample", "--checkpoint", "out", "--num-samples", "64", "--no-stream")
    assert result.exit_code == 2
    assert result.output == ("error: out of memory on cpu (asked for 2.00 GiB); lower "
                             "--num-samples or --max-new-tokens, or choose --device\n")


def test_a_batch_larger_than_free_memory_is_refused_before_it_is_built(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Refused when its KV cache and logits pass the free memory, by one byte; at the limit it
    samples."""
    from gpt.generate import decoding_bytes

    model = Checkpoint.open(run / "out").load_model()
    prompt = len("def f1")  # one id a character
    positions = min(model.config.block_size, prompt + 40 - 1)  # the run's max_new_tokens
    needed = decoding_bytes(model, 64, positions)
    args = ["sample", "--checkpoint", "out", "--num-samples", "64", "--no-stream",
            "--prompt", "def f1", "--dtype", "float32"]
    monkeypatch.setattr("gpt.sample.free_memory", lambda device: needed - 1)
    result = invoke(run, *args)
    assert result.exit_code == 2
    assert result.output == (
        f"error: decoding 64 sequences of up to {positions} positions needs at least "
        f"{needed / 2**30:.2f} GiB on cpu for their KV cache and logits, more than the "
        f"{(needed - 1) / 2**30:.2f} GiB free there; lower --num-samples or --max-new-tokens, or "
        "decode fewer at once with --set sample.max_batch=N\n")
    monkeypatch.setattr("gpt.sample.free_memory", lambda device: needed)
    assert invoke(run, *args).exit_code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (["--temperature", "-1"], "temperature: must be >= 0"),
        (["--top-p", "0"], "top_p: must be in (0, 1]"),
        (["--top-p", "1.5"], "top_p: must be in (0, 1]"),
        (["--top-k", "0"], "top_k: must be >= 1"),
        (["--max-new-tokens", "-1"], "max_new_tokens: must be >= 0"),
        (["--num-samples", "0"], "num_samples: must be > 0"),
        (["--stop", ""], "a stop string is empty"),
        (["--prompt", "déf ☃"], "2 character(s) not in the char vocabulary: 'é', '☃'"),
        (["--device", "foo"], "--device 'foo' is not a device; use auto, cpu"),
        (["--dtype", "int4"], "--dtype 'int4' is not one of auto, float32"),
    ],
)
def test_sample_bad_input(run: Path, args: list[str], message: str) -> None:
    result = invoke(run, "sample", "--checkpoint", "out", "--no-stream", *args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_bad_flags_fail_before_the_model_loads(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gpt.sample

    def no_load(*args: object, **kwargs: object) -> None:
        raise AssertionError("the checkpoint was loaded")

    monkeypatch.setattr(gpt.sample, "load_for_inference", no_load)
    result = invoke(run, "sample", "--checkpoint", "out", "--top-k", "0")
    assert result.exit_code == 2 and "top_k: must be >= 1" in result.output


def test_compile_failure_is_one_line(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch.compile fails at the first call (no C++ compiler, say), deep inside generation."""
    from torch._dynamo.exc import TorchDynamoException

    class FailsToCompile:
        def __init__(self, model: torch.nn.Module) -> None:
            self.model = model

        def __getattr__(self, name: str) -> object:
            return getattr(self.model, name)

        def __call__(self, *args: object, **kwargs: object) -> None:
            raise TorchDynamoException("no working C++ compiler found\nmore lines")

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: FailsToCompile(model))
    result = invoke(run, "sample", "--checkpoint", "out", "--compile", "--no-stream")
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "torch.compile failed (no working C++ compiler found); run without --compile" in result.output


@pytest.mark.slow
def test_compiled_sampling_gives_the_eager_text(run: Path) -> None:
    args = ["sample", "--checkpoint", "out", "--prompt", "def f1", "--dtype", "float32",
            "--temperature", "0", "--max-new-tokens", "24", "--no-stream"]
    eager = invoke(run, *args)
    compiled = invoke(run, *args, "--compile")
    assert compiled.exit_code == 0, compiled.output
    assert compiled.stdout == eager.stdout  # what torch.compile prints goes to stderr


def test_missing_and_damaged_checkpoints(run: Path, tmp_path: Path) -> None:
    missing = runner.invoke(app, ["sample", "--checkpoint", str(tmp_path / "nope"), "--prompt", "x"])
    assert missing.exit_code == 2 and "does not exist" in missing.output
    empty = runner.invoke(app, ["sample", "--checkpoint", str(tmp_path), "--prompt", "x"])
    assert empty.exit_code == 2 and "no latest checkpoint" in empty.output
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run / "out" / "ckpt-0000060", copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\x00" * 8)
    damaged = runner.invoke(app, ["sample", "--checkpoint", str(copy), "--prompt", "x"])
    assert damaged.exit_code == 2 and "model.safetensors is damaged" in damaged.output
    nothing = runner.invoke(app, ["sample", "--prompt", "x"])
    assert nothing.exit_code == 2 and "--checkpoint" in nothing.output


def test_sample_and_eval_take_a_weights_only_checkpoint(run: Path, tmp_path: Path) -> None:
    """Without optimizer.pt (deleted to save space) the same text and loss; a present file is
    still checked, and the weights and state.json are still required."""
    import shutil

    copy = tmp_path / "weights-only"
    shutil.copytree(run / "out" / "ckpt-0000060", copy)
    (copy / "optimizer.pt").unlink()
    for command in (["sample", "--prompt", "def f1", "--no-stream"], ["eval", "--json"]):
        full = invoke(run, *command, "--checkpoint", str(run / "out" / "ckpt-0000060"))
        light = invoke(run, *command, "--checkpoint", str(copy))
        assert light.exit_code == 0, light.output
        assert light.output == full.output
    (copy / "optimizer.pt").write_bytes(b"not the saved optimizer")
    damaged = invoke(run, "eval", "--checkpoint", str(copy))
    assert damaged.exit_code == 2 and "optimizer.pt is damaged" in damaged.output
    for required in ("model.safetensors", "state.json"):
        out = shutil.copytree(run / "out", tmp_path / f"without-{required}")
        (out / "ckpt-0000060" / "optimizer.pt").unlink()
        (out / "ckpt-0000060" / required).unlink()
        missing = invoke(run, "sample", "--checkpoint", str(out), "--prompt", "x")
        assert missing.exit_code == 2, missing.output
        assert f"ckpt-0000060/{required} is missing" in missing.output


def test_eval_perplexity_equals_naive_loop(run: Path) -> None:
    result = invoke(run, "eval", "--checkpoint", "out", "--json")
    assert result.exit_code == 0, result.output
    got = json.loads(result.output.strip().splitlines()[-1])
    model = Checkpoint.open(run / "out").load_model()
    tokens = np.fromfile(run / "data" / "corpus-char" / "val.bin", dtype=np.uint16).astype(np.int64)
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - 1, 32):  # consecutive windows, one at a time
        window = torch.from_numpy(tokens[start : start + 33])[None]  # the last one shorter
        with torch.no_grad():
            logits, _ = model(window[:, :-1])
        nll += torch.nn.functional.cross_entropy(logits[0], window[0, 1:], reduction="sum").item()
        count += window.size(1) - 1
    assert (len(tokens) - 1) % 32 != 0  # so the shorter last window is covered
    assert got["tokens"] == count == len(tokens) - 1
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    assert got["bits_per_byte"] == pytest.approx(nll / count / math.log(2), rel=1e-5)  # 1 char = 1 byte


def test_eval_batches_shrink_for_large_logits_without_changing_the_result(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpt.evaluate as evaluate_module

    found = Checkpoint.open(run / "out")
    model, tokenizer = found.load_model(), tokenizer_from_dict(found.tokenizer)
    tokens = np.fromfile(run / "data" / "corpus-char" / "val.bin", dtype=np.uint16).astype(np.int64)
    batched = evaluate_module.evaluate(model, tokens, tokenizer, progress=False)
    monkeypatch.setattr(evaluate_module, "LOGITS_BYTES", 1)  # one window at a time
    single = evaluate_module.evaluate(model, tokens, tokenizer, progress=False)
    assert single["tokens"] == batched["tokens"] and single["bytes"] == batched["bytes"]
    assert single["loss"] == pytest.approx(batched["loss"], rel=1e-6)
    short = evaluate_module.evaluate(model, tokens[:5], tokenizer, progress=False)
    assert short["tokens"] == 4  # fewer than block_size tokens: one short window
    with pytest.raises(GPTError, match="too few to evaluate; give at least 2"):
        evaluate_module.evaluate(model, tokens[:1], tokenizer, progress=False)


@pytest.mark.parametrize("checkpoint", ["out", "out/ckpt-0000060"])
def test_eval_finds_the_runs_data_from_any_folder(
    run: Path, tmp_path: Path, checkpoint: str
) -> None:
    """The run's relative data_dir starts where gpt train ran, not where gpt eval runs; a
    data_dir given on the command line starts here, and a missing one is named in full."""
    here = invoke(run, "eval", "--checkpoint", "out", "--json")
    elsewhere = invoke(tmp_path, "eval", "--checkpoint", str(run / checkpoint), "--json")
    assert here.exit_code == elsewhere.exit_code == 0, elsewhere.output
    assert json.loads(elsewhere.stdout) == json.loads(here.stdout)
    given = invoke(tmp_path, "eval", "--checkpoint", str(run / checkpoint),
                   "--set", "data.data_dir=data/corpus-char")
    assert given.exit_code == 2
    assert f"error: {tmp_path / 'data' / 'corpus-char'} has no prepared data" in given.output


def test_eval_on_other_text_and_errors(run: Path) -> None:
    (run / "other.txt").write_text("def f7(x):\n    return x + 7\n\n" * 20)
    result = invoke(run, "eval", "--checkpoint", "out", "--data", "other.txt")
    assert result.exit_code == 0 and "perplexity" in result.output
    bad = invoke(run, "eval", "--checkpoint", "out", "--split", "test")
    assert bad.exit_code == 2 and "--split 'test' is not a split; use --split val or --split train" in bad.output
    (run / "alien.txt").write_text("ω" * 100)
    alien = invoke(run, "eval", "--checkpoint", "out", "--data", "alien.txt")
    assert alien.exit_code == 2 and "'ω'" in alien.output


def generated_length(result) -> int:
    assert result.exit_code == 0, result.output
    return len(result.output.rstrip("\n")) - len("def f1")


def test_each_config_layer_wins_over_the_one_before(run: Path) -> None:
    """defaults < the checkpoint's saved config < --config < --set < flags, for sample and eval."""
    sample = ["sample", "--prompt", "def f1", "--no-stream"]
    config = (run / "tiny.toml").read_text()
    (run / "longer.toml").write_text(config.replace("max_new_tokens = 40", "max_new_tokens = 25"))
    saved = invoke(run, *sample, "--checkpoint", "out")
    assert generated_length(saved) == 40  # the checkpoint's [sample], not the default 256
    from_file = invoke(run, *sample, "--config", "longer.toml")
    assert generated_length(from_file) == 25
    from_set = invoke(run, *sample, "--config", "longer.toml", "--set", "sample.max_new_tokens=12")
    assert generated_length(from_set) == 12
    on_checkpoint = invoke(run, *sample, "--checkpoint", "out", "--set", "sample.max_new_tokens=7")
    assert generated_length(on_checkpoint) == 7  # --set applies without --config too
    flag = invoke(run, *sample, "--checkpoint", "out", "--set", "sample.max_new_tokens=7",
                  "--max-new-tokens", "3")
    assert generated_length(flag) == 3
    # --set sample.temperature on a checkpoint: sampling is no longer greedy, so seeds differ
    warm = [*sample, "--checkpoint", "out", "--set", "sample.temperature=2.0"]
    assert invoke(run, *warm, "--seed", "1").output != invoke(run, *warm, "--seed", "2").output


def test_eval_takes_data_overrides(run: Path, tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    result = invoke(run, "eval", "--checkpoint", "out", "--set", f"data.data_dir={missing}")
    assert result.exit_code == 2 and f"{missing} has no prepared data" in result.output


@pytest.mark.parametrize(
    "command, args, message",
    [
        ("sample", ["--set", "model.n_layer=4"], "gpt sample cannot apply model.n_layer; it takes [sample] keys"),
        ("sample", ["--set", "train.max_iters=4"], "gpt sample cannot apply train.max_iters"),
        ("sample", ["--set", "data.source=x.txt"], "gpt sample cannot apply data.source"),
        ("eval", ["--set", "sample.top_k=4"], "gpt eval cannot apply sample.top_k; it takes [data] keys"),
        ("eval", ["--set", "model.n_embd=64"], "gpt eval cannot apply model.n_embd"),
    ],
)
def test_an_override_that_cannot_apply_is_an_error(
    run: Path, command: str, args: list[str], message: str
) -> None:
    result = invoke(run, command, "--checkpoint", "out", *args)
    assert result.exit_code == 2 and message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_a_config_file_contradicting_the_checkpoint_model_is_an_error(run: Path) -> None:
    config = (run / "tiny.toml").read_text()
    (run / "wider.toml").write_text(config.replace("n_embd = 32", "n_embd = 64"))
    result = invoke(run, "sample", "--config", "wider.toml", "--set", "train.out_dir=out")
    assert result.exit_code == 2
    assert "wider.toml sets model.n_embd = 64 (the checkpoint has 32)" in result.output
    (run / "dropout.toml").write_text(config.replace("dropout = 0.1", "dropout = 0.3"))
    same_weights = invoke(run, "sample", "--config", "dropout.toml", "--prompt", "def f1",
                          "--no-stream")
    assert same_weights.exit_code == 0, same_weights.output  # dropout is off when sampling


def test_stdout_holds_the_text_alone(run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A library that prints, warns or logs while the model loads (torch.compile on a machine
    without CUDA logs a line, say) never reaches the text on stdout."""
    import logging
    import warnings

    import gpt.sample

    args = ["sample", "--checkpoint", "out", "--prompt", "def f1", "--no-stream"]
    clean = invoke(run, *args)
    pack = gpt.sample.pack_linears

    def noisy(model):
        print("a library's chatter")
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
        logging.getLogger("torch.utils.cpp_extension").warning("No CUDA runtime is found")
        return pack(model)

    monkeypatch.setattr(gpt.sample, "pack_linears", noisy)
    result = invoke(run, *args)
    assert result.exit_code == 0 and result.stdout == clean.stdout
    assert clean.stdout.startswith("def f1") and "chatter" in result.stderr
    assert "warning" not in result.stderr and "CUDA" not in result.stderr  # quiet by default
    assert invoke(run, "--debug", *args).stdout == clean.stdout  # --debug lets them through


def test_huge_max_new_tokens_must_stream(run: Path) -> None:
    huge = str(10**18)  # within 64 bits, far beyond what is held
    held = invoke(run, "sample", "--checkpoint", "out", "--max-new-tokens", huge, "--no-stream")
    assert held.exit_code == 2 and "stream it (--stream, one sample) or ask for at most" in held.output
    batch = invoke(run, "sample", "--checkpoint", "out", "--max-new-tokens", huge, "--stream",
                   "--num-samples", "2")
    assert batch.exit_code == 2 and "without streaming" in batch.output


def test_bfloat16_without_packing_samples_through_plain_linears(
    run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A CPU whose oneDNN refuses bfloat16 packing (AVX2 only) samples in bfloat16 all the same."""
    import gpt.onednn

    monkeypatch.setattr(gpt.onednn, "packing_works", lambda dtype: False)
    result = invoke(run, "sample", "--checkpoint", "out", "--prompt", "def f1", "--dtype",
                    "bfloat16", "--no-stream")
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("def f1") and len(result.stdout) > len("def f1") + 10


def test_info_reads_a_char_vocabulary_from_prepared_data(run: Path, tmp_path: Path) -> None:
    result = invoke(run, "info", "--config", "tiny.toml")
    assert result.exit_code == 0, result.output
    vocab = Checkpoint.open(run / "out").config.model.vocab_size
    assert f"vocab_size {vocab} from the char tokenizer, padded to 64" in result.output
    elsewhere = invoke(run, "info", "--config", "tiny.toml", "--set", f"data.data_dir={tmp_path}")
    assert elsewhere.exit_code == 2 and "run gpt prepare first" in elsewhere.output


SEPARATOR = "\n" + "-" * 40 + "\n"  # between samples


def old_sample_path(run: Path, prompt: str, seed: int, n: int) -> str:
    """What `gpt sample` printed before the engine: generate's lockstep loop over one row with
    one generator seeded once, the text decoded at the end."""
    from gpt.generate import generate

    found = Checkpoint.open(run / "out")
    model, tok = found.load_model().eval(), tokenizer_from_dict(found.tokenizer)
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([tok.encode(prompt)])
    new = [int(t) for t in torch.cat(list(generate(model, ids, n, 1.0, 5, 1.0, g)))]
    return prompt + tok.decode(new) + "\n"


def test_seed_gives_the_text_it_gave_before_the_engine(run: Path) -> None:
    """--seed S with one sample: the same text as the lockstep loop; sample i of several is
    what --num-samples 1 --seed S+i gives alone."""
    args = ["sample", "--checkpoint", "out", "--prompt", "def", "--temperature", "1.0",
            "--top-k", "5", "--no-stream", "--dtype", "float32", "--max-new-tokens", "40"]
    for seed in (3, 4):
        out = invoke(run, *args, "--seed", str(seed))
        assert out.exit_code == 0, out.output
        assert out.output == old_sample_path(run, "def", seed, 40)
    three = invoke(run, *args, "--seed", "3", "--num-samples", "3").output.split(SEPARATOR)
    assert three == [invoke(run, *args, "--seed", str(3 + i)).output for i in range(3)]


@pytest.mark.parametrize("fmt", ["lines", "jsonl"])
def test_a_prompt_file_with_several_prompts_runs_as_one_batch(run: Path, fmt: str) -> None:
    """Prompts of different lengths decoded together give each what it gives alone."""
    prompts = ["def f1", "def f22(x):", "d", "def f3(x):\n    return"]
    lines = [json.dumps(p) if fmt == "jsonl" else p for p in prompts]
    if fmt == "jsonl":
        lines[1] = json.dumps({"prompt": prompts[1], "id": 7})
    else:
        prompts[3] = "def f3(x):"  # a line holds no newline
        lines[3] = prompts[3]
    (run / f"prompts.{fmt}").write_text("\n".join(lines) + "\n\n")
    args = ["sample", "--checkpoint", "out", "--no-stream", "--temperature", "0.8", "--seed", "5"]
    out = invoke(run, *args, "--prompt-file", f"prompts.{fmt}", "--prompt-format", fmt)
    assert out.exit_code == 0, out.output
    alone = [invoke(run, *args, "--prompt", p).output for p in prompts]
    if fmt == "jsonl":
        rows = [json.loads(line) for line in out.output.splitlines()]
        assert [r["prompt"] for r in rows] == prompts and {r["sample"] for r in rows} == {0}
        assert [r["prompt"] + r["text"] + "\n" for r in rows] == alone
    else:
        assert out.output.split(SEPARATOR) == alone
