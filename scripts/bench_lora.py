"""LoRA against a full finetune on the CPU: peak memory, checkpoint size, speed and loss.

The base is a Llama-shaped model (RMSNorm, SwiGLU, RoPE, no biases; 6 layers 512 wide by
default) trained briefly by `gpt train` on the standard library's email package (`--base-steps`),
so that it knows something of Python; both finetunes continue it on the asyncio package, both
tokenized with GPT-2's BPE (no download). Each finetune is `gpt train --set
train.init_from=base` for the same steps and batch, at its own learning rate (LoRA's updates
are low-rank and start from zero, so it customarily takes a larger one), in a
process of its own, so that its peak resident memory (ru_maxrss) is its own; the two kinds
alternate, `--repeats` times each. A row gives the median peak memory and tokens/s (the
metrics' tok_per_s after the first log), the final checkpoint's size (weights and optimizer
state) and the validation loss before the first step and after the last.

    python scripts/bench_lora.py [--layers 6] [--width 512] [--base-steps 150] [--steps 30]
        [--repeats 2] [--write-docs [--docs PATH]]

`--write-docs` writes the bench-lora block of docs/finetuning.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

import doc_tables as docs

ROOT = Path(__file__).resolve().parents[1]
LLAMA = ["model.norm=rmsnorm", "model.mlp=swiglu", "model.pos_embedding=rope", "model.bias=false",
         "model.dropout=0.0"]


def gpt_train(work: Path, overrides: list[str]) -> int:
    """`gpt train` in a process of its own; its peak resident memory in bytes."""
    command = [sys.executable, "-m", "gpt", "train"]
    for override in overrides:
        command += ["--set", override]
    with open(work / "train.log", "w") as log:
        proc = subprocess.Popen(command, cwd=work, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"gpt train failed:\n{(work / 'train.log').read_text()[-3000:]}")
    return usage.ru_maxrss * 1024  # kilobytes on Linux


def common(args: argparse.Namespace, package: str) -> list[str]:
    """The data and model of every run: a stdlib package's sources, GPT-2's BPE, the Llama
    shape."""
    source = Path(sysconfig.get_paths()["stdlib"]) / package / "*.py"
    return [*LLAMA, f"data.source={source}", "data.tokenizer=gpt2", f"data.data_dir={package}",
            f"model.n_layer={args.layers}", f"model.n_embd={args.width}",
            f"model.n_head={args.width // 64}", f"model.block_size={args.block}",
            "train.device=cpu", "train.compile=false", "log.wandb=false"]


def finetune(kind: str, args: argparse.Namespace, work: Path, run: int) -> dict[str, float]:
    """One finetune of the base: its peak memory, checkpoint bytes, tokens/s and final loss."""
    out, lr = f"{kind}-{run}", args.lr if kind == "full" else args.lora_lr
    rss = gpt_train(work, [
        *common(args, "asyncio"), "train.init_from=base", f"train.finetune={kind}",
        f"train.out_dir={out}", f"train.lora_rank={args.rank}", f"train.batch_size={args.batch}",
        f"train.max_iters={args.steps}", f"train.learning_rate={lr}",
        f"train.min_lr={lr / 10}", "train.warmup_iters=3", "train.log_interval=1",
        f"train.eval_interval={args.steps}", "train.eval_iters=10", "train.keep_last=1",
    ])
    records = [json.loads(line) for line in (work / out / "metrics.jsonl").read_text().splitlines()]
    checkpoint = work / out / f"ckpt-{args.steps:07d}"
    stored = sum(p.stat().st_size for p in checkpoint.iterdir() if p.name != "state.json")
    losses = [r["val_loss"] for r in records if "val_loss" in r]  # at step 0 and the last
    return {"rss": rss, "bytes": stored,
            "tok_per_s": statistics.median(r["tok_per_s"] for r in records if "tok_per_s" in r
                                           and r["iter"] > 1),
            "val_before": losses[0], "val_loss": losses[-1]}


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=512, help="n_embd; heads of 64 each")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--base-steps", type=int, default=150, help="the base's training")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--lr", type=float, default=3e-4, help="the full finetune's peak rate")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="LoRA's peak rate")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    docs.add_doc_options(parser)
    args = parser.parse_args()
    doc = docs.docs_target(parser, args, "bench-lora", default=ROOT / "docs" / "finetuning.md")
    load_before = docs.load_average()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"load average {load_before:.2f}, {cores} cores", flush=True)
    results: dict[str, list[dict[str, float]]] = {"full": [], "lora": []}
    with tempfile.TemporaryDirectory(prefix="bench-lora-") as tmp:
        work = Path(tmp)
        gpt_train(work, [*common(args, "email"), "train.out_dir=base",
                         f"train.max_iters={args.base_steps}", f"train.batch_size={args.batch}",
                         "train.learning_rate=1e-3", "train.warmup_iters=10",
                         f"train.eval_interval={args.base_steps}", "train.eval_iters=1"])
        base_loss = [json.loads(line) for line in
                     (work / "base" / "metrics.jsonl").read_text().splitlines()][-1]["val_loss"]
        print(f"base: {args.base_steps} steps on email, val loss {base_loss:.4f}", flush=True)
        for run in range(args.repeats):
            for kind in ("full", "lora") if run % 2 == 0 else ("lora", "full"):
                results[kind].append(finetune(kind, args, work, run))
                last = results[kind][-1]
                print(f"{kind}: peak RSS {mib(last['rss'])}, checkpoint {mib(last['bytes'])}, "
                      f"{last['tok_per_s']:,.0f} tokens/s, val loss {last['val_loss']:.4f}",
                      flush=True)
    rows = []
    for kind, runs in results.items():
        median = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
        rows.append([kind if kind == "full" else f"lora (rank {args.rank}, every layer)",
                     mib(median["rss"]), mib(median["bytes"]), f"{median['tok_per_s']:,.0f}",
                     f"{median['val_before']:.4f} → {median['val_loss']:.4f}"])
    table = docs.markdown_table(
        ["finetune", "peak RSS", "checkpoint (weights + optimizer)", "tokens/s",
         f"val loss, before → after {args.steps} steps"], rows)
    print(table)
    print(f"load average {docs.load_average():.2f} after, {cores} cores")
    notes = [f"base: Llama-shaped, {args.layers} layers x {args.width} wide, "
             f"{args.width // 64} heads, GPT-2's vocabulary, trained {args.base_steps} steps "
             f"on the email package's sources (val loss {base_loss:.2f}); each finetune "
             f"{args.steps} steps of {args.batch} x {args.block} tokens on asyncio's sources, "
             f"at peak learning rate {args.lr:g} (full) and {args.lora_lr:g} (LoRA); medians "
             f"of {args.repeats} runs each, alternating, each in its own process"]
    docs.publish(doc, "bench-lora", [table], load_before, notes)


if __name__ == "__main__":
    main()
