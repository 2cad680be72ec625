"""GPU memory and speed of `gpt train` on a GPT-2-medium-shaped model (24 layers, 1024 wide, 16
heads, block 1024, GPT-2's vocabulary), with and without activation checkpointing, and with
`--nproc N` on N GPUs under DDP and FSDP.

Each row is `gpt train` itself for `--steps` steps on the library sources tokenized with GPT-2's
BPE (no download), bfloat16, not compiled: the peak memory is rank 0's `peak_mem_gib` and the
speed the median `tok_per_s` of metrics.jsonl after the first log line.

    python scripts/bench_memory.py [--nproc 1] [--batch-size 8] [--steps 30] [--write-docs]

`--write-docs` writes the bench-memory block of docs/training.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import doc_tables as docs

ROOT = Path(__file__).resolve().parents[1]
MEDIUM = ["model.n_layer=24", "model.n_embd=1024", "model.n_head=16", "model.block_size=1024",
          "data.source=python-stdlib", "data.tokenizer=gpt2", "data.data_dir=data",
          "train.grad_accum_steps=1", "train.compile=false", "train.dtype=bfloat16",
          "train.device=cuda", "train.warmup_iters=5", "log.wandb=false"]


def run(nproc: int, parallel: str, checkpointing: bool, args: argparse.Namespace,
        work: Path) -> dict[str, float]:
    """One `gpt train`; its rank 0 peak memory (GiB) and median tokens/s across processes."""
    out = work / f"{parallel}-{nproc}-{checkpointing}"
    overrides = [*MEDIUM, f"train.out_dir={out}", f"train.batch_size={args.batch_size}",
                 f"train.max_iters={args.steps}", "train.log_interval=5",
                 f"train.eval_interval={args.steps}", "train.eval_iters=1",
                 f"train.checkpoint_interval={10 * args.steps}", f"train.parallel={parallel}",
                 f"train.activation_checkpointing={str(checkpointing).lower()}"]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable])
    command = [*launch, "-m", "gpt", "train", "--config", str(ROOT / "configs/gpt2_124m.toml")]
    for override in overrides:
        command += ["--set", override]
    done = subprocess.run(command, cwd=work, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"gpt train failed:\n{done.stderr[-3000:]}")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in lines if "tok_per_s" in r][1:]  # after the allocator's first steps
    return {"peak_gib": max(r["peak_mem_gib"] for r in logged),
            "tok_per_s": statistics.median(r["tok_per_s"] for r in logged)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=1, help="GPUs: DDP and FSDP rows when > 1")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per GPU per step")
    parser.add_argument("--steps", type=int, default=30)
    docs.add_doc_options(parser)
    args = parser.parse_args()
    doc = docs.docs_target(parser, args, "bench-memory", default=ROOT / "docs" / "training.md")
    load_before = docs.load_average()
    layouts = [("ddp", False), ("ddp", True)]
    if args.nproc > 1:
        layouts += [("fsdp", False), ("fsdp", True)]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        for parallel, checkpointing in layouts:
            result = run(args.nproc, parallel, checkpointing, args, Path(tmp))
            name = "one process" if args.nproc == 1 else f"{parallel}, {args.nproc} GPUs"
            rows.append([name, "yes" if checkpointing else "no", f"{result['peak_gib']:.1f} GiB",
                         f"{result['tok_per_s']:,.0f}"])
            print(" | ".join(rows[-1]), flush=True)
    import torch

    table = docs.markdown_table(
        ["layout", "activation checkpointing", "peak memory, rank 0", "tokens/s (all GPUs)"],
        rows)
    print(table)
    notes = [f"GPU: {torch.cuda.get_device_name()}; GPT-2-medium shape (24 x 1024, 16 heads, "
             f"block 1024), {args.batch_size} x 1024 tokens per GPU per step, bfloat16, not "
             f"compiled; medians over {args.steps} steps after the first log"]
    docs.publish(doc, "bench-memory", [table], load_before, notes)


if __name__ == "__main__":
    main()
