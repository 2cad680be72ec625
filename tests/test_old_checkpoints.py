"""Checkpoints written by earlier versions keep loading: each fixture under tests/fixtures was
written by the code of its time, and must still resume the same run and sample."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gpt.cli import app
from gpt.config import load_config
from gpt.train import train

FIXTURES = Path(__file__).parent / "fixtures"
# Two tiny char-level runs (AdamW, and Muon with AdamW) stopped at iteration 4 of 8, written by
# commit 9e911bf (before the trainer's redesign), with the metrics of the same runs trained
# straight to 8 by that code: a resume must continue them step for step.
BEFORE_REDESIGN = FIXTURES / "run-before-redesign"
UNTIMED = ("elapsed_s", "tok_per_s", "mfu")
needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"),
                                reason="torch.optim.Muon arrived in torch 2.9")

pytestmark = pytest.mark.usefixtures("one_thread")


def records(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in UNTIMED}
            for line in path.read_text().splitlines()]


@pytest.fixture
def old_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the fixture's folder (checkpoints are never touched in place); the test runs
    inside it. Its data is prepared again from corpus.txt, as on a new machine."""
    folder = tmp_path / "run"
    shutil.copytree(BEFORE_REDESIGN, folder)
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=needs_muon)])
def test_a_checkpoint_from_before_the_redesign_resumes_the_same_run(
    old_run: Path, optimizer: str
) -> None:
    assert train(load_config(f"{optimizer}.toml")) == 0
    resumed = records(old_run / optimizer / "metrics.jsonl")
    straight = records(old_run / f"straight-{optimizer}.jsonl")
    assert [r["iter"] for r in resumed] == [r["iter"] for r in straight]
    for got, want in zip(resumed, straight, strict=True):
        assert got.keys() == want.keys()
        assert got == pytest.approx(want, rel=1e-5, abs=1e-7), got["iter"]


def test_state_json_keeps_the_order_of_its_keys_from_before_the_redesign(old_run: Path) -> None:
    """A resumed run's new state.json lists its entries as the fixture's does, so the files of
    the two versions read (and diff) alike."""
    assert train(load_config("adamw.toml")) == 0
    before = json.loads((old_run / "adamw" / "ckpt-0000004" / "state.json").read_text())
    after = json.loads((old_run / "adamw" / "ckpt-0000008" / "state.json").read_text())
    assert list(after) == list(before)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_a_checkpoint_from_before_the_redesign_samples_and_evaluates(
    old_run: Path, optimizer: str
) -> None:
    sample = CliRunner().invoke(app, ["sample", "--checkpoint", optimizer, "--prompt", "def",
                                      "--max-new-tokens", "8", "--seed", "1"])
    assert sample.exit_code == 0, sample.output
    assert sample.output.startswith("def")
    prepared = CliRunner().invoke(app, ["prepare", "--config", f"{optimizer}.toml"])
    assert prepared.exit_code == 0, prepared.output
    evaluated = CliRunner().invoke(app, ["eval", "--checkpoint", optimizer, "--json"])
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.output)["loss"] > 0
