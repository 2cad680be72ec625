"""Benchmark `gpt train` on one CUDA GPU: the GPT-2-124M shape in bfloat16, compiled.

Trains the config's model (configs/gpt2_124m.toml: block 1024, vocabulary 50,304 padded) through
`gpt train` itself, on random GPT-2 tokens (or, with `--data config`, the config's own prepared
data), and reads its tokens/s from its metrics.jsonl: one figure per window of `--window` steps
after `--warmup` steps (compilation, the allocator's first steps), the median of them reported.
The reference is the plain loop nanoGPT's train.py runs (random memmap windows, forward,
backward, clip, fused AdamW) over the same model, data, precision and compilation, timed over
the same windows. MFU is tokens/s times `GPT.flops_per_token` over the GPU's peak
(gpt/metrics.py's table, or `--peak-flops`). `--write-docs` puts the table into
docs/performance.md (or `--docs PATH`).

    python scripts/bench_gpu.py [--config configs/gpt2_124m.toml] [--batch-size 16]
        [--warmup 20] [--steps 50] [--window 10] [--no-compile] [--no-reference]
        [--data random|config] [--peak-flops F] [--write-docs [--docs PATH]]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import doc_tables as docs
import numpy as np
import torch

from gpt.config import RunConfig, load_config
from gpt.data.prepare import prepare
from gpt.data.prepared import PreparedData
from gpt.metrics import peak_flops
from gpt.model import GPT
from gpt.optim import make_optimizer
from gpt.tokenizer import get_tokenizer
from gpt.train import train

RANDOM_TOKENS = 2_000_000  # about 8 MB of text: tokenized in seconds, far more than is read


def random_text(path: Path, tokens: int, seed: int = 0) -> None:
    """A text file of `tokens` uniformly random GPT-2 tokens, for `prepare` to tokenize."""
    tokenizer = get_tokenizer("gpt2")
    ids = np.random.default_rng(seed).integers(0, tokenizer.vocab_size, tokens)
    path.write_text(tokenizer.decode(ids.tolist()), encoding="utf-8")


def timed_windows(
    step: Callable[[], None], sync: Callable[[], None], warmup: int, steps: int, window: int
) -> list[float]:
    """Seconds per window of `window` calls of `step`, after `warmup` calls; `sync` waits for
    the device at each window's ends."""
    for _ in range(warmup):
        step()
    sync()
    seconds = []
    for _ in range(steps // window):
        start = time.perf_counter()
        for _ in range(window):
            step()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def reference_tok_per_s(
    cfg: RunConfig, device: torch.device, dtype: torch.dtype, compile_model: bool,
    warmup: int, steps: int, window: int,
) -> list[float]:
    """Tokens/s per window of the plain loop: what a training step costs with nothing around it."""
    data = PreparedData(cfg.data.resolved_data_dir).tokens("train")
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg.train, device)
    trained = torch.compile(model) if compile_model else model
    B, T = cfg.train.batch_size, cfg.model.block_size
    offsets = np.arange(T + 1)

    def step() -> None:
        starts = torch.randint(len(data) - T, (B,)).numpy()
        batch = torch.from_numpy(data[starts[:, None] + offsets].astype(np.int64))  # (B, T + 1)
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = trained(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_windows(step, lambda: _sync(device), warmup, steps, window)
    return [B * T * window / s for s in seconds]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_tok_per_s(cfg: RunConfig, warmup: int) -> list[float]:
    """`gpt train`'s tokens/s per logged window, those ending after `warmup` steps."""
    assert train(cfg) == 0
    out = Path(cfg.train.out_dir) / "metrics.jsonl"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    return [r["tok_per_s"] for r in lines if "tok_per_s" in r and r["iter"] > warmup]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt2_124m.toml")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sequences per step (16 x 1024 fits an 80 GB GPU)")
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--window", type=int, default=10, help="steps per timed window")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="eager mode instead of torch.compile")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="time gpt train only")
    parser.add_argument("--data", choices=("random", "config"), default="random",
                        help="random GPT-2 tokens, or the config's [data] (prepare it first)")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="the GPU's peak bf16 FLOP/s, for a GPU gpt/metrics.py does not know")
    docs.add_doc_options(parser)
    args = parser.parse_args()
    for name in ("warmup", "steps", "window"):
        if getattr(args, name) % args.window or getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive multiple of --window ({args.window})")
    doc = docs.docs_target(parser, args, "bench-gpu")
    if not torch.cuda.is_available():
        raise SystemExit(
            f"bench_gpu.py needs a CUDA GPU, and this torch ({torch.__version__}, CUDA "
            f"{torch.version.cuda or 'not built in'}) sees none; run it on a GPU machine "
            "(scripts/bench_train.py measures training on the CPU)"
        )
    device, dtype = torch.device("cuda"), torch.bfloat16
    load_before = docs.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        overrides = [
            "train.device=cuda", "train.dtype=bfloat16",
            f"train.compile={str(args.compile).lower()}",
            f"train.batch_size={args.batch_size}", "train.grad_accum_steps=1",
            f"train.max_iters={args.warmup + args.steps}", f"train.log_interval={args.window}",
            f"train.eval_interval={args.warmup + args.steps}", "train.eval_iters=1",
            f"train.out_dir={Path(tmp) / 'out'}", "log.wandb=false",
        ]
        if args.peak_flops is not None:
            overrides.append(f"train.peak_flops={args.peak_flops}")
        if args.data == "random":
            random_text(Path(tmp) / "random.txt", RANDOM_TOKENS)
            overrides += [f"data.source={Path(tmp) / 'random.txt'}", "data.tokenizer=gpt2",
                          f"data.data_dir={Path(tmp) / 'data'}", "data.streaming=false"]
        cfg = load_config(args.config, overrides)
        meta = prepare(cfg.data, progress=False, block_size=cfg.model.block_size)
        if cfg.model.vocab_size is None:
            model_cfg = dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"])
            cfg = dataclasses.replace(cfg, model=model_cfg)  # padding follows
        ours = trainer_tok_per_s(cfg, args.warmup)
        ref = (reference_tok_per_s(cfg, device, dtype, args.compile, args.warmup, args.steps,
                                   args.window) if args.reference else [])
    model = GPT(cfg.model)
    flops = model.flops_per_token()
    peak = peak_flops(cfg.train, device, dtype)
    gpu = torch.cuda.get_device_name(device)
    tokens_per_step = args.batch_size * cfg.model.block_size
    mode = "compiled" if args.compile else "eager"

    def mfu(rate: float) -> str:
        return f"{flops * rate / peak:.1%}" if peak else "n/a"

    rows = [("`gpt train`", ours)] + ([("plain loop (reference)", ref)] if ref else [])
    peak_text = (f"peak {peak / 1e12:.0f} TFLOP/s" if peak
                 else "peak unknown for this GPU (pass --peak-flops for MFU)")
    print(f"GPU: {gpu}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    print(f"model: {args.config}, {model.num_params():,} parameters, vocabulary "
          f"{cfg.model.padded_vocab_size:,} (padded), {flops / 1e9:.3f} GFLOP per token")
    print(f"batch: {args.batch_size} x {cfg.model.block_size} = {tokens_per_step:,} tokens per "
          f"step, bfloat16, {mode}; {peak_text}")
    for label, rates in rows:
        rate = statistics.median(rates)
        print(f"{label:24} {rate:12,.0f} tokens/s  MFU {mfu(rate):>6}  "
              f"(median of {len(rates)} windows of {args.window} steps; "
              f"{min(rates):,.0f} to {max(rates):,.0f})")
    base = statistics.median(ref) if ref else None
    table = docs.markdown_table(
        ["loop", "tokens/s", "MFU", "vs reference"],
        [[label, f"{statistics.median(rates):,.0f}", mfu(statistics.median(rates)),
          f"{statistics.median(rates) / base:.3f}" if base else "n/a"] for label, rates in rows],
    )
    docs.publish(doc, "bench-gpu", [table], load_before, [
        f"GPU: {gpu}, CUDA {torch.version.cuda}; peak "
        + (f"{peak / 1e12:.0f} TFLOP/s (bf16 dense) for MFU" if peak else "unknown"),
        f"model: `{args.config}`, {model.num_params():,} parameters, vocabulary "
        f"{cfg.model.padded_vocab_size:,} (padded), {flops / 1e9:.3f} GFLOP per token",
        f"{args.batch_size} x {cfg.model.block_size} tokens per step, bfloat16 autocast, "
        f"{mode}, data: {args.data}",
        f"medians of {args.steps // args.window} windows of {args.window} steps after "
        f"{args.warmup} warm-up steps",
    ])


if __name__ == "__main__":
    main()
