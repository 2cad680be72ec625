"""Peak host memory of each FSDP process as `gpt train` builds its model, fresh or from a
checkpoint (`init_from`), with sharded loading and before it, for a GPT-2-124M-shaped model
(12 x 768, GPT-2's vocabulary: 124M parameters, ~500 MB in float32).

Each row is `gpt train` itself for one step under torchrun with 2 gloo processes on the CPU,
float32, batch 1 of 256 tokens. "Before" is the `gpt` package of another commit (`--before`,
one that predates sharded loading), extracted with `git archive` and run the same way. Each
process records its peak resident memory (VmHWM of /proc/self/status) when the run's setup
starts (the imports done) and returns (the model built and loaded), and at exit, after the
step and the final checkpoint (whose weights rank 0 gathers whole).

    python scripts/bench_sharded_load.py --before COMMIT [--write-docs]

`--write-docs` writes the bench-sharded-load block of docs/training.md.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from io import BytesIO
from pathlib import Path

import doc_tables as docs

ROOT = Path(__file__).resolve().parents[1]
RANK_MODE = "--rank-of-run"  # how torchrun starts this script in each process
SHAPE = ["model.n_layer=12", "model.n_embd=768", "model.n_head=12", "model.block_size=256",
         "model.dropout=0.0", "data.tokenizer=gpt2", "data.data_dir=data",
         "data.source=corpus.txt", "train.parallel=fsdp", "train.device=cpu",
         "train.dtype=float32", "train.compile=false", "train.batch_size=1",
         "train.grad_accum_steps=2", "train.max_iters=1", "train.eval_interval=100",
         "train.eval_iters=1", "train.log_interval=1", "train.warmup_iters=0",
         "log.wandb=false"]
MiB = 2**20


def peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("no VmHWM in /proc/self/status: this benchmark needs Linux")


def rank_of_run(out: Path, argv: list[str]) -> None:
    """One torchrun process: `gpt argv` (from the `gpt` that PYTHONPATH finds) with its peak
    memory recorded into `out` as setup_run starts (imports done) and returns, and at exit."""
    import gpt.train
    from gpt.cli import main

    record: dict[str, int] = {}
    path = out / f"rank-{os.environ['RANK']}.json"

    def note(when: str) -> None:
        record[when] = peak_rss()
        path.write_text(json.dumps(record))

    setup = gpt.train.setup_run

    def setup_and_note(*args: object, **kwargs: object) -> object:
        note("start")
        run = setup(*args, **kwargs)  # type: ignore[arg-type]
        note("loaded")
        return run

    gpt.train.setup_run = setup_and_note  # type: ignore[assignment]
    atexit.register(note, "exit")
    sys.argv = ["gpt", *argv]
    main()


def extract(commit: str, into: Path) -> Path:
    """The `gpt` package of `commit`, extracted under `into`; the folder to put on PYTHONPATH."""
    try:
        tar = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "gpt"],
                             capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as e:
        why = e.stderr.decode().strip()
        raise SystemExit(f"--before {commit}: git archive failed ({why}); pass a commit of "
                         "this repository") from None
    with tarfile.open(fileobj=BytesIO(tar)) as archive:
        archive.extractall(into, filter="data")
    return into


def run(tree: Path, out: Path, work: Path, extra: list[str]) -> list[dict[str, int]]:
    """`gpt train` for one step in 2 gloo processes; each rank's peaks (bytes)."""
    out.mkdir(parents=True)
    overrides = [*SHAPE, f"train.out_dir={out / 'run'}", *extra]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", __file__, RANK_MODE, str(out), "train",
               "--config", str(ROOT / "configs" / "gpt2_124m.toml")]
    for override in overrides:
        command += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=work, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"gpt train failed:\n{done.stderr[-3000:]}")
    return [json.loads((out / f"rank-{rank}.json").read_text()) for rank in (0, 1)]


def write_corpus(path: Path) -> None:
    """A small corpus, this repository's own sources: the run needs only a few batches."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted((ROOT / "gpt").glob("*.py")))
    path.write_text(text, encoding="utf-8")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == RANK_MODE:
        rank_of_run(Path(sys.argv[2]), sys.argv[3:])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", required=True, metavar="COMMIT",
                        help="a commit before sharded loading, whose gpt gives the 'before' rows")
    docs.add_doc_options(parser)
    args = parser.parse_args()
    doc = docs.docs_target(parser, args, "bench-sharded-load",
                           default=ROOT / "docs" / "training.md")
    load_before = docs.load_average()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sharded-load-") as tmp:
        work = Path(tmp)
        write_corpus(work / "corpus.txt")
        trees = {"before": extract(args.before, work / "before"), "now": ROOT}
        start = work / "now-fresh" / "run"  # the checkpoint init_from starts from
        for start_from, extra in (("fresh", []), ("init_from a checkpoint",
                                                  [f"train.init_from={start}"])):
            for name in ("now", "before"):
                tag = f"{name}-{'fresh' if not extra else 'init_from'}"
                peaks = run(trees[name], work / tag, work, extra)
                rows.append([start_from, "sharded (now)" if name == "now" else "whole, then "
                             "sharded (before)",
                             *(f"{p['start'] / MiB:,.0f} → {p['loaded'] / MiB:,.0f} MiB"
                               for p in peaks),
                             *(f"{p['exit'] / MiB:,.0f} MiB" for p in peaks)])
                print(" | ".join(rows[-1]), flush=True)
    table = docs.markdown_table(
        ["start", "loading", "rank 0, setup", "rank 1, setup", "rank 0, whole run",
         "rank 1, whole run"], rows)
    print(table)
    notes = ["peak resident memory (VmHWM) of each of 2 gloo processes: setup, as the run's "
             "setup starts (imports done) → as it returns (the model built and loaded); whole "
             "run, at exit (one step of batch 1 x 256 tokens, then the final checkpoint, whose "
             "weights rank 0 gathers whole); mapped file pages count too",
             f"GPT-2-124M shape (12 x 768, GPT-2's vocabulary), float32; 'before' is the gpt "
             f"of commit {args.before}"]
    docs.publish(doc, "bench-sharded-load", [table], load_before, notes)


if __name__ == "__main__":
    main()
