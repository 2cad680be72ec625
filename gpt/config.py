"""Run configuration: one dataclass per TOML section, loaded as defaults < TOML file < `--set`.

Every key is declared once, with its type, default and help text (docs/config.md's reference table
is generated from these declarations). Types and allowed values are checked by one generic
routine driven by the annotations; each section adds only its cross-key checks. No torch here.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from gpt.errors import GPTError
from gpt.fileio import read_text_bounded

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def _key(default: Any, help: str) -> Any:
    """Declare a config key: its default and the help text shown in docs/config.md and errors."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


VOCAB_MULTIPLE = 64
CONFIG_LIMIT = 2**20  # bytes: a run config is a few KiB; a larger "config" is not one
# The sizes torch can build. It counts a tensor's bytes in 64 bits and refuses more with an
# overflow deep inside the model's construction (gpt info's on the meta device too): fewer than
# 2**60 elements leaves room for the 8-byte ones it makes on the way (the causal mask's tril).
# Blocks are modules built one at a time: ten times the deepest trained transformers (about
# 1,000 blocks) still builds in seconds.
TENSOR_ELEMENTS_LIMIT = 2**60
MAX_LAYERS = 10_000


def pad_vocab(n: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Round a vocabulary up to a multiple of 64: nanoGPT's 50304 for GPT-2's 50257."""
    return -(-n // multiple) * multiple


Norm = Literal["layernorm", "rmsnorm"]
NormPosition = Literal["pre", "post"]
MLPKind = Literal["standard", "swiglu", "geglu"]
Activation = Literal[
    "gelu", "gelu_tanh", "relu", "relu2", "leaky_relu", "silu", "sigmoid", "tanh"
]
PosEmbedding = Literal["learned", "rope"]
AttentionImpl = Literal["sdpa", "manual"]
DType = Literal["auto", "float32", "bfloat16", "float16"]
LRSchedule = Literal["cosine", "wsd"]
OptimizerName = Literal["adamw", "muon"]
Parallel = Literal["ddp", "fsdp", "hsdp"]
SHARDED = ("fsdp", "hsdp")  # the layouts that split each weight by rows across processes
CompileScope = Literal["model", "blocks"]
Finetune = Literal["full", "lora"]
LORA_TARGETS = ("c_attn", "c_proj", "c_fc", "c_up")  # the blocks' Linear layers, by module name
QKV_NAMES = ("q_proj", "k_proj", "v_proj", "query", "key", "value", "q", "k", "v")
WandbMode = Literal["online", "offline", "disabled"]
DecodeErrors = Literal["skip", "fail"]
DataFormat = Literal["text", "chat"]
BadRows = Literal["fail", "skip"]
LongConversations = Literal["truncate", "fail"]


class _Section:
    """Shared behaviour of the section dataclasses: type checks on construction."""

    section: str = ""

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(self.section, f.name, getattr(self, f.name), hints[f.name])
            object.__setattr__(self, f.name, value)
        self.check()
        for key, value in self.derived().items():  # frozen: set once, here
            object.__setattr__(self, key, value)

    def check(self) -> None:
        """Cross-key checks; overridden by sections that have any."""

    def derived(self) -> dict[str, Any]:
        """Unset keys whose value follows from others; overridden by sections that have any."""
        return {}

    def _fail(self, key: str, problem: str) -> None:
        raise GPTError(f"[{self.section}] {key}: {problem}")

    def _positive(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if value is not None and value <= 0:
                self._fail(key, f"must be > 0, got {value!r}")

    def _non_negative(self, *keys: str) -> None:
        for key in keys:
            value = getattr(self, key)
            if value is not None and value < 0:
                self._fail(key, f"must be >= 0, got {value!r}")


@dataclass(frozen=True)
class ModelConfig(_Section):
    """The `[model]` section: the network's shape and which variant of each part to build."""

    section = "model"

    block_size: int = _key(1024, "maximum context length in tokens")
    vocab_size: int | None = _key(
        None, "token ids the tokenizer produces; unset = the data's tokenizer (GPT-2: 50257)"
    )
    padded_vocab_size: int | None = _key(
        None,
        "rows of the embedding and LM head; unset = vocab_size rounded up to a multiple of "
        f"{VOCAB_MULTIPLE} (faster matmuls; GPT-2: 50304). Padding ids are never sampled",
    )
    n_layer: int = _key(12, "number of transformer blocks")
    n_head: int = _key(12, "attention heads per block (query heads)")
    n_embd: int = _key(768, "width of the residual stream")
    n_kv_head: int | None = _key(
        None, "key/value heads for grouped-query attention; unset = n_head (plain multi-head)"
    )
    dropout: float = _key(0.0, "dropout on embeddings, attention weights and residual outputs")
    bias: bool = _key(True, "biases in linear layers and LayerNorm (GPT-2: true)")
    norm: Norm = _key("layernorm", "normalisation layer")
    norm_eps: float = _key(1e-5, "epsilon added inside the norm")
    norm_position: NormPosition = _key(
        "pre", "pre: x + f(norm(x)) with a final norm; post: norm(x + f(x)) (original Transformer)"
    )
    mlp: MLPKind = _key("standard", "standard: W2 act(W1 x); swiglu/geglu: W2 (act(W1 x) * W3 x)")
    activation: Activation = _key("gelu", "activation of the standard MLP (gated MLPs fix theirs)")
    mlp_hidden: int | None = _key(
        None, "MLP hidden width; unset = 4*n_embd (standard) or 8/3*n_embd up to a multiple of 64"
    )
    pos_embedding: PosEmbedding = _key(
        "learned", "learned absolute positions (GPT-2) or rotary embeddings (RoPE)"
    )
    rope_base: float = _key(10000.0, "RoPE frequency base (theta)")
    tie_embeddings: bool = _key(True, "share one matrix between token embedding and LM head")
    zero_init_proj: bool = _key(
        False, "start the output projections (c_proj) at zero: every block starts as the identity"
    )
    logit_softcap: float | None = _key(
        None, "squash the logits into (-cap, cap): cap * tanh(logits / cap); unset = off"
    )
    attention: AttentionImpl = _key(
        "sdpa", "sdpa: F.scaled_dot_product_attention; manual: explicit masked softmax"
    )
    qk_norm: bool = _key(
        False, "RMS-normalise each head's queries and keys (no learned gain) before RoPE"
    )
    cross_attention: bool = _key(
        False, "add a cross-attention sublayer to every block (keys/values from a context)"
    )

    def check(self) -> None:
        self._positive("block_size", "vocab_size", "padded_vocab_size", "n_layer", "n_head")
        self._positive("n_embd", "n_kv_head")
        if self.padded_vocab_size is not None and self.vocab_size is None:
            self._fail("padded_vocab_size", "is set but vocab_size is not; set vocab_size too")
        if None not in (self.vocab_size, self.padded_vocab_size) and (
            self.padded_vocab_size < self.vocab_size  # type: ignore[operator]
        ):
            self._fail(
                "padded_vocab_size",
                f"{self.padded_vocab_size} is smaller than vocab_size = {self.vocab_size}; "
                "raise it or leave it unset",
            )
        self._positive("norm_eps", "mlp_hidden", "rope_base", "logit_softcap")
        if not 0.0 <= self.dropout < 1.0:
            self._fail("dropout", f"must be in [0, 1), got {self.dropout!r}")
        if self.n_embd % self.n_head:
            self._fail(
                "n_embd",
                f"{self.n_embd} is not divisible by n_head = {self.n_head}; "
                "choose n_embd as a multiple of n_head",
            )
        if self.n_head % self.kv_heads:
            self._fail(
                "n_kv_head",
                f"n_head = {self.n_head} is not divisible by n_kv_head = {self.kv_heads}; "
                "choose a divisor of n_head",
            )
        if self.pos_embedding == "rope" and self.head_dim % 2:
            self._fail(
                "pos_embedding",
                f"rope needs an even head size, but n_embd / n_head = {self.head_dim}; "
                "change n_embd or n_head, or use pos_embedding = \"learned\"",
            )
        self._buildable()

    def _buildable(self) -> None:
        """No more blocks than MAX_LAYERS, and no weight or buffer of the network of
        TENSOR_ELEMENTS_LIMIT elements or more, each checked against the key that sizes it."""
        if self.n_layer > MAX_LAYERS:
            self._fail("n_layer", f"{self.n_layer:,} blocks are more than the {MAX_LAYERS:,} "
                                  "gpt builds; lower it")
        vocab_key = "vocab_size" if self.padded_vocab_size is None else "padded_vocab_size"
        vocab = self.padded_vocab_size or pad_vocab(self.vocab_size or 0)
        positions = self.n_embd if self.pos_embedding == "learned" else self.head_dim // 2
        tensors = [  # n_embd's own first, as it widens all the others
            ("n_embd", "attention's c_attn", self.n_embd,
             self.n_embd + 2 * self.kv_heads * self.head_dim),
            ("n_embd" if self.mlp_hidden is None else "mlp_hidden", "the MLP's c_fc",
             self.hidden_dim, self.n_embd),
            (vocab_key, "the token embedding", vocab, self.n_embd),
            ("block_size", "the position embedding" if self.pos_embedding == "learned"
             else "RoPE's tables", self.block_size, positions),
        ]
        if self.attention == "manual":
            tensors.append(("block_size", "the causal mask", self.block_size, self.block_size))
        for key, tensor, rows, columns in tensors:
            if rows * columns >= TENSOR_ELEMENTS_LIMIT:
                self._fail(key, f"{getattr(self, key)} makes {tensor} {rows * columns:.2e} "
                                "elements; torch holds fewer than 2**60 in one tensor; lower it")

    def derived(self) -> dict[str, Any]:
        if self.padded_vocab_size is None and self.vocab_size is not None:
            return {"padded_vocab_size": pad_vocab(self.vocab_size)}
        return {}

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head if self.n_kv_head is not None else self.n_head

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width: 4x for the standard MLP; ~2/3 of that for gated ones (same params)."""
        if self.mlp_hidden is not None:
            return self.mlp_hidden
        if self.mlp == "standard":
            return 4 * self.n_embd
        return 64 * math.ceil(8 * self.n_embd / 3 / 64)


def grow_vocabulary(model: ModelConfig, tokenizer_vocab: int) -> ModelConfig:
    """`model` with room for a tokenizer that a finetune grew to `tokenizer_vocab` ids (the
    base's and the chat tokens): a vocab_size set smaller is raised to it, and a
    padded_vocab_size that no longer holds it is derived again; fit_vocabulary does the rest."""
    if model.vocab_size is None or model.vocab_size >= tokenizer_vocab:
        return model
    padded = model.padded_vocab_size
    return dataclasses.replace(
        model, vocab_size=tokenizer_vocab,
        padded_vocab_size=padded if padded is not None and padded >= tokenizer_vocab else None,
    )


def fit_vocabulary(
    model: ModelConfig, tokenizer_vocab: int, pretrained: str | None = None
) -> ModelConfig:
    """`model` for a tokenizer of `tokenizer_vocab` ids, the one rule of gpt train, gpt info and
    HF models: vocab_size becomes the tokenizer's where unset (padded_vocab_size follows), or
    where it only counts the embedding rows of `pretrained`, an HF model (the ids past the
    tokenizer's are padding, never sampled); fewer ids than the tokenizer has are refused."""
    given = model.vocab_size
    if given is not None and given < tokenizer_vocab:
        key, fix = "[model] vocab_size", "raise it or leave it unset"
        if pretrained is not None:
            key = f"{pretrained}: its config.json's vocab_size"
            fix = "the folder's tokenizer is not the model's"
        raise GPTError(f"{key} = {given} is smaller than the tokenizer's {tokenizer_vocab}; {fix}")
    if given is None or pretrained is not None:
        return dataclasses.replace(model, vocab_size=tokenizer_vocab)
    return model


@dataclass(frozen=True)
class DataConfig(_Section):
    """The `[data]` section: where the text comes from and how it becomes token files."""

    section = "data"

    source: str = _key(
        "python-stdlib",
        "text file, folder, glob, .jsonl/.json/.parquet/.csv, a saved dataset folder, "
        "hf:NAME[:CONFIG], or python-stdlib (the interpreter's own library sources); with "
        "format = chat, python-docstrings (questions on the standard library, its answers)",
    )
    format: DataFormat = _key(
        "text",
        "text: documents, every token trained on; chat: conversations ({\"messages\": [...]} or "
        "{\"prompt\", \"completion\"} rows) packed into rows of block_size + 1 tokens, the loss "
        "on the assistant's tokens only",
    )
    data_dir: str | None = _key(
        None, "where train.bin/val.bin/meta.json go; unset = data/<source>-<tokenizer>"
    )
    tokenizer: str = _key(
        "gpt2",
        "gpt2 (bundled BPE), char, bpe (a byte-level BPE learned from the train split), or a "
        "tiktoken encoding name",
    )
    bpe_vocab_size: int = _key(
        8192, "tokenizer = bpe: ids to learn, end-of-text included; rounded up to a multiple of 64"
    )
    glob: str = _key(
        "**/*.txt,**/*.md,**/*.rst,**/*.py",
        "comma-separated file patterns used when source is a folder",
    )
    text_column: str = _key("text", "column holding the text in tabular and HF datasets")
    split: str = _key("train", "split of an HF dataset to read")
    streaming: bool = _key(False, "stream an HF dataset instead of downloading it whole")
    val_fraction: float = _key(0.1, "fraction of the text (or documents) held out for validation")
    seed: int = _key(1337, "seed of the document-level train/val split")
    num_proc: int | None = _key(None, "tokenizer worker processes; unset = all cores")
    decode_errors: DecodeErrors = _key("skip", "files that are not UTF-8: skip (and count) or fail")
    bad_rows: BadRows = _key(
        "fail",
        "format = chat: a row that is not JSON, has an unknown role, no assistant turn or a "
        "content that is not text: fail naming its file and line, or skip (and count) it",
    )
    long_conversations: LongConversations = _key(
        "truncate",
        "format = chat: a conversation longer than block_size + 1 tokens: truncate it (and "
        "count), or fail naming it",
    )

    def check(self) -> None:
        self._positive("num_proc")
        if self.bpe_vocab_size < 257:
            self._fail(
                "bpe_vocab_size",
                f"must be at least 257 (the 256 bytes and the end-of-text), got "
                f"{self.bpe_vocab_size!r}",
            )
        if not 0.0 < self.val_fraction < 1.0:
            self._fail("val_fraction", f"must be in (0, 1), got {self.val_fraction!r}")
        if not self.source.strip():
            self._fail("source", "is empty; set it to a file, folder, hf:NAME or python-stdlib")

    def derived(self) -> dict[str, Any]:
        """A learned vocabulary the size the model's embedding is padded to anyway."""
        return {"bpe_vocab_size": pad_vocab(self.bpe_vocab_size)}

    @property
    def resolved_data_dir(self) -> Path:
        """The data folder: `data_dir` when set, else `data/<source name>-<tokenizer>`, so that
        one source prepared with two tokenizers lands in two folders."""
        if self.data_dir is not None:
            return Path(self.data_dir)

        def clean(text: str) -> str:
            return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_.")

        name = clean(Path(self.source.rstrip("/")).stem) or "corpus"
        return Path("data") / f"{name}-{clean(self.tokenizer) or 'tokens'}"


@dataclass(frozen=True)
class TrainConfig(_Section):
    """The `[train]` section: optimisation, evaluation, checkpoints and the device."""

    section = "train"

    out_dir: str = _key("out", "run folder: checkpoints, metrics.jsonl")
    init_from: str | None = _key(
        None,
        "start from another run's weights (finetuning): its out_dir; or an HF GPT-2, Llama or "
        "Qwen3 model (hf:FOLDER, hf:OWNER/NAME, gpt2 ... gpt2-xl), whose shape and tokenizer it "
        "takes",
    )
    finetune: Finetune = _key(
        "full",
        "full: every weight of init_from's model trains; lora: it stays frozen and only low-rank "
        "adapters on the blocks' layers (lora_targets) train (docs/finetuning.md)",
    )
    lora_rank: int = _key(8, "rank r of each LoRA adapter: B (out, r) times A (r, in)")
    lora_alpha: float = _key(16.0, "LoRA's update B A is scaled by lora_alpha / lora_rank")
    lora_dropout: float = _key(0.0, "dropout on the LoRA adapters' input, in training only")
    lora_targets: list[str] | None = _key(
        None,
        "the blocks' layers LoRA adapts, by module name: c_attn (q, k and v), c_proj (attention's "
        "and the MLP's output), c_fc, c_up (gated MLPs); unset = every one the model has",
    )
    batch_size: int = _key(12, "sequences per micro-batch (per GPU)")
    grad_accum_steps: int = _key(1, "micro-batches per optimizer step, across all GPUs")
    max_iters: int = _key(5000, "optimizer steps in the run")
    optimizer: OptimizerName = _key(
        "adamw",
        "adamw; or muon (torch >= 2.9): Muon for the blocks' weight matrices, AdamW for "
        "embeddings, an untied head, norms and biases",
    )
    learning_rate: float = _key(6e-4, "peak learning rate (of AdamW)")
    muon_lr: float = _key(
        0.02, "Muon's peak learning rate (optimizer = muon), on learning_rate's schedule, scaled"
    )
    min_lr: float = _key(6e-5, "learning rate at the end of the decay")
    warmup_iters: int = _key(100, "linear warmup steps")
    lr_decay_iters: int | None = _key(
        None, "step at which the decay reaches min_lr; unset = max_iters"
    )
    decay_lr: bool = _key(True, "warmup, then lr_schedule's decay; false keeps learning_rate")
    lr_schedule: LRSchedule = _key(
        "cosine",
        "after warmup, cosine: cosine decay to min_lr; wsd (warmup-stable-decay): learning_rate "
        "held, then a linear decay to min_lr over the last cooldown_fraction of lr_decay_iters",
    )
    cooldown_fraction: float = _key(0.2, "wsd: the fraction of lr_decay_iters spent decaying")
    weight_decay: float = _key(0.1, "AdamW weight decay (matrices only; Muon's take none)")
    beta1: float = _key(0.9, "AdamW beta1")
    beta2: float = _key(0.95, "AdamW beta2")
    grad_clip: float = _key(1.0, "clip the gradient norm to this; 0 = off")
    eval_interval: int = _key(250, "evaluate every this many steps")
    eval_iters: int = _key(100, "batches per evaluation of each split")
    log_interval: int = _key(10, "log the training loss every this many steps")
    checkpoint_interval: int | None = _key(
        None, "save every this many steps; unset = eval_interval"
    )
    keep_last: int = _key(2, "how many recent checkpoints to keep (plus best)")
    device: str = _key("auto", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    dtype: DType = _key("auto", "auto: bfloat16 on capable GPUs, float16 on older, float32 on CPU")
    compile: bool = _key(False, "wrap the model in torch.compile")
    compile_scope: CompileScope = _key(
        "model",
        "with compile = true, model: the whole model in one graph; blocks: each transformer "
        "block on its own (they share one compiled graph: faster to compile)",
    )
    loss_chunk: int | None = _key(
        None,
        "compute the LM head and the loss over this many tokens at a time, each chunk's logits "
        "recomputed in the backward pass, so the (tokens, vocabulary) logits are never whole; "
        "unset = all at once",
    )
    document_masking: bool = _key(
        False,
        "each token attends only within its own document, which starts at an end-of-text token "
        "(FlexAttention on CUDA, a dense mask elsewhere); sampling stays plainly causal",
    )
    fp8: bool = _key(
        False,
        "float8 matmuls in the blocks' linear layers through torchao (pip install torchao); "
        "CUDA GPUs of compute capability 8.9 or higher (Ada, Hopper and later) only",
    )
    parallel: Parallel = _key(
        "ddp",
        "under torchrun, ddp: every process holds the whole model, gradients and optimizer "
        "state; fsdp: FSDP2 shards all three across the processes; hsdp: FSDP2 "
        "within each of hsdp_replicas groups, the groups replicas of each other",
    )
    hsdp_replicas: int | None = _key(
        None,
        "parallel = \"hsdp\": replica groups (a divisor of the process count), each sharding "
        "over world_size / hsdp_replicas processes; unset = one per node (torchrun's "
        "WORLD_SIZE / LOCAL_WORLD_SIZE)",
    )
    activation_checkpointing: bool = _key(
        False, "recompute each block in the backward pass: less activation memory, more compute"
    )
    seed: int = _key(1337, "seed of initialisation, batches and dropout")
    peak_flops: float | None = _key(
        None, "device peak FLOP/s for MFU; unset = a GPU's from the table, a CPU's measured"
    )

    @property
    def decay_iters(self) -> int:
        """The step the learning rate's decay reaches min_lr: lr_decay_iters, or max_iters."""
        return self.lr_decay_iters or self.max_iters

    @property
    def save_interval(self) -> int:
        """Steps between checkpoints: checkpoint_interval, or eval_interval when unset."""
        return self.checkpoint_interval or self.eval_interval

    def _check_lora(self) -> None:
        """The lora_* keys are checked whatever finetune says; finetune = "lora" needs a model
        to adapt and a layout that keeps the adapters whole."""
        self._positive("lora_rank", "lora_alpha")
        if self.finetune == "lora" and self.fp8:
            self._fail("fp8", "does not train LoRA finetunes (their frozen base layers would "
                       "turn float8 too); set train.fp8 = false with finetune = \"lora\"")
        if not 0.0 <= self.lora_dropout < 1.0:
            self._fail("lora_dropout", f"must be in [0, 1), got {self.lora_dropout!r}")
        targets = self.lora_targets
        for target in targets or []:
            if target not in LORA_TARGETS:
                fused = " (c_attn holds q, k and v together)" if target in QKV_NAMES else ""
                hint = "" if fused else _did_you_mean(target, list(LORA_TARGETS))
                self._fail("lora_targets", f"{target!r} is not a layer of gpt's blocks{fused}; "
                           f"choose among {', '.join(LORA_TARGETS)}{hint}")
        if targets is not None and (not targets or len(set(targets)) != len(targets)):
            self._fail("lora_targets", "must name each layer once, and at least one; or leave "
                       "it unset for every layer")
        if self.finetune != "lora":
            return
        if not self.init_from:
            self._fail("finetune", "\"lora\" adapts a trained model, but init_from is unset; set "
                       "train.init_from to a run's out_dir or an HF model (hf:...), or "
                       "finetune = \"full\"")
        if self.parallel in SHARDED:
            self._fail("parallel", f"\"{self.parallel}\" does not shard LoRA finetunes (their "
                       "frozen base and small adapters); use parallel = \"ddp\" with "
                       "finetune = \"lora\"")

    def check(self) -> None:
        self._positive("batch_size", "grad_accum_steps", "eval_interval", "eval_iters")
        self._positive("log_interval", "checkpoint_interval", "keep_last", "peak_flops")
        self._positive("lr_decay_iters", "muon_lr", "hsdp_replicas", "loss_chunk")
        self._non_negative("max_iters", "learning_rate", "min_lr", "warmup_iters")
        self._non_negative("weight_decay", "grad_clip")
        if self.optimizer == "muon" and self.learning_rate == 0:
            self._fail(
                "learning_rate",
                "must be > 0 with optimizer = \"muon\": muon_lr follows the schedule as a "
                "multiple of it",
            )
        self._check_lora()
        if not 0.0 < self.cooldown_fraction <= 1.0:
            self._fail("cooldown_fraction", f"must be in (0, 1], got {self.cooldown_fraction!r}")
        for key in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                self._fail(key, f"must be in [0, 1), got {getattr(self, key)!r}")
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", self.device):
            self._fail(
                "device", f"unknown device {self.device!r}; use auto, cpu, cuda, cuda:N or mps"
            )


@dataclass(frozen=True)
class SampleConfig(_Section):
    """The `[sample]` section: defaults of `gpt sample` and `gpt chat`, each overridable by its
    flag."""

    section = "sample"

    prompt: str = _key("", "text to continue; empty = start from the end-of-text token")
    max_new_tokens: int = _key(256, "tokens to generate per sample (per reply in gpt chat)")
    temperature: float = _key(0.8, "softmax temperature; 0 = greedy (deterministic)")
    top_k: int | None = _key(200, "sample among the k most likely tokens; unset = all")
    top_p: float = _key(1.0, "nucleus sampling: smallest set with this much probability")
    num_samples: int = _key(1, "samples of each prompt (sample i draws with seed + i)")
    seed: int = _key(1337, "same seed, same text")
    stop: list[str] = _key([], "strings that end a sample (the output stops before them)")
    ignore_eos: bool = _key(
        False, "keep going past the end-of-text token (raw sampling); by default a sample ends "
        "there"
    )
    max_batch: int = _key(
        64, "sequences decoded at once (their KV cache is allocated together); more wait"
    )
    max_prompt_bytes: int = _key(
        16 * 2**20, "the largest prompt read from --prompt-file or stdin, in bytes: a longer one "
        "is refused, rather than read until memory runs out"
    )

    def check(self) -> None:
        self._non_negative("max_new_tokens", "temperature")
        self._positive("num_samples", "max_prompt_bytes", "max_batch")
        if self.top_k is not None and self.top_k < 1:
            self._fail("top_k", f"must be >= 1, got {self.top_k!r}")
        if not 0.0 < self.top_p <= 1.0:
            self._fail("top_p", f"must be in (0, 1], got {self.top_p!r}")
        if any(s == "" for s in self.stop):
            self._fail("stop", "a stop string is empty; remove it or give some text")


@dataclass(frozen=True)
class ServeConfig(_Section):
    """The `[serve]` section: `gpt serve`'s address, its engine's batch and its request limits."""

    section = "serve"

    host: str = _key(
        "127.0.0.1", "address to listen on: loopback only by default; 0.0.0.0 opens it to the "
        "network (set an API key then)"
    )
    port: int = _key(8000, "TCP port to listen on; 0 = any free one")
    max_batch: int = _key(16, "sequences the engine decodes together; more requests wait")
    context: int | None = _key(
        None, "tokens a sequence may hold, prompt and completion together; unset = block_size"
    )
    prefill_chunk: int = _key(
        128, "prompt tokens the engine reads per step, over all new sequences: lower keeps the "
        "running streams smooth, higher gives a long prompt its first token sooner"
    )
    max_tokens: int = _key(
        4096, "the most tokens one request may ask for (max_tokens); never more than context"
    )
    default_max_tokens: int = _key(
        256, "max_tokens of a request that gives none (less where the context has less room)"
    )
    max_body_bytes: int = _key(2**20, "the largest request body accepted, in bytes")
    max_connections: int = _key(
        64, "generation requests answered at once; more are answered 429 at once"
    )
    grace: float = _key(
        10.0, "seconds a stop (SIGTERM, Ctrl-C) lets running requests finish before cancelling"
    )

    def check(self) -> None:
        self._positive("max_batch", "context", "prefill_chunk", "max_tokens")
        self._positive("default_max_tokens", "max_body_bytes", "max_connections")
        self._non_negative("grace")
        if not 0 <= self.port <= 65535:
            self._fail("port", f"must be in [0, 65535] (0 = any free port), got {self.port!r}")
        if not self.host.strip():
            self._fail("host", "is empty; give an address such as 127.0.0.1")


@dataclass(frozen=True)
class LogConfig(_Section):
    """The `[log]` section: experiment tracking."""

    section = "log"

    wandb: bool = _key(False, "log the config and every metrics line to Weights & Biases")
    wandb_project: str = _key("gpt", "wandb project")
    wandb_run_name: str | None = _key(None, "wandb run name; unset = wandb's choice")
    wandb_mode: WandbMode = _key("online", "online, offline (sync later) or disabled")


@dataclass(frozen=True)
class RunConfig:
    """A whole run: one instance of each section. Components receive only their own section."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    log: LogConfig = field(default_factory=LogConfig)


SECTIONS: dict[str, type[_Section]] = {
    "model": ModelConfig,
    "data": DataConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
    "serve": ServeConfig,
    "log": LogConfig,
}


# ---------------------------------------------------------------------------------------------
# Type checking of one value against its annotation


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1  # what every integer key holds (seeds included)


def _brief(value: Any, limit: int = 60) -> str:
    """`repr(value)` for a message, cut to about `limit` characters: a mistyped value can be
    100,000 characters, or an integer of more digits than Python prints."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**limit:
        return f"an integer of about {int(value.bit_length() * 0.30103):,} digits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def _type_name(tp: Any) -> str:
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, "a list of strings"
    )


def _coerce(section: str, name: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widened to float where due)."""
    where = f"[{section}] {name}"
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        (tp,) = args
    if get_origin(tp) is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            choices = ", ".join(f'"{a}"' for a in allowed)
            hint = _did_you_mean(str(value), [str(a) for a in allowed])
            raise GPTError(
                f"{where}: {_brief(value)} is not allowed; choose one of {choices}{hint}")
        return value
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(tp, lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v))
    if not ok(value):
        shown = "nothing" if value is None else f"{_brief(value)} ({type(value).__name__})"
        raise GPTError(f"{where} must be {_type_name(tp)}, got {shown}")
    if tp is float and not math.isfinite(value):  # TOML has nan and inf; no key means them
        raise GPTError(f"{where} must be a finite number, got {value!r}")
    if tp is int and not INT64_MIN <= value <= INT64_MAX:  # torch, numpy and C read 64 bits
        raise GPTError(
            f"{where}: must be in [-2**63, 2**63 - 1] (a 64-bit integer), got {_brief(value)}")
    return float(value) if tp is float else value


def _did_you_mean(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""


# ---------------------------------------------------------------------------------------------
# Loading: defaults < TOML file < --set overrides


def _check_keys(section: str, values: dict[str, Any], origin: str) -> None:
    cls = SECTIONS[section]
    known = [f.name for f in dataclasses.fields(cls)]
    for key in values:
        if key not in known:
            hint = _did_you_mean(key, known)
            raise GPTError(
                f"{origin}: unknown key {key!r} in [{section}]{hint}; "
                f"known keys: {', '.join(known)}"
            )


def _check_section(name: str, origin: str) -> None:
    if name not in SECTIONS:
        hint = _did_you_mean(name, list(SECTIONS))
        raise GPTError(
            f"{origin}: unknown section [{name}]{hint}; sections are "
            + ", ".join(f"[{s}]" for s in SECTIONS)
        )


def read_toml(path: str | Path) -> dict[str, dict[str, Any]]:
    """Read a config file into {section: {key: value}}, checking section and key names."""
    path = Path(path)
    try:
        text = read_text_bounded(path, CONFIG_LIMIT, "a config file")
    except FileNotFoundError:
        raise GPTError(
            f"config file {path} not found; pass an existing TOML file to --config"
        ) from None
    except OSError as e:
        raise GPTError(
            f"cannot read config file {path} ({e.strerror}); pass a TOML file to --config"
        ) from None
    except UnicodeDecodeError:
        raise GPTError(f"config file {path} is not UTF-8 text; save it as UTF-8") from None
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:  # says where: "(at line 2, column 11)"
        raise GPTError(f"{path}: malformed TOML: {e}; fix the file there") from None
    except ValueError:  # an integer of more digits than Python converts (4,300)
        raise GPTError(f"{path}: malformed TOML: a number of more digits than can be read; fix "
                       "the file") from None
    except RecursionError:  # arrays or tables nested deeper than the parser goes
        raise GPTError(f"{path}: malformed TOML: nested too deeply; fix the file") from None
    for name, values in raw.items():
        if not isinstance(values, dict):
            raise GPTError(
                f"{path}: key {name!r} is outside any section; put it under one of "
                + ", ".join(f"[{s}]" for s in SECTIONS)
            )
        _check_section(name, str(path))
        _check_keys(name, values, str(path))
    return raw


def parse_override(text: str) -> tuple[str, str, Any]:
    """Parse one `--set section.key=value`; the value is read as TOML, else taken as a string."""
    origin = f"--set {text}"
    name, sep, raw = text.partition("=")
    section, dot, key = name.strip().partition(".")
    if not sep or not dot or not key:
        raise GPTError(
            f"{origin}: expected section.key=value, for example --set train.max_iters=100"
        )
    _check_section(section, origin)
    _check_keys(section, {key: None}, origin)
    raw = raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except (ValueError, RecursionError):  # not TOML (or too long or deep a number or list): text
        value = raw
    return section, key, value


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Resolve a run's config: dataclass defaults < TOML file at `path` < `overrides`."""
    values: dict[str, dict[str, Any]] = read_toml(path) if path is not None else {}
    for text in overrides or []:
        section, key, value = parse_override(text)
        values.setdefault(section, {})[key] = value
    return from_dict(values)


# Keys of [model] that say how the network runs or how fresh weights start, not what trained
# weights are: a checkpoint continues, is finetuned and is sampled with other values of these.
RUNTIME_MODEL_KEYS = ("dropout", "attention", "zero_init_proj")


def layer_on_checkpoint(
    saved: RunConfig,
    path: str | Path | None,
    overrides: list[str] | None,
    applies: tuple[str, ...],
    command: str,
) -> RunConfig:
    """The config of a command that runs a trained model: built-in defaults < the checkpoint's
    saved config < the TOML file at `path` < `overrides`.

    The model is the checkpoint's, so a [model] key of the file that contradicts it is an
    error; so is an override outside `applies` (section names like "sample", or single keys
    like "train.out_dir"): it would otherwise be silently ignored.
    """
    file_values = read_toml(path) if path is not None else {}
    contradicted = [
        f"model.{key} = {value!r} (the checkpoint has {getattr(saved.model, key)!r})"
        for key, value in file_values.get("model", {}).items()
        if key not in RUNTIME_MODEL_KEYS
        and getattr(dataclasses.replace(saved.model, **{key: value}), key)
        != getattr(saved.model, key)
    ]
    if contradicted:
        raise GPTError(
            f"{path} sets {', '.join(contradicted)}, but {command} runs the checkpoint's model; "
            "remove the key, or pass the config the run was trained with"
        )
    values = {name: section for name, section in file_values.items() if name != "model"}
    for text in overrides or []:
        section, key, value = parse_override(text)
        if section not in applies and f"{section}.{key}" not in applies:
            raise GPTError(
                f"--set {text}: {command} cannot apply {section}.{key}; it takes "
                + ", ".join(f"[{a}] keys" if "." not in a else a for a in applies)
            )
        values.setdefault(section, {})[key] = value
    return dataclasses.replace(
        saved,
        **{
            name: dataclasses.replace(getattr(saved, name), **section)
            for name, section in values.items()
        },
    )


# ---------------------------------------------------------------------------------------------
# Writing: the resolved config as a dict, JSON or TOML, readable back by from_dict()/load_config()


def to_dict(config: RunConfig) -> dict[str, dict[str, Any]]:
    """The config as plain data; unset (None) keys are left out, as TOML has no null."""
    return {
        name: {k: v for k, v in dataclasses.asdict(getattr(config, name)).items() if v is not None}
        for name in SECTIONS
    }


def from_dict(values: dict[str, dict[str, Any]]) -> RunConfig:
    """A RunConfig from {section: {key: value}} (to_dict's output, a TOML file's contents),
    filling defaults and validating."""
    for name, section in values.items():
        _check_section(name, "config")
        _check_keys(name, section, "config")
    return RunConfig(**{name: cls(**values.get(name, {})) for name, cls in SECTIONS.items()})


def to_json(config: RunConfig) -> str:
    return json.dumps(to_dict(config), indent=2)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    return "[" + ", ".join(_toml_value(v) for v in value) + "]"


def to_toml(config: RunConfig, sections: tuple[str, ...] = tuple(SECTIONS)) -> str:
    """The config (or some of its sections) as a TOML document that load_config() reads back to
    an equal RunConfig."""
    lines: list[str] = []
    for name, values in to_dict(config).items():
        if name not in sections:
            continue
        lines.append(f"[{name}]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in values.items()]
        lines.append("")
    return "\n".join(lines)


def reference_markdown() -> str:
    """The config reference table of docs/config.md, generated from the declarations above."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    for name, cls in SECTIONS.items():
        hints = get_type_hints(cls)
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            args = [a for a in get_args(tp) if a is not type(None)] if get_origin(tp) in (
                Union,
                types.UnionType,
            ) else [tp]
            inner = args[0]
            if get_origin(inner) is Literal:
                type_text = " \\| ".join(f'"{a}"' for a in get_args(inner))
            else:
                type_text = getattr(inner, "__name__", str(inner)).replace("list", "list of str")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            default_text = "unset" if default is None else f"`{_toml_value(default)}`"
            help_text = f.metadata["help"]
            rows.append(f"| `{name}.{f.name}` | {type_text} | {default_text} | {help_text} |")
    return "\n".join(rows)
