"""HF models as starting points: `hf:NAME_OR_PATH` (or a GPT-2 short name) read like a checkpoint.

A pretrained model is a folder written by `save_pretrained`, or a hub repository downloaded
into HF's cache. Its config.json becomes a `ModelConfig`, its `*.safetensors` weights are read
without building the HF model and without unpickling anything, and its tokenizer becomes a
record that every checkpoint of a run started from it carries, so resuming and sampling that
run never need the hub again.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gpt.checkpoint import Checkpoint
from gpt.config import RUNTIME_MODEL_KEYS, ModelConfig, RunConfig, fit_vocabulary
from gpt.errors import GPTError, first_line
from gpt.fileio import MiB, TooLargeError, open_regular, read_bounded
from gpt.model import GPT
from gpt.weights import SafetensorsFiles, Weights

HF_PREFIX = "hf:"
GPT2_NAMES = {  # nanoGPT's init_from names, on the hub under openai-community
    name: f"openai-community/{name}" for name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl")
}
# what a model is described by; its *.safetensors come only when its weights are needed, and
# pickled weights never
HUB_FILES = ["*.json", "*.txt", "tokenizer.model", "*.jinja"]  # *.jinja: a chat template
HUB_WEIGHTS = ["*.safetensors", "*.safetensors.index.json"]
DESCRIPTION_LIMIT = 512 * MiB  # bytes of one of HUB_FILES: the largest tokenizer.json is ~35 MB


def is_pretrained(spec: str | Path) -> bool:
    """Whether a --checkpoint or init_from value names an HF model rather than a run's folder."""
    return isinstance(spec, str) and (spec.startswith(HF_PREFIX) or spec in GPT2_NAMES)


@dataclass(frozen=True)
class Pretrained:
    """An HF model read from its folder: what `gpt.checkpoint.Checkpoint` offers, for a model
    that no `gpt train` wrote (`path` is the name it was given by, for messages)."""

    path: str
    folder: Path
    model: ModelConfig
    tokenizer: dict[str, Any]
    repo: str | None = None  # the hub repository the folder is a cached copy of

    @property
    def config(self) -> RunConfig:
        """A run config holding the model; every other section at its defaults."""
        return RunConfig(model=self.model)

    def weights_for(self, config: ModelConfig) -> Weights:
        """The weights as ours name them, read by slices from the safetensors files, in float32,
        for a model of `config`, which may have fewer positions (a shorter context)."""
        from gpt.hf.convert import hf_names, hf_rows, our_shapes

        folder = self.folder if self.repo is None else _download(self.repo, self.path, HUB_WEIGHTS)

        def damaged(path: Path, e: Exception) -> GPTError:
            return GPTError(f"{self.path}: {path} is damaged or missing ({first_line(e, 120)})")

        def misfit(detail: str) -> GPTError:
            return GPTError(f"{self.path}: weights do not fit the model ({detail})")

        files = SafetensorsFiles(_safetensors_files(folder, self.path), damaged)
        names = hf_names(self.model, files.shapes, lambda name: files.read(name, slice(None)))
        shapes = {key: tuple(shape) for key, shape in our_shapes(self.model).items()}
        if "transformer.wpe.weight" in shapes:  # (T, C): the first block_size positions
            positions = shapes["transformer.wpe.weight"]
            shapes["transformer.wpe.weight"] = (min(config.block_size, positions[0]), positions[1])

        def read(key: str, rows: slice) -> torch.Tensor:
            return hf_rows(self.model, key, names[key], files.shapes, files.read, rows).float()

        return Weights(shapes, read, misfit)

    def load_into(self, model: GPT) -> None:
        """Copy the weights into `model` (whole, or each process's rows of a sharded one),
        which may have fewer positions (a shorter context)."""
        self.weights_for(model.config).load_into(model)

    def load_model(self, device: str | torch.device = "cpu") -> GPT:
        """The model, in eval mode, on `device`."""
        model = GPT(self.model)
        self.load_into(model)
        return model.to(device).eval()


def open_model(spec: str | Path, which: str = "latest") -> Checkpoint | Pretrained:
    """A model to run or start from: a run's checkpoint (its out_dir or a ckpt-* folder), or an
    HF model (`hf:FOLDER`, `hf:OWNER/NAME`, `gpt2`, ... `gpt2-xl`)."""
    if not is_pretrained(spec):
        return Checkpoint.open(spec, which)
    if which != "latest":
        raise GPTError(f"--which {which} picks a checkpoint of a run; {spec} is an HF model")
    return open_pretrained(str(spec))


def open_pretrained(spec: str) -> Pretrained:
    """The HF model `spec` names: `hf:FOLDER`, `hf:HUB/NAME`, or gpt2, gpt2-medium, ...-xl.
    Only its config and tokenizer are read here (downloaded, for a hub name)."""
    name = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else GPT2_NAMES[spec]
    if not name.strip():
        raise GPTError(f"{spec!r} names no model; write hf:FOLDER or hf:OWNER/NAME")
    folder = Path(name).expanduser()
    repo = None
    if not _is_folder(folder, spec):
        if folder.exists() or name.startswith((".", "/", "~")) or not _is_repo_id(name):
            raise GPTError(
                f"{spec}: {folder} is neither a folder nor a hub name (OWNER/NAME); pass a "
                "folder written by save_pretrained"
            )
        folder, repo = _download(name, spec, HUB_FILES), name
    _check_described_files(folder, spec)
    hf_config = _read_hf_config(folder, spec)
    from gpt.hf.convert import model_config_from_hf

    model = model_config_from_hf(hf_config)
    tokenizer = _tokenizer_record(folder, spec, hf_config, model)
    model = fit_vocabulary(model, _tokenizer_vocab(tokenizer), pretrained=spec)
    return Pretrained(path=spec, folder=folder, model=model, tokenizer=tokenizer, repo=repo)


def _is_folder(folder: Path, spec: str) -> bool:
    try:
        return folder.is_dir()
    except OSError as e:  # a name too long for a path, a folder we may not look into
        raise GPTError(f"{spec}: cannot look at {folder} ({e.strerror})") from None


def _is_repo_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
        return True
    except HFValidationError:
        return False


def _download(name: str, spec: str, patterns: list[str]) -> Path:
    """The hub repository's files that match `patterns`, through HF's cache (a cached copy is
    used with no network)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (  # where every release since 0.14 has them
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except LocalEntryNotFoundError:
        why = "the hub is unreachable and HF's cache does not hold it"
    except GatedRepoError:
        why = "it is gated: accept its terms on the hub, then log in with `hf auth login`"
    except RepositoryNotFoundError:
        why = "no such repository (or it is private: log in with `hf auth login`)"
    except Exception as e:
        why = first_line(e, 120)
    raise GPTError(
        f"{spec}: could not download {name!r} from the HF hub ({why}); without network, pass "
        "a local folder written by save_pretrained: hf:path/to/folder"
    )


def _check_described_files(folder: Path, spec: str) -> None:
    """Refuse the folder's config and tokenizer files (what HUB_FILES names) that transformers
    could not read in bounded time and memory: a device or FIFO in a file's place, a file over
    DESCRIPTION_LIMIT; and name one this user cannot read, before transformers reads them."""
    for path in sorted({p for pattern in HUB_FILES for p in folder.glob(pattern)}):
        try:
            with open_regular(path) as file:
                if os.fstat(file.fileno()).st_size > DESCRIPTION_LIMIT:
                    raise TooLargeError(path, DESCRIPTION_LIMIT, "a model's config or tokenizer")
        except IsADirectoryError:
            continue
        except OSError as e:
            raise GPTError(f"{spec}: cannot read {path} ({e.strerror}){_FIX_READ}") from None


_FIX_READ = "; make it a file you can read (its owner can: chmod a+r), or remove it"


def _read_hf_config(folder: Path, spec: str) -> Any:
    """The folder's config.json as transformers' config class (no network: a local folder)."""
    if not (folder / "config.json").is_file():
        raise GPTError(
            f"{spec}: {folder} has no config.json; pass a folder written by save_pretrained"
        )
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:
        raise GPTError(
            f"{spec}: {folder / 'config.json'} cannot be read ({first_line(e, 150)})"
        ) from None


def _tokenizer_record(folder: Path, spec: str, hf_config: Any, model: ModelConfig) -> dict:
    """The folder's own tokenizer; a GPT-2 folder without one takes GPT-2's (bundled)."""
    from gpt.hf.tokenizers import tokenizer_record_from_folder

    label = spec[len(HF_PREFIX):] if spec.startswith(HF_PREFIX) else spec
    record = tokenizer_record_from_folder(folder, Path(label.rstrip("/")).name or label)
    if record is not None:
        return record
    gpt2 = {"name": "gpt2"}
    if hf_config.model_type == "gpt2" and model.padded_vocab_size == _tokenizer_vocab(gpt2):
        return gpt2
    raise GPTError(
        f"{spec}: {folder} holds no tokenizer (tokenizer.json); save the model's tokenizer "
        "there with tokenizer.save_pretrained(folder)"
    )


def _tokenizer_vocab(record: dict[str, Any]) -> int:
    from gpt.tokenizer import tokenizer_from_dict

    return tokenizer_from_dict(record).vocab_size


def _safetensors_files(folder: Path, spec: str) -> list[Path]:
    """The folder's safetensors files (one file, or the shards of an index), each readable."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            text = read_bounded(index, DESCRIPTION_LIMIT, "a model's config or tokenizer")
            names = sorted(set(json.loads(text)["weight_map"].values()))
        except OSError as e:
            raise GPTError(f"{spec}: cannot read {index} ({e.strerror}){_FIX_READ}") from None
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise GPTError(f"{spec}: {index} is damaged (no weight_map)") from None
        files = [folder / n for n in names]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in folder.glob("pytorch_model*")]  # HF's pickled weights
        hint = (f" (it has {pickled[0]}, a pickle, which gpt does not load: re-save it with "
                "save_pretrained(folder, safe_serialization=True))") if pickled else ""
        raise GPTError(f"{spec}: {folder} holds no *.safetensors weights{hint}")
    for path in files:
        try:
            open_regular(path).close()  # safetensors says "No such file" for an unreadable one
        except OSError as e:
            raise GPTError(f"{spec}: cannot read {path} ({e.strerror}){_FIX_READ}") from None
    return files


def model_from_pretrained(user: ModelConfig, base: ModelConfig, init_from: str) -> ModelConfig:
    """The model of a run started from an HF model: the base's shape, and from the run's own
    [model] section only the runtime keys (dropout, ...) and a shorter `block_size`.

    A shape key the run's config sets (other than its default) to another value than the
    base's is an error rather than silently ignored. `block_size` left at its default becomes
    min(default, the base's): the context to finetune with.
    """
    defaults = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        mine, theirs = getattr(user, f.name), getattr(base, f.name)
        if f.name in RUNTIME_MODEL_KEYS or f.name == "block_size":
            continue
        if mine != getattr(defaults, f.name) and mine != theirs:
            raise GPTError(
                f"[model] {f.name} = {mine!r} does not apply: the model comes from "
                f"init_from = {init_from!r}, which has {theirs!r}; remove the key"
            )
    block_size = user.block_size
    if block_size == defaults.block_size:
        block_size = min(block_size, base.block_size)
    elif block_size > base.block_size:
        raise GPTError(
            f"[model] block_size = {block_size} is longer than the {base.block_size} positions "
            f"of init_from = {init_from!r}; set it to at most {base.block_size}"
        )
    runtime = {key: getattr(user, key) for key in RUNTIME_MODEL_KEYS}
    return dataclasses.replace(base, block_size=block_size, **runtime)
