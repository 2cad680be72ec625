"""Benchmark `gpt train` against a plain PyTorch loop over the same model, in one process.

The trainer's tokens/s come from its own metrics.jsonl (the logged windows after the first);
the reference is the loop nanoGPT's train.py runs (random memmap windows, forward, backward,
clip, AdamW step) on the same GPT, config and data, with nothing else. Their ratio is what the
trainer's own bookkeeping (logging, sampler state, signal checks, progress bar) costs.
`--write-docs` puts the table into docs/performance.md (or `--docs PATH`).

    python scripts/bench_train.py [--config configs/default.toml] [--iters 60] [--repeats 3]
        [--write-docs [--docs PATH]]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import doc_tables as docs
import numpy as np
import torch

from gpt.config import load_config
from gpt.data.prepare import prepare
from gpt.data.prepared import PreparedData
from gpt.model import GPT
from gpt.optim import make_optimizer
from gpt.train import train


def reference_tok_per_s(cfg, data_dir: Path, iters: int) -> float:
    """A straightforward training loop; tokens/s over its last iters - 5 steps."""
    data = PreparedData(data_dir).tokens("train")
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model)
    optimizer = make_optimizer(model, cfg.train, torch.device("cpu"))
    T, B = cfg.model.block_size, cfg.train.batch_size
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        for _ in range(cfg.train.grad_accum_steps):
            ix = torch.randint(len(data) - T, (B,))
            x = torch.stack([torch.from_numpy(data[i : i + T].astype(np.int64)) for i in ix])
            y = torch.stack(
                [torch.from_numpy(data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix]
            )
            _, loss = model(x, y)
            (loss / cfg.train.grad_accum_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
        times.append(time.perf_counter() - start)
    per_iter = statistics.median(times[5:])
    return B * T * cfg.train.grad_accum_steps / per_iter


def trainer_tok_per_s(cfg, out_dir: Path) -> float:
    assert train(cfg) == 0
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tok_per_s"] for r in lines if "tok_per_s" in r][1:-1]  # skip warmup and the end
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/default.toml")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    docs.add_doc_options(parser)
    args = parser.parse_args()
    doc = docs.docs_target(parser, args, "bench-train")
    load_before = docs.load_average()
    base = load_config(args.config, ["train.device=cpu", "train.compile=false"])
    meta = prepare(base.data, progress=False, block_size=base.model.block_size)
    if base.model.vocab_size is None:
        model = dataclasses.replace(base.model, vocab_size=meta["vocab_size"])  # padding follows
        base = dataclasses.replace(base, model=model)
    with tempfile.TemporaryDirectory() as tmp:
        ours, ref = [], []
        for r in range(args.repeats):
            out = Path(tmp) / f"run{r}"
            cfg = load_config(args.config, [
                "train.device=cpu", "train.compile=false", f"train.out_dir={out}",
                f"train.max_iters={args.iters}", "train.log_interval=5", "train.eval_iters=1",
                f"train.eval_interval={args.iters}", f"train.checkpoint_interval={args.iters}",
            ])
            ours.append(trainer_tok_per_s(cfg, out))
            ref.append(reference_tok_per_s(base, base.data.resolved_data_dir, args.iters))
    model = GPT(base.model)
    flops = model.flops_per_token()
    o, f = statistics.median(ours), statistics.median(ref)
    print(f"config {args.config}: {model.num_params():,} parameters, {flops / 1e6:.1f} MFLOP/token")
    print(f"plain reference loop: {f:9,.0f} tokens/s  ({f * flops / 1e9:.1f} GFLOP/s achieved)")
    print(f"gpt train:            {o:9,.0f} tokens/s  ({o * flops / 1e9:.1f} GFLOP/s achieved)")
    print(f"ratio gpt train / reference: {o / f:.3f} (medians of {args.repeats} alternating runs)")
    table = docs.markdown_table(
        ["loop", "tokens/s", "achieved GFLOP/s", "vs reference"],
        [[label, f"{rate:,.0f}", f"{rate * flops / 1e9:.1f}", f"{rate / f:.3f}"]
         for label, rate in (("plain loop (reference)", f), ("`gpt train`", o))],
    )
    b, t = base.train.batch_size * base.train.grad_accum_steps, base.model.block_size
    docs.publish(doc, "bench-train", [table], load_before, [
        f"model: `{args.config}`, {model.num_params():,} parameters, "
        f"{flops / 1e6:.1f} MFLOP per token; {b} x {t} tokens per step on the CPU",
        f"medians of {args.repeats} alternating runs of {args.iters} steps each",
    ])


if __name__ == "__main__":
    main()
