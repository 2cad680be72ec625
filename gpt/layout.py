"""The layout of a run folder (`[train] out_dir`): the names of what it holds and the bounded
reads of its small files, without torch, so that listing runs (`gpt runs`, `gpt plot`) stays
fast. gpt/checkpoint.py writes and checks what is named here.

    metrics.jsonl            one JSON record per logged step or evaluation
    ckpt-0000600/            one checkpoint (its files: see gpt/checkpoint.py)
      model.safetensors, optimizer.pt or optimizer-00000-of-00004.pt ..., state.json
    .tmp-ckpt-0000600/       a checkpoint being written (renamed into place when complete)
    latest, best             the name of the newest checkpoint folder, and of the one with the
                             lowest validation loss
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from gpt.fileio import MiB, read_bounded, write_atomic

METRICS = "metrics.jsonl"
STATE = "state.json"
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"  # the optimizer state, whole: inference needs only the weights
OPTIMIZER_SHARD = re.compile(r"^optimizer-(\d{5})-of-(\d{5})\.pt$")  # one process's rows of it
CKPT_PATTERN = re.compile(r"^ckpt-(\d+)$")
POINTERS = ("latest", "best")
POINTER_LIMIT = 4096  # bytes of a `latest` or `best` file: one folder name
STATE_LIMIT = 256 * MiB  # bytes of a state.json: the config, RNG states, a tokenizer's record
Rows = tuple[int, int]  # rows [start, stop) of a parameter's dim 0, as optimizer shards record
# the rows of each parameter a process reads of a saved optimizer state, by state key (a combined
# optimizer's under each one's name first, as its state dict holds them)
OptimizerRows = Mapping[int, Rows] | Mapping[str, Mapping[int, Rows]]


def checkpoint_name(iteration: int) -> str:
    """The folder name of the checkpoint of `iteration`: `ckpt-0000640`."""
    return f"ckpt-{iteration:07d}"


def temporary_folder(out_dir: Path, iteration: int) -> Path:
    """Where `ckpt-<iteration>` is written before it is renamed into place: the same path in
    every process of a run."""
    return out_dir / f".tmp-{checkpoint_name(iteration)}"


def iteration_of(ckpt: Path) -> int:
    """The iteration in a `ckpt-<iteration>` folder's name."""
    match = CKPT_PATTERN.match(ckpt.name)
    assert match is not None, ckpt
    return int(match.group(1))


def is_checkpoint_name(name: str) -> bool:
    return CKPT_PATTERN.match(name) is not None


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, newest first (an OSError where it cannot be listed)."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if is_checkpoint_name(p.name) and p.is_dir()]
    return sorted(found, key=iteration_of, reverse=True)


def read_pointer(path: Path) -> str | None:
    """The checkpoint folder name a `latest` or `best` file holds; None where it holds none
    (missing, unreadable, binary bytes, a path that is not a ckpt-* name in its folder)."""
    try:
        name = read_bounded(path, POINTER_LIMIT, "a checkpoint pointer").decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if is_checkpoint_name(name) else None


def write_pointer(out_dir: Path, which: str, name: str) -> None:
    """Point `latest` or `best` at the checkpoint folder `name`, atomically."""
    assert which in POINTERS and is_checkpoint_name(name), (which, name)
    write_atomic(out_dir / which, name + "\n")


def load_state_json(path: Path) -> Any:
    """A state.json, read within STATE_LIMIT and parsed: OSError where it cannot be read,
    ValueError or RecursionError where it is not JSON (the callers say what that means)."""
    return json.loads(read_bounded(path, STATE_LIMIT, "a checkpoint's state.json"))


def optimizer_file(rank: int, world_size: int) -> str:
    """The name of one process's rows of a sharded optimizer state."""
    return f"optimizer-{rank:05d}-of-{world_size:05d}.pt"


def optimizer_files(state: dict[str, Any]) -> list[str]:
    """The optimizer files a checkpoint's state.json records: optimizer.pt, or a sharded
    run's files in rank order (only those names: nothing outside the folder is ever read)."""
    names = state.get("sha256", {})
    return sorted(f for f in names if f == OPTIMIZER or OPTIMIZER_SHARD.fullmatch(f))
