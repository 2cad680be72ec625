"""gpt plot: curves from metrics.jsonl (the last line of an iteration wins), one colour per run and
the expected lines on each panel, a PNG of the asked size, and bad input refused in one line
without writing anything."""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

import gpt.plot
from gpt.cli import app
from gpt.config import load_config
from gpt.plot import curve, draw, load_runs
from gpt.train import train

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) from a PNG's header, after checking it is one and decodes."""
    import matplotlib.image

    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert matplotlib.image.imread(path).shape[:2] == (height, width)
    return width, height


def write_metrics(folder: Path, records: list[dict], extra: str = "") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (folder / "metrics.jsonl").write_text(text + extra)
    return folder


def records(n: int = 4, log: int = 10, evaluate: int = 20, scale: float = 1.0) -> list[dict]:
    """A run's metrics lines as gpt train writes them: an evaluation at 0, training lines every
    `log` iterations and evaluations every `evaluate`, up to n * log."""
    lines = []
    for it in range(0, n * log + 1, log):
        base = {"iter": it, "elapsed_s": it * 0.5 * scale, "tokens": it * 128, "lr": 1e-3}
        if it:
            lines.append({**base, "loss": 4.0 - it / 100, "tok_per_s": 1000.0})
        if it % evaluate == 0:
            lines.append({**base, "train_loss": 4.0 - it / 100, "val_loss": 4.1 - it / 100})
    return lines


def lines_per_panel(fig) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {ax.get_title(): len(ax.lines) for ax in fig.axes if ax.get_title()}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, write_tiny_run: Callable[..., Path]) -> Path:
    """Two real tiny runs: `straight` (30 iterations) and `resumed` (20, then on to 30)."""
    folder = write_tiny_run(tmp_path_factory.mktemp("plot"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        assert train(load_config("tiny.toml", ["train.out_dir=straight"])) == 0
        assert train(load_config("tiny.toml", ["train.out_dir=resumed", "train.max_iters=20"])) == 0
        assert train(load_config("tiny.toml", ["train.out_dir=resumed"])) == 0
    return folder


def test_a_curve_takes_the_last_line_of_each_iteration_in_order() -> None:
    lines = [{"iter": 0, "elapsed_s": 0.0, "loss": 5.0}, {"iter": 10, "elapsed_s": 1.0, "loss": 4.0},
             {"iter": 20, "elapsed_s": 2.0, "loss": 3.0}, {"iter": 10, "elapsed_s": 3.0, "loss": 3.5},
             {"iter": 30, "loss": 2.0}, {"iter": 40, "elapsed_s": 4.0}]
    c = curve(lines, "loss")
    assert c.iters == [0, 10, 20, 30] and c.values == [5.0, 3.5, 3.0, 2.0]
    assert c.seconds[:3] == [0.0, 3.0, 2.0] and c.seconds[3] != c.seconds[3]  # nan: no elapsed_s


def test_real_runs_give_the_logged_and_evaluated_iterations(trained: Path) -> None:
    runs, notes = load_runs([trained / "straight", trained / "resumed"])
    assert notes == []
    for run in runs:  # the resumed run reads as one uninterrupted run
        assert run.train.iters == [5, 10, 15, 20, 25, 30]
        assert run.val.iters == [0, 10, 20, 30]
        assert run.lr.iters == [0, 5, 10, 15, 20, 25, 30]
    assert [r.label for r in runs] == ["straight", "resumed"]


def test_each_panel_holds_one_line_per_series_of_each_run(tmp_path: Path) -> None:
    a = write_metrics(tmp_path / "a", records())
    b = write_metrics(tmp_path / "b", records(scale=2.0))
    c = write_metrics(tmp_path / "c", records(n=0))  # only the first evaluation so far
    runs, _ = load_runs([a, b, c])
    fig = draw(runs, 800, 500)
    assert lines_per_panel(fig) == {
        "loss by iteration": 2 + 2 + 1, "loss by wall time": 2 + 2 + 1, "learning rate": 3,
    }
    by_iter = fig.axes[0]
    colours = [line.get_color() for line in by_iter.lines]
    assert colours[0] == colours[1] != colours[2] == colours[3] != colours[4]
    assert [line.get_linestyle() for line in by_iter.lines] == ["-", "--", "-", "--", "--"]
    assert [line.get_marker() for line in by_iter.lines] == ["None", "o", "None", "o", "o"]
    legend = [t.get_text() for t in fig.axes[3].get_legend().get_texts()]
    assert legend == ["a", "b", "c", "train (logged step)", "val (evaluation)"]


def test_a_muon_run_draws_both_rates_labelled_and_older_metrics_draw_one(tmp_path: Path) -> None:
    """A Muon run's lines hold Muon's rate as muon_lr: drawn dotted beside AdamW's, the panel
    saying which is which; metrics without it (an AdamW run, or written before it was
    recorded) draw AdamW's alone, with no such key."""
    muon = write_metrics(tmp_path / "muon", [{**r, "muon_lr": r["lr"] * 20} for r in records()])
    adamw = write_metrics(tmp_path / "adamw", records())
    runs, _ = load_runs([muon, adamw])
    assert runs[0].muon_lr.values == [2e-2] * len(runs[0].lr.values) and not runs[1].muon_lr
    fig = draw(runs, 800, 500)
    lr = next(ax for ax in fig.axes if ax.get_title() == "learning rate")
    assert lr.get_ylabel() == "learning rate"
    assert [(line.get_linestyle(), max(line.get_ydata())) for line in lr.lines] == [
        ("-", 1e-3), (":", 2e-2), ("-", 1e-3)]
    assert [t.get_text() for t in lr.get_legend().get_texts()] == [
        "AdamW (learning_rate)", "Muon (muon_lr)"]
    alone = draw(load_runs([adamw])[0], 800, 500)
    lr = next(ax for ax in alone.axes if ax.get_title() == "learning rate")
    assert len(lr.lines) == 1 and lr.get_legend() is None and lr.get_ylabel() == "learning rate"


def test_runs_with_the_same_name_are_labelled_by_path(tmp_path: Path) -> None:
    a = write_metrics(tmp_path / "x" / "run", records())
    b = write_metrics(tmp_path / "y" / "run", records())
    runs, _ = load_runs([a, b])
    assert [r.label for r in runs] == [str(a), str(b)]


@pytest.mark.parametrize(("size", "expected"), [([], (1000, 600)), (["--width", "640", "--height", "480"], (640, 480))])
def test_the_cli_writes_a_png_of_the_asked_size(trained: Path, tmp_path: Path, size: list[str], expected: tuple[int, int]) -> None:
    out = tmp_path / "runs.png"
    result = runner.invoke(app, ["plot", str(trained / "straight"), str(trained / "resumed"), "--out", str(out), *size])
    assert result.exit_code == 0, result.output
    assert result.stdout == f"wrote {out}\n"
    assert png_size(out) == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.png"]  # no temporary file left


def test_an_existing_out_is_replaced_and_nothing_else_touched(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", records())
    out = run / "curves.png"
    out.write_bytes(b"old")
    before = {p: p.read_bytes() for p in run.iterdir() if p != out}
    assert runner.invoke(app, ["plot", str(run), "--out", str(out)]).exit_code == 0
    assert png_size(out) == (1000, 600)
    assert {p: p.read_bytes() for p in run.iterdir() if p != out} == before


def test_svg_and_pdf_by_suffix(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", records())
    for name, start in (("a.svg", b"<?xml"), ("a.pdf", b"%PDF")):
        assert runner.invoke(app, ["plot", str(run), "--out", str(tmp_path / name)]).exit_code == 0
        assert (tmp_path / name).read_bytes().startswith(start)


def test_a_damaged_line_is_skipped_with_a_note(tmp_path: Path) -> None:
    run = write_metrics(tmp_path / "run", records(), extra='{"iter": 50, "loss": 3.0}\nnot json\n{"iter": "x"}\n{"iter": 60, "lo')
    out = tmp_path / "a.png"
    result = runner.invoke(app, ["plot", str(run), "--out", str(out)])
    assert result.exit_code == 0, result.output
    # the last line lacks its newline (being written, or cut short): not worth a note
    assert result.stderr == f"note: {run / 'metrics.jsonl'}: skipped 2 lines (the first: line 9) that are not a metrics record\n"
    assert load_runs([run])[0][0].train.iters[-1] == 50


def test_missing_matplotlib_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = write_metrics(tmp_path / "run", records())
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    result = runner.invoke(app, ["plot", str(run), "--out", str(tmp_path / "a.png")])
    assert result.exit_code == 2
    assert result.output == ('error: gpt plot needs matplotlib: pip install matplotlib '
                             '(or pip install -e ".[plot]" in a clone of gpt)\n')
    assert not (tmp_path / "a.png").exists()


def bad_inputs(tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    """Each case: the arguments and the start of its one-line error."""
    good = write_metrics(tmp_path / "good", records())
    (tmp_path / "empty").mkdir()
    write_metrics(tmp_path / "blank", [])
    write_metrics(tmp_path / "junk", [], extra="not json\n[1, 2]\n")
    (tmp_path / "a_file").write_text("")
    png = str(tmp_path / "a.png")
    return {
        "missing run": ([str(tmp_path / "nope"), "--out", png], f"{tmp_path / 'nope'} does not exist"),
        "run is a file": ([str(tmp_path / "a_file"), "--out", png], f"{tmp_path / 'a_file'} is not a folder"),
        "no metrics": ([str(tmp_path / "empty"), "--out", png], f"{tmp_path / 'empty'} holds no metrics.jsonl"),
        "empty metrics": ([str(tmp_path / "blank"), "--out", png], f"{tmp_path / 'blank' / 'metrics.jsonl'} holds no metrics record"),
        "only junk": ([str(tmp_path / "junk"), "--out", png], f"{tmp_path / 'junk' / 'metrics.jsonl'} holds no metrics record"),
        "twice": ([str(good), str(tmp_path / "good" / "."), "--out", png], "a run folder is given twice"),
        "no suffix": ([str(good), "--out", str(tmp_path / "a")], f"--out {tmp_path / 'a'}: unknown image format '(no suffix)'"),
        "unknown suffix": ([str(good), "--out", str(tmp_path / "a.jpg")], f"--out {tmp_path / 'a.jpg'}: unknown image format '.jpg'"),
        "out is a folder": ([str(good), "--out", str(tmp_path / "empty.png")], f"--out {tmp_path / 'empty.png'} is a folder"),
        "no such folder": ([str(good), "--out", str(tmp_path / "nope" / "a.png")], f"--out {tmp_path / 'nope' / 'a.png'}: {tmp_path / 'nope'} does not exist"),
        "folder is a file": ([str(good), "--out", str(tmp_path / "a_file" / "a.png")], f"--out {tmp_path / 'a_file' / 'a.png'}: {tmp_path / 'a_file'} is not a folder"),
        "too narrow": ([str(good), "--out", png, "--width", "50"], "--width 50 is out of range; give 300 to 10000 pixels"),
        "too tall": ([str(good), "--out", png, "--height", "20000"], "--height 20000 is out of range"),
    }


BAD_INPUTS = [
    "missing run", "run is a file", "no metrics", "empty metrics", "only junk", "twice",
    "no suffix", "unknown suffix", "out is a folder", "no such folder", "folder is a file",
    "too narrow", "too tall",
]


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path: Path, case: str) -> None:
    (tmp_path / "empty.png").mkdir()
    cases = bad_inputs(tmp_path)
    assert list(cases) == BAD_INPUTS
    args, error = cases[case]
    before = sorted(tmp_path.rglob("*"))
    result = runner.invoke(app, ["plot", *args])
    assert result.exit_code == 2, result.output
    assert result.output.startswith(f"error: {error}") and result.output.count("\n") == 1
    assert sorted(tmp_path.rglob("*")) == before


def test_an_unwritable_out_is_one_line_and_keeps_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run = write_metrics(tmp_path / "run", records())
    out = tmp_path / "a.png"
    out.write_bytes(b"old")

    def refuse(path: Path, content: bytes) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(gpt.plot, "write_atomic", refuse)
    result = runner.invoke(app, ["plot", str(run), "--out", str(out)])
    assert result.exit_code == 2
    assert result.output == f"error: cannot write --out {out} (Permission denied); pass a path you can write\n"
    assert out.read_bytes() == b"old"



def test_the_quickstart_figure_is_a_small_png() -> None:
    """docs/quickstart.png, written by scripts/plot_quickstart.py, and the block it fills."""
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("doc_tables", ROOT / "scripts" / "doc_tables.py")
    doc_tables = module_from_spec(spec)
    spec.loader.exec_module(doc_tables)
    assert png_size(ROOT / "docs" / "quickstart.png") == (1000, 600)
    assert (ROOT / "docs" / "quickstart.png").stat().st_size < 200_000
    assert doc_tables.marker_problem(ROOT / "docs" / "observing.md", "quickstart") is None
