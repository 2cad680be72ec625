"""What the stop flag's agreement costs a step under DDP and FSDP: 2 gloo processes on the CPU.

The same runs (`gpt train` under torchrun, one thread a process) train with two protocols,
alternately: `late`, the trainer's own (an all-reduce started after a step, read after the
next: no step waits for it), and `blocking`, the one it replaced (an all-reduce and a host read
after every step, patched into the same tree, so nothing else differs). A step's time is the
trainer's own tokens/s, read from metrics.jsonl windows of --log-interval steps (the first and
last dropped). `--write-docs` writes the table into docs/training.md (or `--docs PATH`).

    python scripts/bench_sync.py [--iters 120] [--repeats 5] [--layouts ddp fsdp]
        [--write-docs [--docs PATH]]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import doc_tables as docs
from fsdp_launches import write_tiny_run

ROOT = Path(__file__).resolve().parents[1]
TRAINING_MD = ROOT / "docs" / "training.md"
PROTOCOLS = ("late", "blocking")
BATCH, BLOCK, ACCUM = 8, 64, 2  # a step: 2 micro-batches (one a process) of 8 x 64 tokens
MODEL = ["model.n_layer=4", "model.n_head=4", "model.n_embd=128", f"model.block_size={BLOCK}",
         f"train.batch_size={BATCH}", f"train.grad_accum_steps={ACCUM}", "model.dropout=0.0"]


def worker(protocol: str, argv: list[str]) -> None:
    """One torchrun process: `gpt train ARGV` with the stop flag agreed by `protocol`."""
    from gpt import parallel
    from gpt.cli import main as gpt_main

    if protocol == "blocking":
        parallel.StopFlag.seen = lambda self, world: world.any(self.signum is not None)
    sys.argv = ["gpt", "train", *argv]
    gpt_main()


def step_times(folder: Path, layout: str, protocol: str, run: int, args: argparse.Namespace
               ) -> list[float]:
    """Seconds a step in each logged window of one run (2 processes)."""
    out = folder / f"{layout}-{protocol}-{run}"
    sets = [*MODEL, f"train.parallel={layout}", f"train.max_iters={args.iters}",
            f"train.log_interval={args.log_interval}", f"train.out_dir={out.name}",
            f"train.eval_interval={args.iters}", f"train.checkpoint_interval={args.iters}",
            "train.eval_iters=1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", str(Path(__file__).resolve()), "--worker", protocol,
               "--config", "tiny.toml", *(x for s in sets for x in ("--set", s))]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                          timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"{layout}/{protocol} run failed (exit {done.returncode}):\n"
                         f"{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [BATCH * BLOCK * ACCUM / r["tok_per_s"] for r in records if "tok_per_s" in r][1:-1]


def summary(times: list[float]) -> tuple[float, float, float]:
    """Median, 25th and 75th percentile, in milliseconds."""
    q1, median, q3 = statistics.quantiles(times, n=4)
    return 1e3 * median, 1e3 * q1, 1e3 * q3


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=120, help="steps a run")
    parser.add_argument("--log-interval", type=int, default=10, help="steps a timed window")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each protocol")
    parser.add_argument("--layouts", nargs="+", choices=["ddp", "fsdp"], default=["ddp", "fsdp"])
    docs.add_doc_options(parser)
    args = parser.parse_args()
    if args.iters < 4 * args.log_interval or args.repeats < 1:
        raise SystemExit("--iters must hold at least 4 windows of --log-interval steps, and "
                         "--repeats must be at least 1")
    doc = docs.docs_target(parser, args, "bench-sync", default=TRAINING_MD)
    load_before = docs.load_average()
    times: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        write_tiny_run(Path(tmp))
        for run in range(args.repeats):
            for layout in args.layouts:
                for protocol in PROTOCOLS if run % 2 == 0 else PROTOCOLS[::-1]:
                    times.setdefault((layout, protocol), []).extend(
                        step_times(Path(tmp), layout, protocol, run, args))
    rows = []
    for layout in args.layouts:
        late, blocking = (summary(times[layout, p])[0] for p in PROTOCOLS)
        for protocol in PROTOCOLS:
            median, q1, q3 = summary(times[layout, protocol])
            rows.append([layout.upper(), protocol, f"{median:.2f}", f"{q1:.2f} - {q3:.2f}",
                         f"{median / blocking:.3f}"])
            print(f"{layout} {protocol:8}: {median:7.2f} ms a step (quartiles {q1:.2f} - "
                  f"{q3:.2f}), {median / blocking:.3f} of blocking")
        print(f"{layout}: late saves {blocking - late:.2f} ms a step")
    print(f"load average: {load_before:.2f} before, {docs.load_average():.2f} after")
    table = docs.markdown_table(
        ["layout", "stop flag", "ms a step (median)", "quartiles", "vs blocking"], rows)
    docs.publish(doc, "bench-sync", [table], load_before, [
        "2 gloo processes on the CPU, one thread each; a 4-layer model of width 128, "
        f"{BATCH} x {BLOCK} tokens a micro-batch, {ACCUM} micro-batches a step",
        f"{args.repeats} alternating runs of {args.iters} steps for each protocol; the windows "
        f"of {args.log_interval} steps after the first, pooled",
    ])


if __name__ == "__main__":
    main()
