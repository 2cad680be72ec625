"""A run resolved once, before anything is built: where it starts (new, resumed, finetuned from
a run's checkpoint or an HF model), its config as it trains (an HF base's shape and tokenizer,
the vocabulary fitted), the tokenizer its data is tokenized with, and every check that these
fit (tokenizer, model shape, optimizer). gpt prepare and gpt info start from `plan_run`; gpt
train from `resolve_start`, built on it.

A finetune whose data adds the chat tokens to the base's tokenizer (`with_chat_tokens`) grows
the model's vocabulary by them: their rows of the embedding and head begin as the mean of the
base's token rows, and the run's checkpoints record it (`CHAT_TOKENS_ADDED`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt import checkpoint as ckpt
from gpt.checkpoint import Checkpoint
from gpt.config import (
    RUNTIME_MODEL_KEYS,
    DataConfig,
    RunConfig,
    TrainConfig,
    fit_vocabulary,
    grow_vocabulary,
)
from gpt.data.prepare import prepare
from gpt.data.prepared import PreparedData
from gpt.errors import GPTError
from gpt.hf.pretrained import Pretrained, is_pretrained, model_from_pretrained, open_model
from gpt.layout import OPTIMIZER
from gpt.lora import check_same_finetune
from gpt.model import GPT
from gpt.parallel import Dist
from gpt.tokenizer import (
    CHAT_TOKENS,
    ChatTokenizer,
    adds_chat_tokens,
    check_same_tokenizer,
    check_tokenizer_setting,
    get_tokenizer,
    tokenizer_from_dict,
    tokenizer_kind,
    tokenizer_setting,
    with_chat_tokens,
)
from gpt.weights import VOCABULARY_KEYS, load_with_chat_tokens

Model = Checkpoint | Pretrained
CHAT_TOKENS_ADDED = "chat_tokens_added"  # state.json's record of a finetune that added them


@dataclass(frozen=True)
class Plan:
    """A run before its data is prepared: its config as it trains (an HF base's shape and
    tokenizer; vocab_size still as the config sets it), the checkpoint it resumes, and the model
    it finetunes (init_from's, for a run not yet started)."""

    cfg: RunConfig
    resumed: Checkpoint | None
    base: Model | None

    @property
    def weights(self) -> Model | None:
        """Where the model's weights come from: the resumed checkpoint, or the base."""
        return self.resumed or self.base

    @property
    def data_tokenizer(self) -> dict[str, Any] | None:
        """The record the data is tokenized with when it is the finetuned model's (a char
        vocabulary, an HF model's tokenizer), so that its ids mean the same; None when
        `[data] tokenizer` names its own."""
        finetuned = self.weights if self.cfg.train.init_from else None
        kind = tokenizer_kind(self.cfg.data.tokenizer)
        if finetuned is None or finetuned.tokenizer["name"] != kind:
            return None
        return finetuned.tokenizer

    @property
    def chat_token_ids(self) -> tuple[int, ...]:
        """The ids of the chat tokens a finetune on chat data adds to its base's tokenizer (the
        rows a LoRA finetune trains beside its adapters); none for any other run."""
        if self.cfg.data.format != "chat" or self.base is None or self.resumed is not None:
            return ()
        base = tokenizer_from_dict(self.base.tokenizer)
        chat = with_chat_tokens(base)
        return tuple(chat.chat_ids) if isinstance(chat, ChatTokenizer) and chat is not base else ()

    def tokenizer_vocab(self) -> int:
        """The ids of the tokenizer the run trains with, as its prepared data will count them:
        the finetuned model's, a named tokenizer's, or the prepared data's (char and bpe are
        built from the text); chat data's adds the chat tokens."""
        record, data = self.data_tokenizer, self.cfg.data
        chat = with_chat_tokens if data.format == "chat" else (lambda tokenizer: tokenizer)
        if record is not None:
            return chat(tokenizer_from_dict(record)).vocab_size
        if data.tokenizer not in ("char", "bpe"):
            return chat(get_tokenizer(data.tokenizer)).vocab_size
        try:
            return PreparedData(data.resolved_data_dir).vocab_size
        except GPTError:
            raise GPTError(
                f"[model] vocab_size depends on the {data.tokenizer} tokenizer's data, which is "
                "not prepared yet; run gpt prepare first, or set it with --set model.vocab_size=N"
            ) from None

    def prepare_data(self, force: bool = False) -> dict[str, Any]:
        """Tokenize the run's data (a no-op when prepared already) and return its meta."""
        return prepare(self.cfg.data, block_size=self.cfg.model.block_size, force=force,
                       tokenizer_record=self.data_tokenizer)


def plan_run(
    cfg: RunConfig, resumed: Checkpoint | None = None,
    open_base: Callable[[str], Model] = open_model,
) -> Plan:
    """The run `cfg` describes, resuming `resumed` or else finetuning init_from's model (opened
    with `open_base`): its config as it trains, its tokenizer setting checked against that
    model's before any data is prepared with it. gpt prepare, gpt info and gpt train all plan
    a run here."""
    init_from = cfg.train.init_from
    base = open_base(init_from) if init_from and resumed is None else None
    start = resumed or base
    if start is None:
        return Plan(cfg, None, None)
    if init_from and is_pretrained(init_from):  # resumed too: the config is the base's
        cfg = _config_from_pretrained(cfg, start)
    instead = "use another train.out_dir" if resumed else "finetune another model"
    check_tokenizer_setting(cfg.data.tokenizer, start.tokenizer, str(start.path), instead)
    return Plan(cfg, resumed, base)


@dataclass(frozen=True)
class Start(Plan):
    """A run's plan carried out up to its model: the config with the vocabulary of its data,
    the data prepared, and the newer checkpoints that were skipped as damaged."""

    data: PreparedData
    damaged: set[str]

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The tokenizer record the run keeps: its start model's when it has one (the data's
        gives the same ids, maybe with an older chat template: same_tokenizer), else the
        data's, which is also the one kept when it adds the chat tokens to the base's."""
        start = self.weights
        if start is None or self.adds_chat_tokens:
            return self.data.tokenizer
        return start.tokenizer

    @property
    def adds_chat_tokens(self) -> bool:
        """Whether this finetune adds the chat tokens to its base model."""
        return _adds_chat_tokens(self, self.data)

    @property
    def chat_tokens_record(self) -> dict[str, Any]:
        """The state.json entry of a run whose finetune added the chat tokens (its checkpoints
        all carry it, those of a resumed run too), else nothing."""
        if self.resumed is not None:
            found = self.resumed.state.get(CHAT_TOKENS_ADDED)
            return {} if found is None else {CHAT_TOKENS_ADDED: found}
        if self.base is None or not self.adds_chat_tokens:
            return {}
        first = tokenizer_from_dict(self.base.tokenizer).vocab_size
        return {CHAT_TOKENS_ADDED: {
            "tokens": list(CHAT_TOKENS), "ids": [first, first + 1], "base": str(self.base.path),
            "rows": "the mean of the base's token rows",
        }}

    def load_into(self, model: GPT) -> None:
        """Copy the start's weights into `model`. Where this finetune adds the chat tokens,
        `model` has their rows beyond the base's (and maybe more padding rows): they begin as
        the mean of the base's token rows (`load_with_chat_tokens`)."""
        start = self.weights
        if start is None:
            return
        if not self.adds_chat_tokens:
            start.load_into(model)
            return
        load_with_chat_tokens(start, model)


def resolve_start(cfg: RunConfig, resume: bool, world: Dist) -> Start:
    """Find the checkpoint to resume (or open init_from's model), plan the run on it, and
    prepare the data (rank 0) with the right tokenizer. Each checkpoint is read once."""
    resumed, damaged = _resume_point(Path(cfg.train.out_dir), resume, world)
    if resumed is not None:
        _check_same_optimizer(resumed, cfg.train)
        check_same_finetune(resumed.lora, cfg.train, resumed.config.model, str(resumed.path))
    planned = plan_run(cfg, resumed, lambda init_from: _open_base(init_from, world))
    data = _prepared_data(planned, world)
    model = planned.cfg.model
    chat_tokens_added = _adds_chat_tokens(planned, data)
    if chat_tokens_added:
        model = grow_vocabulary(model, data.vocab_size)
    cfg = dataclasses.replace(planned.cfg, model=fit_vocabulary(model, data.vocab_size))
    if planned.weights is not None:
        _check_compatible(planned.weights, cfg, data, chat_tokens_added)
    return Start(cfg, resumed, planned.base, data, damaged)


def _adds_chat_tokens(planned: Plan, data: PreparedData) -> bool:
    """Whether the run finetunes a base model with data whose tokenizer is the base's plus
    the chat tokens (a resumed run has them in its checkpoint already)."""
    return (planned.resumed is None and planned.base is not None
            and adds_chat_tokens(data.tokenizer, planned.base.tokenizer))


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


def _open_base(init_from: str, world: Dist) -> Model:
    """The model a finetune starts from. An HF hub model is downloaded by rank 0 alone; the
    other ranks then find it in HF's cache."""
    if world.world_size > 1 and is_pretrained(init_from):
        base = open_model(init_from) if world.main else None
        world.barrier()
        return base or open_model(init_from)
    return open_model(init_from)


def _config_from_pretrained(cfg: RunConfig, base: Model) -> RunConfig:
    """The config of a run started from an HF model (or resumed from such a run's checkpoint,
    `base`): the model's shape and tokenizer, the config's data and schedule."""
    model = model_from_pretrained(cfg.model, base.config.model, cfg.train.init_from or "")
    return dataclasses.replace(cfg, model=model, data=_data_config(cfg, base))


def _data_config(cfg: RunConfig, base: Model) -> DataConfig:
    """The data settings of a run started from an HF model: its own tokenizer (an HF one is
    named after the model, and the data folder's default name follows)."""
    name = tokenizer_setting(base.tokenizer)
    if cfg.data.tokenizer not in (DataConfig().tokenizer, name):
        raise GPTError(
            f"[data] tokenizer = {cfg.data.tokenizer!r} does not apply: the data is tokenized "
            f"with the tokenizer of init_from = {cfg.train.init_from!r}; remove the key"
        )
    return dataclasses.replace(cfg.data, tokenizer=name)


def _prepared_data(planned: Plan, world: Dist) -> PreparedData:
    """The run's data: prepared once by rank 0 while the others wait, then opened by every
    rank."""
    if world.main:
        planned.prepare_data()
    world.barrier()
    return PreparedData(planned.cfg.data.resolved_data_dir)


def _check_compatible(
    start: Model, cfg: RunConfig, data: PreparedData, chat_tokens_added: bool
) -> None:
    """A checkpoint continues only with data of its tokenizer and with its model shape (an HF
    model's shape is the run's already, but for a shorter block_size: see
    model_from_pretrained); a finetune that adds the chat tokens grows the vocabulary.

    The tokenizer goes first: another vocabulary changes vocab_size too, which would be named
    instead of the cause."""
    check_same_tokenizer(
        data.tokenizer, start.tokenizer, f"{data.data_dir} holds data of", str(start.path),
        "rebuild it from the text the run was trained on (gpt prepare --force), or use another "
        "train.out_dir", models=f"the one {start.path} was trained with",
        chat_tokens_added=chat_tokens_added,
    )
    saved = start.config.model
    for f in dataclasses.fields(saved):
        if isinstance(start, Pretrained) and f.name == "block_size":
            continue
        if chat_tokens_added and f.name in VOCABULARY_KEYS and (
            getattr(cfg.model, f.name) >= getattr(saved, f.name)
        ):
            continue  # grown by grow_vocabulary
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
