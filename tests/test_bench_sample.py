"""scripts/bench_sample.py's llama.cpp plumbing without llama.cpp: what a decoding process
printed, a process that crashes or fails costing only its row, the rows skipped when an anchor is
not named, the goal ratios, the int8 copy's bytes per token; and scripts/llama_decode.py run
against a stand-in `llama_cpp` package."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DECODED = {"tokens": 16, "tokens_s": 60.0, "decode_tokens_s": 64.0, "tensor_bytes": 1000,
           "version": "0.3.36"}


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # it imports its helpers from its folder
    spec = importlib.util.spec_from_file_location("bench_sample",
                                                  ROOT / "scripts" / "bench_sample.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_sample", module)  # its dataclasses look it up
    spec.loader.exec_module(module)
    return module


def fake_python(folder: Path, body: str) -> str:
    """An executable standing in for the llama-cpp-python python: a shell script that logs its
    arguments to calls.log, then runs `body`."""
    path = folder / "python"
    path.write_text(f'#!/bin/sh\necho "$@" >> "{folder}/calls.log"\n{body}\n')
    path.chmod(0o755)
    return str(path)


def test_a_decoding_process_result_is_its_last_json_line(bench) -> None:
    printed = f"loading...\n{json.dumps({**DECODED, 'tokens_s': 1.0})}\n{json.dumps(DECODED)}\n"
    result = bench.child_result(0, printed, "")
    assert result == bench.Decoded(16, 60.0, 64.0, 1000, "0.3.36")


@pytest.mark.parametrize(("returncode", "stdout", "stderr", "why"), [
    (-11, "", "", "crashed (signal 11)"),
    (-6, json.dumps(DECODED), "", "crashed (signal 6)"),
    (1, "", "Traceback\nValueError: bad model\n", "failed (exit 1): ValueError: bad model"),
    (0, "only words\n", "", "printed no result: only words"),
    (0, '{"tokens_s": 3.0}\n', "", 'printed no result: {"tokens_s": 3.0}'),
])
def test_a_process_without_a_figure_says_why(bench, returncode: int, stdout: str, stderr: str,
                                             why: str) -> None:
    assert bench.child_result(returncode, stdout, stderr) == why


def test_a_crash_costs_its_row_and_is_not_started_again(bench, tmp_path: Path) -> None:
    python = fake_python(tmp_path, "kill -SEGV $$")
    decoder = bench.LlamaDecode(python, tmp_path / "model-q8_0.gguf", "q8_0", threads=2)
    prompt = torch.tensor([[1, 2, 3]])
    assert math.isnan(decoder(prompt, 8)) and math.isnan(decoder(prompt, 16))
    assert decoder.failure == "crashed (signal 11)" and decoder.runs == []
    assert len((tmp_path / "calls.log").read_text().splitlines()) == 1


def test_a_decoding_process_gets_the_prompt_ids_and_threads(bench, tmp_path: Path) -> None:
    python = fake_python(tmp_path, f"echo '{json.dumps(DECODED)}'")
    gguf = tmp_path / "model-q8_0.gguf"
    decoder = bench.LlamaDecode(python, gguf, "q8_0", threads=3, no_repack=True)
    assert decoder(torch.tensor([[50256, 7, 42]]), 16) == 60.0
    assert decoder.failure is None and decoder.runs[0].decode_tokens_s == 64.0
    args = (tmp_path / "calls.log").read_text().split()
    assert args[:2] == [str(bench.DECODE), str(gguf)] and args[-1] == "--no-repack"
    assert args[args.index("--prompt") + 1] == "50256,7,42"
    assert args[args.index("--threads") + 1] == "3"
    assert args[args.index("--new-tokens") + 1] == "16"


def test_the_llama_rows_are_skipped_saying_which_anchor_is_missing(
        bench, tiny_config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from gpt.model import GPT

    monkeypatch.delenv("GPT_BENCH_LLAMA_PYTHON", raising=False)
    model = GPT(tiny_config(vocab_size=50257, padded_vocab_size=50257)).eval()
    args = argparse.Namespace(llama_python=None, work=tmp_path, gguf_types=["bf16", "q8_0"],
                              convert=None, convert_python=sys.executable)
    assert bench.llama_decoders(args, model) == ({}, [
        "llama.cpp: no python with llama-cpp-python is named (--llama-python or "
        "GPT_BENCH_LLAMA_PYTHON)"])
    args.llama_python = str(tmp_path / "missing")
    assert bench.llama_decoders(args, model)[1] == [
        f"llama.cpp: --llama-python {tmp_path / 'missing'} is not a file"]
    args.llama_python = fake_python(tmp_path, "exit 0")
    decoders, skipped = bench.llama_decoders(args, model)
    why = "llama.cpp's converter is not named (--convert or GPT_BENCH_CONVERT)"
    assert decoders == {} and skipped == [f"llama.cpp BF16: {why}", f"llama.cpp Q8_0: {why}"]


def test_cached_gguf_files_give_rows_without_the_converter(bench, tiny_config,
                                                           tmp_path: Path) -> None:
    from gpt.model import GPT

    model = GPT(tiny_config(vocab_size=50257, padded_vocab_size=50257)).eval()
    args = argparse.Namespace(llama_python=fake_python(tmp_path, "exit 0"), work=tmp_path,
                              gguf_types=["bf16", "q8_0"], convert=None,
                              convert_python=sys.executable)
    bench.llama_decoders(args, model)  # exports the model into its folder
    folder = next(tmp_path.glob("model-*"))
    for outtype in ("bf16", "q8_0"):
        (folder / f"model-{outtype}.gguf").write_bytes(b"GGUF")
    decoders, skipped = bench.llama_decoders(args, model)
    assert skipped == [] and list(decoders) == ["llama.cpp BF16", "llama.cpp Q8_0",
                                                "llama.cpp Q8_0, --no-repack"]
    assert decoders["llama.cpp Q8_0, --no-repack"].no_repack
    assert not decoders["llama.cpp Q8_0"].no_repack


def test_the_goal_ratios_leave_out_rows_without_a_figure(bench) -> None:
    rates = {"gpt sample path, bf16": 60.0, "llama.cpp BF16": 50.0,
             "gpt sample path, int8": 100.0, "llama.cpp Q8_0": math.nan,
             "llama.cpp Q8_0, --no-repack": 80.0}
    assert bench.goal_lines(rates) == [
        "gpt sample path, bf16 / llama.cpp BF16, tokens/s: 1.20x",
        "gpt sample path, int8 / llama.cpp Q8_0, --no-repack, tokens/s: 1.25x",
    ]
    assert bench.goal_lines({"gpt sample path, bf16": 60.0}) == []


def test_an_int8_copy_reads_its_head_not_the_embedding_table(bench, tiny_config) -> None:
    from gpt.model import GPT

    model = GPT(tiny_config()).eval()
    assert bench.tensor_bytes(model) == model.num_params() * 4  # the head is the table: read whole

    class Int8Head(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.register_buffer("rows", torch.zeros_like(linear.weight, dtype=torch.int8))
            self.register_buffer("scale", torch.zeros(linear.out_features))

    head = model.lm_head
    model.lm_head = Int8Head(head)
    vocab, width = head.weight.shape
    table = vocab * width * 4  # fp32, of which a lookup reads one row
    assert bench.tensor_bytes(model) == model.num_params() * 4 - table + vocab * width + vocab * 4


def test_the_ablation_undoes_one_choice_at_a_time_and_restores_it(bench, tiny_config) -> None:
    """Every variant decodes (torch's int8 matmul included), each rate is against its own
    kind's path as shipped, and what a variant patches is put back."""
    from gpt.model import GPT, Attention
    from gpt.onednn import pack_linears
    from gpt.quant import quantize

    torch.manual_seed(0)
    model = GPT(tiny_config()).eval()

    def copy(dtype: torch.dtype, prepare=pack_linears) -> GPT:
        c = GPT(model.config).eval()
        c.load_state_dict(model.state_dict())
        return prepare(c.to(dtype))

    shipped = {"bf16": copy(torch.bfloat16)}
    try:
        shipped["int8"] = copy(torch.bfloat16, lambda m: quantize(m, "int8"))
    except Exception:  # no int8 kernel on this CPU: the bf16 variants alone
        pass
    attend, dtype_of = Attention._attend_group, bench.gpt_generate.cache_dtype
    rows = bench.ablation(copy, shipped, torch.randint(0, 64, (1, 4)), 4, 1)
    labels = [row[0] for row in rows]
    assert len(labels) == (7 if "int8" in shipped else 4)
    assert all(float(row[1]) > 0 for row in rows)
    assert [row[2] for row in rows if "as shipped" in row[0]] == ["1.00x"] * len(shipped)
    assert Attention._attend_group is attend and bench.gpt_generate.cache_dtype is dtype_of


def llama_cpp_stand_in(folder: Path) -> Path:
    """A `llama_cpp` package with what llama_decode.py calls; it logs to llama.log."""
    package = folder / "llama_cpp"
    package.mkdir()
    (package / "llama_cpp.py").write_text(
        "class llama_model_params:\n"
        "    use_extra_bufts = True\n"
        "def llama_model_default_params():\n"
        "    return llama_model_params()\n")
    (package / "__init__.py").write_text(f"""
import json
from . import llama_cpp
__version__ = "stand-in"
LOG = {str(folder / "llama.log")!r}

def llama_model_size(model):
    return 4321

class Llama:
    def __init__(self, path, **kwargs):
        self.model = object()
        repack = llama_cpp.llama_model_default_params().use_extra_bufts
        self.log({{"path": path, "repack": repack, **kwargs}})

    def log(self, record):
        with open(LOG, "a") as f:
            f.write(json.dumps(record) + "\\n")

    def reset(self):
        self.log("reset")

    def generate(self, tokens, **sampling):
        self.log({{"prompt": list(tokens), **sampling}})
        drawn = 0
        try:
            while True:
                drawn += 1
                yield 50256  # the end of text: it must not stop the count
        finally:
            self.log({{"drawn": drawn}})
""")
    return folder


@pytest.mark.parametrize("no_repack", [False, True])
def test_llama_decode_draws_exactly_n_tokens_from_the_prompt_ids(tmp_path: Path,
                                                                 no_repack: bool) -> None:
    llama_cpp_stand_in(tmp_path)
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "llama_decode.py"), "model.gguf",
         "--prompt", "5,6,7", "--new-tokens", "12", "--threads", "3",
         *(["--no-repack"] if no_repack else [])],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout.splitlines()[-1])
    assert printed["tokens"] == 12 and printed["tensor_bytes"] == 4321
    assert printed["tokens_s"] > 0 and printed["decode_tokens_s"] > 0
    load, *calls = [json.loads(line) for line in (tmp_path / "llama.log").read_text().splitlines()]
    assert load["repack"] is not no_repack
    assert load["n_threads"] == load["n_threads_batch"] == 3 and load["n_ctx"] >= 3 + 12
    assert load["n_batch"] == 3  # the prompt in one batch
    assert calls[0] == "reset" and calls[3] == "reset"  # before the warm-up and the timed run
    warmup, timed = calls[1], calls[4]
    assert warmup["prompt"] == timed["prompt"] == [5, 6, 7]
    assert timed["top_k"] == 50 and timed["temp"] == 1.0 and timed["top_p"] == 1.0
    assert calls[2] == {"drawn": 8} and calls[5] == {"drawn": 12}
