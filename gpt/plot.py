"""`gpt plot`: the loss and learning-rate curves of one or more runs, from their metrics.jsonl.

matplotlib is an optional extra (`pip install -e ".[plot]"`), imported only when a figure is
drawn, and drawn without pyplot or a display: a `Figure` on the Agg canvas, so nothing global
changes in a process that imports `gpt`.

What is drawn, per run, in one colour: the training loss (the logged step's, every
`log_interval` steps, solid) and the validation loss (every `eval_interval` steps, dashed)
against the iteration and against the run's wall time, and the learning rate against the
iteration (AdamW's, solid, and on a Muon run Muon's, dotted: metrics written before Muon's rate
was recorded hold AdamW's alone). An iteration that appears more than once in a file (files
joined by hand; `gpt train` itself drops the lines past the checkpoint it resumes from) is
drawn with its last line, as a resumed run overwrites the steps it redoes.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gpt.errors import GPTError
from gpt.fileio import write_atomic
from gpt.layout import METRICS
from gpt.runs import read_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100  # --width and --height are pixels: inches times this
DEFAULT_WIDTH, DEFAULT_HEIGHT = 1000, 600
MIN_PIXELS, MAX_PIXELS = 300, 10_000
FORMATS = (".png", ".svg", ".pdf")  # what --out may end in; the size is exact in pixels for PNG
INSTALL = 'pip install matplotlib (or pip install -e ".[plot]" in a clone of gpt)'
TRAIN_STYLE: dict[str, Any] = {"ls": "-", "lw": 1.3}
VAL_STYLE: dict[str, Any] = {"ls": "--", "lw": 1.3, "marker": "o", "ms": 3}  # evaluations are few
# the learning rate of each optimizer: (its metrics key, its name, its line style)
RATES = (("lr", "AdamW (learning_rate)", "-"), ("muon_lr", "Muon (muon_lr)", ":"))


@dataclass(frozen=True)
class Curve:
    """One series of a run, sorted by iteration, with the wall time at each point."""

    iters: list[int]
    seconds: list[float]  # elapsed_s of the run at each point (nan where a line lacks it)
    values: list[float]

    def __bool__(self) -> bool:
        return bool(self.iters)


@dataclass(frozen=True)
class RunCurves:
    """What `gpt plot` draws of one run folder."""

    label: str
    train: Curve  # the logged step's loss
    val: Curve
    lr: Curve  # AdamW's rate
    muon_lr: Curve  # Muon's rate (a Muon run's, once recorded); no points otherwise


def curve(records: list[dict[str, Any]], key: str) -> Curve:
    """The records holding `key`, the last one of each iteration, in iteration order."""
    points: dict[int, tuple[float, float]] = {}
    for r in records:
        if key in r:
            points[r["iter"]] = (r.get("elapsed_s", math.nan), r[key])
    iters = sorted(points)
    return Curve(iters, [points[i][0] for i in iters], [points[i][1] for i in iters])


def load_runs(run_dirs: list[Path]) -> tuple[list[RunCurves], list[str]]:
    """Each run folder's curves, labelled with its name (its path where two names clash), and
    notes about lines skipped. A folder without metrics, or with no record in them, is an
    error naming it."""
    if not run_dirs:
        raise GPTError("no run folder given; pass one or more out_dirs: gpt plot out/default ...")
    if len({p.resolve() for p in run_dirs}) < len(run_dirs):
        raise GPTError("a run folder is given twice; pass each run once")
    names = [p.resolve().name for p in run_dirs]
    runs, notes = [], []
    for path, name in zip(run_dirs, names, strict=True):
        try:
            is_dir, exists = path.is_dir(), path.exists()
            has_metrics = is_dir and os.path.lexists(path / METRICS)  # a FIFO is refused when read
        except OSError as e:  # it, or a folder above it, cannot be read
            raise GPTError(f"cannot read {path} ({e.strerror}); make it readable, or pass "
                           "another run folder") from None
        if not is_dir:
            problem = "does not exist" if not exists else "is not a folder"
            raise GPTError(f"{path} {problem}; pass a run's out_dir, which holds {METRICS}")
        if not has_metrics:
            raise GPTError(f"{path} holds no {METRICS}; pass a run's out_dir (gpt train writes "
                           f"{METRICS} there from its first step)")
        metrics = read_metrics(path / METRICS)
        if (note := metrics.note()) is not None:
            notes.append(note)
        if not metrics.records:
            raise GPTError(f"{path / METRICS} holds no metrics record; plot the run once "
                           f"gpt train has logged a step")
        records = metrics.records
        label = name if names.count(name) == 1 else str(path)
        runs.append(RunCurves(label, curve(records, "loss"), curve(records, "val_loss"),
                              *(curve(records, key) for key, _, _ in RATES)))
    return runs, notes


def check_output(out: Path, width: int, height: int) -> None:
    """Refuse, before any reading or drawing, an --out or size that cannot be written."""
    if out.suffix.lower() not in FORMATS:
        raise GPTError(f"--out {out}: unknown image format {out.suffix or '(no suffix)'!r}; end "
                       f"it in {', '.join(FORMATS)}")
    if out.is_dir():
        raise GPTError(f"--out {out} is a folder; name the image file to write")
    if not out.parent.is_dir():
        problem = "does not exist" if not out.parent.exists() else "is not a folder"
        raise GPTError(f"--out {out}: {out.parent} {problem}; write into an existing folder")
    for option, pixels in (("--width", width), ("--height", height)):
        if not MIN_PIXELS <= pixels <= MAX_PIXELS:
            raise GPTError(f"{option} {pixels} is out of range; give {MIN_PIXELS} to "
                           f"{MAX_PIXELS} pixels")


def _matplotlib() -> tuple[Any, Any, Any]:
    """matplotlib's Figure, Agg canvas and colormaps, or the command that installs them."""
    try:
        import matplotlib  # noqa: F401  (the package itself: a missing one fails here)
    except ImportError:
        raise GPTError(f"gpt plot needs matplotlib: {INSTALL}") from None
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    return Figure, FigureCanvasAgg, colormaps


def draw(runs: list[RunCurves], width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT) -> Figure:
    """The figure: loss by iteration and by wall time above, the learning rates by iteration
    below, then the legend. A run's series without points draws no line."""
    Figure, FigureCanvasAgg, colormaps = _matplotlib()
    from matplotlib.lines import Line2D

    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 2, height_ratios=(2, 1))
    by_iter = fig.add_subplot(grid[0, 0], title="loss by iteration")
    by_time = fig.add_subplot(grid[0, 1], title="loss by wall time", sharey=by_iter)
    lr = fig.add_subplot(grid[1, 0], title="learning rate", sharex=by_iter)
    key = fig.add_subplot(grid[1, 1])
    key.axis("off")

    unit, scale = _time_unit(runs)
    colours = _colours(colormaps, len(runs))
    for run, colour in zip(runs, colours, strict=True):
        for series, style in ((run.train, TRAIN_STYLE), (run.val, VAL_STYLE)):
            if series:
                by_iter.plot(series.iters, series.values, color=colour, **style)
                by_time.plot([s / scale for s in series.seconds], series.values, color=colour,
                             **style)
        for series_name, _, style in RATES:
            if rate := getattr(run, series_name):
                lr.plot(rate.iters, rate.values, color=colour, lw=1.3, ls=style)

    by_iter.set_ylabel("loss (nats per token)")
    by_time.set_xlabel(f"wall time ({unit})")
    lr.set_xlabel("iteration")
    lr.set_ylabel("learning rate")
    if any(run.muon_lr for run in runs):  # two optimizers' rates: say which line is which
        lr.legend(handles=[Line2D([], [], color="grey", lw=1.3, ls=style, label=name)
                           for _, name, style in RATES], fontsize="small")
    lr.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in (by_iter, by_time, lr):
        ax.grid(True, alpha=0.3)
    handles = [Line2D([], [], color=colour, lw=2, label=run.label)
               for run, colour in zip(runs, colours, strict=True)]
    handles += [Line2D([], [], color="grey", label="train (logged step)", **TRAIN_STYLE),
                Line2D([], [], color="grey", label="val (evaluation)", **VAL_STYLE)]
    key.legend(handles=handles, loc="center", frameon=False,
               ncols=1 + (len(handles) - 1) // 12)
    return fig


def _time_unit(runs: list[RunCurves]) -> tuple[str, float]:
    """Seconds, minutes or hours, whichever keeps the longest run's axis readable."""
    longest = max(
        (s for run in runs for c in (run.train, run.val) for s in c.seconds if math.isfinite(s)),
        default=0.0,
    )
    if longest >= 3 * 3600:
        return "hours", 3600.0
    if longest >= 3 * 60:
        return "minutes", 60.0
    return "seconds", 1.0


def _colours(colormaps: Any, n: int) -> list[Any]:
    """One colour per run: tab10's for up to ten, evenly spaced along viridis beyond."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    return [colormaps["viridis"](i / (n - 1)) for i in range(n)]


def save(fig: Figure, out: Path) -> None:
    """Write the figure to `out` atomically, in the format its suffix names: a failure leaves
    whatever `out` held before."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format=out.suffix.lower()[1:], dpi=DPI)
    try:
        write_atomic(out, buffer.getvalue())
    except OSError as e:
        raise GPTError(f"cannot write --out {out} ({e.strerror}); pass a path you can write") \
            from None


def plot_runs(
    run_dirs: list[Path], out: Path, width: int = DEFAULT_WIDTH, height: int = DEFAULT_HEIGHT
) -> list[str]:
    """Draw the runs in `run_dirs` into `out`; returns notes about skipped lines."""
    check_output(out, width, height)
    runs, notes = load_runs(run_dirs)
    save(draw(runs, width, height), out)
    return notes
