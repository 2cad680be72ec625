"""Generated Markdown in the docs: the one writer every script in scripts/ uses for its table.

A block in a Markdown file is everything between `<!-- NAME:start -->` and `<!-- NAME:end -->`;
`write_block` replaces it and leaves the rest of the file as it is, so prose around a table is
written by hand and the table itself only by the script that produced it. The benchmarks add
`--write-docs` and `--docs PATH` (`add_doc_options`) and describe the host a table was measured
on (`host_markdown`), since a figure read without its host says little.

This is a helper module, not a script: the scripts import it from their own folder.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PERFORMANCE_MD = ROOT / "docs" / "performance.md"


def markers(name: str) -> tuple[str, str]:
    """The start and end comments that delimit block `name`."""
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def marker_problem(doc: Path, name: str) -> str | None:
    """Why block `name` of `doc` cannot be written (unreadable, markers missing, repeated or out
    of order), or None when it can."""
    start, end = markers(name)
    try:
        text = doc.read_text(encoding="utf-8")
    except OSError as e:
        return f"cannot read {doc}: {e}"
    if text.count(start) != 1 or text.count(end) != 1 or text.index(start) > text.index(end):
        return f"{doc} needs exactly one {start} followed by one {end}"
    return None


def write_block(doc: Path, name: str, markdown: str) -> None:
    """Replace block `name` of the Markdown file `doc` with `markdown`; a file without the
    block's markers exits with a one-line message naming them."""
    problem = marker_problem(doc, name)
    if problem is not None:
        raise SystemExit(problem)
    start, end = markers(name)
    text = doc.read_text(encoding="utf-8")
    block = f"{start}\n{markdown.strip()}\n{end}"
    pattern = re.escape(start) + ".*?" + re.escape(end)
    doc.write_text(re.sub(pattern, lambda _: block, text, flags=re.S), encoding="utf-8")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table; `|` inside a cell is escaped."""

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(header), line(["---"] * len(header)), *(line(r) for r in rows)])


def add_doc_options(parser: argparse.ArgumentParser) -> None:
    """`--write-docs` and `--docs PATH`, shared by the benchmarks."""
    parser.add_argument(
        "--write-docs", action="store_true",
        help="write the result table into --docs (run on a quiet machine: the table is what "
        "readers will see)",
    )
    parser.add_argument(
        "--docs", type=Path, default=None, metavar="PATH",
        help=f"Markdown file holding the block (default: {PERFORMANCE_MD.relative_to(ROOT)}); "
        "needs --write-docs",
    )


def docs_target(
    parser: argparse.ArgumentParser, args: argparse.Namespace, name: str,
    default: Path = PERFORMANCE_MD,
) -> Path | None:
    """The file to write block `name` into (--docs, else `default`), or None without
    --write-docs. Checked before any measurement, so a long run cannot end on a missing
    marker."""
    if args.docs is not None and not args.write_docs:
        parser.error("--docs names where --write-docs writes; add --write-docs")
    if not args.write_docs:
        return None
    doc = args.docs if args.docs is not None else default
    problem = marker_problem(doc, name)
    if problem is not None:
        parser.error(problem)
    return doc


def load_average() -> float:
    """The 1-minute load average (0.0 where the OS has none)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, check=True,
        )
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def host_markdown(load_before: float, notes: list[str] | None = None) -> str:
    """A list describing where and how a table was measured: CPU, cores this process may use,
    torch threads, load average before and after, versions, commit, date, command line."""
    import torch

    from gpt.peak import cpu_name

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    lines = [
        f"- CPU: {cpu_name()}; {cores} cores available to the process, "
        f"{torch.get_num_threads()} torch threads",
        f"- load average (1 min): {load_before:.2f} before, {load_average():.2f} after "
        "(other processes slow every row)",
        *(f"- {note}" for note in notes or []),
        f"- torch {torch.__version__}, Python {platform.python_version()}, "
        f"commit {_commit()}, {datetime.date.today().isoformat()}",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
    ]
    return "\n".join(lines)


def publish(doc: Path | None, name: str, tables: list[str], load_before: float,
            notes: list[str]) -> None:
    """Write `tables` and the host's description into block `name` of `doc` (None: nothing)."""
    if doc is None:
        return
    write_block(doc, name, "\n\n".join([*tables, host_markdown(load_before, notes)]))
    print(f"wrote the table into {doc}")
