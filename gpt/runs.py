"""Run folders read without disturbing them: `gpt runs`' table, and the metrics.jsonl reader that
`gpt plot` draws from.

A run folder is a `[train] out_dir`: it holds metrics.jsonl, ckpt-* folders, or both. Nothing
here writes, and the out_dir lock is only looked at (`lock.holder`), so a trainer that starts
meanwhile is never refused. No torch: listing runs takes a fraction of a second.
"""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt.errors import GPTError
from gpt.fileio import open_regular
from gpt.layout import (
    METRICS,
    STATE,
    is_checkpoint_name,
    list_checkpoints,
    load_state_json,
    read_pointer,
)
from gpt.lock import holder

NUMERIC = ("elapsed_s", "tokens", "lr", "muon_lr", "loss", "train_loss", "val_loss", "tok_per_s",
           "mfu")
SEARCH_DEPTH = 2  # levels below the folder `gpt runs` is given


@dataclass(frozen=True)
class Metrics:
    """A metrics.jsonl as read: its records in file order, and the lines that were not one."""

    path: Path
    records: list[dict[str, Any]]
    bad_lines: list[int]  # 1-based; a last line without its newline (being written) is not one

    def note(self) -> str | None:
        """One line about the skipped lines, or None when every line was a record."""
        if not self.bad_lines:
            return None
        n, first = len(self.bad_lines), self.bad_lines[0]
        lines = f"line {first}" if n == 1 else f"{n} lines (the first: line {first})"
        return f"{self.path}: skipped {lines} that {'is' if n == 1 else 'are'} not a metrics record"


def parse_record(line: str) -> dict[str, Any] | None:
    """One metrics record (an object with an integer `iter`, its known fields numbers), or None."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply for the parser
        return None
    if not isinstance(record, dict):
        return None
    it = record.get("iter")
    if not isinstance(it, int) or isinstance(it, bool) or it < 0:
        return None
    if any(k in record and not _is_number(record[k]) for k in NUMERIC):
        return None
    return record


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _number(value: Any) -> Any:
    """`value` if it is a number, else None (a field a damaged file holds something else in)."""
    return value if _is_number(value) else None


def read_metrics(path: Path) -> Metrics:
    """Every record of a metrics.jsonl, skipping (and counting) lines that are not one.

    A damaged line costs its own points, not the whole file: a crash can cut the last line
    short, and resuming drops such lines too (`MetricsLog`).
    """
    records: list[dict[str, Any]] = []
    bad: list[int] = []
    try:
        with open_regular(path) as raw:
            lines = io.TextIOWrapper(raw, encoding="utf-8", errors="replace")
            for number, line in enumerate(lines, 1):
                record = parse_record(line)
                if record is not None:
                    records.append(record)
                elif line.strip() and line.endswith("\n"):
                    bad.append(number)
    except OSError as e:
        raise GPTError(f"cannot read {path} ({e.strerror}); make it a file you can read") from None
    return Metrics(path, records, bad)


def find_runs(folder: Path, unreadable: list[tuple[Path, str]] | None = None) -> list[Path]:
    """The run folders in `folder` and up to SEARCH_DEPTH levels below it, sorted, named by
    `folder` joined with their path inside it (so they paste into other commands).

    Hidden folders and checkpoints are not searched. A folder below `folder` that cannot be
    read (no permission) is skipped, and added to `unreadable` with the reason.
    """
    try:
        is_folder = folder.is_dir()
        exists = is_folder or folder.exists()
    except OSError as e:  # a folder above it cannot be searched
        raise GPTError(f"cannot read {folder} ({e.strerror}); make it readable, or pass another "
                       "folder") from None
    if not exists:
        raise GPTError(f"{folder} does not exist; pass a folder that holds runs (default: here)")
    if not is_folder:
        raise GPTError(f"{folder} is not a folder; pass the folder that holds run folders")
    found, level = [], [folder]
    for depth in range(SEARCH_DEPTH + 1):
        below = []
        for path in level:
            try:
                run, subfolders = _look_into(path)
            except OSError as e:
                if path == folder:
                    raise GPTError(f"cannot read {folder} ({e.strerror}); make it readable, or "
                                   "pass another folder") from None
                if unreadable is not None:
                    unreadable.append((path, e.strerror or str(e)))
                continue
            if run:
                found.append(path)
            if depth < SEARCH_DEPTH:
                below.extend(subfolders)
        level = below
    return sorted(found, key=lambda p: p.parts)


def _look_into(folder: Path) -> tuple[bool, list[Path]]:
    """Whether `folder` is a run's out_dir (it holds metrics.jsonl or a ckpt-* folder), and the
    folders below it to search; an OSError where it cannot be listed.

    A folder that may be entered but not listed is still a run when metrics.jsonl is there
    (summarize says what it cannot list); nothing below it can be searched.
    """
    try:
        entries = [(p, p.is_dir()) for p in folder.iterdir()]
    except OSError:
        try:
            if (folder / METRICS).is_file():
                return True, []
        except OSError:
            pass
        raise
    folders = [p for p, is_dir in entries if is_dir]
    run = any(is_checkpoint_name(p.name) for p in folders) or (folder / METRICS).is_file()
    below = [p for p in folders if not p.name.startswith(".") and not is_checkpoint_name(p.name)]
    return run, below


@dataclass
class RunSummary:
    """One row of `gpt runs`. Fields that could not be read are None, and `notes` say why."""

    path: Path
    status: str  # running, finished or interrupted
    iteration: int | None = None
    max_iters: int | None = None
    best_val_loss: float | None = None
    tokens: int | None = None
    elapsed_s: float | None = None
    checkpoint: str | None = None  # the folder name of the checkpoint read
    notes: list[str] = field(default_factory=list)


def summarize(path: Path) -> RunSummary:
    """What a run folder says about its run, never raising for a damaged file.

    The counters come from the latest readable checkpoint's state.json (what a resume continues
    from); a run that is training now, or has no checkpoint yet, shows its last metrics record
    where that is newer. The best val loss is the lowest evaluated up to that iteration.
    """
    notes: list[str] = []
    held_by = holder(path)
    name, state = _latest_state(path, notes)
    run = RunSummary(path, "running" if held_by else "interrupted", checkpoint=name, notes=notes)
    if state is not None:
        run.iteration, run.tokens = state["iter"], _number(state.get("tokens"))
        run.elapsed_s = _number(state.get("elapsed_s"))
        run.best_val_loss = _number(state.get("best_val_loss"))
        run.max_iters = state["config"]["train"]["max_iters"]
    records = _metrics_records(run)
    if records and (held_by or state is None) and records[-1]["iter"] >= (run.iteration or 0):
        last = records[-1]
        run.iteration, run.tokens = last["iter"], last.get("tokens")
        run.elapsed_s = last.get("elapsed_s")
    vals = [r["val_loss"] for r in records if "val_loss" in r and r["iter"] <= (run.iteration or 0)]
    if run.best_val_loss is not None:  # also the record a checkpoint keeps
        vals.append(run.best_val_loss)
    run.best_val_loss = min((v for v in vals if _finite(v)), default=None)  # a NaN hides none
    if held_by is None and None not in (run.iteration, run.max_iters):
        run.status = "finished" if run.iteration >= run.max_iters else "interrupted"
    if run.max_iters is not None and run.iteration is not None and run.iteration > run.max_iters:
        run.max_iters = None  # a resumed run raised it, and no checkpoint of it says how far yet
    return run


def _latest_state(path: Path, notes: list[str]) -> tuple[str | None, dict[str, Any] | None]:
    """The newest checkpoint whose state.json reads (the one `latest` names first), skipping
    damaged ones with a note each."""
    pointer = read_pointer(path / "latest")
    try:
        names = [p.name for p in list_checkpoints(path)]
    except OSError as e:
        notes.append(f"cannot list the folder ({e.strerror})")
        return None, None
    if pointer in names:
        names.remove(pointer)
        names.insert(0, pointer)
    for name in names:
        problem, state = _read_state(path / name / STATE)
        if state is not None:
            return name, state
        notes.append(f"{name}/state.json {problem}")
    return None, None


def _read_state(path: Path) -> tuple[str, dict[str, Any] | None]:
    """A checkpoint's state.json with the fields the table shows, or why it cannot be read.

    The weights' hashes are not checked: that reads every byte of every checkpoint, and a
    table needs only the counters.
    """
    try:
        state = load_state_json(path)
    except FileNotFoundError:
        return "is missing (an incomplete checkpoint)", None
    except OSError as e:
        return f"cannot be read ({e.strerror})", None
    except (ValueError, RecursionError):  # not UTF-8 or not JSON; nested too deeply
        return "is damaged (not JSON)", None
    try:
        counters = state["iter"], state["config"]["train"]["max_iters"]
    except (KeyError, TypeError):
        counters = None, None
    if not all(isinstance(n, int) for n in counters):
        return "is damaged (no iter or [train] max_iters)", None
    return "", state


def _metrics_records(run: RunSummary) -> list[dict[str, Any]]:
    """The run's metrics records (none without the file), noting damaged lines."""
    path = run.path / METRICS
    try:
        if not path.is_file():
            return []
    except OSError as e:
        run.notes.append(f"cannot read {METRICS} ({e.strerror})")
        return []
    try:
        metrics = read_metrics(path)
    except GPTError as e:
        run.notes.append(str(e))
        return []
    if (note := metrics.note()) is not None:
        run.notes.append(note.replace(f"{path}: ", f"{METRICS}: "))
    return metrics.records


COLUMNS = ("name", "iters", "best val", "tokens", "wall time", "last checkpoint", "status")
RIGHT = {"iters", "best val", "tokens", "wall time"}  # numbers, aligned on their last digit


def table(runs: list[RunSummary]) -> str:
    """The runs as an aligned text table, one row each, `-` where a figure is unknown."""
    rows = [[str(run.path), _iters(run), _loss(run.best_val_loss), _count(run.tokens),
             _duration(run.elapsed_s), run.checkpoint or "-", run.status] for run in runs]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(COLUMNS)]

    def line(cells: list[str] | tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(w) if name in RIGHT else cell.ljust(w)
            for name, cell, w in zip(COLUMNS, cells, widths, strict=True)
        ).rstrip()

    return "\n".join([line(COLUMNS), *(line(r) for r in rows)])


def _iters(run: RunSummary) -> str:
    if run.iteration is None:
        return "-"
    return f"{run.iteration:,}/{'?' if run.max_iters is None else f'{run.max_iters:,}'}"


def _loss(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.4f}"


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _count(n: float | None) -> str:
    """A token count to three figures: 983, 12.3k, 2.62M, 10.0B (999,950 is 1.00M, not 1000k)."""
    if n is None:
        return "-"
    for unit, scale in (("", 1.0), ("k", 1e3), ("M", 1e6), ("B", 1e9), ("T", 1e12)):
        value = float(f"{n / scale:.3g}")  # rounded first, so that it picks the unit
        if value < 1000 or unit == "T":
            if not unit:
                return f"{n:.0f}"
            return f"{value:.{0 if value >= 100 else 1 if value >= 10 else 2}f}{unit}"
    raise AssertionError("unreachable: T takes every larger count")


def _duration(seconds: float | None) -> str:
    """Wall time in its two largest units: 42s, 2m51s, 1h02m, 3d04h."""
    if seconds is None or not math.isfinite(seconds):
        return "-"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"
