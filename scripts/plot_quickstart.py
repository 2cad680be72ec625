"""Train the README's quick start, plot it and sample from it: writes docs/quickstart.png and the
block of docs/observing.md that shows that figure, the run's figures and the text it wrote.

    python scripts/plot_quickstart.py [--out-dir DIR] [--docs PATH]

It runs the commands a reader would (`gpt train --config configs/default.toml`, `gpt sample`,
`gpt plot`) from the repository root. Without --out-dir the run goes into a temporary folder,
removed afterwards; with one, a run already finished there is plotted and sampled as it is.
Nothing here is a timing to compare, so a busy machine costs only time (about 3 minutes of
training on two free cores), though the wall-time axis shows what the machine gave; where
another program keeps a core busy, `OMP_NUM_THREADS=1` spares torch's threads the wait for it.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import doc_tables as docs

from gpt.config import load_config
from gpt.runs import summarize

CONFIG = "configs/default.toml"
FIGURE = docs.ROOT / "docs" / "quickstart.png"
OBSERVING_MD = docs.ROOT / "docs" / "observing.md"
BLOCK = "quickstart"
WIDTH, HEIGHT = 1000, 600


def gpt(*args: str, capture: bool = False) -> str:
    """Run `python -m gpt ARGS` from the repository root, as a reader would run `gpt ARGS`."""
    result = subprocess.run(
        [sys.executable, "-m", "gpt", *args], cwd=docs.ROOT, check=False, text=True,
        stdout=subprocess.PIPE if capture else None,
    )
    if result.returncode:
        raise SystemExit(f"gpt {' '.join(args)} failed with exit code {result.returncode}")
    return result.stdout if capture else ""


def block(out_dir: Path, doc: Path, sample: str, load_before: float) -> str:
    """The Markdown between the markers: the figure, what the run reached, the sample."""
    run = summarize(out_dir)
    if run.status != "finished":
        raise SystemExit(f"{out_dir} is {run.status}, not finished; train it to the end first")
    figure = os.path.relpath(FIGURE, doc.parent)
    settings = load_config(docs.ROOT / CONFIG).sample
    fence = "````" if "```" in sample else "```"
    return "\n".join([
        f"![Loss by iteration and by wall time, and the learning rate, of the quick start's "
        f"run]({figure})",
        "",
        f"`gpt train --config {CONFIG}`: {run.iteration:,} iterations, {run.tokens:,} tokens "
        f"in {run.elapsed_s / 60:.1f} minutes, best validation loss {run.best_val_loss:.4f}. "
        f"`gpt sample` then wrote (with the config's `[sample]`: "
        f"prompt `{settings.prompt!r}`, temperature {settings.temperature}, top-k "
        f"{settings.top_k}, seed {settings.seed}):",
        "",
        f"{fence}text",
        sample.rstrip(),
        fence,
        "",
        docs.host_markdown(load_before, [
            f"`gpt plot RUN --out {FIGURE.relative_to(docs.ROOT)} --width {WIDTH} "
            f"--height {HEIGHT}` drew the figure",
        ]),
    ])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out-dir", type=Path, default=None,
        help="train into (or reuse a finished run in) this folder, relative to the repository "
        "root; default: a temporary folder",
    )
    parser.add_argument(
        "--docs", type=Path, default=OBSERVING_MD, metavar="PATH",
        help=f"Markdown file holding the block (default: {OBSERVING_MD.relative_to(docs.ROOT)})",
    )
    args = parser.parse_args()
    problem = docs.marker_problem(args.docs, BLOCK)
    if problem is not None:
        parser.error(problem)
    load_before = docs.load_average()
    with tempfile.TemporaryDirectory(prefix="quickstart-") as tmp:
        out_dir = (docs.ROOT / args.out_dir) if args.out_dir else Path(tmp) / "default"
        gpt("train", "--config", CONFIG, "--set", f"train.out_dir={out_dir}")
        sample = gpt("sample", "--checkpoint", str(out_dir), "--no-stream", capture=True)
        text = block(out_dir, args.docs, sample, load_before)  # names the commit: before writing
        gpt("plot", str(out_dir), "--out", str(FIGURE), "--width", str(WIDTH),
            "--height", str(HEIGHT))
        docs.write_block(args.docs, BLOCK, text)
    print(f"wrote {FIGURE} and the {BLOCK} block of {args.docs}")


if __name__ == "__main__":
    main()
