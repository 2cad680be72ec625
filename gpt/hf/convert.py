"""Conversion between `gpt.model.GPT` and HF transformers' GPT-2. The only module importing it.

Our parameter names are GPT-2's, so the mapping is key for key; the one difference is that HF's
GPT-2 stores its projections as `Conv1D` with (in, out) weights, the transpose of `nn.Linear`.
Only the GPT-2 family converts: learned positions, LayerNorm with bias, tanh-GELU, Pre-LN, tied
head, plain multi-head attention without QK-norm, uncapped logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from gpt.config import ModelConfig
from gpt.errors import GPTError
from gpt.model import GPT

if TYPE_CHECKING:
    from transformers import GPT2Config, GPT2LMHeadModel

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
GPT2_SHAPE = dict(
    norm="layernorm",
    norm_position="pre",
    mlp="standard",
    activation="gelu_tanh",
    pos_embedding="learned",
    bias=True,
    tie_embeddings=True,
    cross_attention=False,
    qk_norm=False,
    logit_softcap=None,
)


def check_gpt2_compatible(config: ModelConfig) -> None:
    """Raise unless `config` describes a model GPT-2's architecture can hold."""
    for key, value in GPT2_SHAPE.items():
        if getattr(config, key) != value:
            needed = "it unset" if value is None else repr(value)
            raise GPTError(f"[model] {key} = {getattr(config, key)!r}: GPT-2 needs {needed}")
    if config.kv_heads != config.n_head or config.hidden_dim != 4 * config.n_embd:
        raise GPTError("GPT-2 needs n_kv_head = n_head and mlp_hidden = 4 * n_embd")


def model_config_from_gpt2(hf_config: GPT2Config) -> ModelConfig:
    """The ModelConfig of an HF GPT-2 config."""
    return ModelConfig(
        block_size=hf_config.n_positions,
        vocab_size=hf_config.vocab_size,
        padded_vocab_size=hf_config.vocab_size,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        norm_eps=hf_config.layer_norm_epsilon,
        dropout=0.0,
        **GPT2_SHAPE,  # type: ignore[arg-type]
    )


def gpt2_config(config: ModelConfig) -> GPT2Config:
    """The HF GPT-2 config of a GPT-2-shaped ModelConfig."""
    from transformers import GPT2Config

    check_gpt2_compatible(config)
    return GPT2Config(
        vocab_size=config.padded_vocab_size,
        n_positions=config.block_size,
        n_embd=config.n_embd,
        n_layer=config.n_layer,
        n_head=config.n_head,
        layer_norm_epsilon=config.norm_eps,
        activation_function="gelu_new",
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        tie_word_embeddings=True,
        bos_token_id=min(50256, config.vocab_size - 1),
        eos_token_id=min(50256, config.vocab_size - 1),
    )


def _gpt2_keys(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """HF state dict -> ours: drop non-parameter buffers, transpose Conv1D weights."""
    ours = {}
    for key, value in hf_state.items():
        if key.endswith((".attn.bias", ".attn.masked_bias")):  # causal-mask buffers, not weights
            continue
        ours[key] = value.t() if key.endswith(_CONV1D) else value
    return ours


def from_hf_gpt2(hf_model: GPT2LMHeadModel) -> GPT:
    """A `GPT` holding the weights of an HF `GPT2LMHeadModel`."""
    model = GPT(model_config_from_gpt2(hf_model.config))
    state = _gpt2_keys(hf_model.state_dict())
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    with torch.no_grad():
        missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GPTError(f"GPT-2 weights do not map: missing {missing}, unexpected {unexpected}")
    return model


def to_hf_gpt2(model: GPT) -> GPT2LMHeadModel:
    """An HF `GPT2LMHeadModel` holding the weights of a GPT-2-shaped `GPT`."""
    from transformers import GPT2LMHeadModel

    hf_model = GPT2LMHeadModel(gpt2_config(model.config))
    state = {
        key: (value.t() if key.endswith(_CONV1D) else value).contiguous()
        for key, value in model.state_dict().items()
    }
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith((".attn.bias", ".attn.masked_bias"))]
    if missing or unexpected:
        raise GPTError(f"weights do not map to GPT-2: missing {missing}, unexpected {unexpected}")
    return hf_model.eval()
