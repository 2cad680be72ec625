"""The command line: --help, --version, gpt info, and config errors as one line with exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from gpt import __version__
from gpt.cli import app

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.splitlines() if line.startswith("  ")}
    registered = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert registered == {"info", "prepare", "train", "sample", "eval"}
    assert registered <= listed


@pytest.mark.parametrize("command", ["info", "prepare", "train", "sample", "eval"])
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "--config" in result.output


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"gpt {__version__}"


def test_info_reports_size_flops_and_memory() -> None:
    result = runner.invoke(
        app,
        ["info", "--config", str(ROOT / "configs" / "default.toml"), "--set", "model.n_layer=2",
         "--set", "model.vocab_size=1000"],
    )
    assert result.exit_code == 0, result.output
    assert "n_layer = 2" in result.output
    # 2 blocks of width 128 (12 * 128^2 + 13 * 128 each with biases) + the 1000 ids padded to
    # 1024 rows * 128 + 128 positions * 128 + ln_f
    blocks = 2 * (12 * 128 * 128 + 13 * 128)
    total = blocks + 1024 * 128 + 128 * 128 + 2 * 128
    assert f"parameters:        {total:,}" in result.output
    assert "FLOPs per token" in result.output and "AdamW state" in result.output


def test_info_gpt2_shape_is_124m() -> None:
    result = runner.invoke(
        app, ["info", "--set", "model.vocab_size=50257", "--set", "model.padded_vocab_size=50257"]
    )
    assert result.exit_code == 0, result.output
    assert "parameters:        124,439,808" in result.output


def test_info_takes_the_vocabulary_from_the_tokenizer() -> None:
    """Unset vocab_size: the gpt2 tokenizer's 50257 ids, padded to 50304 rows (nanoGPT's)."""
    result = runner.invoke(app, ["info"])
    assert result.exit_code == 0, result.output
    assert "vocab_size 50257 from the gpt2 tokenizer, padded to 50304" in result.output
    assert f"parameters:        {124_439_808 + 47 * 768:,}" in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (["--set", "model.n_head=5"], "error: [model] n_embd: 768 is not divisible by n_head = 5"),
        (["--set", "model.norm=batchnorm"], 'choose one of "layernorm", "rmsnorm"'),
        (["--set", "modle.n_head=4"], 'unknown section [modle] (did you mean "model"?)'),
        (["--set", "model.nhead=4"], 'unknown key \'nhead\' in [model] (did you mean "n_head"?)'),
        (["--set", "model.n_layer=two"], "[model] n_layer must be an integer, got 'two'"),
        (["--config", "does-not-exist.toml"], "config file does-not-exist.toml not found"),
    ],
)
def test_config_errors_exit_2_with_one_line(args: list[str], message: str) -> None:
    result = runner.invoke(app, ["info", *args])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_malformed_toml_names_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("[model]\nn_layer = 4\nn_layer = 5\n")
    result = runner.invoke(app, ["info", "--config", str(path)])
    assert result.exit_code == 2
    assert f"{path}: malformed TOML" in result.output and "line 3" in result.output


@pytest.mark.slow
def test_debug_shows_the_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpt", "--debug", "info", "--set", "model.n_head=5"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "GPTError" in result.stderr


@pytest.mark.slow
def test_python_dash_m_gpt_runs_without_traceback() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "gpt", "info", "--set", "model.n_head=5"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: [model] n_embd")
    assert "Traceback" not in result.stderr
