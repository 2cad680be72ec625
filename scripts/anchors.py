"""What the benchmarks share to set `gpt` against its anchors on the same weights: the seeded
GPT-2-shaped model, finding an anchor's program, and llama.cpp's GGUF files of a model.

The anchors are not dependencies: a benchmark names them with flags or environment variables and
skips, saying why, what is not named or found. This is a helper module, not a script: the
benchmarks import it from their own folder.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt.config import DataConfig, ModelConfig, RunConfig
from gpt.model import GPT
from gpt.tokenizer import get_tokenizer


def gpt2_model(seed: int, **shape: int) -> GPT:
    """A GPT-2-shaped model with seeded random weights: GPT-2 124M's shape (12 layers, 12 heads,
    768 wide, block 1024) unless `shape` changes it, its unpadded vocabulary and the tanh GELU,
    which llama.cpp's gpt2 architecture computes."""
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=50257, padded_vocab_size=50257, activation="gelu_tanh",
                           **shape))


@dataclass
class InMemory:
    """A model held in this process, with GPT-2's tokenizer, as `gpt.hf.export.export` reads a
    checkpoint: what it exports are the very weights measured, not a reloaded copy."""

    model: GPT
    path: Path  # where the model is said to live (never read)

    @property
    def config(self) -> RunConfig:
        return RunConfig(model=self.model.config, data=DataConfig(tokenizer="gpt2"))

    @property
    def tokenizer(self) -> dict[str, Any]:
        return get_tokenizer("gpt2").to_dict()

    def load_model(self, device: str | torch.device = "cpu") -> GPT:
        return self.model.to(device)


def weights_digest(model: GPT) -> str:
    """12 hex digits of the sha256 of every tensor: a folder of conversions named by it cannot
    hold another model's files."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()[:12]


def find_program(given: str | None, env_var: str, name: str | None) -> str | None:
    """The flag's path, the environment variable's, or `name` on PATH (None: not looked for)."""
    path = given or os.environ.get(env_var) or (shutil.which(name) if name else None)
    return path if path and Path(path).is_file() else None


def add_convert_options(parser: argparse.ArgumentParser) -> None:
    """`--convert` and `--convert-python`: llama.cpp's converter and the python it runs in."""
    parser.add_argument("--convert", type=Path, metavar="PATH",
                        help="llama.cpp's convert_hf_to_gguf.py (or GPT_BENCH_CONVERT)",
                        default=os.environ.get("GPT_BENCH_CONVERT")
                        or os.environ.get("GPT_LLAMA_CPP_CONVERT"))
    parser.add_argument("--convert-python", metavar="PATH",
                        help="the python to run the converter with (or GPT_BENCH_CONVERT_PYTHON; "
                        "default: this one)",
                        default=os.environ.get("GPT_BENCH_CONVERT_PYTHON")
                        or os.environ.get("GPT_LLAMA_CPP_PYTHON") or sys.executable)


def convert_gguf(hf_folder: Path, outtype: str, out: Path, convert: Path | None,
                 python: str) -> Path | str:
    """`hf_folder` converted by llama.cpp's converter into `out` (kept from an earlier run), or
    the reason it was not."""
    if out.is_file() or convert is None:
        return out
    gguf_py = convert.parent / "gguf-py"  # the converter's own package, beside it in llama.cpp
    env = dict(os.environ)
    if gguf_py.is_dir():
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(gguf_py), env.get("PYTHONPATH")) if p)
    tmp = out.with_name(out.name + ".tmp")
    command = [python, str(convert), str(hf_folder), "--outtype", outtype, "--outfile", str(tmp)]
    print(f"converting to {outtype}: {' '.join(command)}", flush=True)
    try:
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the converter did not run ({e})"
    if done.returncode != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        return f"the converter failed: {lines[-1][:200]}"
    os.replace(tmp, out)
    return out


def gguf_files(hf_folder: Path, folder: Path, outtypes: list[str], convert: Path | None,
               python: str) -> dict[str, Path | str]:
    """Each GGUF type of the HF folder: its file in `folder` (converted by an earlier run, or
    now), or why there is none."""
    files: dict[str, Path | str] = {}
    for outtype in outtypes:
        gguf = folder / f"model-{outtype}.gguf"
        if gguf.is_file() or (convert is not None and convert.is_file()):
            files[outtype] = convert_gguf(hf_folder, outtype, gguf, convert, python)
        else:
            files[outtype] = (
                "llama.cpp's converter is not named (--convert or GPT_BENCH_CONVERT)"
                if convert is None else f"--convert {convert} is not a file")
    return files
