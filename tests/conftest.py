"""Test-wide settings (no network, no tracking service, a temporary cache) and the shared tiny
model config."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from gpt import peak
from gpt.config import ModelConfig
from gpt.model import GPT

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# gpt's cache (the CPU peak, the int8 kernel), never the user's: set at import, so the
# environments that test modules copy for their subprocesses hold it too; training measures the
# peak once a session per thread count and dtype, and --quantize int8 builds its kernel once
os.environ["GPT_CACHE_DIR"] = tempfile.mkdtemp(prefix="gpt-test-cache-")
atexit.register(shutil.rmtree, os.environ["GPT_CACHE_DIR"], ignore_errors=True)


def _transformers_has_qwen3() -> bool:
    try:
        import transformers
    except ImportError:
        return False
    return hasattr(transformers, "Qwen3Config")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests of Qwen3 models (their ids name qwen3) need a transformers that has them (4.51 or
    later); with an older one, what gpt says instead is tested by name."""
    if _transformers_has_qwen3():
        return
    skip = pytest.mark.skip(reason="this transformers has no Qwen3 (it came in 4.51)")
    for item in items:
        if "qwen3" in item.nodeid.lower():
            item.add_marker(skip)


@pytest.fixture(scope="session")
def int8_kernel() -> None:
    """Skip, saying why, where `--quantize int8` cannot run: a CPU without VNNI, no C compiler
    (the kernel is built here once a session)."""
    from gpt import quant
    from gpt.errors import GPTError

    try:
        quant._library()
    except GPTError as e:
        pytest.skip(str(e))


@pytest.fixture
def one_thread() -> Iterator[None]:
    """One intra-op thread (modules that train take it with `pytestmark`): tiny models gain
    nothing from two, and a second spinning thread slows them several-fold when other
    processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_MODEL = dict(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)


@pytest.fixture
def tiny_config() -> Callable[..., ModelConfig]:
    """ModelConfig of a tiny model (2 layers, 4 heads, width 32, 16 positions, 64 ids), with
    any key overridden: `tiny_config(norm="rmsnorm")`."""

    def make(**overrides: object) -> ModelConfig:
        return ModelConfig(**{**TINY_MODEL, **overrides})  # type: ignore[arg-type]

    return make


@pytest.fixture
def tiny(tiny_config: Callable[..., ModelConfig]) -> Callable[..., GPT]:
    """A tiny model with 50 token ids (padded to 64 rows), its biases and norm weights moved
    away from their 0 / 1 init so that every parameter matters."""

    def make(**overrides: object) -> GPT:
        torch.manual_seed(0)
        model = GPT(tiny_config(**{"vocab_size": 50, **overrides})).eval()
        with torch.no_grad():
            for param in model.parameters():
                param.add_(torch.randn_like(param) * 0.05)
        return model

    return make


# A whole run on a tiny char-level model: trains, evaluates and checkpoints in about a second.
TINY_RUN = """
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32
dropout = 0.1

[data]
source = "corpus.txt"
tokenizer = "char"

[train]
out_dir = "out"
batch_size = 4
max_iters = 30
warmup_iters = 5
learning_rate = 3e-3
eval_interval = 10
eval_iters = 2
log_interval = 5
checkpoint_interval = 10
"""


@pytest.fixture(scope="session")
def write_tiny_run() -> Callable[..., Path]:
    """Write `corpus.txt` (the given text, or a small Python-like corpus) and `tiny.toml` (the
    tiny run, plus `extra` TOML) into a folder."""

    def write(folder: Path, corpus: str | None = None, extra: str = "") -> Path:
        if corpus is None:
            corpus = "".join(
                f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400)
            )
        (folder / "corpus.txt").write_text(corpus)
        (folder / "tiny.toml").write_text(TINY_RUN + extra)
        return folder

    return write


@pytest.fixture
def tiny_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, write_tiny_run: Callable[..., Path]
) -> Path:
    """A folder holding the tiny run's corpus and config; the test runs inside it."""
    monkeypatch.chdir(tmp_path)
    return write_tiny_run(tmp_path)


@pytest.fixture
def poison_forward(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, int], None]:
    """`poison_forward(what, after)`: every training forward of GPT after the first `after`
    gives a non-finite `what` ("loss", or "gradient norm" with a finite loss)."""

    def poison(what: str, after: int) -> None:
        forward = GPT.forward
        calls = {"n": 0}

        def poisoned(self, idx, targets=None, context=None):  # type: ignore[no-untyped-def]
            logits, loss = forward(self, idx, targets, context)
            if self.training:
                calls["n"] += 1
                if calls["n"] > after and what == "loss":
                    loss = loss * float("nan")
                elif calls["n"] > after:  # adds 0, but d sqrt(w)/dw at w = 0 is inf: NaN grads
                    loss = loss + 0.0 * torch.sqrt(self.transformer.wte.weight * 0.0).sum()
            return logits, loss

        monkeypatch.setattr(GPT, "forward", poisoned)

    return poison


@pytest.fixture
def docs_folder(tmp_path: Path) -> Callable[..., Path]:
    """Make `tmp_path/docs`: n small text files, every other one in a subfolder, and one binary
    file that the default globs leave out."""

    def make(n: int = 10) -> Path:
        folder = tmp_path / "docs"
        (folder / "sub").mkdir(parents=True)
        for i in range(n):
            text = f"document {i} " * (i + 1)
            (folder / ("sub" if i % 2 else "") / f"doc{i}.txt").write_text(text)
        (folder / "ignored.bin").write_bytes(b"\x00\x01")
        return folder

    return make


@pytest.fixture
def measured_peak(
    monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory
) -> tuple[float, list[torch.dtype]]:
    """The CPU peak benchmark replaced by one that returns a fixed figure at once, with an empty
    cache and this process's memory of earlier figures cleared: (the figure, the dtype of each
    measurement)."""
    flops, calls = 1.25e9, []

    def measure(dtype: torch.dtype) -> float:
        calls.append(dtype)
        return flops

    monkeypatch.setattr(peak, "measure_matmul_flops", measure)
    monkeypatch.setattr(peak, "_MEASURED", {})
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    return flops, calls


# gloo's TCP transport now and then drops a connection between two processes on a loaded host
# (a known flake of gloo itself); a launch that fails that way is tried once more, which resumes
# exactly where it stopped. Any other failure fails the test with the launch's own error output.
TRANSPORT_FLAKES = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                    "Address already in use")


@pytest.fixture
def torchrun() -> Callable[..., None]:
    """`torchrun(*args)`: `gpt train --config tiny.toml ARGS` (or `script ARGS`) in two gloo
    processes (or `nproc=`) on a free port (--standalone), so parallel test runs never collide;
    one thread each."""

    def launch(*args: str, nproc: int = 2, script: Path | None = None) -> None:
        what = [str(script)] if script else ["-m", "gpt", "train", "--config", "tiny.toml"]
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={nproc}", *what, *args]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        for attempt in (1, 2):
            done = subprocess.run(command, timeout=300, capture_output=True, text=True, env=env)
            if done.returncode == 0:
                return
            if attempt == 2 or not any(flake in done.stderr for flake in TRANSPORT_FLAKES):
                raise AssertionError(f"torchrun exited {done.returncode}:\n{done.stderr[-4000:]}")

    return launch
