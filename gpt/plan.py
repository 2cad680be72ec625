"""Where a run starts, resolved once: the checkpoint of out_dir it resumes, or the model it
finetunes (`init_from`: a run's checkpoint or an HF model), its data prepared, and every check
that they fit the config (tokenizer, model shape, optimizer) before any training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt import checkpoint as ckpt
from gpt.checkpoint import Checkpoint
from gpt.config import RUNTIME_MODEL_KEYS, DataConfig, ModelConfig, RunConfig, TrainConfig
from gpt.data.prepare import prepare
from gpt.data.prepared import PreparedData
from gpt.errors import GPTError
from gpt.hf.pretrained import Pretrained, is_pretrained, model_from_pretrained, open_model
from gpt.layout import OPTIMIZER
from gpt.parallel import Dist
from gpt.tokenizer import same_tokenizer


@dataclass(frozen=True)
class Start:
    """A run's starting point: its config as it trains (an HF base's shape, the vocabulary of
    its data), the data, the checkpoint it resumes or the model it finetunes, and the newer
    checkpoints that were skipped as damaged."""

    cfg: RunConfig
    data: PreparedData
    resumed: Checkpoint | None
    base: Checkpoint | Pretrained | None  # init_from's model, for a run not yet started
    damaged: set[str]

    @property
    def weights(self) -> Checkpoint | Pretrained | None:
        """Where the model's weights come from: the resumed checkpoint, or the base."""
        return self.resumed or self.base

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The tokenizer record the run keeps: its start model's when it has one (the data's
        gives the same ids, maybe with an older chat template: same_tokenizer), else the
        data's."""
        start = self.weights
        return start.tokenizer if start is not None else self.data.tokenizer


def resolve_start(cfg: RunConfig, resume: bool, world: Dist) -> Start:
    """Find the checkpoint to resume (or open init_from's model), check it against the config,
    and prepare the data (rank 0) with the right tokenizer. Each checkpoint is read once."""
    tcfg = cfg.train
    resumed, damaged = _resume_point(Path(tcfg.out_dir), resume, world)
    if resumed is not None:
        _check_same_optimizer(resumed, tcfg)
    base = _open_base(tcfg.init_from, world) if tcfg.init_from and resumed is None else None
    # a finetune keeps the base model's tokenizer (a resumed one holds it too)
    finetuned = (resumed or base) if tcfg.init_from else None
    if finetuned is not None and is_pretrained(tcfg.init_from):
        cfg = config_from_pretrained(cfg, finetuned)
    start = resumed or base
    if start is not None:  # before any data is prepared with another tokenizer
        _check_same_tokenizer(start, cfg.data, resumed is not None)
    data = _prepared_data(cfg, world, finetuned)
    cfg = dataclasses.replace(cfg, model=_fit_vocabulary(cfg.model, data.vocab_size))
    if start is not None:
        _check_compatible(start, cfg, data.tokenizer)
    return Start(cfg, data, resumed, base, damaged)


def _resume_point(
    out_dir: Path, resume: bool, world: Dist
) -> tuple[Checkpoint | None, set[str]]:
    """The newest checkpoint of out_dir that loads, and the names of the newer, damaged ones
    that were reported and skipped.

    A weights-only one (optimizer.pt deleted) is refused rather than skipped: falling back past
    it would silently throw away the training it holds.
    """
    existing = ckpt.list_checkpoints(out_dir)
    if existing and not resume:
        raise GPTError(
            f"{out_dir} already holds checkpoints ({existing[0].name}); resume by dropping "
            "--no-resume, or set train.out_dir to a new folder"
        )
    damaged: set[str] = set()
    for candidate in existing:
        try:
            found = Checkpoint(candidate, ckpt.read_state(candidate))
        except ckpt.UnreadableCheckpoint as e:
            raise GPTError(f"{e}; make it readable, then run gpt train again") from None
        except GPTError as e:
            world.print0(f"warning: {e}; trying the previous checkpoint")
            damaged.add(candidate.name)
            continue
        if not found.has_optimizer:
            raise GPTError(
                f"{candidate / OPTIMIZER} is missing, so training cannot resume from it; "
                f"set train.out_dir to a new folder, with train.init_from = \"{candidate}\" "
                "to finetune from its weights"
            )
        return found, damaged
    if existing:
        raise GPTError(
            f"every checkpoint in {out_dir} is damaged; remove them or use another out_dir"
        )
    return None, damaged


def _open_base(init_from: str, world: Dist) -> Checkpoint | Pretrained:
    """The model a finetune starts from. An HF hub model is downloaded by rank 0 alone; the
    other ranks then find it in HF's cache."""
    if world.world_size > 1 and is_pretrained(init_from):
        base = open_model(init_from) if world.main else None
        world.barrier()
        return base or open_model(init_from)
    return open_model(init_from)


def config_from_pretrained(cfg: RunConfig, base: Checkpoint | Pretrained) -> RunConfig:
    """The config of a run started from an HF model (or resumed from such a run's checkpoint,
    `base`): the model's shape and tokenizer, the config's data and schedule."""
    model = model_from_pretrained(cfg.model, base.config.model, cfg.train.init_from or "")
    return dataclasses.replace(cfg, model=model, data=_data_config(cfg, base))


def _data_config(cfg: RunConfig, base: Checkpoint | Pretrained) -> DataConfig:
    """The data settings of a run started from an HF model: its own tokenizer (an HF one is
    named after the model, and the data folder's default name follows)."""
    record = base.tokenizer
    name = f"hf-{record.get('label') or 'model'}" if record["name"] == "hf" else record["name"]
    if cfg.data.tokenizer not in (DataConfig().tokenizer, name):
        raise GPTError(
            f"[data] tokenizer = {cfg.data.tokenizer!r} does not apply: the data is tokenized "
            f"with the tokenizer of init_from = {cfg.train.init_from!r}; remove the key"
        )
    return dataclasses.replace(cfg.data, tokenizer=name)


def _prepared_data(
    cfg: RunConfig, world: Dist, base: Checkpoint | Pretrained | None
) -> PreparedData:
    """The run's data: prepared once by rank 0 while the others wait, then opened by every rank.

    A finetune with a char or HF tokenizer tokenizes with its `base` model's own (a char
    vocabulary, an HF tokenizer), so its ids mean the same.
    """
    record = base_tokenizer(cfg.data, base)
    if world.main:
        prepare(
            cfg.data, progress=True, block_size=cfg.model.block_size, tokenizer_record=record
        )
    world.barrier()
    return PreparedData(cfg.data.resolved_data_dir)


def base_tokenizer(data: DataConfig, base: Checkpoint | Pretrained | None) -> dict[str, Any] | None:
    """The base model's tokenizer record when the data is to be tokenized with it (a char
    vocabulary, an HF model's tokenizer); None when `data.tokenizer` names its own."""
    kind = _tokenizer_kind(data)
    return base.tokenizer if base is not None and base.tokenizer["name"] == kind else None


def _tokenizer_kind(data: DataConfig) -> str:
    """The record name of the tokenizer `data.tokenizer` names (an HF model's "hf-NAME": hf)."""
    return "hf" if data.tokenizer.startswith("hf-") else data.tokenizer


def _fit_vocabulary(model: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """The model config with `vocab_size` taken from the tokenizer when unset (padding follows)."""
    if model.vocab_size is None:
        return dataclasses.replace(model, vocab_size=tokenizer_vocab)
    if model.vocab_size < tokenizer_vocab:
        raise GPTError(
            f"[model] vocab_size = {model.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer_vocab}; raise it or leave it unset"
        )
    return model


def _check_same_tokenizer(start: Checkpoint | Pretrained, data: DataConfig, resumed: bool) -> None:
    """A run goes on, and a finetune starts, with its model's tokenizer: another one in
    `data.tokenizer` is refused by name, before the data is prepared with it."""
    saved = start.tokenizer.get("name")
    if _tokenizer_kind(data) != saved:
        named = f"hf-{start.tokenizer.get('label') or 'model'}" if saved == "hf" else saved
        instead = "use another train.out_dir" if resumed else "finetune another model"
        raise GPTError(
            f"{start.path} was trained with the {saved!r} tokenizer, the config now says "
            f"data.tokenizer = {data.tokenizer!r}; set data.tokenizer = {named!r}, or {instead}"
        )


def _check_compatible(
    start: Checkpoint | Pretrained, cfg: RunConfig, tokenizer: dict[str, Any]
) -> None:
    """A checkpoint continues only with the same tokenizer and model shape (an HF model's
    shape is the run's already, but for a shorter block_size: see model_from_pretrained).

    The tokenizer goes first: another vocabulary changes vocab_size too, which would be named
    instead of the cause."""
    if not same_tokenizer(start.tokenizer, tokenizer):
        name, saved = tokenizer.get("name"), start.tokenizer.get("name")
        what = (f"a {name!r} vocabulary other than the one {start.path} was trained with"
                if name == saved else
                f"the {name!r} tokenizer, but {start.path} was trained with the {saved!r} one")
        raise GPTError(
            f"{cfg.data.resolved_data_dir} holds data of {what}; rebuild it from the text the "
            "run was trained on (gpt prepare --force), or use another train.out_dir"
        )
    saved = start.config.model
    for f in dataclasses.fields(saved):
        if isinstance(start, Pretrained) and f.name == "block_size":
            continue
        old, new = getattr(saved, f.name), getattr(cfg.model, f.name)
        if f.name not in RUNTIME_MODEL_KEYS and old != new:
            raise GPTError(
                f"{start.path} was trained with model.{f.name} = {old!r}, the config now says "
                f"{new!r}; set it back, or use another train.out_dir (or init_from to finetune)"
            )


def _check_same_optimizer(resumed: Checkpoint, tcfg: TrainConfig) -> None:
    """Resuming continues the saved optimizer state, which only the same optimizer can read."""
    saved = resumed.config.train.optimizer
    if saved != tcfg.optimizer:
        raise GPTError(
            f"{resumed.path} was trained with train.optimizer = {saved!r}, the config now says "
            f"{tcfg.optimizer!r}; set it back, or train into a new train.out_dir with "
            f"train.init_from = \"{resumed.path}\" to go on from its weights"
        )
