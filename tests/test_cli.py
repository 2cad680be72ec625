"""The command line: --help, --version, gpt info, and config errors as one line with exit code 2."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from gpt import __version__
from gpt import checkpoint as ckpt
from gpt.cli import app
from gpt.config import ModelConfig, RunConfig, SampleConfig, ServeConfig, to_dict, to_toml
from gpt.info import format_bytes, format_flop_rate
from gpt.parallel import Dist

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


COMMANDS = ["info", "prepare", "train", "sample", "chat", "serve", "eval", "export", "plot",
            "runs", "tokenizer"]


def test_help_lists_every_command() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    listed = {line.split()[0] for line in result.output.splitlines() if line.startswith("  ")}
    registered = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert registered == set(COMMANDS)
    assert registered <= listed


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command: str) -> None:
    result = runner.invoke(app, [command, "--help"])
    # export writes a model as it is, plot and runs read run folders: no run config applies
    no_config = ("export", "plot", "runs")
    assert result.exit_code == 0 and ("--config" in result.output) == (command not in no_config)


@pytest.mark.parametrize(
    ("command", "section", "keys"),
    [
        ("sample", SampleConfig, ["prompt", "max_new_tokens", "temperature", "top_k", "top_p",
                                  "num_samples", "seed", "stop", "ignore_eos"]),
        ("chat", SampleConfig, ["max_new_tokens", "temperature", "top_k", "top_p", "seed"]),
        ("serve", ServeConfig, ["host", "port"]),
    ],
)
def test_flags_that_mirror_a_key_show_its_help(command: str, section: type, keys: list[str]) -> None:
    """A flag that mirrors a config key is described by the key's own help text, declared once."""
    result = runner.invoke(app, [command, "--help"], terminal_width=1000)
    assert result.exit_code == 0
    helps = {f.name: f.metadata["help"] for f in dataclasses.fields(section)}
    for key in keys:
        line = next(line for line in result.output.splitlines()
                    if f"--{key.replace('_', '-')} " in line)
        assert helps[key][1:] in line and f"[{section.section}] {key}" in line


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
    ("n_bytes", "text"),
    [(500, "500 B"), (1024, "1.00 KiB"), (61_312, "59.9 KiB"), (1.5 * 2**20, "1.50 MiB"),
     (497_759_232, "475 MiB"), (2**30, "1.00 GiB"), (1_991_036_928, "1.85 GiB")],
)
def test_byte_counts_read_in_a_unit_that_shows_them(n_bytes: float, text: str) -> None:
    assert format_bytes(n_bytes) == text


def test_info_memory_of_a_tiny_model_is_not_zero() -> None:
    """15,328 parameters: 4 bytes each for weights and gradients, 8 for AdamW's two moments."""
    tiny = ["model.n_layer=1", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
            "model.vocab_size=64"]
    result = runner.invoke(app, ["info", *[a for k in tiny for a in ("--set", k)]])
    assert result.exit_code == 0, result.output
    assert "parameters:        15,328" in result.output
    assert ("weights 59.9 KiB + gradients 59.9 KiB + AdamW state 120 KiB = 240 KiB"
            in result.output)
    assert "0.00 GiB" not in result.output


def allocated_optimizer_bytes(sets: list[str]) -> int:
    """The bytes of optimizer state that training really allocates for the config `sets`: the
    optimizer make_optimizer builds, after one step (the scalar step counts left out)."""
    from gpt.config import load_config
    from gpt.model import GPT
    from gpt.optim import make_optimizer

    cfg = load_config(None, sets)
    model = GPT(cfg.model)
    optimizer = make_optimizer(model, cfg.train, torch.device("cpu"))
    _, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    loss.backward()
    optimizer.step()
    parts = getattr(optimizer, "optimizers", {"adamw": optimizer}).values()  # Muon + AdamW
    return sum(t.numel() * t.element_size() for part in parts for entry in part.state.values()
               for t in entry.values() if torch.is_tensor(t) and t.dim() > 0)


@pytest.mark.parametrize(("optimizer", "name"), [("adamw", "AdamW"), ("muon", "Muon + AdamW")])
def test_info_sizes_the_optimizer_state_training_allocates(optimizer: str, name: str) -> None:
    """The one-process line names the configured optimizer and gives the bytes of the state it
    allocates; the --nproc line of a DDP run (every process holds it all) says the same."""
    sets = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=16",
            "model.vocab_size=64", f"train.optimizer={optimizer}"]
    result = runner.invoke(app, ["info", "--nproc", "2", *[a for k in sets for a in ("--set", k)]])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    one = next(line for line in lines if line.startswith("memory (float32):"))
    each = next(line for line in lines if line.startswith("per process (2 processes"))
    assert f" + {name} state {format_bytes(allocated_optimizer_bytes(sets))} = " in one
    assert one.split(":  ", 1)[1] == each.split("): ", 1)[1]


@pytest.mark.parametrize(
    ("sets", "peak"),
    [([], "1.25 GFLOP/s (CPU, float32, {threads}, measured)"),
     (["train.dtype=bfloat16"], "1.25 GFLOP/s (CPU, bfloat16, {threads}, measured)"),
     (["train.peak_flops=2e12"], "2.00 TFLOP/s ([train] peak_flops)")],
)
def test_info_prints_the_device_peak(
    sets: list[str], peak: str, measured_peak: tuple[float, list[torch.dtype]]
) -> None:
    n = torch.get_num_threads()
    threads = f"{n} thread{'s' * (n != 1)}"
    args = [a for k in ["train.device=cpu", *sets] for a in ("--set", k)]
    result = runner.invoke(app, ["info", *args])
    assert result.exit_code == 0, result.output
    assert f"device peak:       {peak.format(threads=threads)}\n" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_info_without_the_configured_device_says_why_the_peak_is_unknown() -> None:
    result = runner.invoke(app, ["info", "--set", "train.device=cuda"])
    assert result.exit_code == 0, result.output
    assert "device peak:       unknown here ([train] device 'cuda': no CUDA GPU" in result.output


@pytest.mark.parametrize(
    ("rate", "text"),
    [(5e5, "500000 FLOP/s"), (1.25e9, "1.25 GFLOP/s"), (67.14e9, "67.1 GFLOP/s"),
     (989e12, "989 TFLOP/s"), (2e15, "2.00 PFLOP/s")],
)
def test_flop_rates_read_in_a_unit_that_shows_them(rate: float, text: str) -> None:
    assert format_flop_rate(rate) == text


def save_run(out: Path, iteration: int, cfg: RunConfig, is_best: bool = False) -> Path:
    """A checkpoint of an untrained model with `cfg` as its saved config."""
    import torch

    from gpt.model import GPT

    model = GPT(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"tokens": 0, "best_val_loss": None, "config": to_dict(cfg),
             "tokenizer": {"name": "char", "chars": "ab"}}
    return ckpt.Checkpointer(out, Dist(), model, optimizer, fixed=state).save(iteration,
                                                                            is_best=is_best)


def test_info_describes_a_checkpoint_as_its_config_would(tmp_path: Path) -> None:
    small = RunConfig(model=ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=16,
                                        vocab_size=64))
    wide = RunConfig(model=ModelConfig(n_layer=1, n_head=2, n_embd=64, block_size=16,
                                       vocab_size=64))
    save_run(tmp_path / "out", 10, small, is_best=True)
    save_run(tmp_path / "out", 20, wide)
    for cfg, which in ((wide, []), (wide, ["--which", "latest"]), (small, ["--which", "best"])):
        (tmp_path / "saved.toml").write_text(to_toml(cfg))
        expected = runner.invoke(app, ["info", "--config", str(tmp_path / "saved.toml")])
        result = runner.invoke(app, ["info", "--checkpoint", str(tmp_path / "out"), *which])
        assert result.exit_code == 0, result.output
        assert result.output == expected.output
        assert f"n_embd = {cfg.model.n_embd}" in result.output
    (tmp_path / "out" / "ckpt-0000020" / "optimizer.pt").unlink()  # weights only: still read
    one = runner.invoke(app, ["info", "--checkpoint", str(tmp_path / "out" / "ckpt-0000020")])
    assert one.exit_code == 0 and "n_embd = 64" in one.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "out", "--config", "x.toml"], "give either --checkpoint or --config"),
        (["--checkpoint", "out", "--set", "model.n_layer=3"], "--set does not apply to --checkpoint"),
        (["--which", "best"], "--which picks one checkpoint of an out_dir; give --checkpoint"),
        (["--checkpoint", "out", "--which", "best"], "no best checkpoint in out"),
        (["--checkpoint", "out", "--which", "newest"], "unknown checkpoint choice 'newest'"),
        (["--checkpoint", "nowhere"], "checkpoint path nowhere does not exist"),
    ],
)
def test_info_checkpoint_errors_are_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, args: list[str], message: str
) -> None:
    monkeypatch.chdir(tmp_path)
    save_run(tmp_path / "out", 10, RunConfig(model=ModelConfig(
        n_layer=1, n_head=2, n_embd=32, block_size=16, vocab_size=64)))
    result = runner.invoke(app, ["info", *args])
    assert result.exit_code == 2
    assert message in result.output and len(result.output.strip().splitlines()) == 1


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
