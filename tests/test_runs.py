"""gpt runs: run folders found two levels down, their figures from the latest checkpoint (or the
metrics of a run training now), status from the out_dir lock, and damaged folders shown as far
as they read, with notes."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpt.cli import app
from gpt.config import load_config
from gpt.lock import FolderLock
from gpt.runs import _count, _duration, find_runs, read_metrics, summarize, table
from gpt.train import train

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory, write_tiny_run: Callable[..., Path]) -> Path:
    """A finished tiny run (30 of 30 iterations), trained once for the module; tests copy it."""
    folder = write_tiny_run(tmp_path_factory.mktemp("trained"))
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(folder)
        assert train(load_config("tiny.toml", ["train.out_dir=run"])) == 0
    return folder / "run"


def copy_run(trained: Path, to: Path) -> Path:
    shutil.copytree(trained, to)
    return to


def test_reading_run_folders_imports_no_torch() -> None:
    """The layout of a run folder is named once, in a module that `gpt runs` and `gpt plot`
    read without torch, and that checkpoint.py writes by."""
    code = "import sys, gpt.runs, gpt.layout; print('torch' in sys.modules)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert found.stdout.strip() == "False"


def test_runs_are_found_up_to_two_levels_down(tmp_path: Path) -> None:
    def run(path: str, what: str = "metrics") -> None:
        folder = tmp_path / path
        folder.mkdir(parents=True)
        if what == "metrics":
            (folder / "metrics.jsonl").write_text("")
        else:
            (folder / "ckpt-0000010").mkdir()

    (tmp_path / "metrics.jsonl").write_text("")  # the folder itself is a run
    run("a")
    run("exp/b", "checkpoint")
    run("exp/deeper/c")  # three levels down: not searched
    run(".hidden/d")
    (tmp_path / "notes").mkdir()
    found = find_runs(tmp_path)
    assert found == [tmp_path, tmp_path / "a", tmp_path / "exp" / "b"]
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert [str(p) for p in find_runs(Path("."))] == [".", "a", "exp/b"]  # pasteable names


def test_a_finished_run_reads_from_its_latest_checkpoint(trained: Path) -> None:
    state = json.loads((trained / "ckpt-0000030" / "state.json").read_text())
    run = summarize(trained)
    assert (run.status, run.iteration, run.max_iters, run.checkpoint) == ("finished", 30, 30, "ckpt-0000030")
    assert (run.tokens, run.elapsed_s) == (30 * 4 * 32, state["elapsed_s"])
    assert run.best_val_loss == state["best_val_loss"] == min(
        r["val_loss"] for r in read_metrics(trained / "metrics.jsonl").records if "val_loss" in r
    )
    assert run.notes == []


def test_a_run_killed_past_its_checkpoint_is_interrupted_at_the_checkpoint(trained: Path, tmp_path: Path) -> None:
    """As if killed after iteration 30 was logged but before it was saved: resuming would continue
    from iteration 20, so that is what the table says."""
    run_dir = copy_run(trained, tmp_path / "run")
    shutil.rmtree(run_dir / "ckpt-0000030")  # `latest` names it still: the newest one present is used
    run = summarize(run_dir)
    assert (run.status, run.iteration, run.max_iters, run.checkpoint) == ("interrupted", 20, 30, "ckpt-0000020")
    assert run.notes == []


def test_a_running_trainer_is_seen_through_the_lock(trained: Path, tmp_path: Path) -> None:
    run_dir = copy_run(trained, tmp_path / "run")
    shutil.rmtree(run_dir / "ckpt-0000030")  # training now: the metrics are ahead of the checkpoint
    with FolderLock(run_dir, "gpt train", "train.out_dir"):
        run = summarize(run_dir)
        assert (run.status, run.iteration, run.checkpoint, run.tokens) == ("running", 30, "ckpt-0000020", 30 * 4 * 32)
        result = runner.invoke(app, ["runs", str(tmp_path)])
        assert result.exit_code == 0 and result.output.splitlines()[1].split()[-1] == "running"
    assert summarize(run_dir).status == "interrupted"
    FolderLock(run_dir, "gpt train", "train.out_dir").release()  # looking left it free


def test_a_run_without_checkpoints_shows_its_metrics(trained: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    shutil.copy(trained / "metrics.jsonl", run_dir)
    run = summarize(run_dir)
    assert (run.status, run.iteration, run.max_iters, run.checkpoint) == ("interrupted", 30, None, None)
    assert run.best_val_loss == summarize(trained).best_val_loss


def test_damaged_files_show_what_they_can_with_notes(trained: Path, tmp_path: Path) -> None:
    run_dir = copy_run(trained, tmp_path / "run")
    (run_dir / "ckpt-0000030" / "state.json").write_text("{not json")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("garbage\n")
    run = summarize(run_dir)
    assert (run.iteration, run.checkpoint, run.status) == (20, "ckpt-0000020", "interrupted")
    skipped = "metrics.jsonl: skipped line 11 that is not a metrics record"
    assert run.notes == ["ckpt-0000030/state.json is damaged (not JSON)", skipped]

    (run_dir / "ckpt-0000020" / "state.json").unlink()
    run = summarize(run_dir)  # no checkpoint left: the metrics
    assert (run.iteration, run.checkpoint) == (30, None)
    assert run.notes == [
        "ckpt-0000030/state.json is damaged (not JSON)",
        "ckpt-0000020/state.json is missing (an incomplete checkpoint)",
        skipped,
    ]


def test_files_that_are_not_what_they_seem_show_what_they_can(trained: Path, tmp_path: Path) -> None:
    """A binary `latest`, a state.json nested too deeply to parse, one that is a FIFO (read
    without blocking), a metrics line nested too deeply: notes, never a hang or a traceback."""
    run_dir = copy_run(trained, tmp_path / "run")
    (run_dir / "latest").write_bytes(b"\xff\xfe\x00ckpt")
    (run_dir / "ckpt-0000030" / "state.json").write_text("[" * 100_000 + "]" * 100_000)
    (run_dir / "ckpt-0000020" / "state.json").unlink()
    os.mkfifo(run_dir / "ckpt-0000020" / "state.json")
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write("[" * 100_000 + "\n")
    run = summarize(run_dir)
    assert (run.checkpoint, run.iteration) == (None, 30)  # from the metrics, as they read
    assert run.notes == [
        "ckpt-0000030/state.json is damaged (not JSON)",
        "ckpt-0000020/state.json cannot be read (a FIFO, not a regular file)",
        "metrics.jsonl: skipped line 11 that is not a metrics record",
    ]


@pytest.mark.parametrize(
    "state",
    ['{"iter": 30}', '{"iter": "30", "config": {"train": {"max_iters": 30}}}', "[1, 2]"],
)
def test_a_state_without_its_counters_is_damaged(tmp_path: Path, state: str) -> None:
    (tmp_path / "ckpt-0000030").mkdir()
    (tmp_path / "ckpt-0000030" / "state.json").write_text(state)
    run = summarize(tmp_path)
    assert (run.iteration, run.status) == (None, "interrupted")
    assert run.notes == ["ckpt-0000030/state.json is damaged (no iter or [train] max_iters)"]


def test_odd_values_in_a_state_are_left_out(trained: Path, tmp_path: Path) -> None:
    run_dir = copy_run(trained, tmp_path / "run")
    (run_dir / "metrics.jsonl").unlink()
    path = run_dir / "ckpt-0000030" / "state.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "tokens": "many", "best_val_loss": "low"}))
    run = summarize(run_dir)
    assert (run.iteration, run.tokens, run.best_val_loss) == (30, None, None)
    assert table([run]).splitlines()[1].split()[1:4] == ["30/30", "-", "-"]


def test_the_best_val_loss_counts_evaluations_up_to_the_checkpoint(trained: Path, tmp_path: Path) -> None:
    """Also the first evaluation, at iteration 0, which the checkpoint's record leaves out."""
    run_dir = copy_run(trained, tmp_path / "run")
    records = read_metrics(run_dir / "metrics.jsonl").records
    for ckpt in ("ckpt-0000020", "ckpt-0000030"):
        path = run_dir / ckpt / "state.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "best_val_loss": None}))
    shutil.rmtree(run_dir / "ckpt-0000030")
    assert summarize(run_dir).best_val_loss == min(r["val_loss"] for r in records if "val_loss" in r and r["iter"] <= 20)


def test_a_nan_evaluation_does_not_hide_the_best_one(trained: Path, tmp_path: Path) -> None:
    run_dir = copy_run(trained, tmp_path / "run")
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    first_eval = next(i for i, line in enumerate(lines) if "val_loss" in json.loads(line))
    record = {**json.loads(lines[first_eval]), "val_loss": float("nan")}
    lines[first_eval] = json.dumps(record)  # NaN, as Python's json writes it
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    best = summarize(run_dir).best_val_loss
    assert best is not None and math.isfinite(best)


def test_the_cli_lists_every_run_and_never_fails_on_a_damaged_one(trained: Path, tmp_path: Path) -> None:
    copy_run(trained, tmp_path / "out" / "good")
    broken = tmp_path / "out" / "broken"
    (broken / "ckpt-0000010").mkdir(parents=True)
    (broken / "metrics.jsonl").write_bytes(b"\x00\xff garbage\n")
    result = runner.invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert lines[0].split("  ")[0] == "name" and re.split(r"\s{2,}", lines[0]) == [
        "name", "iters", "best val", "tokens", "wall time", "last checkpoint", "status"
    ]
    broken_row, good_row = lines[1].split(), lines[2].split()
    assert broken_row == [f"{broken}", "-", "-", "-", "-", "-", "interrupted"]
    assert good_row[0] == str(tmp_path / "out" / "good") and good_row[1] == "30/30"
    assert good_row[-2:] == ["ckpt-0000030", "finished"]
    assert f"note: {broken}: ckpt-0000010/state.json is missing" in result.stderr
    assert f"note: {broken}: metrics.jsonl: skipped line 1" in result.stderr


def test_the_cli_says_when_there_is_no_run(tmp_path: Path) -> None:
    result = runner.invoke(app, ["runs", str(tmp_path)])
    assert result.exit_code == 0 and result.output.startswith(f"no runs in {tmp_path}")


@pytest.mark.parametrize("make", ["missing", "file"])
def test_the_cli_refuses_a_folder_that_is_not_one(tmp_path: Path, make: str) -> None:
    path = tmp_path / "x"
    if make == "file":
        path.write_text("")
    result = runner.invoke(app, ["runs", str(path)])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and result.output.startswith(f"error: {path}")


@pytest.mark.parametrize(
    ("n", "text"),
    [(None, "-"), (983, "983"), (12_345, "12.3k"), (2_621_440, "2.62M"), (10e9, "10.0B"), (3e12, "3.00T"),
     (999, "999"), (99_995, "100k"), (999_950, "1.00M"), (9_999_000, "10.0M")],  # rounding picks the unit
)
def test_token_counts(n: float | None, text: str) -> None:
    assert _count(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(None, "-"), (float("nan"), "-"), (41.6, "42s"), (171, "2m51s"), (3720, "1h02m"), (3 * 86400 + 4 * 3600, "3d04h")],
)
def test_wall_times(seconds: float | None, text: str) -> None:
    assert _duration(seconds) == text
