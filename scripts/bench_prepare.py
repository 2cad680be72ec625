"""Benchmark `gpt prepare`: throughput and peak memory against single-threaded tiktoken.

Builds a corpus of the standard library's sources repeated `--copies` times, then, in one
process and alternating, times
  - reference: tiktoken's `encode_ordinary` on every document, one thread;
  - gpt prepare: the whole pipeline (read, split, encode in worker processes, write, hash);
and prints the medians and their ratio. Peak memory is measured in child processes that run
`prepare` on 1x and on `--copies`x the corpus, to show it does not grow with the corpus.
A pure-Python busy loop run once alone and then twice in parallel processes shows how much of a
second core the machine actually gave (on a shared host, less than 2x), to read the ratio by.
`--write-docs` puts the table into docs/performance.md (or `--docs PATH`).

    python scripts/bench_prepare.py [--copies 5] [--runs 5] [--write-docs [--docs PATH]]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import doc_tables as docs

from gpt.config import DataConfig
from gpt.data.prepare import prepare
from gpt.data.sources import stdlib_files
from gpt.tokenizer import get_tokenizer


def build_corpus(root: Path, copies: int) -> tuple[Path, int]:
    """A folder with `copies` copies of the stdlib's .py files renamed .txt; returns its bytes."""
    files = stdlib_files()
    total = 0
    for c in range(copies):
        for i, f in enumerate(files):
            target = root / f"copy{c}" / f"{i:05d}_{f.stem}.txt"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, target)
            total += target.stat().st_size
    return root, total


def reference_seconds(folder: Path) -> tuple[float, int]:
    """Single-threaded tiktoken over every document (text already read, as prepare reads too)."""
    enc = get_tokenizer("gpt2").encoding
    start = time.perf_counter()
    tokens = 0
    for path in sorted(folder.rglob("*.txt")):
        text = path.read_text(encoding="utf-8")
        if text:  # prepare skips empty documents too
            tokens += len(enc.encode_ordinary(text)) + 1
    return time.perf_counter() - start, tokens


def prepare_seconds(folder: Path, out: Path) -> tuple[float, int]:
    cfg = DataConfig(source=str(folder), data_dir=str(out), glob="**/*.txt")
    start = time.perf_counter()
    meta = prepare(cfg, force=True, progress=False)
    return time.perf_counter() - start, sum(meta["tokens"].values())


def _busy(n: int) -> int:
    total = 0
    for i in range(n):
        total += i
    return total


def core_scaling(n: int = 10_000_000) -> float:
    """Throughput of two busy processes over one: 2.0 when two cores are really free."""
    import multiprocessing

    start = time.perf_counter()
    _busy(n)
    alone = time.perf_counter() - start
    with multiprocessing.get_context("fork").Pool(2) as pool:
        start = time.perf_counter()
        pool.map(_busy, [n, n])
        together = time.perf_counter() - start
    return 2 * alone / together


def peak_rss_mb(folder: Path, out: Path) -> tuple[float, float]:
    """Peak resident memory (MB) of a fresh process that prepares `folder`, and of its largest
    worker process."""
    code = (
        "import resource, sys\n"
        "from gpt.config import DataConfig\nfrom gpt.data.prepare import prepare\n"
        f"prepare(DataConfig(source={str(folder)!r}, data_dir={str(out)!r}), force=True, "
        "progress=False)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,"
        " resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    )
    cmd = [sys.executable, "-c", code]
    result = subprocess.run(cmd, capture_output=True, text=True, check=True)
    main_kb, worker_kb = result.stdout.strip().splitlines()[-1].split()
    return int(main_kb) / 1024, int(worker_kb) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5)
    docs.add_doc_options(parser)
    args = parser.parse_args()
    doc = docs.docs_target(parser, args, "bench-prepare")
    load_before = docs.load_average()
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        small, small_bytes = build_corpus(tmp_path / "small", 1)
        big, big_bytes = build_corpus(tmp_path / "big", args.copies)
        print(f"corpus: {big_bytes / 1e6:.1f} MB ({args.copies} copies of the stdlib sources)")
        ref_times, ours_times, scaling = [], [], []
        for _ in range(args.runs):
            scaling.append(core_scaling())
            seconds, ref_tokens = reference_seconds(big)
            ref_times.append(seconds)
            seconds, our_tokens = prepare_seconds(big, tmp_path / "out")
            ours_times.append(seconds)
        assert ref_tokens == our_tokens, (ref_tokens, our_tokens)
        ref, ours = statistics.median(ref_times), statistics.median(ours_times)
        mb = big_bytes / 1e6
        rows = []
        for label, seconds in (
            ("tiktoken encode_ordinary, 1 thread", ref),
            ("gpt prepare (read+encode+write)  ", ours),
        ):
            print(
                f"{label}: {mb / seconds:6.1f} MB/s  {our_tokens / seconds / 1e6:5.2f} M tokens/s"
                f"  (median of {args.runs}: {seconds:.2f} s)"
            )
            rows.append([
                f"{mb / seconds:.1f}", f"{our_tokens / seconds / 1e6:.2f}", f"{seconds:.2f}",
                f"{ref / seconds:.2f}x",
            ])
        core_ratio = statistics.median(scaling)
        print(f"speed-up over the single-thread rate: {ref / ours:.2f}x "
              f"(two busy processes ran {core_ratio:.2f}x one)")
        rss_small = peak_rss_mb(small, tmp_path / "rss_small")
        rss_big = peak_rss_mb(big, tmp_path / "rss_big")
        memory_rows = []
        for text_bytes, (main_mb, worker_mb) in ((small_bytes, rss_small), (big_bytes, rss_big)):
            print(f"peak memory for {text_bytes / 1e6:3.0f} MB of text: main process "
                  f"{main_mb:.0f} MB, largest worker {worker_mb:.0f} MB")
            memory_rows.append(
                [f"{text_bytes / 1e6:.1f}", f"{main_mb:.0f}", f"{worker_mb:.0f}"]
            )
    speed = docs.markdown_table(
        ["run", "MB/s", "M tokens/s", "median seconds", "vs reference"],
        [["tiktoken `encode_ordinary`, one thread (reference)", *rows[0]],
         ["`gpt prepare` (read, split, encode, write, hash)", *rows[1]]],
    )
    memory = docs.markdown_table(
        ["MB of text", "peak MB, main process", "peak MB, largest worker"], memory_rows
    )
    docs.publish(doc, "bench-prepare", [speed, memory], load_before, [
        f"corpus: {mb:.1f} MB, {args.copies}x the standard library's sources, "
        f"GPT-2 BPE, {our_tokens:,} tokens; medians of {args.runs} alternating runs",
        f"two busy processes ran {core_ratio:.2f}x one (2.00: two cores were free)",
    ])


if __name__ == "__main__":
    main()
