"""`gpt train` against nanoGPT's CPU example, side by side on one machine, same data and split.

Three contenders, run in turn (A B C, A B C, ...) so that a slow spell of the machine hits each:

- nanoGPT: its `train.py` with the character-level CPU example's flags (4 layers, 128 wide,
  block 64, batch 12, 2000 steps, 20 evaluation batches);
- gpt, same: `gpt train` on the identical model and hyperparameters (LayerNorm, exact GELU, learned
  positions, no bias, tied head, unpadded vocabulary, AdamW as nanoGPT configures it, float32);
- gpt, fast: `gpt train --config configs/fast_char.toml` (or `--fast-config`), on the same data.

Both tools read the same token ids: the text is prepared once by `gpt prepare` (characters, first
90% train, last 10% validation) and the two token files are written again in nanoGPT's layout.
Printed: ms per step and tokens/s (medians of each run's per-step times), the wall time from
launch to each tool's last evaluation, the wall time at which the fast config's validation loss
first reaches nanoGPT's final one, and the ratios, as medians with their spread (min-max).

    python scripts/bench_vs_nanogpt.py --nanogpt-dir DIR [--text FILE | --text python-stdlib]
        [--runs 3] [--iters 2000] [--fast-config configs/fast_char.toml] [--work DIR]
        [--ablation] [--write-docs [--docs PATH]]

`--ablation` runs the fast config alone, and again with each of its choices undone (or one it
leaves out added) in turn, to show what each buys (`ABLATION`); it needs no nanoGPT.

`--nanogpt-dir` (or the NANOGPT_DIR variable) is a checkout of github.com/karpathy/nanoGPT.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import doc_tables as docs
import numpy as np

from gpt.config import DataConfig
from gpt.data.prepare import prepare
from gpt.data.prepared import PreparedData
from gpt.data.sources import open_source

ROOT = Path(__file__).resolve().parent.parent
BATCH, BLOCK, EVAL_ITERS, EVAL_INTERVAL = 12, 64, 20, 250
NANOGPT_FLAGS = [  # the CPU example of nanoGPT's README, on the data this script writes
    "--device=cpu", "--compile=False", f"--eval_iters={EVAL_ITERS}", "--log_interval=1",
    f"--block_size={BLOCK}", f"--batch_size={BATCH}", "--n_layer=4", "--n_head=4",
    "--n_embd=128", "--dropout=0.0",
]
# The same run for `gpt train`: train_shakespeare_char.py's values under those flags.
SAME_CONFIG = """\
[model]
block_size = {block}
n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0
bias = false
activation = "gelu"
vocab_size = {vocab}
padded_vocab_size = {vocab}

[data]
source = "{text}"
tokenizer = "char"
data_dir = "{data_dir}"

[train]
batch_size = {batch}
max_iters = {iters}
lr_decay_iters = {iters}
learning_rate = 1e-3
min_lr = 1e-4
warmup_iters = 100
beta1 = 0.9
beta2 = 0.99
weight_decay = 0.1
grad_clip = 1.0
eval_interval = {eval_interval}
eval_iters = {eval_iters}
log_interval = 1
device = "cpu"
dtype = "float32"
"""
NANO_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)")
NANO_STEP = re.compile(r"^iter (\d+): loss [\d.]+, time ([\d.]+)ms")
GPT_EVAL = re.compile(r"iter (\d+): train loss ([\d.]+), val loss ([\d.]+)")


@dataclass
class Result:
    """One run of one contender: evaluations stamped with the seconds since launch."""

    evals: list[tuple[float, int, float]] = field(default_factory=list)  # (seconds, step, val)
    step_ms: float = 0.0  # median milliseconds per training step
    tokens_per_step: int = BATCH * BLOCK

    @property
    def final_val(self) -> float:
        return self.evals[-1][2]

    @property
    def wall(self) -> float:
        """Seconds from launch to the last evaluation."""
        return self.evals[-1][0]

    def time_to(self, target: float) -> float | None:
        """Seconds from launch to the first evaluation at or below `target`, if any."""
        return next((t for t, _, val in self.evals if val <= target), None)


def launch(command: list[str], cwd: Path, log: Path, pattern: re.Pattern[str]) -> tuple[
    list[tuple[float, int, float]], list[str]
]:
    """Run `command`, stamping each evaluation line its output matches as it arrives."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    evals, lines = [], []
    with subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True) as process, log.open("w") as out:
        assert process.stdout is not None
        for line in process.stdout:  # tqdm's carriage returns split no evaluation line
            out.write(line)
            for piece in line.split("\r"):
                lines.append(piece)
                if match := pattern.search(piece):
                    evals.append((time.perf_counter() - started, int(match[1]), float(match[3])))
    if process.returncode != 0 or not evals:
        sys.exit(f"{shlex.join(command)} failed (exit {process.returncode}); see {log}")
    return evals, lines


def run_nanogpt(nanogpt: Path, data: Path, out: Path, *, iters: int) -> Result:
    command = [sys.executable, str(nanogpt / "train.py"),
               str(nanogpt / "config" / "train_shakespeare_char.py"), *NANOGPT_FLAGS,
               f"--max_iters={iters}", f"--lr_decay_iters={iters}",
               f"--dataset={data}", f"--out_dir={out}"]
    evals, lines = launch(command, nanogpt, out.with_suffix(".log"), NANO_EVAL)
    times = [float(m[2]) for line in lines if (m := NANO_STEP.match(line))]
    return Result(evals, statistics.median(times[1:]))


def run_gpt(config: Path, out: Path, *, overrides: list[str]) -> Result:
    command = [sys.executable, "-m", "gpt", "train", "--config", str(config),
               "--set", f"train.out_dir={out}", *(a for o in overrides for a in ("--set", o))]
    evals, _ = launch(command, ROOT, out.with_suffix(".log"), GPT_EVAL)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tok_per_s"] for r in records if "tok_per_s" in r][1:]  # the first one warms up
    steps = [r for r in records if "tokens" in r and r["iter"] > 0]
    tokens_per_step = steps[0]["tokens"] // steps[0]["iter"]
    return Result(evals, 1000 * tokens_per_step / statistics.median(rates), tokens_per_step)


def text_file(spec: str, work: Path) -> Path:
    """The text to train on: a file, or `python-stdlib` written out as one file."""
    if spec != "python-stdlib":
        path = Path(spec).resolve()
        if not path.is_file():
            sys.exit(f"--text {spec}: no such file; give a UTF-8 text file or python-stdlib")
        return path
    path = work / "python-stdlib.txt"
    text = "\n".join(open_source(DataConfig(source="python-stdlib")).documents())
    if not path.is_file() or path.read_text(encoding="utf-8") != text:  # kept: data stays valid
        path.write_text(text, encoding="utf-8")
    return path


def prepare_both(text: Path, work: Path) -> tuple[Path, Path, int]:
    """gpt's data folder and nanoGPT's (the same ids as uint16, with its meta.pkl)."""
    gpt_data, nano_data = work / "gpt-data", work / "nanogpt-data"
    prepare(DataConfig(source=str(text), tokenizer="char", data_dir=str(gpt_data)),
            progress=False, block_size=BLOCK)
    prepared = PreparedData(gpt_data)
    if prepared.vocab_size > np.iinfo(np.uint16).max:
        sys.exit(f"{text} has {prepared.vocab_size} distinct characters; nanoGPT's files hold "
                 "at most 65535 ids")
    nano_data.mkdir(exist_ok=True)
    for split in ("train", "val"):
        np.asarray(prepared.tokens(split), dtype=np.uint16).tofile(nano_data / f"{split}.bin")
    with (nano_data / "meta.pkl").open("wb") as f:  # nanoGPT's own format, read by nanoGPT only
        pickle.dump({"vocab_size": prepared.vocab_size}, f)
    return gpt_data, nano_data, prepared.vocab_size


def spread(values: list[float], fmt: str) -> str:
    return f"{format(statistics.median(values), fmt)} ({format(min(values), fmt)}-" \
           f"{format(max(values), fmt)})"


# Each row of --ablation undoes one choice of the fast config, or adds one it leaves out, to
# show what that choice buys.
ABLATION = [
    ("fast config", []),
    ("AdamW instead of Muon", ["train.optimizer=adamw"]),
    ("cosine decay instead of warmup-stable-decay", ["train.lr_schedule=cosine",
                                                     "train.min_lr=3e-4"]),
    ("tied head", ["model.tie_embeddings=true"]),
    ("no QK-norm", ["model.qk_norm=false"]),
    ("nanoGPT's size (4 layers, MLP 512 wide)", ["model.n_layer=4", "model.mlp_hidden=512"]),
    ("adding ReLU² (left out)", ['model.activation="relu2"']),
    ("adding zero-initialised output projections (left out)", ["model.zero_init_proj=true"]),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nanogpt-dir", type=Path, default=os.environ.get("NANOGPT_DIR"))
    parser.add_argument("--text", default="python-stdlib")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--iters", type=int, default=2000)
    parser.add_argument("--fast-config", type=Path, default=ROOT / "configs" / "fast_char.toml")
    parser.add_argument("--ablation", action="store_true",
                        help="run the fast config with each of its choices undone in turn")
    parser.add_argument("--work", type=Path, help="keep data, logs and runs here (default: temp)")
    docs.add_doc_options(parser)
    args = parser.parse_args()
    doc = docs.docs_target(parser, args, "bench-ablation" if args.ablation else "bench-nanogpt")
    if not args.ablation and (args.nanogpt_dir is None
                              or not (args.nanogpt_dir / "train.py").is_file()):
        parser.error("--nanogpt-dir (or NANOGPT_DIR) must be a nanoGPT checkout with train.py")
    if not args.fast_config.is_file():
        parser.error(f"--fast-config {args.fast_config}: no such file")
    load_before = docs.load_average()
    work = (args.work or Path(tempfile.mkdtemp(prefix="bench-nanogpt-"))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    text = text_file(args.text, work)
    gpt_data, nano_data, vocab = prepare_both(text, work)
    print(f"text: {text} ({text.stat().st_size:,} bytes, {vocab} characters); work: {work}")
    fast = [f"data.source={text}", f"data.data_dir={gpt_data}", "data.tokenizer=char",
            f"train.eval_iters={EVAL_ITERS}", "train.device=cpu"]
    notes = [f"text: `{args.text}` ({text.stat().st_size:,} bytes, {vocab} characters), first "
             "90% train, last 10% validation",
             f"{args.runs} runs of each, alternating; medians (min-max)",
             f"fast config: `{display(args.fast_config)}`"]
    if args.ablation:
        runners = {label: partial(run_gpt, args.fast_config.resolve(), overrides=fast + extra)
                   for label, extra in ABLATION}
        tables = ablation_tables(run_all(runners, work, args.runs))
    else:
        same = work / "same.toml"
        same.write_text(SAME_CONFIG.format(
            block=BLOCK, vocab=vocab, text=text, data_dir=gpt_data, batch=BATCH,
            iters=args.iters, eval_interval=EVAL_INTERVAL, eval_iters=EVAL_ITERS))
        runners = {
            "nanoGPT": partial(run_nanogpt, args.nanogpt_dir.resolve(), nano_data,
                               iters=args.iters),
            "gpt, same": partial(run_gpt, same, overrides=[]),
            "gpt, fast": partial(run_gpt, args.fast_config.resolve(), overrides=fast),
        }
        tables = comparison_tables(run_all(runners, work, args.runs))
        notes[1] += "; target: nanoGPT's median final validation loss; the same ids for both"
    print("\n\n".join(tables))
    docs.publish(doc, "bench-ablation" if args.ablation else "bench-nanogpt", tables,
                 load_before, notes)


def display(path: Path) -> str:
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def run_all(runners: dict[str, Callable[[Path], Result]], work: Path,
            runs: int) -> dict[str, list[Result]]:
    """Every runner `runs` times, in turn (A B C, A B C, ...)."""
    results: dict[str, list[Result]] = {name: [] for name in runners}
    for r in range(runs):
        for name, run in runners.items():
            out = work / f"{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            result = run(out)
            results[name].append(result)
            print(f"run {r + 1}/{runs} {name}: {result.step_ms:6.1f} ms/step, final val "
                  f"{result.final_val:.4f} at {result.wall:5.1f} s", flush=True)
    return results


def comparison_tables(results: dict[str, list[Result]]) -> list[str]:
    """The three tools' figures, and the two ratios the speed goals are about."""
    target = statistics.median(r.final_val for r in results["nanoGPT"])
    rows = []
    for name, runs in results.items():
        reached = [r.time_to(target) for r in runs]
        rows.append([
            name, spread([r.step_ms for r in runs], ".1f"),
            spread([1000 * r.tokens_per_step / r.step_ms for r in runs], ",.0f"),
            spread([r.final_val for r in runs], ".4f"), spread([r.wall for r in runs], ".1f"),
            spread([t for t in reached if t is not None], ".1f") if None not in reached
            else f"not reached in {sum(t is None for t in reached)} of {len(runs)} runs",
        ])
    nano, same, fast = results["nanoGPT"], results["gpt, same"], results["gpt, fast"]
    speed = [n.step_ms / s.step_ms * s.tokens_per_step / n.tokens_per_step
             for n, s in zip(nano, same, strict=True)]  # run by run: the same spell of machine
    ratios = [f"tokens/s, gpt (same run) / nanoGPT: {spread(speed, '.2f')}",
              "final val loss, gpt (same run) - nanoGPT: " + spread(
                  [s.final_val - n.final_val for n, s in zip(nano, same, strict=True)], "+.4f")]
    fast_times = [f.time_to(target) for f in fast]
    if None in fast_times:
        ratios.append("the fast config did not reach nanoGPT's final val loss in every run")
    else:
        share = [t / n.wall for t, n in zip(fast_times, nano, strict=True)]  # type: ignore
        ratios.append("wall time to nanoGPT's final val loss, gpt (fast) / nanoGPT's: "
                      f"{spread(share, '.2f')}")
    header = ["run", "ms/step", "tokens/s", "final val loss", "wall s (launch to last eval)",
              f"wall s to val <= {target:.4f}"]
    return [docs.markdown_table(header, rows), "\n".join(f"- {r}" for r in ratios)]


def ablation_tables(results: dict[str, list[Result]]) -> list[str]:
    """Each undone choice: its final val loss and wall time beside the fast config's."""
    base = results["fast config"]
    rows = []
    for name, runs in results.items():
        loss_change = [r.final_val - b.final_val for r, b in zip(runs, base, strict=True)]
        rows.append([
            name, spread([r.final_val for r in runs], ".4f"),
            "" if runs is base else spread(loss_change, "+.4f"),
            spread([1000 * r.tokens_per_step / r.step_ms for r in runs], ",.0f"),
            spread([r.wall for r in runs], ".1f"),
        ])
    header = ["run", "final val loss", "vs fast config", "tokens/s", "wall s"]
    return [docs.markdown_table(header, rows)]


if __name__ == "__main__":
    main()
