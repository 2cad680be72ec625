"""Which tokenizer serves a corpus: characters, GPT-2's BPE, or a BPE learned on the corpus.

For each corpus and tokenizer: bytes per token of the validation split, the time `gpt prepare`
takes to learn the BPE, and the validation bits per byte (`gpt eval` over the whole split: a
tokenizer-independent loss) of the default model (configs/default.toml) trained for the same
wall time. Each model's step count is fitted to `--seconds` from a short timed run of the same
model, so every tokenizer trains for about the same time and through its whole learning-rate
schedule (warmup and cooldown scaled with it). Runs go one at a time, never side by side.

The corpora: the interpreter's library sources (`python-stdlib`, the default run's), and a
non-English text: by default the message translations that ship with Vim (two dozen languages
in Latin, Cyrillic and CJK scripts, from its compiled .mo catalogues, lines shuffled with a fixed
seed so that the validation split, the text's end, holds every language), or `--text PATH`.

    python scripts/bench_tokenizers.py [--seconds 120] [--text PATH] [--write-docs [--docs PATH]]

`--write-docs` writes the tables into docs/data.md.
"""

from __future__ import annotations

import argparse
import gettext
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import doc_tables as docs

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ROOT / "configs" / "default.toml"
TOKENIZERS = ("char", "gpt2", "bpe")
DEFAULT_STEPS, DEFAULT_WARMUP = 640, 50  # configs/default.toml: warmup scales with the steps
CALIBRATION_STEPS = 30
VIM_LANG = Path("/usr/share/vim")


def vim_translations(out: Path) -> Path | None:
    """Every message translation of Vim's .mo catalogues as one UTF-8 text, a line per line of
    translation, shuffled; one catalogue per language (ja, not also ja.euc-jp). None without
    Vim."""
    catalogues = sorted(VIM_LANG.glob("vim*/lang/*/LC_MESSAGES/vim.mo"))
    seen, lines = set(), []
    for path in catalogues:
        language = path.parents[1].name.split(".")[0]
        if language in seen:
            continue
        try:
            with open(path, "rb") as handle:
                catalogue = gettext.GNUTranslations(handle)  # decoded from its own charset
        except UnicodeDecodeError:  # a header gettext cannot read: another variant may do
            continue
        seen.add(language)
        for source, translated in catalogue._catalog.items():  # noqa: SLF001 (no public reader)
            if source and isinstance(translated, str):
                lines.extend(line for line in translated.splitlines() if line.strip())
    if not lines:
        return None
    random.Random(0).shuffle(lines)
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"{out.name}: {len(seen)} languages, {len(lines):,} lines, "
          f"{out.stat().st_size / 1e6:.1f} MB")
    return out


def gpt(*args: str, cwd: Path) -> str:
    """`gpt ARGS` in its own process; its stdout (a failure stops the benchmark, with stderr)."""
    done = subprocess.run([sys.executable, "-m", "gpt", *args], cwd=cwd, capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise SystemExit(f"gpt {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return done.stdout


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def training_seconds(records: list[dict]) -> float:
    """The wall time of the training steps alone, evaluations excluded: each training line's
    tokens since the previous one over its tokens/s (which a pause for evaluation leaves out)."""
    total, previous = 0.0, 0
    for record in records:
        if "tok_per_s" in record:
            total += (record["tokens"] - previous) / record["tok_per_s"]
            previous = record["tokens"]
    return total


def measure(source: str, tokenizer: str, seconds: float, work: Path) -> dict[str, float]:
    """Prepare, time, train for `seconds` and evaluate one tokenizer on one corpus."""
    data = ["--set", f"data.source={source}", "--set", f"data.tokenizer={tokenizer}",
            "--set", f"data.data_dir={work / ('data-' + tokenizer)}"]
    config = ["--config", str(DEFAULT), *data]
    started = time.perf_counter()
    prepared = gpt("prepare", *config, cwd=work)
    prepare_s = time.perf_counter() - started
    learned = re.search(r"learned \d+ ids in ([\d.]+) s", prepared)

    calibration = work / f"calibrate-{tokenizer}"
    gpt("train", *config, "--set", f"train.out_dir={calibration}",
        "--set", f"train.max_iters={CALIBRATION_STEPS}", "--set", "train.log_interval=5",
        "--set", f"train.eval_interval={CALIBRATION_STEPS}", "--set", "train.eval_iters=1",
        "--set", "train.warmup_iters=5", cwd=work)
    rates = [r["tok_per_s"] for r in metrics(calibration) if "tok_per_s" in r][1:]  # past warmup
    tokens_per_step = 32 * 128  # configs/default.toml: batch_size x block_size
    steps = max(20, int(seconds * statistics.median(rates) / tokens_per_step))
    warmup = max(1, round(steps * DEFAULT_WARMUP / DEFAULT_STEPS))

    out_dir = work / f"run-{tokenizer}"
    gpt("train", *config, "--set", f"train.out_dir={out_dir}", "--set", f"train.max_iters={steps}",
        "--set", f"train.warmup_iters={warmup}", "--set", f"train.eval_interval={steps}",
        "--set", f"train.log_interval={max(1, steps // 10)}", cwd=work)
    evaluated = json.loads(gpt("eval", "--checkpoint", str(out_dir), "--json", cwd=work))
    return {
        "bytes_per_token": evaluated["bytes"] / evaluated["tokens"],
        "prepare_s": prepare_s,
        "learn_s": float(learned.group(1)) if learned else float("nan"),
        "steps": steps,
        "train_s": training_seconds(metrics(out_dir)),
        "bits_per_byte": evaluated["bits_per_byte"],
        "val_tokens": evaluated["tokens"],
    }


def table(corpus: str, results: dict[str, dict[str, float]]) -> str:
    rows = []
    for name, r in results.items():
        learn = f"{r['learn_s']:.1f} s" if name == "bpe" else "-"
        rows.append([f"`{name}`", f"{r['bytes_per_token']:.2f}", learn, f"{r['steps']:,}",
                     f"{r['train_s']:.0f} s", f"**{r['bits_per_byte']:.3f}**"])
    header = ["tokenizer", "bytes per token (val)", "learn the BPE", "steps",
              "training time", "val bits per byte"]
    return f"**{corpus}**\n\n" + docs.markdown_table(header, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0,
                        help="training wall time of every model")
    parser.add_argument("--text", type=Path, default=None,
                        help="the non-English UTF-8 text (default: Vim's translations)")
    docs.add_doc_options(parser)
    args = parser.parse_args()
    # beside the learned BPE's description
    doc = docs.docs_target(parser, args, "bench-tokenizers", default=ROOT / "docs" / "data.md")
    load_before = docs.load_average()
    with tempfile.TemporaryDirectory(prefix="bench-tokenizers-") as tmp:
        work = Path(tmp)
        text = args.text.resolve() if args.text else vim_translations(work / "translations.txt")
        if text is None:
            parser.error("no Vim translations on this machine; pass --text PATH")
        corpora = {"python-stdlib": "python-stdlib",
                   ("Vim's translations" if args.text is None else text.name): str(text)}
        tables = []
        for corpus, source in corpora.items():
            results = {}
            for tokenizer in TOKENIZERS:
                folder = work / re.sub(r"\W+", "-", corpus) / tokenizer
                folder.mkdir(parents=True)
                results[tokenizer] = measure(source, tokenizer, args.seconds, folder)
                print(f"{corpus:20s} {tokenizer:5s} " + ", ".join(
                    f"{k} {v:.3f}" for k, v in results[tokenizer].items()), flush=True)
            tables.append(table(corpus, results))
            print(tables[-1])
    notes = [f"each model trained for about {args.seconds:.0f} s of steps (evaluations not "
             f"counted): its step count from a {CALIBRATION_STEPS}-step timed run of the same "
             "model; one run per row"]
    docs.publish(doc, "bench-tokenizers", tables, load_before, notes)


if __name__ == "__main__":
    main()
