"""LoRA: low-rank adapters trained on the blocks' linear layers while the model they adapt stays
frozen (Hu et al., 2021).

An adapted layer computes `W x + b + (alpha / r) * B (A dropout(x))`, with A (r, in) drawn like
a Linear's weight and B (out, r) zero, so that an adapted model starts as exactly its base.
The layer keeps the base's `weight` and `bias` under their own names and adds `lora_A` and
`lora_B` beside them, so a base's weights load into an adapted model key for key and a LoRA
checkpoint holds only the `*.lora_A` / `*.lora_B` tensors. Merging folds B A into W, after
which the model is a plain `GPT` again (inference, export).

A finetune that adds the chat tokens (gpt/plan.py) must also train their embedding and head
rows: the base never saw those tokens, and adapters on the blocks alone cannot make a model
write `<|im_end|>`, whose head row is the mean of the others. Those rows (`LoRA.rows`) train as
`*.added_rows` beside the frozen table, as PEFT's trainable token indices do.

Written here rather than taken from PEFT: gpt's attention projects q, k and v with one fused
Linear (`c_attn`) where HF Llama has three, a checkpoint must hold the adapters under gpt's own
names and resume bit for bit, and DDP must see plain parameters; the PEFT export (gpt/hf/
export.py) maps these adapters onto PEFT's names.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt.config import LORA_TARGETS, ModelConfig, TrainConfig
from gpt.errors import GPTError
from gpt.model import GPT

ADAPTER_SUFFIXES = (".lora_A", ".lora_B", ".added_rows")


def is_adapter_key(key: str) -> bool:
    """Whether a state-dict key is an adapter's (what a LoRA checkpoint holds)."""
    return key.endswith(ADAPTER_SUFFIXES)


def model_targets(config: ModelConfig) -> tuple[str, ...]:
    """The targets a model has: c_up only in a gated MLP."""
    gated = config.mlp != "standard"
    return tuple(t for t in LORA_TARGETS if gated or t != "c_up")


@dataclass(frozen=True)
class LoRA:
    """A LoRA finetune's shape: rank, scale numerator, input dropout, the adapted layers, and
    the token ids whose embedding and head rows train (the chat tokens the finetune added)."""

    rank: int
    alpha: float
    dropout: float
    targets: tuple[str, ...]
    rows: tuple[int, ...] = ()

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(
        cls, tcfg: TrainConfig, model: ModelConfig, rows: tuple[int, ...] = ()
    ) -> LoRA:
        """The [train] lora_* keys for `model`: unset targets are every layer it has; a named
        one it lacks (c_up of a standard MLP) is refused."""
        has = model_targets(model)
        targets = tuple(tcfg.lora_targets) if tcfg.lora_targets is not None else has
        for target in targets:
            if target not in has:
                raise GPTError(
                    f"[train] lora_targets names {target!r}, which this model's blocks lack "
                    f"(mlp = {model.mlp!r} has no c_up); remove it, or choose among "
                    f"{', '.join(has)}"
                )
        return cls(tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_dropout, targets, rows)

    def record(self, base: str, base_sha256: str) -> dict[str, Any]:
        """What state.json keeps of a LoRA checkpoint: the base it adapts and the adapters'
        shape."""
        return {"base": base, "base_sha256": base_sha256, "rank": self.rank,
                "alpha": self.alpha, "targets": list(self.targets), "rows": list(self.rows)}

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> LoRA:
        """The adapters' shape as a checkpoint recorded it (dropout does not matter there)."""
        return cls(record["rank"], record["alpha"], 0.0, tuple(record["targets"]),
                   tuple(record.get("rows", ())))


class LoRALinear(nn.Module):
    """A frozen Linear plus a trainable low-rank update: W x + b + scale * B (A dropout(x))."""

    def __init__(self, base: nn.Linear, lora: LoRA, generator: torch.Generator) -> None:
        super().__init__()
        self.weight, self.bias = base.weight, base.bias  # the base's own Parameters, frozen
        self.in_features, self.out_features = base.in_features, base.out_features
        self.scale = lora.scale
        # A as nn.Linear draws its weight (kaiming-uniform, a = sqrt(5)): U(-1/sqrt(in), ..)
        bound = 1.0 / math.sqrt(self.in_features)
        a = torch.empty(lora.rank, self.in_features).uniform_(-bound, bound, generator=generator)
        dtype, device = base.weight.dtype, base.weight.device
        self.lora_A = nn.Parameter(a.to(device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, lora.rank, device=device,
                                               dtype=dtype))  # (out, r)
        self.dropout = nn.Dropout(lora.dropout)

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out)
        return F.linear(x, self.weight, self.bias) + self.scale * update

    def delta(self) -> Tensor:
        """scale * B A: what merging adds to the weight (out, in)."""
        return self.scale * (self.lora_B @ self.lora_A)

    def merged(self) -> nn.Linear:
        """A plain Linear holding W + scale * B A (and the bias)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight.device, dtype=self.weight.dtype).train(self.training)
        with torch.no_grad():
            linear.weight.copy_(self.weight + self.delta())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


class TrainedRows(nn.Module):
    """A frozen token embedding whose rows `ids` train: `added_rows` (k, C) begin as those rows
    and replace them."""

    def __init__(self, embedding: nn.Embedding, ids: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = embedding.weight  # the base's own Parameter, frozen
        self.register_buffer("ids", torch.tensor(ids, device=self.weight.device), persistent=False)
        self.added_rows = nn.Parameter(self.weight.detach()[self.ids].clone())  # (k, C)

    def change(self) -> Tensor:
        """What the trained rows add to the frozen ones (zero at the start): (k, C)."""
        return self.added_rows - self.weight[self.ids]

    def forward(self, idx: Tensor) -> Tensor:
        x = F.embedding(idx, self.weight)  # (B, T, C)
        hits = (idx.unsqueeze(-1) == self.ids).to(x.dtype)  # (B, T, k)
        return x + hits @ self.change()

    def merged(self) -> nn.Embedding:
        """A plain Embedding holding the trained rows."""
        embedding = nn.Embedding(*self.weight.shape, device=self.weight.device,
                                 dtype=self.weight.dtype)
        with torch.no_grad():
            embedding.weight.copy_(self.weight.index_copy(0, self.ids, self.added_rows))
        return embedding


class TrainedHeadRows(nn.Module):
    """A frozen LM head whose rows `ids` train: its own `added_rows`, or, tied, the token
    embedding's (one set of rows, as the tied weight is one table)."""

    def __init__(self, head: nn.Linear, ids: tuple[int, ...], tied: TrainedRows | None) -> None:
        super().__init__()
        self.weight = head.weight  # frozen
        self.register_buffer("ids", torch.tensor(ids, device=self.weight.device), persistent=False)
        self._tied = [tied] if tied is not None else []  # a list: not a submodule, no keys
        if tied is None:
            self.added_rows = nn.Parameter(self.weight.detach()[self.ids].clone())  # (k, C)

    def change(self) -> Tensor:
        if self._tied:
            return self._tied[0].change()
        return self.added_rows - self.weight[self.ids]

    def forward(self, x: Tensor) -> Tensor:
        logits = F.linear(x, self.weight)  # (B, T, V)
        return logits.index_add(-1, self.ids, F.linear(x, self.change()))  # (B, T, k) added

    def merged(self, embedding: nn.Embedding) -> nn.Linear:
        """A plain head holding the trained rows: tied to the merged `embedding`, or its own."""
        out, width = self.weight.shape
        head = nn.Linear(width, out, bias=False, device=self.weight.device,
                         dtype=self.weight.dtype)
        if self._tied:
            head.weight = embedding.weight
        else:
            with torch.no_grad():
                head.weight.copy_(self.weight.index_copy(0, self.ids, self.added_rows))
        return head


def _target_layers(model: GPT, targets: tuple[str, ...]) -> list[tuple[nn.Module, str]]:
    """(parent, name) of every Linear in the blocks whose name is a target."""
    return [(parent, name) for parent in model.transformer.h.modules()
            for name, child in parent.named_children()
            if name in targets and isinstance(child, (nn.Linear, LoRALinear))]


def add_adapters(model: GPT, lora: LoRA, seed: int) -> int:
    """Replace the targeted Linears of `model` by LoRALinears and freeze everything else; the
    adapters' A are drawn from their own generator seeded with `seed`, the same in every
    process. Returns the number of adapter parameters."""
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise GPTError("the model already carries LoRA adapters; merge them first")
    for param in model.parameters():
        param.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    trainable = 0
    for parent, name in _target_layers(model, lora.targets):
        base = getattr(parent, name)
        layer = LoRALinear(base, lora, generator).train(base.training)
        setattr(parent, name, layer)
        trainable += layer.lora_A.numel() + layer.lora_B.numel()
    if lora.rows:
        embedding = TrainedRows(model.transformer.wte, lora.rows)
        tied = embedding if model.config.tie_embeddings else None
        model.transformer.wte = embedding
        model.lm_head = TrainedHeadRows(model.lm_head, lora.rows, tied)
        trainable += embedding.added_rows.numel() * (1 if tied is not None else 2)
    return trainable


def merge_adapters(model: GPT) -> GPT:
    """Fold every adapter into its weight, in place: the model is a plain GPT again."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, LoRALinear):
                setattr(parent, name, child.merged())
    if isinstance(embedding := model.transformer.wte, TrainedRows):
        model.transformer.wte = embedding.merged()
        assert isinstance(model.lm_head, TrainedHeadRows)
        model.lm_head = model.lm_head.merged(model.transformer.wte)
    for param in model.parameters():
        param.requires_grad_(True)
    return model


def adapter_state(model: GPT) -> dict[str, Tensor]:
    """The adapters' tensors by key (`...c_attn.lora_A`): what a LoRA checkpoint holds."""
    return {k: v for k, v in model.state_dict().items() if is_adapter_key(k)}


def weights_sha256(model: GPT) -> str:
    """The sha256 of a model's weights as loaded (float32, adapters and a tied head left out):
    each key, dtype, shape and bytes, in key order. The same for a run's checkpoint and an HF
    folder, however its files are split, and it costs one pass over the weights, which loading
    makes anyway."""
    digest = hashlib.sha256()
    state = model.state_dict()
    for key in sorted(state):
        if is_adapter_key(key) or (key == "lm_head.weight" and model.config.tie_embeddings):
            continue
        tensor = state[key].detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{key}:{tuple(tensor.shape)}:float32;".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def check_same_finetune(
    lora: dict[str, Any] | None, tcfg: TrainConfig, model: ModelConfig, where: str
) -> None:
    """A run resumes with the finetune it was trained with: full stays full, and LoRA keeps its
    rank, alpha and targets (the adapters' shapes and scale); dropout may change."""
    if (lora is not None) != (tcfg.finetune == "lora"):
        was = "lora" if lora is not None else "full"
        raise GPTError(
            f"{where} was trained with train.finetune = {was!r}, the config now says "
            f"{tcfg.finetune!r}; set it back, or train into a new train.out_dir with "
            f"train.init_from = \"{where}\""
        )
    if lora is None:
        return
    now = LoRA.from_config(tcfg, model)
    for key, old, new in (("lora_rank", lora["rank"], now.rank),
                          ("lora_alpha", lora["alpha"], now.alpha),
                          ("lora_targets", lora["targets"], list(now.targets))):
        if old != new:
            raise GPTError(
                f"{where} was trained with train.{key} = {old!r}, the config now says {new!r}; "
                f"set it back, or train into a new train.out_dir with train.init_from = "
                f"\"{where}\""
            )
