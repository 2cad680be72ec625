"""`gpt export`: a trained model as a folder HF transformers loads with `from_pretrained`.

The folder holds config.json, model.safetensors, generation_config.json and the tokenizer's
files: `AutoModelForCausalLM.from_pretrained(folder)` builds a `GPT2LMHeadModel` (learned
positions), a `LlamaForCausalLM` (RoPE) or a `Qwen3ForCausalLM` (RoPE and QK-norm) with every
weight in place, and
`AutoTokenizer.from_pretrained(folder)` encodes text to the ids `gpt` gives it. A LoRA
finetune exports merged (its base plus its adapters), or with `--peft` as its adapters alone, in
PEFT's format. The folder is written beside its destination and renamed into place, so a failure
leaves nothing half-written and `--force` replaces an old folder only once the new one is
complete.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import save_file

from gpt.checkpoint import Checkpoint
from gpt.config import RunConfig
from gpt.errors import GPTError
from gpt.fileio import fsync_dir, new_file_mode, write_failure
from gpt.hf.pretrained import HF_PREFIX
from gpt.lora import LoRA, adapter_state
from gpt.model import GPT
from gpt.tokenizer import ChatTokenizer, tokenizer_from_dict


class Exportable(Protocol):
    """A checkpoint of a run, or an imported HF model (`gpt.hf.pretrained.open_model`)."""

    @property
    def path(self) -> Path | str: ...

    @property
    def config(self) -> RunConfig: ...

    @property
    def tokenizer(self) -> dict[str, Any]: ...

    def load_model(self, device: str | torch.device = "cpu") -> GPT: ...


def export(source: Exportable, out_dir: Path, force: bool) -> Path:
    """Write `source` into `out_dir` as an HF model folder; return the folder.

    Everything that can be refused (a variant HF cannot represent, a tokenizer it cannot hold,
    a non-empty `out_dir` without `force`) is refused before anything is written.
    """
    from gpt.hf.convert import check_hf_compatible, hf_config_from_model, weights_to_hf
    from gpt.hf.tokenizers import check_exportable_tokenizer, save_hf_tokenizer

    model_config = source.config.model
    check_hf_compatible(model_config)
    check_exportable_tokenizer(source.tokenizer)
    _check_destination(out_dir, force, _source_folder(source))
    with _new_folder(out_dir) as tmp:
        special = save_hf_tokenizer(source.tokenizer, tmp, model_max_length=model_config.block_size)
        if source.tokenizer.get("name") == "char":
            # the char tokenizer's end of text is the newline: HF generate would stop every line
            special = {**special, "eos_token_id": None}
        hf_config = hf_config_from_model(model_config, **special)
        hf_config.save_pretrained(str(tmp))
        _generation_config(special, source.tokenizer).save_pretrained(str(tmp))
        model = source.load_model("cpu")  # a LoRA finetune's adapters merged in
        weights = weights_to_hf(model_config, model.state_dict())
        _save_safetensors(weights, tmp / "model.safetensors")
    return out_dir


def export_adapter(source: Exportable, out_dir: Path, force: bool) -> Path:
    """Write a LoRA finetune's adapters into `out_dir` as PEFT writes them (adapter_config.json,
    adapter_model.safetensors): `PeftModel.from_pretrained(base, out_dir)` loads them on its
    base as HF holds it (the base exported with gpt export, or the HF model it adapts)."""
    from gpt.hf.convert import adapters_to_peft, check_hf_compatible

    record = source.lora if isinstance(source, Checkpoint) else None
    if not isinstance(source, Checkpoint) or record is None:
        raise GPTError(
            f"{source.path} holds a whole model, not LoRA adapters (a run trained with "
            "train.finetune = \"lora\"); export it without --peft"
        )
    model_config = source.config.model
    check_hf_compatible(model_config)
    if source.base().config.model.vocab_size != model_config.vocab_size:
        raise GPTError(
            f"{source.path} added the chat tokens to its base's vocabulary, whose new rows "
            "PEFT's adapters cannot carry; export it merged, without --peft"
        )
    _check_destination(out_dir, force, _source_folder(source))
    lora = LoRA.from_record(record)
    model = GPT(model_config)
    source.load_adapted(model, lora, seed=0)  # the base too: its hash must still match
    adapters, modules = adapters_to_peft(model_config, adapter_state(model))
    learned = model_config.pos_embedding == "learned"
    base = record["base"].removeprefix(HF_PREFIX)
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base,
        "r": lora.rank, "lora_alpha": lora.alpha, "lora_dropout": source.config.train.lora_dropout,
        "target_modules": modules, "fan_in_fan_out": learned,  # GPT-2's Conv1D holds W^T
        "bias": "none", "inference_mode": True, "init_lora_weights": True,
        "use_rslora": False, "use_dora": False, "modules_to_save": None,
    }
    with _new_folder(out_dir) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        os.chmod(tmp / "adapter_config.json", new_file_mode())
        _save_safetensors(adapters, tmp / "adapter_model.safetensors")
    return out_dir


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    save_file(tensors, str(path), metadata={"format": "pt"})
    os.chmod(path, new_file_mode())  # safetensors leaves it 0o600


@contextlib.contextmanager
def _new_folder(out_dir: Path) -> Iterator[Path]:
    """A temporary folder beside `out_dir` to write into; once written, every file is flushed
    and it replaces `out_dir`. A failure removes it and leaves `out_dir` as it was (a write
    failure as one line)."""
    target = out_dir.resolve()  # "." and "dir/.." have a parent and a name only when resolved
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    except OSError as e:
        raise GPTError(f"--out {out_dir}: cannot write there ({e.strerror or e})") from None
    try:
        yield tmp
        for path in tmp.iterdir():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())
        _replace(tmp, target)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        failure = write_failure(e, tmp.parent) if isinstance(e, Exception) else None
        if failure is None:
            raise
        fix = ("free some space or " if failure.errno in (errno.ENOSPC, errno.EDQUOT) else
               "make it writable or " if failure.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
               else "")
        raise GPTError(
            f"--out {out_dir}: writing failed ({failure.strerror or failure}); {fix}choose "
            "another folder (nothing was replaced)"
        ) from None


def _source_folder(source: Exportable) -> Path:
    """The folder the model is read from: a checkpoint's, or an HF model's."""
    return Path(getattr(source, "folder", source.path)).resolve()


def _check_destination(out_dir: Path, force: bool, source: Path) -> None:
    """Export writes a new folder, or replaces a non-empty one only with --force, and never one
    that holds the model it exports."""
    try:
        _check_folder(out_dir, force, source)
    except OSError as e:  # it, or a folder above it, cannot be read
        raise GPTError(f"cannot read --out {out_dir} ({e.strerror}); choose a folder you can "
                       "write") from None


def _check_folder(out_dir: Path, force: bool, source: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise GPTError(f"--out {out_dir} is a file; give a folder path")
    if out_dir.resolve() == source or out_dir.resolve() in source.parents:
        raise GPTError(
            f"--out {out_dir} holds the model being exported ({source}); choose another folder"
        )
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise GPTError(
            f"--out {out_dir} is not empty; choose a new folder, or pass --force to replace it"
        )


def _generation_config(special: dict[str, int | None], tokenizer: dict[str, Any]) -> Any:
    """Sampling defaults for HF `generate`: its special ids, nothing else; a tokenizer with the
    chat tokens ends a generation at <|im_end|> too, as `gpt chat` does."""
    from transformers import GenerationConfig

    ids: dict[str, Any] = {k: v for k, v in special.items() if v is not None}
    chat = tokenizer_from_dict(tokenizer)
    if isinstance(chat, ChatTokenizer):
        eos, end_of_turn = special["eos_token_id"], chat.chat_ids[1]
        ids["eos_token_id"] = [end_of_turn] if eos is None else [eos, end_of_turn]
    return GenerationConfig(**ids)


def _replace(tmp: Path, out_dir: Path) -> None:
    """Move the finished folder into place; an old one goes only after the new one is there."""
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    replacing = out_dir.exists()
    if replacing:
        os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        if replacing:
            os.rename(old, out_dir)  # the old folder back where it was
        raise
    fsync_dir(out_dir.parent)
    shutil.rmtree(old, ignore_errors=True)
