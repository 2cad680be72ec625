"""Checkpoints that survive a crash at any instant, loaded without executing pickled code.

Layout of a run folder (`[train] out_dir`):

    ckpt-0000600/            one checkpoint
      model.safetensors      weights, whole even from a sharded run (a tied LM head is stored
                             once, as the token embedding); a LoRA finetune's holds only its
                             adapters (`*.lora_A`, `*.lora_B`: gpt/lora.py)
      optimizer.pt           optimizer state (AdamW's, or Muon's and AdamW's by name); read back
                             with torch.load(weights_only=True); only resuming needs it, so a
                             weights-only checkpoint (optimizer files deleted to save space)
                             still samples, evaluates and finetunes
      optimizer-00000-of-00004.pt, ...
                             instead of optimizer.pt, from an FSDP run: each process's rows of
                             the state (torch's state dict of the local rows, plus `rows`:
                             {key: [start, stop]}), so no process ever holds it whole; any
                             layout reads the rows it needs from them. An HSDP run's first
                             replica writes them, as an FSDP run of its S processes would
      state.json             iteration, tokens, best val loss, wandb id, the resolved config,
                             the tokenizer, data sampler and RNG states (every rank's),
                             GradScaler state, and the sha256 of every file above; a LoRA
                             finetune's also `lora`: the base it adapts (init_from's checkpoint
                             or HF model) with the sha256 of its weights, rank, alpha, targets
    latest                   name of the newest checkpoint folder
    best                     name of the checkpoint with the lowest val loss

A checkpoint is written into a hidden temporary folder, every file flushed to disk, then renamed
into place; the `latest` pointer is replaced atomically last. A crash at any point leaves the
previous checkpoint and pointer intact.

A run saves and restores through one `Checkpointer`, with which each part of its state registers
once, so that what is saved and what is restored cannot drift apart. The names in a run folder
are gpt/layout.py's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import random
import re
import shutil
import warnings
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from safetensors.torch import save_file

from gpt.config import ModelConfig, RunConfig, from_dict
from gpt.errors import GPTError, first_line
from gpt.fileio import fsync_dir, new_file_mode, sha256_file, write_failure
from gpt.layout import (
    STATE,
    WEIGHTS,
    OptimizerRows,
    Rows,
    checkpoint_name,
    iteration_of,
    list_checkpoints,
    load_state_json,
    optimizer_files,
    read_pointer,
    temporary_folder,
    write_pointer,
)
from gpt.lora import LoRA, add_adapters, is_adapter_key, merge_adapters, weights_sha256
from gpt.model import GPT
from gpt.parallel import Dist, unwrap
from gpt.parallel.sharding import is_sharded
from gpt.tokenizer import tokenizer_from_dict
from gpt.weights import VOCABULARY_KEYS, SafetensorsFiles, Weights, load_with_chat_tokens

if TYPE_CHECKING:
    from gpt.hf.pretrained import Pretrained


class Stateful(Protocol):
    """A part of a run's state that a checkpoint saves and restores."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


def begin_checkpoint(out_dir: Path, iteration: int) -> Path:
    """The empty temporary folder that `ckpt-<iteration>` is written into (one process makes it,
    the others write into it once it exists); leftovers of a crash are removed first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".tmp-ckpt-*"):  # the run lock says no other save is live
        shutil.rmtree(stale, ignore_errors=True)
    folder = temporary_folder(out_dir, iteration)
    folder.mkdir()
    return folder


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
    name, state = final.name, {**state, "iter": iteration_of(final)}
    save_file(weights, str(folder / WEIGHTS))
    os.chmod(folder / WEIGHTS, new_file_mode())  # safetensors leaves it 0o600
    hashes = {WEIGHTS: sha256_file(folder / WEIGHTS), **optimizer_hashes}
    (folder / STATE).write_text(json.dumps({**state, "sha256": hashes}, indent=1))
    for f in (WEIGHTS, STATE):
        _fsync(folder / f)
    fsync_dir(folder)
    if final.exists():  # a re-save of the same iteration (e.g. after a resume)
        shutil.rmtree(final)
    os.rename(folder, final)
    fsync_dir(out_dir)
    if is_best:
        write_pointer(out_dir, "best", name)
    write_pointer(out_dir, "latest", name)
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
    best = read_pointer(out_dir / "best")
    kept = 0
    for old in list_checkpoints(out_dir):
        if iteration_of(old) > iteration_of(saved):
            continue
        if old == saved or (old.name not in damaged and kept < keep_last):
            kept += 1
        elif old.name != best:
            shutil.rmtree(old, ignore_errors=True)


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
    if (path / STATE).exists():
        return path
    if not path.exists():
        raise GPTError(
            f"checkpoint path {path} does not exist; pass a run's out_dir or a ckpt-* folder"
        )
    name = read_pointer(path / which)
    if name is not None and (path / name / STATE).exists():
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
    state_path = ckpt / STATE
    try:
        state = load_state_json(state_path)
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


def open_weights(ckpt: Path) -> Weights:
    """The checkpoint's model.safetensors, to be read by rows."""
    path = ckpt / WEIGHTS
    again = lambda: _another_checkpoint(ckpt)  # noqa: E731  (only when it fails)

    def damaged(_: Path, e: Exception) -> GPTError:
        return GPTError(f"{path} is damaged ({first_line(e, 120)}); {again()}")

    def misfit(detail: str) -> GPTError:
        return GPTError(
            f"{path} does not fit the model that {ckpt / STATE} describes ({detail}): its "
            f"config was edited or belongs to other weights; {again()}"
        )

    files = SafetensorsFiles([path], damaged)
    return Weights(files.shapes, lambda key, rows: files.read(key, rows).float(), misfit)


def load_weights(ckpt: Path, model: torch.nn.Module, adapters: bool = False) -> None:
    """Load model.safetensors into `model` (whole, or each process's rows of a sharded one);
    with `adapters`, a LoRA checkpoint's, which holds only the adapters of a model that
    carries them."""
    open_weights(ckpt).load_into(model, is_adapter_key if adapters else None)


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
    ckpt: Path, files: list[str], rows: OptimizerRows | None = None
) -> dict[str, Any]:
    """The optimizer state saved with the weights, loaded without executing pickled code.

    `files` are the checkpoint's optimizer files (`optimizer_files`): optimizer.pt, or a
    sharded run's. `rows` asks for part of each parameter (by state key, under each
    optimizer's name for Muon's and AdamW's) instead of all of it: this process's rows under
    FSDP. The files are memory-mapped, so only the rows asked for are read, whatever layout
    wrote them.
    """
    parts = [_load_tensors(ckpt, f) for f in files]
    if len(parts) == 1 and "rows" not in parts[0] and not rows:
        return parts[0]  # a whole state, wanted whole (AdamW's, or Muon's and AdamW's by name)
    return _rows_of_state(parts, rows)


def _named(state: dict[str, Any]) -> bool:
    """Whether a saved optimizer state holds several optimizers' by name (Muon's and AdamW's),
    rather than one optimizer's `state` and `param_groups`."""
    return "state" not in state


def _rows_of_state(parts: list[dict[str, Any]], rows: OptimizerRows | None) -> dict[str, Any]:
    """The `rows` (all if None) of one optimizer's state, or of each named one's, from the
    parts that hold them."""
    if _named(parts[0]):
        return {name: _rows_of_state([part[name] for part in parts], (rows or {}).get(name))
                for name in parts[0]}
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

    def optimizer_state(self, rows: OptimizerRows | None = None) -> dict[str, Any]:
        """The saved optimizer state, whole or the `rows` of it (`load_optimizer_state`)."""
        return load_optimizer_state(self.path, self.optimizer_files, rows)

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The tokenizer record (rebuilt with `tokenizer.tokenizer_from_dict`)."""
        return self.state["tokenizer"]

    @property
    def lora(self) -> dict[str, Any] | None:
        """A LoRA finetune's record (`LoRA.record`): its base and the adapters' shape; None
        for a checkpoint that holds every weight."""
        return self.state.get("lora")

    def weights_for(self, config: ModelConfig) -> Weights:
        """The checkpoint's weights, read by rows (a model of `config` must have its shape). A
        LoRA finetune's adapters merge into its base on a whole model on the CPU first (built
        with the run's random state left as it was): the merge needs every row."""
        if self.lora is None:
            return open_weights(self.path)
        with torch.random.fork_rng(devices=[]):
            merged = dict(self.load_model().named_parameters())  # a tied head once
        return Weights(
            {key: tuple(param.shape) for key, param in merged.items()},
            lambda key, rows: merged[key].detach()[rows],
            lambda detail: GPTError(f"{self.path} does not fit the model to fill ({detail}); "
                                    f"{_another_checkpoint(self.path)}"),
        )

    def load_into(self, model: GPT) -> None:
        """Copy the checkpoint's weights into `model` (built from its config; whole, or
        sharded: each process reads its rows): a LoRA finetune's base with its adapters merged
        in, so that `model` stays a plain GPT."""
        if self.lora is not None and not is_sharded(next(model.parameters())):
            self.load_adapted(model, LoRA.from_record(self.lora), seed=0)
            merge_adapters(model)
            return
        self.weights_for(unwrap(model).config).load_into(model)

    def load_adapted(self, model: GPT, lora: LoRA, seed: int) -> None:
        """A LoRA finetune's model as it trains: its base's weights, checked against the
        recorded hash, then adapters of `lora`'s shape holding the saved ones."""
        record = self.lora
        assert record is not None
        base = self.base()
        if all(getattr(base.config.model, k) == getattr(model.config, k) for k in VOCABULARY_KEYS):
            base.load_into(model)
        else:  # a finetune that added the chat tokens: their rows as it began them
            load_with_chat_tokens(base, model)
        if weights_sha256(model) != record["base_sha256"]:
            raise GPTError(
                f"{self.path} holds LoRA adapters of {record['base']}, whose weights have changed "
                "since (their sha256 differs); restore the base it was trained on, or finetune "
                "again from this one"
            )
        add_adapters(model, lora, seed)
        load_weights(self.path, model, adapters=True)

    def base(self) -> Checkpoint | Pretrained:
        """The model a LoRA finetune adapts: a relative path is found from the folder training
        ran in (where init_from named it), else from here."""
        from gpt.hf.pretrained import HF_PREFIX, is_pretrained, open_model  # it imports this

        record = self.lora
        assert record is not None
        spec = record["base"]
        prefix = HF_PREFIX if spec.startswith(HF_PREFIX) else ""
        path = Path(spec[len(prefix):])
        root = self.trained_in
        local = prefix or not is_pretrained(spec)  # not a hub name (gpt2, ...)
        places = [root / path, path] if root is not None and not path.is_absolute() else [path]
        found = next((place for place in places if place.exists()), None)
        if local and found is not None:
            spec = prefix + str(found)
        if found is None and not is_pretrained(spec):  # a run's checkpoint, gone
            looked = dict.fromkeys(os.path.abspath(place) for place in places)
            problem = f"it is not at {' nor at '.join(looked)}"
        else:
            try:
                return open_model(spec)
            except GPTError as e:
                problem = str(e)
        raise GPTError(
            f"{self.path} holds LoRA adapters of {record['base']}, which cannot be opened "
            f"({problem}); put the base back where training found it"
        )

    def load_model(self, device: str | torch.device = "cpu") -> GPT:
        """The trained model, in eval mode, on `device`."""
        model = GPT(self.config.model)
        self.load_into(model)
        return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# A run's checkpoints: what is saved, when, by which process, and restored from them


class Checkpointer:
    """Saves a run's checkpoints and restores the run from one: the weights, the optimizer
    state and every registered state, each written by the processes that hold it.

    `states` register once, each under its key of state.json (None: its entries at the top
    level, as the run's counters and RNG states are); `restore` loads them back in the same
    order (the RNGs last), so a save and a restore cannot drift apart. `fixed` entries (the
    config, the tokenizer) are written as they are: they describe the run, not restore it. It
    decides for itself when to save (`due`) and what to prune.
    """

    def __init__(
        self,
        out_dir: Path,
        world: Dist,
        model: torch.nn.Module,
        optimizer: Stateful,
        *,
        states: Sequence[tuple[str | None, Stateful]] = (),
        fixed: Mapping[str, Any] | None = None,
        interval: int = 1,
        keep_last: int = 2,
        damaged: Collection[str] = (),
        adapters_only: bool = False,
    ) -> None:
        self.out_dir, self.world, self.model, self.optimizer = out_dir, world, model, optimizer
        self.adapters_only = adapters_only  # a LoRA finetune saves its adapters, not its base
        self.states = list(states)
        self.fixed = dict(fixed or {})
        self.interval, self.keep_last = interval, keep_last
        self.latest: Path | None = None  # the newest checkpoint on disk (restored or saved)
        # checkpoints newer than the resumed one that failed their check: never kept as good ones
        self.damaged = set(damaged)

    def due(self, step: int, last_step: bool = False, stopping: bool = False) -> bool:
        """Whether `step` is saved: every `interval` steps, the last one, and on a signal."""
        return step % self.interval == 0 or last_step or stopping

    def save(self, step: int, *, last_step: bool = False, stopping: bool = False,
             is_best: bool = False) -> Path | None:
        """Save `step` when it is due (every process calls this): the checkpoint written, or
        None when it was not due."""
        if not self.due(step, last_step, stopping):
            return None
        self._write(step, is_best)
        return self.latest

    def restore(self, resumed: Checkpoint) -> None:
        """The optimizer and every registered state as `resumed` left them (the optimizer's
        state may come from another layout: under FSDP each process reads only its rows)."""
        self.world.load_optimizer_state(self.optimizer, resumed.optimizer_state)
        for key, state in self.states:
            saved = resumed.state if key is None else resumed.state.get(key)
            if saved:  # a disabled GradScaler's is saved as null
                state.load_state_dict(saved)
        self.latest = resumed.path

    def _state(self) -> dict[str, Any]:
        """What state.json holds besides the file hashes (a collective: states may gather):
        the top-level entries, then the fixed ones, then the keyed states, as ever written."""
        top: dict[str, Any] = {}
        keyed: dict[str, Any] = {}
        for key, part in self.states:
            saved = part.state_dict()
            if key is None:
                top.update(saved)
            else:
                keyed[key] = saved or None
        return {**top, **self.fixed, **keyed}

    def _write(self, step: int, is_best: bool) -> None:
        """Every process joins: rank 0 writes the weights (gathered from the shards under FSDP)
        and state.json; the optimizer state is rank 0's, or under FSDP each process's rows of
        it (under HSDP the first replica's processes': `Dist.optimizer_state`). A write that
        fails in any process stops every process with one error, and the previous checkpoint
        stays as it was."""
        world, out_dir = self.world, self.out_dir
        # the collectives come first, joined by every process outside the steps that may fail
        # in one of them; an unsharded model's weights are copied inside the last step
        state = self._state()
        keep = is_adapter_key if self.adapters_only else None
        gathered = world.model_state(self.model, keep) if world.sharded else None
        folder = temporary_folder(out_dir, step)
        with self._writing(folder, step):
            if world.main:
                begin_checkpoint(out_dir, step)
        hashes: dict[str, str] = {}
        with self._writing(folder, step):
            if (mine := world.optimizer_state(self.optimizer)) is not None:
                hashes = write_optimizer(folder, *mine)
        hashes = {name: sha for each in world.gather(hashes) for name, sha in each.items()}
        with self._writing(folder, step):
            if world.main:
                weights = gathered if gathered is not None else world.model_state(self.model,
                                                                                  keep)
                finish_checkpoint(folder, weights, state, hashes, self.keep_last, is_best,
                                  self.damaged)
        self.latest = out_dir / checkpoint_name(step)  # every process names it in messages
        self.damaged.discard(self.latest.name)  # overwritten: good now

    @contextlib.contextmanager
    def _writing(self, folder: Path, step: int) -> Iterator[None]:
        """One step of a save, which every process enters: a failure in any (a full disk, say)
        removes the temporary `folder` and raises the same one-line error in every process, so
        none waits for the others at a collective. A failure that is no write failure is a
        bug: in one process it goes up as it is."""
        out_dir, world = folder.parent, self.world
        problem = None
        try:
            yield
        except Exception as e:
            failure = write_failure(e, out_dir)
            if failure is None and world.world_size == 1:
                shutil.rmtree(folder, ignore_errors=True)
                raise
            problem = (_save_failed(out_dir, step, failure, self.latest)
                       if failure is not None else
                       f"saving the checkpoint failed on rank {world.rank}: {first_line(e, 200)}")
        first = next((p for p in world.gather(problem) if p is not None), None)
        if first is not None:
            if world.main:
                shutil.rmtree(folder, ignore_errors=True)
            raise GPTError(first)


def _save_failed(out_dir: Path, iteration: int, error: OSError, previous: Path | None) -> str:
    """The one-line error of a checkpoint that could not be written: what failed, and that the
    run goes on from the previous checkpoint, which a failed save leaves as it was."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        problem = (f"no space left on the disk of {out_dir} for the checkpoint of iteration "
                   f"{iteration}; free some space (or lower train.keep_last)")
    else:
        problem = (f"cannot write the checkpoint of iteration {iteration} into {out_dir} "
                   f"({error.strerror or error}); make it writable")
    if previous is None:
        return f"{problem}, then run gpt train again (no checkpoint was saved yet)"
    return (f"{problem}, then run gpt train again to resume from {previous}, which is intact "
            "(checkpoints are written atomically)")


class Each(dict[str, Stateful]):
    """Named states saved together under one key (the data samplers)."""

    def state_dict(self) -> dict[str, Any]:
        return {name: part.state_dict() for name, part in self.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, part in self.items():
            part.load_state_dict(state[name])


class RandomStates:
    """Every random number generator a run draws from (Python's, numpy's, torch's, CUDA's), in
    every process, as plain data: each process restores its own (its dropout masks), or rank
    0's when the number of processes changed."""

    def __init__(self, world: Dist) -> None:
        self.world = world

    def state_dict(self) -> dict[str, Any]:
        ranks = self.world.gather(rng_state())  # a collective: every process saves
        return {"rng": ranks[0], "rng_ranks": ranks if len(ranks) > 1 else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ranks = state.get("rng_ranks") or [state["rng"]]
        same_world = len(ranks) == self.world.world_size
        set_rng_state(ranks[self.world.rank] if same_world else ranks[0])


def rng_state() -> dict[str, Any]:
    """This process's RNG states, as plain data."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])
