"""Conversion between `gpt.model.GPT` and HF transformers' GPT-2, Llama and Qwen3. transformers
is imported inside functions, so the checks here run without it.

`pos_embedding` picks the family. Learned positions convert to `GPT2LMHeadModel`: LayerNorm
with biases, a standard MLP, multi-head attention; its names are ours key for key, but its
`Conv1D` projections store (in, out) weights, the transpose of `nn.Linear`. Rotary positions
convert to `LlamaForCausalLM`: RMSNorm, SwiGLU, no biases, grouped-query heads; it keeps q, k
and v in three matrices where we fuse them row-wise, and its `rotate_half` RoPE rotates the same
(i, i + hs/2) pairs as ours, so no rows are permuted. Rotary positions with QK-norm convert to
`Qwen3ForCausalLM`, which is Llama's network and names plus what our QK-norm computes: each
head's queries and keys RMS-normalised over head_dim, with the blocks' `rms_norm_eps`, before
RoPE, attention still scaled by 1/sqrt(head_dim). Its norms have a gain (`q_norm`, `k_norm`),
ours none: export writes ones, import takes only ones. All three are Pre-LN with uncapped logits.

Configs and weights convert separately, so that a loader (config.json and safetensors files)
and an exporter need no HF model; `from_hf` and `to_hf` join the two for live models.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from gpt.config import ModelConfig
from gpt.errors import GPTError
from gpt.model import GPT

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel

# HF activation_function names whose function is exactly one of gpt.model.ACTIVATIONS
# (gelu_new writes out the tanh approximation that F.gelu(approximate="tanh") computes)
_ACTIVATION_FROM_HF = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
    "relu2": "relu2",
    "leaky_relu": "leaky_relu",
    "silu": "silu",
    "swish": "silu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
}
# the name each of ours exports under: gelu_new, as OpenAI's GPT-2 checkpoints name it
_ACTIVATION_TO_HF = {
    "gelu_tanh": "gelu_new",
    "gelu": "gelu",
    "relu": "relu",
    "relu2": "relu2",
    "leaky_relu": "leaky_relu",
    "silu": "silu",
    "sigmoid": "sigmoid",
    "tanh": "tanh",
}

_GPT2_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# what an HF file may hold that is no weight: GPT-2's causal-mask buffers, Llama's RoPE tables
_GPT2_BUFFERS = (".attn.bias", ".attn.masked_bias")
_LLAMA_BUFFERS = ("rotary_emb.inv_freq", "rotary_emb.original_inv_freq")

# our block's keys -> Llama's, under transformer.h.N. and model.layers.N.
_LLAMA_BLOCK = {
    "ln_1.weight": "input_layernorm.weight",
    "ln_2.weight": "post_attention_layernorm.weight",
    "attn.c_proj.weight": "self_attn.o_proj.weight",
    "mlp.c_fc.weight": "mlp.gate_proj.weight",
    "mlp.c_up.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
}
_LLAMA_QKV = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
_LLAMA_TOP = {"transformer.wte.weight": "model.embed_tokens.weight",
              "transformer.ln_f.weight": "model.norm.weight", "lm_head.weight": "lm_head.weight"}
# Qwen3's per-head QK-norm gains, under model.layers.N.: ours has none, so they are ones
_QWEN3_QK_GAINS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")
# what each family exports as
_ARCHITECTURES = {"HF GPT-2": "GPT2LMHeadModel", "HF Llama": "LlamaForCausalLM",
                  "HF Qwen3": "Qwen3ForCausalLM"}
# logit soft-capping's refusal: the HF models that cap logits so differ in more than the cap
_SOFTCAP_NEEDS = ("it unset (HF's models with cap * tanh(logits / cap), Gemma 2 and its "
                  "successors, also norm every sublayer's output and scale the embeddings by "
                  "sqrt(n_embd), which gpt does not)")


# ---------------------------------------------------------------------------------------------
# Configs


def _family(config: ModelConfig) -> str:
    """Which HF family holds `config`, as messages name it."""
    if config.pos_embedding == "learned":
        return "HF GPT-2"
    return "HF Qwen3" if config.qk_norm else "HF Llama"


def _family_in_refusals(config: ModelConfig) -> str:
    """The family and the keys that pick it, as refusals name them."""
    picked_by = f"pos_embedding = {config.pos_embedding!r}"
    if _family(config) == "HF Qwen3":
        picked_by += " with qk_norm"
    return f"{_family(config)}, the family of {picked_by},"


def check_hf_compatible(config: ModelConfig) -> None:
    """Raise unless an HF family computes what `config` does: GPT-2 for learned positions,
    Llama for rotary ones, Qwen3 for rotary ones with QK-norm. The runtime-only keys (dropout,
    attention, zero_init_proj) pass."""
    gpt2 = config.pos_embedding == "learned"
    needs: list[tuple[str, bool, str]] = [  # (key, holds, what the family needs)
        ("norm_position", config.norm_position == "pre", "'pre'"),
        ("cross_attention", not config.cross_attention, "False"),
        ("logit_softcap", config.logit_softcap is None, _SOFTCAP_NEEDS),
    ]
    if gpt2:
        needs += [
            ("qk_norm", not config.qk_norm,
             "False (QK-norm exports as HF Qwen3, with pos_embedding = 'rope')"),
            ("mlp", config.mlp == "standard",
             "'standard' (gated MLPs export as HF Llama, with pos_embedding = 'rope')"),
            ("norm", config.norm == "layernorm", "'layernorm'"),
            ("activation", config.activation in _ACTIVATION_TO_HF,
             "one that HF names: " + ", ".join(repr(a) for a in _ACTIVATION_TO_HF)),
            ("bias", config.bias, "True (GPT-2 has biases in every layer)"),
            ("n_kv_head", config.kv_heads == config.n_head,
             f"it unset or n_head = {config.n_head} (GPT-2 has no grouped-query attention)"),
        ]
    else:
        standard = config.mlp == "standard"  # Llama's network with it is HF Arcee's
        needs += [
            ("mlp", config.mlp == "swiglu", "'swiglu'" + (
                " (a standard MLP, ReLU² included, with RoPE would need HF Arcee, which gpt "
                "does not export to)" if standard else "")),
            ("norm", config.norm == "rmsnorm", "'rmsnorm'"),
            ("bias", not config.bias, "False (the RoPE export has no biases)"),
        ]
    family = _family_in_refusals(config)
    for key, holds, needed in needs:
        if not holds:
            raise GPTError(f"[model] {key} = {getattr(config, key)!r}: {family} needs {needed}")


def _refuse(key: str, value: Any, problem: str) -> GPTError:
    return GPTError(f"HF config {key} = {value!r}: {problem}; gpt cannot convert this model")


def _rope_settings(hf_config: PretrainedConfig) -> tuple[str, str, float]:
    """(the HF key holding the RoPE type, the type, theta) of a Llama config.

    transformers 5 keeps type and theta together in `rope_parameters`; 4.x has `rope_theta`
    beside an optional `rope_scaling` dict (whose type key was once "type").
    """
    params = getattr(hf_config, "rope_parameters", None)
    if isinstance(params, dict):
        theta = params.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
        return "rope_parameters", params.get("rope_type", "default"), float(theta)
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    return "rope_scaling", kind, float(getattr(hf_config, "rope_theta", 10000.0))


def _model_config_from_gpt2(c: PretrainedConfig) -> ModelConfig:
    if not getattr(c, "scale_attn_weights", True):
        raise _refuse("scale_attn_weights", False, "gpt always scales attention by 1/sqrt(hs)")
    for key in ("scale_attn_by_inverse_layer_idx", "reorder_and_upcast_attn",
                "add_cross_attention"):
        if getattr(c, key, False):
            raise _refuse(key, True, "gpt's attention has no such option")
    if c.activation_function not in _ACTIVATION_FROM_HF:
        raise _refuse("activation_function", c.activation_function,
                      "gpt has the same function only for " + ", ".join(_ACTIVATION_FROM_HF))
    return ModelConfig(
        block_size=c.n_positions,
        vocab_size=c.vocab_size,
        padded_vocab_size=c.vocab_size,
        n_layer=c.n_layer,
        n_head=c.n_head,
        n_embd=c.n_embd,
        dropout=0.0,
        bias=True,
        norm="layernorm",
        norm_eps=c.layer_norm_epsilon,
        norm_position="pre",
        mlp="standard",
        activation=_ACTIVATION_FROM_HF[c.activation_function],  # type: ignore[arg-type]
        mlp_hidden=c.n_inner,
        pos_embedding="learned",
        tie_embeddings=c.tie_word_embeddings,
        attention="sdpa",
    )


def _model_config_from_llama(c: PretrainedConfig) -> ModelConfig:
    rope_key, rope_type, theta = _rope_settings(c)
    if rope_type not in (None, "default"):
        raise _refuse(f"{rope_key}['rope_type']", rope_type, "gpt has only unscaled RoPE")
    for key in ("attention_bias", "mlp_bias"):
        if getattr(c, key, False):
            raise _refuse(key, True, "gpt's RoPE models have no biases")
    if c.hidden_act not in ("silu", "swish"):
        raise _refuse("hidden_act", c.hidden_act, "gpt's SwiGLU needs 'silu'")
    head_dim = getattr(c, "head_dim", None)
    if head_dim is not None and head_dim * c.num_attention_heads != c.hidden_size:
        raise _refuse("head_dim", head_dim,
                      f"gpt needs hidden_size / num_attention_heads = "
                      f"{c.hidden_size / c.num_attention_heads:g}")
    kv_heads = getattr(c, "num_key_value_heads", None)
    return ModelConfig(
        block_size=c.max_position_embeddings,
        vocab_size=c.vocab_size,
        padded_vocab_size=c.vocab_size,
        n_layer=c.num_hidden_layers,
        n_head=c.num_attention_heads,
        n_embd=c.hidden_size,
        n_kv_head=None if kv_heads in (None, c.num_attention_heads) else kv_heads,
        dropout=0.0,
        bias=False,
        norm="rmsnorm",
        norm_eps=c.rms_norm_eps,
        norm_position="pre",
        mlp="swiglu",
        mlp_hidden=c.intermediate_size,
        pos_embedding="rope",
        rope_base=theta,
        tie_embeddings=c.tie_word_embeddings,
        attention="sdpa",
    )


def _model_config_from_qwen3(c: PretrainedConfig) -> ModelConfig:
    """Llama's mapping plus QK-norm; a sliding window, which limits what a token attends to,
    is refused (its gains, which ours lacks, are checked with the weights)."""
    if getattr(c, "use_sliding_window", False):
        raise _refuse("use_sliding_window", True, "gpt's attention sees every earlier position")
    return dataclasses.replace(_model_config_from_llama(c), qk_norm=True)


def model_config_from_hf(hf_config: PretrainedConfig) -> ModelConfig:
    """The ModelConfig of an HF GPT-2, Llama or Qwen3 config; GPTError naming the HF key of
    anything our model would compute differently."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == "gpt2":
        return _model_config_from_gpt2(hf_config)
    if model_type == "llama":
        return _model_config_from_llama(hf_config)
    if model_type == "qwen3":
        return _model_config_from_qwen3(hf_config)
    raise GPTError(
        f"HF model_type {model_type!r} does not convert; gpt converts 'gpt2' (GPT2LMHeadModel), "
        "'llama' (LlamaForCausalLM) and 'qwen3' (Qwen3ForCausalLM)"
    )


def hf_config_from_model(
    config: ModelConfig,
    bos_token_id: int | None = None,
    eos_token_id: int | None = None,
    pad_token_id: int | None = None,
) -> PretrainedConfig:
    """The HF config of `config`: GPT2Config for learned positions, LlamaConfig for RoPE,
    Qwen3Config for RoPE with QK-norm.

    The vocabulary is the padded one (the embedding's rows); HF's position limit is block_size.
    """
    from transformers import GPT2Config, LlamaConfig

    check_hf_compatible(config)
    family = _family(config)
    tokens = dict(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    hf_config: PretrainedConfig
    if config.pos_embedding == "learned":
        hf_config = GPT2Config(
            vocab_size=config.padded_vocab_size,
            n_positions=config.block_size,
            # not a GPT2Config parameter, but GPT-2's own config.json has it, and llama.cpp's
            # converter reads the context length only from it
            n_ctx=config.block_size,
            n_embd=config.n_embd,
            n_layer=config.n_layer,
            n_head=config.n_head,
            n_inner=config.mlp_hidden,
            activation_function=_ACTIVATION_TO_HF[config.activation],
            layer_norm_epsilon=config.norm_eps,
            resid_pdrop=config.dropout,
            embd_pdrop=config.dropout,
            attn_pdrop=config.dropout,
            tie_word_embeddings=config.tie_embeddings,
            **tokens,
        )
    else:
        llama = dict(
            vocab_size=config.padded_vocab_size,
            max_position_embeddings=config.block_size,
            hidden_size=config.n_embd,
            intermediate_size=config.hidden_dim,
            num_hidden_layers=config.n_layer,
            num_attention_heads=config.n_head,
            num_key_value_heads=config.kv_heads,
            head_dim=config.head_dim,  # a plain attribute before transformers 4.45, unread
            hidden_act="silu",
            rms_norm_eps=config.norm_eps,  # Qwen3's QK-norm takes it too, as ours does
            rope_theta=config.rope_base,  # transformers 5 moves it into rope_parameters
            attention_bias=False,
            attention_dropout=config.dropout,  # neither has embedding or residual dropout
            tie_word_embeddings=config.tie_embeddings,
            **tokens,
        )
        if family == "HF Qwen3":  # every layer attends to every earlier position
            hf_config = _qwen3_config_class()(
                **llama, use_sliding_window=False, sliding_window=None,
                max_window_layers=config.n_layer,
            )
        else:
            hf_config = LlamaConfig(**llama, mlp_bias=False)
        params = getattr(hf_config, "rope_parameters", None)
        if isinstance(params, dict):  # in case a 5.x release stops translating rope_theta
            params.update(rope_type="default", rope_theta=config.rope_base)
            # 5.x writes theta only inside rope_parameters, which 4.x (still what many serving
            # tools pin) ignores for its default of 10000; both read the top-level key
            hf_config.rope_theta = config.rope_base
    hf_config.architectures = [_ARCHITECTURES[family]]
    if hasattr(hf_config, "dtype"):  # transformers >= 4.56 renamed torch_dtype to dtype
        hf_config.dtype = torch.float32
    else:
        hf_config.torch_dtype = torch.float32
    return hf_config


def _qwen3_config_class() -> type[PretrainedConfig]:
    """transformers' Qwen3Config, which came in 4.51; GPTError naming the upgrade before it."""
    import transformers

    if not hasattr(transformers, "Qwen3Config"):
        raise GPTError(
            f"[model] qk_norm exports as HF Qwen3, which transformers {transformers.__version__} "
            "lacks; upgrade it to 4.51 or later (pip install -U transformers)"
        )
    return transformers.Qwen3Config


# ---------------------------------------------------------------------------------------------
# Weights: each of our keys stands for one HF key (GPT-2, Llama), or three (Llama's q, k, v);
# Qwen3 adds QK-norm gains that stand for none of ours


def _hf_keys(config: ModelConfig, key: str) -> list[str]:
    """The HF keys (with the transformer./model. prefix) that hold our weight `key`."""
    if config.pos_embedding == "learned":
        return [key]
    if key in _LLAMA_TOP:
        return [_LLAMA_TOP[key]]
    match = re.fullmatch(r"transformer\.h\.(\d+)\.(.+)", key)
    layer, rest = match.groups() if match else ("", "")
    if rest == "attn.c_attn.weight":
        return [f"model.layers.{layer}.{name}" for name in _LLAMA_QKV]
    if rest in _LLAMA_BLOCK:
        return [f"model.layers.{layer}.{_LLAMA_BLOCK[rest]}"]
    raise GPTError(f"weight {key} has no place in {_family(config)}; export a model that "
                   "passes check_hf_compatible")


def _qk_norm_gains(config: ModelConfig, dtype: torch.dtype) -> dict[str, Tensor]:
    """The HF QK-norm gains that compute what ours does: Qwen3's q_norm and k_norm of every
    layer, at one; none for the other families."""
    if _family(config) != "HF Qwen3":
        return {}
    return {f"model.layers.{layer}.{name}": torch.ones(config.head_dim, dtype=dtype)
            for layer in range(config.n_layer) for name in _QWEN3_QK_GAINS}


def _to_hf_tensors(config: ModelConfig, key: str, value: Tensor) -> list[Tensor]:
    """Our weight -> the HF tensors of `_hf_keys(config, key)`, in that order."""
    if config.pos_embedding == "learned":
        return [value.t() if key.endswith(_GPT2_CONV1D) else value]  # Conv1D: (in, out)
    if key.endswith("attn.c_attn.weight"):  # (q_dim + 2 * kv_dim, C) -> q, k, v rows
        q_dim, kv_dim = config.n_head * config.head_dim, config.kv_heads * config.head_dim
        return list(value.split([q_dim, kv_dim, kv_dim], dim=0))
    return [value]


def _from_hf_tensors(config: ModelConfig, key: str, values: list[Tensor]) -> Tensor:
    """The inverse of `_to_hf_tensors`."""
    if config.pos_embedding == "learned":
        return values[0].t() if key.endswith(_GPT2_CONV1D) else values[0]
    return torch.cat(values, dim=0) if len(values) > 1 else values[0]


def our_shapes(config: ModelConfig) -> dict[str, torch.Size]:
    """Our state dict's keys and shapes, a tied head left out; from a model on the meta device,
    which allocates nothing."""
    with torch.device("meta"):
        state = GPT(config).state_dict()
    if config.tie_embeddings:
        del state["lm_head.weight"]
    return {key: value.shape for key, value in state.items()}


def _few(keys: list[str], n: int = 3) -> str:
    """The first n keys, and how many more: enough to recognise the mismatch on one line."""
    if not keys:
        return "none"
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def _hf_prefixed(config: ModelConfig, key: str) -> str:
    """An HF key with its model's prefix, which the hub's GPT-2 file leaves out."""
    prefix = "transformer." if config.pos_embedding == "learned" else "model."
    return key if key == "lm_head.weight" or key.startswith(prefix) else prefix + key


def weights_from_hf(config: ModelConfig, hf_state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """An HF GPT-2, Llama or Qwen3 state dict (keys with or without the transformer./model.
    prefix) -> ours for `config`, a tied head left out: load it with
    `GPT(config).load_state_dict`. Qwen3's QK-norm gains must be ones, as ours has none."""
    shapes = {key: tuple(value.shape) for key, value in hf_state.items()}
    return {key: _from_hf_tensors(config, key, [hf_state[n] for n in names]).contiguous()
            for key, names in hf_names(config, shapes, hf_state.__getitem__).items()}


def hf_names(
    config: ModelConfig, hf_shapes: Mapping[str, tuple[int, ...]], read: Callable[[str], Tensor]
) -> dict[str, list[str]]:
    """Our keys for `config` (a tied head left out) -> the HF keys, as `hf_shapes` names them,
    that hold each; every shape checked, and Qwen3's QK-norm gains, read whole with `read`,
    checked to be ones. Reads no weight: `hf_rows` then reads each one's rows."""
    check_hf_compatible(config)
    buffers = _GPT2_BUFFERS if config.pos_embedding == "learned" else _LLAMA_BUFFERS
    given = {_hf_prefixed(config, key): key for key in hf_shapes if not key.endswith(buffers)}
    if config.tie_embeddings:
        given.pop("lm_head.weight", None)  # HF ties it to the embedding, as we do
    found: dict[str, list[str]] = {}
    missing: list[str] = []
    for key, shape in our_shapes(config).items():
        names = _hf_keys(config, key)
        absent = [name for name in names if name not in given]
        if absent:
            missing += absent
            continue
        found[key] = [given.pop(name) for name in names]
        wanted = _to_hf_tensors(config, key, torch.empty(shape, device="meta"))
        for name, stored, want in zip(names, found[key], wanted, strict=True):
            if hf_shapes[stored] != tuple(want.shape):
                raise GPTError(
                    f"HF weight {name} has shape {hf_shapes[stored]}, but the {_family(config)} "
                    f"config needs {tuple(want.shape)}; pass the config of these weights"
                )
    for name, one in _qk_norm_gains(config, torch.float32).items():
        if name not in given:
            missing.append(name)
            continue
        stored = given.pop(name)
        if hf_shapes[stored] != tuple(one.shape):
            raise GPTError(
                f"HF weight {name} has shape {hf_shapes[stored]}, but the {_family(config)} "
                f"config needs {tuple(one.shape)}; pass the config of these weights"
            )
        if not torch.equal(read(stored).float(), one):
            raise GPTError(f"HF weight {name} is not all ones: gpt's QK-norm learns no gain; "
                           "gpt cannot convert this model")
    if missing or given:
        raise GPTError(
            f"HF weights do not fit the {_family(config)} config: missing {_few(missing)}; "
            f"unexpected {_few(list(given.values()))}; pass the weights the config describes"
        )
    return found


def hf_rows(
    config: ModelConfig, key: str, names: list[str], hf_shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str, Any], Tensor], rows: slice,
) -> Tensor:
    """Rows [start:stop] of our weight `key`, read by slices (`read(name, index)`) from the HF
    tensors `names` (`hf_names`): GPT-2's Conv1D weights are the transpose of the columns
    [start:stop]; Llama's fused q, k and v rows come from each of the three where they fall."""
    if config.pos_embedding == "learned" and key.endswith(_GPT2_CONV1D):
        return read(names[0], (slice(None), rows)).t()  # Conv1D: (in, out)
    parts, first = [], 0
    for name in names:  # the row-wise concatenation of `_from_hf_tensors`
        size = hf_shapes[name][0]
        lo, hi = max(rows.start - first, 0), min(rows.stop - first, size)
        if hi > lo:
            parts.append(read(name, slice(lo, hi)))
        first += size
    if not parts:  # a process that holds none of its rows
        return read(names[0], slice(0, 0))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def weights_to_hf(config: ModelConfig, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Our state dict -> the HF model's (keys as GPT2LMHeadModel, LlamaForCausalLM or
    Qwen3ForCausalLM name them, Qwen3's QK-norm gains at one), contiguous; the head only when
    untied."""
    check_hf_compatible(config)
    shapes = our_shapes(config)
    extra = [k for k in state if k not in shapes and not (k == "lm_head.weight" and
                                                          config.tie_embeddings)]
    missing = [k for k in shapes if k not in state]
    if missing or extra:
        raise GPTError(
            f"weights do not fit the [model] config: missing {_few(missing)}; unexpected "
            f"{_few(extra)}; pass the state dict of a GPT built from this config"
        )
    hf_state: dict[str, Tensor] = {}
    for key, shape in shapes.items():
        if state[key].shape != shape:
            raise GPTError(f"weight {key} has shape {tuple(state[key].shape)}, but the [model] "
                           f"config needs {tuple(shape)}; pass the config of these weights")
        for name, value in zip(
            _hf_keys(config, key), _to_hf_tensors(config, key, state[key]), strict=True
        ):
            hf_state[name] = value.contiguous()
    hf_state.update(_qk_norm_gains(config, state["transformer.wte.weight"].dtype))
    return hf_state


def adapters_to_peft(
    config: ModelConfig, adapters: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], list[str]]:
    """LoRA adapters (`...c_attn.lora_A`, gpt/lora.py) -> PEFT's state dict for the HF model
    of `config`, and the HF module names they target (PEFT's target_modules).

    Each adapted Linear is the HF module(s) its weight exports to (`_hf_keys`). GPT-2's are
    ours by name (its Conv1D stores W^T, but PEFT keeps A (r, in) and B (out, r) either way).
    Llama's fused c_attn is three: each of q, k and v takes the shared A and its rows of B, the
    rows its weight takes (`_to_hf_tensors`; no rows are permuted).
    """
    state: dict[str, Tensor] = {}
    modules: set[str] = set()
    for key, value in adapters.items():
        layer, part = key.rsplit(".", 1)  # "transformer.h.0.attn.c_attn", "lora_A"
        weight = f"{layer}.weight"
        names = [name.removesuffix(".weight") for name in _hf_keys(config, weight)]
        if part == "lora_A" or config.pos_embedding == "learned":
            values = [value] * len(names)
        else:  # B's rows follow the weight's, as they are split or permuted on export
            values = _to_hf_tensors(config, weight, value)
        for name, tensor in zip(names, values, strict=True):
            state[f"base_model.model.{name}.{part}.weight"] = tensor.contiguous().clone()
            modules.add(name.rsplit(".", 1)[1])
    return state, sorted(modules)


# ---------------------------------------------------------------------------------------------
# Live models


def from_hf(hf_model: PreTrainedModel) -> GPT:
    """A `GPT` (eval mode) holding the weights of an HF `GPT2LMHeadModel`, `LlamaForCausalLM` or
    `Qwen3ForCausalLM`, in their dtype and on their device."""
    config = model_config_from_hf(hf_model.config)
    weight = next(hf_model.parameters())
    model = GPT(config).to(device=weight.device, dtype=weight.dtype)
    state = weights_from_hf(config, hf_model.state_dict())
    missing, unexpected = model.load_weights(state)
    if missing or unexpected:  # weights_from_hf matched the keys: a bug if this happens
        raise GPTError(f"HF weights do not load: missing {_few(missing)}; unexpected "
                       f"{_few(unexpected)}")
    return model.eval()


def to_hf(model: GPT) -> PreTrainedModel:
    """An HF `GPT2LMHeadModel` (learned positions), `LlamaForCausalLM` (RoPE) or
    `Qwen3ForCausalLM` (RoPE and QK-norm), in eval mode and float32, holding the weights of
    `model`."""
    from transformers import AutoModelForCausalLM

    hf_model = AutoModelForCausalLM.from_config(hf_config_from_model(model.config))
    hf_model = hf_model.to(torch.float32)
    state = weights_to_hf(model.config, model.state_dict())
    missing, unexpected = hf_model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_embeddings)]
    if missing or unexpected:  # weights_to_hf named every HF weight: a bug if this happens
        raise GPTError(f"weights do not load into HF: missing {_few(missing)}; unexpected "
                       f"{_few(unexpected)}")
    return hf_model.eval()
