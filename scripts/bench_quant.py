"""What int8 (`gpt.quant`) costs in quality: bits per byte, KL to float32's logits, greedy text.

Each model is loaded in float32 (as `gpt eval` runs it), in bfloat16 (as `gpt sample` runs it
on a CPU that computes bfloat16 natively), and in each of the two with its Linear layers
quantized to int8 (`--quantize int8`). Every precision reads the same text, the first
`--max-tokens` tokens of a run's validation split or, for an HF model, of `--data`:

- loss and bits per byte from `gpt.evaluate.evaluate`, the same figures as `gpt eval`;
- the KL divergence from float32's next-token distribution to the precision's, per position, in
  nats (mean and 99th percentile), and how often the two agree on the most likely token, over
  the same windows of block_size tokens;
- greedy decoding from `--prompts` prompts (`--prompt-tokens` tokens each, taken evenly from the
  text): how many of `--new-tokens` tokens equal float32's before the first that differs
  (median and minimum over the prompts).

Models: `--checkpoint` (repeatable) names a run (`out/default`, the quick start's run), an HF
folder (`hf:FOLDER`) or a GPT-2 from the hub (`gpt2`, `gpt2-medium`, ..., which needs the
network once). `--gpt2-shaped` builds a GPT-2-architecture model without the network: GPT-2's
recipe (configs/gpt2_124m.toml) and BPE at `--gpt2-layers` x `--gpt2-width`, trained
`--gpt2-steps` steps on the standard library's top-level modules by `gpt train`, exported by
`gpt export` and loaded back as `hf:FOLDER` (the import path); it is kept in `--work` and built
once. HF models are evaluated on `--data`, by default the standard library's asyncio package,
which that training never reads.

    python scripts/bench_quant.py [--checkpoint out/default] [--checkpoint hf:FOLDER | gpt2]
        [--gpt2-shaped [--work DIR] [--gpt2-layers 6] [--gpt2-width 384] [--gpt2-steps 300]]
        [--data SOURCE] [--max-tokens 100000] [--prompts 8] [--prompt-tokens 16]
        [--new-tokens 64] [--write-docs [--docs PATH]]

`--write-docs` writes the bench-quant block of docs/sampling.md.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import doc_tables as docs
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gpt.checkpoint import Checkpoint
from gpt.errors import GPTError
from gpt.evaluate import evaluate, tokens_of_source, tokens_of_split, window_batches
from gpt.generate import generate
from gpt.hf.pretrained import Pretrained, open_model
from gpt.model import GPT
from gpt.onednn import bfloat16_is_native
from gpt.sample import load_for_inference
from gpt.tokenizer import Tokenizer, tokenizer_from_dict

ROOT = Path(__file__).resolve().parents[1]
STDLIB = Path(sysconfig.get_paths()["stdlib"])
HELD_OUT = str(STDLIB / "asyncio" / "*.py")  # what the GPT-2-shaped build never trains on
PRECISIONS = {"float32": ("float32", False), "int8": ("float32", True),  # name: dtype, int8
              "bfloat16": ("bfloat16", False), "bfloat16 + int8": ("bfloat16", True)}


@dataclass
class Row:
    """One precision of one model, measured against the model in float32."""

    precision: str
    loss: float
    bits_per_byte: float
    kl: Tensor  # (N,) nats at each position
    top1: float  # the fraction of positions whose most likely token is float32's
    greedy: list[int]  # per prompt: tokens equal to float32's before the first that differs

    def cells(self, new_tokens: int) -> list[str]:
        return [self.precision, f"{self.loss:.4f}", f"{self.bits_per_byte:.4f}",
                f"{self.kl.mean().item():.2g}", f"{self.kl.quantile(0.99).item():.2g}",
                f"{100 * self.top1:.2f}%",
                f"{statistics.median(self.greedy):g} / {min(self.greedy)} of {new_tokens}"]


HEADER = ["precision", "loss (nats)", "bits/byte", "KL to float32, mean (nats)", "KL, p99",
          "top-1 = float32's", "greedy tokens = float32's (median / min)"]


def load(found: Checkpoint | Pretrained, precision: str) -> GPT:
    """The model in `precision`, as `gpt eval` and `gpt sample` load it (`--quantize int8`)."""
    dtype, int8 = PRECISIONS[precision]
    return load_for_inference(found, "cpu", dtype, False, "int8" if int8 else None)[0]


def windows(tokens: np.ndarray, model: GPT) -> Iterator[Tensor]:
    """Batches (B, T) of the inputs `evaluate` feeds the model: each of its windows but the
    last token, whose only part is as a target."""
    T = model.config.block_size
    for starts in window_batches(model, len(tokens)):
        yield torch.from_numpy(np.stack([tokens[s : s + T + 1][:-1] for s in starts]))


def log_probs(model: GPT, inputs: Tensor) -> Tensor:
    """float32 log-probabilities (B, T, V) over the tokenizer's ids (no padding rows)."""
    logits, _ = model(inputs)
    return F.log_softmax(logits[..., : model.config.vocab_size].float(), dim=-1)


@torch.inference_mode()
def compare_logits(
    reference: GPT, others: dict[str, GPT], tokens: np.ndarray
) -> dict[str, tuple[Tensor, float]]:
    """For each model of `others`: KL(reference || model) at every position (N,) in nats, and
    the fraction of positions where both rank the same token first."""
    kls: dict[str, list[Tensor]] = {name: [] for name in others}
    agree = dict.fromkeys(others, 0)
    positions = 0
    for inputs in windows(tokens.astype(np.int64), reference):
        ref = log_probs(reference, inputs)  # (B, T, V)
        positions += inputs.numel()
        for name, model in others.items():
            lp = ref if model is reference else log_probs(model, inputs)
            kls[name].append(F.kl_div(lp, ref, log_target=True, reduction="none").sum(-1).flatten())
            agree[name] += int((lp.argmax(-1) == ref.argmax(-1)).sum())
    return {name: (torch.cat(kls[name]), agree[name] / positions) for name in others}


@torch.inference_mode()
def greedy(model: GPT, prompts: Tensor, new_tokens: int) -> Tensor:
    """The greedy continuations (P, new_tokens) of prompts (P, L)."""
    return torch.stack(list(generate(model, prompts, new_tokens, temperature=0.0)), dim=1)


def agreeing_prefix(reference: Tensor, other: Tensor) -> list[int]:
    """Per row of two (P, N) continuations: how many tokens agree before the first difference."""
    same = (reference == other).int().cumprod(dim=1)  # (P, N) 1 up to the first difference
    return same.sum(dim=1).tolist()


def prompts_from(tokens: np.ndarray, count: int, length: int) -> Tensor:
    """`count` prompts (count, length), taken at even intervals from the text."""
    starts = np.linspace(0, len(tokens) - length, count).astype(int)
    return torch.from_numpy(np.stack([tokens[s : s + length] for s in starts]).astype(np.int64))


def measure(
    models: dict[str, GPT], tokens: np.ndarray, tokenizer: Tokenizer, prompts: Tensor,
    new_tokens: int,
) -> list[Row]:
    """Every precision of a model on the same tokens, against the first (the reference)."""
    reference = next(iter(models.values()))
    compared = compare_logits(reference, models, tokens)
    expected = greedy(reference, prompts, new_tokens)
    rows = []
    for name, model in models.items():
        result = evaluate(model, tokens, tokenizer, progress=False)
        kl, top1 = compared[name]
        rows.append(Row(name, result["loss"], result["bits_per_byte"], kl, top1,
                        agreeing_prefix(expected, greedy(model, prompts, new_tokens))))
        print(f"  {' | '.join(rows[-1].cells(new_tokens))}", flush=True)
    return rows


def text_of(
    found: Checkpoint | Pretrained, data: str, tokenizer: Tokenizer
) -> tuple[np.ndarray, str]:
    """The tokens a model is measured on, and what they are: a run's validation split, or for an
    HF model the text `data` names."""
    if isinstance(found, Pretrained):
        what = "the standard library's asyncio package" if data == HELD_OUT else data
        return tokens_of_source(found.config, data, tokenizer), what
    tokens, mask = tokens_of_split(found.config, "val", found)
    if mask is not None:
        raise SystemExit(f"{found.path} is a chat run; this script measures text runs")
    return tokens, "its validation split"


def gpt(command: list[str], work: Path, log: str) -> None:
    """`gpt COMMAND` in a process of its own, in `work`; its output in `work/log`."""
    with open(work / log, "w") as out:
        done = subprocess.run([sys.executable, "-m", "gpt", *command], cwd=work, stdout=out,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"gpt {command[0]} failed:\n{(work / log).read_text()[-3000:]}")


def build_gpt2_shaped(args: argparse.Namespace) -> str:
    """`hf:FOLDER` of the GPT-2-shaped model: trained, exported and kept in --work, once per
    shape and step count."""
    name = f"gpt2-shaped-{args.gpt2_layers}x{args.gpt2_width}-{args.gpt2_steps}steps"
    work = args.work.resolve()
    folder = work / f"{name}-hf"
    if (folder / "config.json").is_file():
        print(f"{name}: built before, in {folder}", flush=True)
        return f"hf:{folder}"
    work.mkdir(parents=True, exist_ok=True)
    steps, width = args.gpt2_steps, args.gpt2_width
    overrides = [
        f"data.source={STDLIB / '*.py'}", "data.data_dir=stdlib-gpt2", f"train.out_dir={name}",
        f"model.n_layer={args.gpt2_layers}", f"model.n_embd={width}",
        f"model.n_head={width // 64}", "model.block_size=256", "train.batch_size=8",
        "train.grad_accum_steps=1", f"train.max_iters={steps}", f"train.lr_decay_iters={steps}",
        f"train.warmup_iters={max(1, steps // 10)}", "train.learning_rate=1e-3",
        "train.min_lr=1e-4", f"train.eval_interval={steps}", "train.eval_iters=10",
        f"train.checkpoint_interval={steps}", "train.log_interval=10", "train.device=cpu",
        "train.compile=false", "log.wandb=false",
    ]
    print(f"{name}: training {steps} steps (the log is {work / 'train.log'})", flush=True)
    config = ["--config", str(ROOT / "configs" / "gpt2_124m.toml")]
    gpt(["train", *config, *(a for o in overrides for a in ("--set", o))], work, "train.log")
    partial = work / f"{name}-hf.partial"  # renamed once whole, so a cut build is not reused
    gpt(["export", "--checkpoint", name, "--out", str(partial), "--force"], work, "export.log")
    partial.rename(folder)
    return f"hf:{folder}"


Subject = tuple[Checkpoint | Pretrained, Tokenizer, np.ndarray, str]


def opened(spec: str, data: str, max_tokens: int) -> Subject:
    """The model `spec` names, its tokenizer, the first max_tokens + 1 tokens it is measured on
    and what they are; a name that opens nothing exits in one line."""
    try:
        found = open_model(spec)
        tokenizer = tokenizer_from_dict(found.tokenizer)
        tokens, what = text_of(found, data, tokenizer)
    except GPTError as e:
        raise SystemExit(str(e)) from None
    return found, tokenizer, tokens[: max_tokens + 1], what


def model_table(
    label: str, subject: Subject, precisions: list[str], args: argparse.Namespace
) -> str:
    """One model measured in every precision: its title and table, in Markdown."""
    found, tokenizer, tokens, what = subject
    title = f"**{describe(label, found, tokenizer)}**, {len(tokens) - 1:,} tokens of {what}"
    print(title, flush=True)
    prompts = prompts_from(tokens, args.prompts, args.prompt_tokens)
    models = {name: load(found, name) for name in precisions}
    rows = measure(models, tokens, tokenizer, prompts, args.new_tokens)
    table = f"{title}:\n\n" + docs.markdown_table(HEADER, [r.cells(args.new_tokens) for r in rows])
    print(table, flush=True)
    return table


def describe(spec: str, found: Checkpoint | Pretrained, tokenizer: Tokenizer) -> str:
    """A model's name with its shape and size: `out/default (4 layers x 128, vocabulary 99,
    0.8M parameters)`."""
    cfg = found.config.model
    with torch.device("meta"):  # counted without allocating
        params = GPT(cfg).num_params()
    return (f"{spec} ({cfg.n_layer} layers x {cfg.n_embd}, vocabulary {tokenizer.vocab_size:,}, "
            f"{params / 1e6:.1f}M parameters)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", action="append", default=[], metavar="SPEC",
                        help="a run's folder, hf:FOLDER, or gpt2 (repeatable)")
    parser.add_argument("--gpt2-shaped", action="store_true",
                        help="build (once, in --work) and measure a GPT-2-architecture model")
    parser.add_argument("--work", type=Path, default=ROOT / "out" / "bench-quant",
                        help="where --gpt2-shaped keeps its build")
    parser.add_argument("--gpt2-layers", type=int, default=6)
    parser.add_argument("--gpt2-width", type=int, default=384, help="n_embd; heads of 64 each")
    parser.add_argument("--gpt2-steps", type=int, default=300)
    parser.add_argument("--data", default=HELD_OUT,
                        help="the text HF models are measured on (a file, glob or source)")
    parser.add_argument("--max-tokens", type=int, default=100_000)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64)
    docs.add_doc_options(parser)
    args = parser.parse_args()
    if not args.checkpoint and not args.gpt2_shaped:
        parser.error("name a model: --checkpoint out/default, --gpt2-shaped, or both")
    doc = docs.docs_target(parser, args, "bench-quant", default=ROOT / "docs" / "sampling.md")
    precisions = list(PRECISIONS) if bfloat16_is_native() else ["float32", "int8"]
    load_before = docs.load_average()
    # every named model opens before the build, so a bad name fails before its training
    subjects = {spec: opened(spec, args.data, args.max_tokens) for spec in args.checkpoint}
    if args.gpt2_shaped:
        spec = build_gpt2_shaped(args)
        subjects[f"GPT-2-shaped, imported as hf:{spec.rsplit('/', 1)[-1]}"] = opened(
            spec, args.data, args.max_tokens)
    tables = [model_table(label, subject, precisions, args)
              for label, subject in subjects.items()]
    notes = []
    if args.gpt2_shaped:
        notes.append(f"the GPT-2-shaped model: configs/gpt2_124m.toml at {args.gpt2_layers} "
                     f"layers x {args.gpt2_width}, block 256, trained {args.gpt2_steps} steps of "
                     "8 x 256 tokens on the standard library's top-level modules, exported with "
                     "`gpt export` and loaded back as `hf:FOLDER`")
    notes.append(f"greedy: {args.prompts} prompts of {args.prompt_tokens} tokens taken evenly "
                 f"from the same text, {args.new_tokens} new tokens each; int8 quantizes every "
                 "Linear layer, the LM head included")
    docs.publish(doc, "bench-quant", tables, load_before, notes)


if __name__ == "__main__":
    main()
