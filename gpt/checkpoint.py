"""Checkpoints that survive a crash at any instant, loaded without executing pickled code.

Layout of a run folder (`[train] out_dir`):

    ckpt-0000600/            one checkpoint
      model.safetensors      weights (a tied LM head is stored once, as the token embedding)
      optimizer.pt           optimizer state (AdamW's, or Muon's and AdamW's by name); read back
                             with torch.load(weights_only=True); only resuming needs it, so a
                             weights-only checkpoint (optimizer.pt deleted to save space) still
                             samples, evaluates and finetunes
      state.json             iteration, tokens, best val loss, wandb id, the resolved config,
                             the tokenizer, data sampler and RNG states (every DDP rank's),
                             GradScaler state, and the sha256 of the two files above
    latest                   name of the newest checkpoint folder
    best                     name of the checkpoint with the lowest val loss

A checkpoint is written into a hidden temporary folder, every file flushed to disk, then renamed
into place; the `latest` pointer is replaced atomically last. A crash at any point leaves the
previous checkpoint and pointer intact.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from gpt.config import RunConfig, from_dict
from gpt.errors import GPTError, first_line
from gpt.fileio import fsync_dir, new_file_mode, sha256_file, write_atomic
from gpt.model import GPT
from gpt.tokenizer import tokenizer_from_dict

CKPT_PATTERN = re.compile(r"^ckpt-(\d+)$")
OPTIMIZER = "optimizer.pt"  # the one file a checkpoint may lack: inference needs only the weights
FILES = ("model.safetensors", OPTIMIZER)  # hashed in state.json


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
    """Weights to save: a tied head is the embedding itself, so it is stored once."""
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
    """Write `ckpt-<iteration>` atomically, then move `latest` (and `best`) and prune.

    `damaged` names the checkpoints that resume skipped as damaged, which pruning never keeps
    in place of good ones.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    name = f"ckpt-{iteration:07d}"
    final = out_dir / name
    for stale in out_dir.glob(".tmp-ckpt-*"):  # left by a crash; the run lock says none is live
        shutil.rmtree(stale, ignore_errors=True)
    tmp = out_dir / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_files(tmp, model, optimizer_state, {**state, "iter": iteration})
    except BaseException:  # a full disk, say: what was written goes, the rest stays as it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # a re-save of the same iteration (e.g. after a resume)
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(out_dir)
    if is_best:
        write_atomic(out_dir / "best", name + "\n")
    write_atomic(out_dir / "latest", name + "\n")
    _prune(out_dir, final, keep_last, damaged)
    return final


def _write_files(
    folder: Path, model: torch.nn.Module, optimizer_state: dict[str, Any], state: dict[str, Any]
) -> None:
    """A checkpoint's three files in `folder`, hashed into state.json and flushed to disk."""
    save_file(model_state(model), str(folder / "model.safetensors"))
    os.chmod(folder / "model.safetensors", new_file_mode())  # safetensors leaves it 0o600
    torch.save(optimizer_state, folder / OPTIMIZER)
    state = {**state, "sha256": {f: sha256_file(folder / f) for f in FILES}}
    (folder / "state.json").write_text(json.dumps(state, indent=1))
    for f in (*FILES, "state.json"):
        with open(folder / f, "rb") as handle:
            os.fsync(handle.fileno())
    fsync_dir(folder)


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
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


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
        return candidates[0]
    raise GPTError(
        f"no {which} checkpoint in {path}; train first (gpt train) or pass a ckpt-* folder"
    )


def read_state(ckpt: Path) -> dict[str, Any]:
    """state.json of a checkpoint, with every file present checked against its recorded sha256.

    optimizer.pt may be absent (a weights-only checkpoint): resuming, the only reader that
    needs it, checks `Checkpoint.has_optimizer` itself.
    """
    state_path = ckpt / "state.json"
    try:
        state = json.loads(state_path.read_text())
        recorded = state["sha256"]
    except FileNotFoundError:
        raise GPTError(f"{state_path} is missing: the checkpoint is incomplete") from None
    except (ValueError, KeyError, TypeError):
        raise GPTError(f"{state_path} is damaged (not the JSON a checkpoint writes)") from None
    for f in FILES:
        path = ckpt / f
        if not path.exists():
            if f == OPTIMIZER:
                continue
            raise GPTError(f"{path} is missing: the checkpoint is incomplete")
        if sha256_file(path) != recorded.get(f):
            raise GPTError(f"{path} is damaged (its sha256 differs from state.json)")
    return state


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


def load_optimizer_state(ckpt: Path) -> dict[str, Any]:
    """The optimizer state saved with the weights, loaded without executing pickled code."""
    path = ckpt / OPTIMIZER
    fix = (f"remove {ckpt} to resume from the checkpoint before it, or set train.out_dir to a "
           "new folder")
    try:
        with warnings.catch_warnings():  # torch warns of pickle protocols before it refuses
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True)
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
    def has_optimizer(self) -> bool:
        """Whether the optimizer state is there to resume training (inference does without it)."""
        return (self.path / OPTIMIZER).exists()

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
