"""Checkpoints that survive a crash at any instant, loaded without executing pickled code.

Layout of a run folder (`[train] out_dir`):

    ckpt-0000600/            one checkpoint
      model.safetensors      weights, whole even from a sharded run (a tied LM head is stored
                             once, as the token embedding)
      optimizer.pt           optimizer state (AdamW's, or Muon's and AdamW's by name); read back
                             with torch.load(weights_only=True); only resuming needs it, so a
                             weights-only checkpoint (optimizer files deleted to save space)
                             still samples, evaluates and finetunes
      optimizer-00000-of-00004.pt, ...
                             instead of optimizer.pt, from an FSDP run: each process's rows of
                             the state (torch's state dict of the local rows, plus `rows`:
                             {key: [start, stop]}), so no process ever holds it whole; any
                             layout reads the rows it needs from them
      state.json             iteration, tokens, best val loss, wandb id, the resolved config,
                             the tokenizer, data sampler and RNG states (every rank's),
                             GradScaler state, and the sha256 of every file above
    latest                   name of the newest checkpoint folder
    best                     name of the checkpoint with the lowest val loss

A checkpoint is written into a hidden temporary folder, every file flushed to disk, then renamed
into place; the `latest` pointer is replaced atomically last. A crash at any point leaves the
previous checkpoint and pointer intact. Saving is three steps (`begin_checkpoint`,
`write_optimizer` on each writing process, `finish_checkpoint`), so that the processes of a
sharded run can each write their part of one checkpoint.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gpt.config import RunConfig, from_dict
from gpt.errors import GPTError, first_line
from gpt.fileio import MiB, fsync_dir, new_file_mode, read_bounded, sha256_file, write_atomic
from gpt.model import GPT
from gpt.tokenizer import tokenizer_from_dict

CKPT_PATTERN = re.compile(r"^ckpt-(\d+)$")
WEIGHTS = "model.safetensors"
OPTIMIZER = "optimizer.pt"  # the optimizer state, whole: inference needs only the weights
OPTIMIZER_SHARD = re.compile(r"^optimizer-(\d{5})-of-(\d{5})\.pt$")  # one process's rows of it
Rows = tuple[int, int]  # rows [start, stop) of a parameter's dim 0
POINTER_LIMIT = 4096  # bytes of a `latest` or `best` file: one folder name
STATE_LIMIT = 256 * MiB  # bytes of a state.json: the config, RNG states, a tokenizer's record


def unwrap(model: torch.nn.Module) -> GPT:
    """The plain GPT inside torch.compile and DDP wrappers, whose keys carry `_orig_mod.` and
    `module.` prefixes that a checkpoint must never hold."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model  # type: ignore[return-value]


def model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weights to save, on the CPU: a tied head is the embedding itself, so it is stored once."""
    model = unwrap(model)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def save_checkpoint(
    out_dir: Path,
    iteration: int,
    model: torch.nn.Module,
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
    keep_last: int,
    is_best: bool,
    damaged: Collection[str] = (),
) -> Path:
    """Write `ckpt-<iteration>` atomically from one process, then move `latest` (and `best`)
    and prune: the three steps below, with the temporary folder removed if any fails."""
    folder = begin_checkpoint(out_dir, iteration)
    try:
        hashes = write_optimizer(folder, OPTIMIZER, optimizer_state)
        return finish_checkpoint(
            folder, model_state(model), state, hashes, keep_last, is_best, damaged
        )
    except BaseException:  # a full disk, say: what was written goes, the rest stays as it was
        shutil.rmtree(folder, ignore_errors=True)
        raise


def begin_checkpoint(out_dir: Path, iteration: int) -> Path:
    """The empty temporary folder that `ckpt-<iteration>` is written into (one process makes it,
    the others write into it once it exists); leftovers of a crash are removed first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".tmp-ckpt-*"):  # the run lock says no other save is live
        shutil.rmtree(stale, ignore_errors=True)
    folder = temporary_folder(out_dir, iteration)
    folder.mkdir()
    return folder


def checkpoint_name(iteration: int) -> str:
    """The folder name of the checkpoint of `iteration`: `ckpt-0000640`."""
    return f"ckpt-{iteration:07d}"


def temporary_folder(out_dir: Path, iteration: int) -> Path:
    """Where `ckpt-<iteration>` is written before it is renamed into place: the same path in
    every process of a run."""
    return out_dir / f".tmp-{checkpoint_name(iteration)}"


def optimizer_file(rank: int, world_size: int) -> str:
    """The name of one process's rows of a sharded optimizer state."""
    return f"optimizer-{rank:05d}-of-{world_size:05d}.pt"


def write_optimizer(folder: Path, name: str, optimizer_state: dict[str, Any]) -> dict[str, str]:
    """One optimizer file in `folder`, flushed to disk; {name: its sha256} for state.json."""
    torch.save(optimizer_state, folder / name)
    _fsync(folder / name)
    return {name: sha256_file(folder / name)}


def finish_checkpoint(
    folder: Path,
    weights: dict[str, torch.Tensor],
    state: dict[str, Any],
    optimizer_hashes: dict[str, str],
    keep_last: int,
    is_best: bool,
    damaged: Collection[str] = (),
) -> Path:
    """Write the weights and state.json (hashing every file) into `folder`, whose optimizer
    files are written, rename it into place, then move `latest` (and `best`) and prune.

    `damaged` names the checkpoints that resume skipped as damaged, which pruning never keeps
    in place of good ones.
    """
    out_dir = folder.parent
    final = out_dir / folder.name.removeprefix(".tmp-")
    name, state = final.name, {**state, "iter": _iteration(final)}
    save_file(weights, str(folder / WEIGHTS))
    os.chmod(folder / WEIGHTS, new_file_mode())  # safetensors leaves it 0o600
    hashes = {WEIGHTS: sha256_file(folder / WEIGHTS), **optimizer_hashes}
    (folder / "state.json").write_text(json.dumps({**state, "sha256": hashes}, indent=1))
    for f in (WEIGHTS, "state.json"):
        _fsync(folder / f)
    fsync_dir(folder)
    if final.exists():  # a re-save of the same iteration (e.g. after a resume)
        shutil.rmtree(final)
    os.rename(folder, final)
    fsync_dir(out_dir)
    if is_best:
        write_atomic(out_dir / "best", name + "\n")
    write_atomic(out_dir / "latest", name + "\n")
    _prune(out_dir, final, keep_last, damaged)
    return final


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def _prune(out_dir: Path, saved: Path, keep_last: int, damaged: Collection[str]) -> None:
    """Keep the newest `keep_last` good checkpoints up to `saved` (the one just written), and
    `best`; delete the others, so that a damaged checkpoint never stands in for a good one.

    - Checkpoints newer than `saved` are left from a run that went further before its newest
      checkpoints were damaged: this run resumed from an older one and is re-doing those steps.
      They neither count nor go (the run overwrites them when it gets there; resume skips them).
    - `damaged` ones older than `saved` can never be resumed from (a newer good one exists), so
      they do not count towards `keep_last` and go.
    - `saved` and the checkpoint `best` names are never deleted.
    """
    best = _read_pointer(out_dir / "best")
    kept = 0
    for old in list_checkpoints(out_dir):
        if _iteration(old) > _iteration(saved):
            continue
        if old == saved or (old.name not in damaged and kept < keep_last):
            kept += 1
        elif old.name != best:
            shutil.rmtree(old, ignore_errors=True)


def _read_pointer(path: Path) -> str | None:
    """The checkpoint folder name a `latest` or `best` file holds; None where it holds none
    (missing, unreadable, binary bytes, a path that is not a ckpt-* name in its folder)."""
    try:
        name = read_bounded(path, POINTER_LIMIT, "a checkpoint pointer").decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return name if CKPT_PATTERN.match(name) else None


def _iteration(ckpt: Path) -> int:
    """The iteration in a `ckpt-<iteration>` folder's name."""
    match = CKPT_PATTERN.match(ckpt.name)
    assert match is not None, ckpt
    return int(match.group(1))


def list_checkpoints(out_dir: Path) -> list[Path]:
    """Checkpoint folders of a run, newest first."""
    if not out_dir.is_dir():
        return []
    found = [p for p in out_dir.iterdir() if p.is_dir() and CKPT_PATTERN.match(p.name)]
    return sorted(found, key=_iteration, reverse=True)


def find_checkpoint(path: str | Path, which: str = "latest") -> Path:
    """A checkpoint folder from a run's out_dir (its `latest` or `best`) or a checkpoint folder."""
    path = Path(path)
    if which not in ("latest", "best"):
        raise GPTError(f"unknown checkpoint choice {which!r}; use latest or best")
    try:
        return _find_checkpoint(path, which)
    except OSError as e:  # the folder, or one above it, cannot be read (no permission)
        raise GPTError(f"cannot read {path} ({e.strerror}); make it readable, or pass another "
                       "checkpoint") from None


def _find_checkpoint(path: Path, which: str) -> Path:
    if (path / "state.json").exists():
        return path
    if not path.exists():
        raise GPTError(
            f"checkpoint path {path} does not exist; pass a run's out_dir or a ckpt-* folder"
        )
    name = _read_pointer(path / which)
    if name is not None and (path / name / "state.json").exists():
        return path / name
    candidates = list_checkpoints(path)
    if which == "latest" and candidates:
        return candidates[0]  # `latest` is written last: a crash, or damage, can leave it behind
    if (path / which).exists():
        raise GPTError(
            f"{path / which} names no checkpoint folder of {path}; pass a ckpt-* folder, or "
            "--which latest"
        )
    raise GPTError(
        f"no {which} checkpoint in {path}; train first (gpt train) or pass a ckpt-* folder"
    )


class UnreadableCheckpoint(GPTError):
    """A checkpoint file this process cannot read (permissions, a device in its place): not
    damaged, so resuming must neither skip it nor let pruning delete it."""


def read_state(ckpt: Path) -> dict[str, Any]:
    """state.json of a checkpoint, with every file present checked against its recorded sha256.

    The optimizer files may be absent (a weights-only checkpoint): resuming, the only reader
    that needs them, checks `Checkpoint.has_optimizer` itself. Some of a sharded state's files
    but not all is a damaged checkpoint.
    """
    state_path = ckpt / "state.json"
    try:
        state = json.loads(read_bounded(state_path, STATE_LIMIT, "a checkpoint's state.json"))
        recorded = dict(state["sha256"])
    except FileNotFoundError:
        raise GPTError(f"{state_path} is missing: the checkpoint is incomplete") from None
    except OSError as e:
        raise UnreadableCheckpoint(f"cannot read {state_path} ({e.strerror})") from None
    except (ValueError, KeyError, TypeError, RecursionError):  # RecursionError: nested deeply
        raise GPTError(f"{state_path} is damaged (not the JSON a checkpoint writes)") from None
    optimizer = optimizer_files(state)
    present = [f for f in optimizer if (ckpt / f).exists()]
    for f in (WEIGHTS, *optimizer):
        path = ckpt / f
        if not path.exists():
            if f in optimizer and not present:
                continue
            raise GPTError(f"{path} is missing: the checkpoint is incomplete")
        try:
            digest = sha256_file(path)
        except OSError as e:  # not readable by this user, a FIFO in its place
            raise UnreadableCheckpoint(f"cannot read {path} ({e.strerror})") from None
        if digest != recorded.get(f):
            raise GPTError(f"{path} is damaged (its sha256 differs from state.json)")
    return state


def optimizer_files(state: dict[str, Any]) -> list[str]:
    """The optimizer files a checkpoint's state.json records: optimizer.pt, or a sharded
    run's files in rank order (only those names: nothing outside the folder is ever read)."""
    names = state.get("sha256", {})
    return sorted(f for f in names if f == OPTIMIZER or OPTIMIZER_SHARD.fullmatch(f))


def load_weights(ckpt: Path, model: torch.nn.Module) -> None:
    """Load model.safetensors into `model` (re-tying a tied head)."""
    model = unwrap(model)
    path = ckpt / "model.safetensors"
    try:
        weights = load_file(str(path))
    except Exception as e:
        raise GPTError(
            f"{path} is damaged ({first_line(e, 120)}); {_another_checkpoint(ckpt)}"
        ) from None
    expected = model.state_dict()
    for key, tensor in weights.items():  # load_state_dict would raise a page of these
        if key in expected and tensor.shape != expected[key].shape:
            raise GPTError(
                f"{path} does not fit the model that {ckpt / 'state.json'} describes ({key}: "
                f"{tuple(tensor.shape)} saved, {tuple(expected[key].shape)} expected): its "
                f"config was edited or belongs to other weights; {_another_checkpoint(ckpt)}"
            )
    missing, unexpected = model.load_weights(weights)
    if missing or unexpected:
        raise GPTError(
            f"{path} does not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]}); "
            f"{_another_checkpoint(ckpt)}"
        )


def _another_checkpoint(damaged: Path) -> str:
    """The way out of a checkpoint that cannot be used: the run's newest other one that reads
    (the words of an error message)."""
    for other in list_checkpoints(damaged.parent):
        if other == damaged:
            continue
        try:
            read_state(other)
        except GPTError:
            continue
        return f"use another checkpoint of the run, such as {other}"
    return "use another checkpoint, or train again (gpt train)"


def load_optimizer_state(
    ckpt: Path, files: list[str], rows: Mapping[int, Rows] | None = None
) -> dict[str, Any]:
    """The optimizer state saved with the weights, loaded without executing pickled code.

    `files` are the checkpoint's optimizer files (`optimizer_files`): optimizer.pt, or a
    sharded run's. `rows` asks for part of each parameter (by state key) instead of all of it:
    this process's rows under FSDP. The files are memory-mapped, so only the rows asked for
    are read, whatever layout wrote them.
    """
    parts = [_load_tensors(ckpt, f) for f in files]
    if len(parts) == 1 and "rows" not in parts[0] and not rows:
        return parts[0]  # a whole state, wanted whole (AdamW's, or Muon's and AdamW's by name)
    entries = {}
    for key, first in parts[0]["state"].items():
        entries[key] = {
            name: (value if value.dim() == 0 else
                   _gather_rows(parts, key, name, (rows or {}).get(key)))
            for name, value in first.items()
        }
    return {"state": entries, "param_groups": parts[0]["param_groups"]}


def _gather_rows(parts: list[dict[str, Any]], key: int, name: str, wanted: Rows | None
                 ) -> torch.Tensor:
    """Rows `wanted` (all if None) of one state tensor, from the parts that hold them."""
    pieces = [parts[0]["state"][key][name][:0]]  # no rows at all for a process past the end
    for part in parts:
        held = part["state"][key][name]
        start, stop = part.get("rows", {}).get(key, (0, held.shape[0]))
        first, last = wanted or (start, stop)
        lo, hi = max(first, start), min(last, stop)
        if lo < hi:
            pieces.append(held[lo - start : hi - start])
    return torch.cat(pieces).clone()  # a copy: the mapped file is closed after


def _load_tensors(ckpt: Path, name: str) -> dict[str, Any]:
    """One optimizer file: torch.load(weights_only=True), memory-mapped, with every refusal
    and failure in one line."""
    path = ckpt / name
    fix = (f"remove {ckpt} to resume from the checkpoint before it, or set train.out_dir to a "
           "new folder")
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols before it refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except FileNotFoundError:
        raise GPTError(f"{path} is missing: the checkpoint holds weights only") from None
    except pickle.UnpicklingError as e:
        # torch names the callable a hostile pickle asks for ("GLOBAL posix.system")
        called = re.search(r"GLOBAL ([\w.]+)", str(e))
        if called is None:
            raise GPTError(f"{path} is damaged (not a file of tensors); {fix}") from None
        raise GPTError(
            f"{path} would call {called.group(1)} when unpickled, which no checkpoint needs: "
            f"it was refused and nothing in it ran; {fix}"
        ) from None
    except Exception as e:
        raise GPTError(f"{path} is damaged ({first_line(e, 120)}); {fix}") from None


@dataclass(frozen=True)
class Checkpoint:
    """One checkpoint folder with its state.json, read and checked against its hashes once."""

    path: Path
    state: dict[str, Any]

    @classmethod
    def open(cls, path: str | Path, which: str = "latest") -> Checkpoint:
        """The checkpoint at `path`: a ckpt-* folder, or a run's out_dir (its latest or best)."""
        found = find_checkpoint(path, which)
        try:
            return cls(found, read_state(found))
        except GPTError as e:
            raise GPTError(f"{e}; {_another_checkpoint(found)}") from None

    @property
    def config(self) -> RunConfig:
        """The run config the checkpoint was trained with."""
        try:
            values = self.state["config"]
            model = values.get("model", {})
            if "vocab_size" in model and "padded_vocab_size" not in model:
                # saved before the two sizes were told apart: vocab_size was the padded one
                real = tokenizer_from_dict(self.tokenizer).vocab_size
                model = {**model, "vocab_size": real, "padded_vocab_size": model["vocab_size"]}
                values = {**values, "model": model}
            return from_dict(values)
        except (GPTError, KeyError, TypeError) as e:
            raise GPTError(
                f"{self.path / 'state.json'} holds no usable config ({e}); "
                f"{_another_checkpoint(self.path)}"
            ) from None

    @property
    def trained_in(self) -> Path | None:
        """The folder `gpt train` ran in, where the saved config's relative paths (data_dir)
        start: the run folder less its relative out_dir, wherever the checkpoint is opened
        from. None when that cannot be told: an absolute out_dir, or a run folder renamed."""
        out_dir = Path(self.config.train.out_dir)
        run = Path(os.path.abspath(self.path)).parent
        cut = len(run.parts) - len(out_dir.parts)  # out_dir = "." has no parts
        if out_dir.is_absolute() or ".." in out_dir.parts or run.parts[cut:] != out_dir.parts:
            return None
        return Path(*run.parts[:cut])

    @property
    def optimizer_files(self) -> list[str]:
        """The optimizer files state.json records (`optimizer_files`)."""
        return optimizer_files(self.state)

    @property
    def has_optimizer(self) -> bool:
        """Whether the optimizer state is there to resume training (inference does without it)."""
        files = self.optimizer_files
        return bool(files) and all((self.path / f).exists() for f in files)

    def optimizer_state(self, rows: Mapping[int, Rows] | None = None) -> dict[str, Any]:
        """The saved optimizer state, whole or the `rows` of it (`load_optimizer_state`)."""
        return load_optimizer_state(self.path, self.optimizer_files, rows)

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The tokenizer record (rebuilt with `tokenizer.tokenizer_from_dict`)."""
        return self.state["tokenizer"]

    def load_into(self, model: GPT) -> None:
        """Copy the checkpoint's weights into `model` (built from its config)."""
        load_weights(self.path, model)

    def load_model(self, device: str | torch.device = "cpu") -> GPT:
        """The trained model, in eval mode, on `device`."""
        model = GPT(self.config.model)
        self.load_into(model)
        return model.to(device).eval()
