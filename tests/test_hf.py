"""HF transformers equivalence: GPT-2 and Llama models convert both ways with the same logits,
the same weights and the same greedy tokens; what either side cannot hold is refused by name."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not transformers.is_torch_available():  # a transformers release needing a newer torch
    pytest.skip(f"transformers {transformers.__version__} does not support torch "
                f"{torch.__version__}", allow_module_level=True)

from gpt.config import ModelConfig  # noqa: E402
from gpt.errors import GPTError  # noqa: E402
from gpt.generate import generate  # noqa: E402
from gpt.hf import convert  # noqa: E402
from gpt.hf.convert import (  # noqa: E402
    check_hf_compatible,
    from_hf,
    hf_config_from_model,
    model_config_from_hf,
    to_hf,
    weights_from_hf,
    weights_to_hf,
)
from gpt.model import GPT  # noqa: E402

VOCAB, BLOCK = 101, 32
SHAPE = dict(vocab_size=VOCAB, block_size=BLOCK, n_layer=2, n_head=4, n_embd=48)

# HF configs of tiny models, as their kwargs: (family, kwargs)
HF_GPT2 = {
    "gpt2-tied-gelu_new": dict(activation_function="gelu_new"),
    "gpt2-untied-gelu": dict(activation_function="gelu", tie_word_embeddings=False),
    "gpt2-relu-n_inner": dict(activation_function="relu", n_inner=80, layer_norm_epsilon=1e-6),
}
HF_LLAMA = {
    "llama-mha-tied": dict(tie_word_embeddings=True),
    "llama-gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False),
    "llama-gqa-theta500k": dict(num_key_value_heads=1, rope_theta=500000.0, rms_norm_eps=3e-6),
}
# our side: the same families, with the runtime-only switches, which export too
OURS = {
    "gpt2-tied-gelu_tanh": dict(activation="gelu_tanh"),
    "gpt2-untied-relu2-manual": dict(activation="relu2", tie_embeddings=False, mlp_hidden=80,
                                     attention="manual"),
    "gpt2-zero_init_proj": dict(activation="gelu", zero_init_proj=True, norm_eps=1e-6),
    "llama-mha-tied": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False),
    "llama-gqa-untied-manual": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu",
                                    bias=False, n_kv_head=2, tie_embeddings=False,
                                    attention="manual", rope_base=500000.0, mlp_hidden=96),
    "llama-zero_init_proj": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                                 n_kv_head=1, zero_init_proj=True, dropout=0.1),
}


def perturb(model: torch.nn.Module) -> None:
    """Move every weight off its initial value, so that norm gains (ones), biases (zeros) and
    zero-initialised projections all matter to the logits."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)


def tiny_hf(name: str) -> transformers.PreTrainedModel:
    """A random HF model from HF_GPT2 / HF_LLAMA, in eval mode."""
    torch.manual_seed(0)
    if name in HF_GPT2:
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=BLOCK, n_embd=48, n_layer=2, n_head=4,
            bos_token_id=None, eos_token_id=None, **HF_GPT2[name],
        )
    else:
        config = transformers.LlamaConfig(
            vocab_size=VOCAB, max_position_embeddings=BLOCK, hidden_size=48,
            intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
            bos_token_id=None, eos_token_id=None, **HF_LLAMA[name],
        )
    model = transformers.AutoModelForCausalLM.from_config(config)
    perturb(model)
    return model.eval()


def tiny_ours(name: str) -> GPT:
    torch.manual_seed(1)
    model = GPT(ModelConfig(**SHAPE, **OURS[name]))
    if not model.config.zero_init_proj:  # keep the zero start: it is what the case exports
        perturb(model)
    return model.eval()


def logits(model: torch.nn.Module, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(idx)
    return out.logits if hasattr(out, "logits") else out[0]


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("name", [*HF_GPT2, *HF_LLAMA])
def test_hf_models_convert_with_the_same_logits(name: str) -> None:
    hf = tiny_hf(name)
    ours = from_hf(hf)
    idx = torch.randint(0, VOCAB, (2, BLOCK))
    torch.testing.assert_close(logits(ours, idx), logits(hf, idx), rtol=0, atol=1e-5)
    assert not ours.training
    tied = hf.config.tie_word_embeddings
    assert ours.config.tie_embeddings == tied
    assert (ours.lm_head.weight is ours.transformer.wte.weight) == tied


def test_hf_configs_map_to_the_matching_variants() -> None:
    gpt2 = model_config_from_hf(tiny_hf("gpt2-relu-n_inner").config)
    assert (gpt2.norm, gpt2.activation, gpt2.mlp_hidden, gpt2.pos_embedding, gpt2.bias) == (
        "layernorm", "relu", 80, "learned", True)
    assert (gpt2.norm_eps, gpt2.block_size, gpt2.padded_vocab_size) == (1e-6, BLOCK, VOCAB)
    llama = model_config_from_hf(tiny_hf("llama-gqa-theta500k").config)
    assert (llama.norm, llama.mlp, llama.mlp_hidden, llama.pos_embedding, llama.bias) == (
        "rmsnorm", "swiglu", 80, "rope", False)
    assert (llama.n_kv_head, llama.rope_base, llama.norm_eps) == (1, 500000.0, 3e-6)
    assert model_config_from_hf(tiny_hf("llama-mha-tied").config).n_kv_head is None


@pytest.mark.parametrize("name", ["gpt2-tied-gelu_new", "gpt2-untied-gelu", "llama-gqa-untied",
                                  "llama-mha-tied"])
def test_weights_from_hf_reads_the_hub_layout_without_prefix(name: str) -> None:
    hf = tiny_hf(name)
    prefix = "transformer." if name.startswith("gpt2") else "model."
    hub = {k.removeprefix(prefix): v for k, v in hf.state_dict().items()}
    if hf.config.tie_word_embeddings:
        hub.pop("lm_head.weight", None)  # the hub's tied files store the embedding once
    config = model_config_from_hf(hf.config)
    state = weights_from_hf(config, hub)
    assert "lm_head.weight" not in state or not config.tie_embeddings
    ours = GPT(config).eval()
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if config.tie_embeddings else [])
    idx = torch.randint(0, VOCAB, (2, 16))
    torch.testing.assert_close(logits(ours, idx), logits(hf, idx), rtol=0, atol=1e-5)


def test_weights_from_hf_skips_buffers_and_a_tied_head() -> None:
    hf = tiny_hf("gpt2-tied-gelu_new")
    config = model_config_from_hf(hf.config)
    state = dict(hf.state_dict())
    state["lm_head.weight"] = state["transformer.wte.weight"]
    state["transformer.h.0.attn.bias"] = torch.ones(1, 1, BLOCK, BLOCK).tril()  # older files
    state["transformer.h.0.attn.masked_bias"] = torch.tensor(-1e4)
    assert "lm_head.weight" not in weights_from_hf(config, state)
    llama = tiny_hf("llama-mha-tied")
    state = {**llama.state_dict(), "model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(6)}
    weights_from_hf(model_config_from_hf(llama.config), state)


@pytest.mark.parametrize("name", ["gpt2-untied-gelu", "llama-gqa-untied"])
def test_weights_from_hf_names_missing_and_unexpected_keys(name: str) -> None:
    hf = tiny_hf(name)
    config = model_config_from_hf(hf.config)
    state = dict(hf.state_dict())
    del state["lm_head.weight"]
    with pytest.raises(GPTError, match=r"missing lm_head\.weight; unexpected none"):
        weights_from_hf(config, state)
    state = {**hf.state_dict(), "transformer.h.9.mlp.c_fc.weight": torch.zeros(1)}
    with pytest.raises(GPTError, match=r"missing none; unexpected transformer\.h\.9"):
        weights_from_hf(config, state)


def test_weights_from_hf_names_a_weight_of_the_wrong_shape() -> None:
    hf = tiny_hf("llama-gqa-untied")
    config = model_config_from_hf(hf.config)
    state = {**hf.state_dict(), "model.layers.1.self_attn.k_proj.weight": torch.zeros(48, 48)}
    with pytest.raises(GPTError, match=r"k_proj\.weight has shape \(48, 48\).* needs \(24, 48\)"):
        weights_from_hf(config, state)


@pytest.mark.parametrize("name", list(OURS))
def test_our_models_export_with_the_same_logits(name: str) -> None:
    ours = tiny_ours(name)
    hf = to_hf(ours)
    assert not hf.training
    assert type(hf).__name__ == ("GPT2LMHeadModel" if name.startswith("gpt2")
                                 else "LlamaForCausalLM")
    idx = torch.randint(0, VOCAB, (2, BLOCK))
    torch.testing.assert_close(logits(hf, idx), logits(ours, idx), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [*HF_GPT2, *HF_LLAMA])
def test_hf_to_gpt_to_hf_gives_the_same_weights(name: str) -> None:
    hf = tiny_hf(name)
    assert_same_state(to_hf(from_hf(hf)).state_dict(), hf.state_dict())


@pytest.mark.parametrize("name", list(OURS))
def test_gpt_to_hf_to_gpt_gives_the_same_weights(name: str) -> None:
    ours = tiny_ours(name)
    assert_same_state(from_hf(to_hf(ours)).state_dict(), ours.state_dict())


@pytest.mark.parametrize("name", ["gpt2-tied-gelu_tanh", "llama-mha-tied"])
def test_weights_to_hf_leaves_a_tied_head_out_with_or_without_ours(name: str) -> None:
    ours = tiny_ours(name)
    state = ours.state_dict()
    without = {k: v for k, v in state.items() if k != "lm_head.weight"}
    assert weights_to_hf(ours.config, state).keys() == weights_to_hf(ours.config, without).keys()
    hf_state = weights_to_hf(ours.config, state)
    assert "lm_head.weight" not in hf_state
    assert all(v.is_contiguous() for v in hf_state.values())


def test_weights_to_hf_names_missing_keys() -> None:
    ours = tiny_ours("llama-gqa-untied-manual")
    state = {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(GPTError, match=r"missing lm_head\.weight; unexpected none"):
        weights_to_hf(ours.config, state)


@pytest.mark.parametrize("name", ["gpt2-untied-relu2-manual", "gpt2-tied-gelu_tanh",
                                  "llama-gqa-untied-manual", "llama-mha-tied"])
def test_saved_export_loads_in_transformers_with_every_key(name: str, tmp_path) -> None:
    ours = tiny_ours(name)
    to_hf(ours).save_pretrained(tmp_path)
    loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, output_loading_info=True
    )
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(kind), (kind, info[kind])
    idx = torch.randint(0, VOCAB, (2, BLOCK))
    torch.testing.assert_close(logits(loaded.eval(), idx), logits(ours, idx), rtol=0, atol=1e-5)


def test_hf_config_carries_token_ids_and_float32() -> None:
    config = ModelConfig(**SHAPE, pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                         dropout=0.1)
    hf_config = hf_config_from_model(config, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    assert (hf_config.bos_token_id, hf_config.eos_token_id, hf_config.pad_token_id) == (1, 2, 0)
    assert hf_config.vocab_size == config.padded_vocab_size == 128  # the embedding's rows
    assert hf_config.max_position_embeddings == BLOCK and hf_config.attention_dropout == 0.1
    dtype = getattr(hf_config, "dtype", None) or hf_config.torch_dtype  # renamed in 4.56
    assert dtype in (torch.float32, "float32")
    assert "float32" in hf_config.to_json_string()


@pytest.mark.parametrize("name", ["gpt2-tied-gelu_tanh", "llama-gqa-untied-manual"])
def test_saved_config_carries_what_llama_cpp_reads(name: str, tmp_path) -> None:
    """GPT-2's context length as n_ctx (which llama.cpp's converter reads, as GPT-2's own
    config.json has it) and Llama's theta at the top level (which transformers 4.x reads), and
    both configs load back into the same model config."""
    config = ModelConfig(**{**SHAPE, **OURS[name]})
    hf_config_from_model(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    if config.pos_embedding == "learned":
        assert saved["n_ctx"] == saved["n_positions"] == BLOCK
    else:
        assert saved["rope_theta"] == config.rope_base == 500000.0
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert model_config_from_hf(loaded) == model_config_from_hf(hf_config_from_model(config))


def greedy_hf(hf: transformers.PreTrainedModel, idx: torch.Tensor, n: int) -> torch.Tensor:
    hf.generation_config.eos_token_id = None  # nothing may end it early
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                      min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, idx.size(1):]


@pytest.mark.parametrize("name", ["gpt2-untied-gelu", "llama-gqa-untied"])
def test_greedy_generation_matches_hf_generate(name: str) -> None:
    hf = tiny_hf(name)
    ours = from_hf(hf)
    idx = torch.randint(0, VOCAB, (2, 8))
    expected = greedy_hf(hf, idx, 20)
    tokens = torch.stack(list(generate(ours, idx, 20, temperature=0)), dim=1)  # (B, 20)
    assert torch.equal(tokens, expected)


# ---------------------------------------------------------------------------------------------
# Refusals: what one side cannot hold is named, by its [model] key or its HF config key

GPT2_OK = dict(activation="gelu_tanh")
LLAMA_OK = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False)
FAMILY_GPT2 = r"HF GPT-2, the family of pos_embedding = 'learned', needs "
FAMILY_LLAMA = r"HF Llama, the family of pos_embedding = 'rope', needs "


@pytest.mark.parametrize("variant, message", [
    ({**GPT2_OK, "norm_position": "post"}, r"norm_position = 'post': " + FAMILY_GPT2 + "'pre'"),
    ({**GPT2_OK, "cross_attention": True}, r"cross_attention = True: " + FAMILY_GPT2 + "False"),
    ({**GPT2_OK, "qk_norm": True}, r"qk_norm = True: " + FAMILY_GPT2 + "False"),
    ({**GPT2_OK, "logit_softcap": 30.0}, r"logit_softcap = 30.0: " + FAMILY_GPT2 + "it unset"),
    ({**GPT2_OK, "mlp": "geglu"}, r"mlp = 'geglu': " + FAMILY_GPT2 + "'standard'"),
    ({**GPT2_OK, "mlp": "swiglu"}, r"mlp = 'swiglu': " + FAMILY_GPT2 + "'standard'"),
    ({**GPT2_OK, "norm": "rmsnorm"}, r"norm = 'rmsnorm': " + FAMILY_GPT2 + "'layernorm'"),
    ({**GPT2_OK, "bias": False}, r"bias = False: " + FAMILY_GPT2 + "True"),
    ({**GPT2_OK, "n_kv_head": 2}, r"n_kv_head = 2: " + FAMILY_GPT2 + "it unset or n_head = 4"),
    ({**LLAMA_OK, "norm_position": "post"}, r"norm_position = 'post': " + FAMILY_LLAMA),
    ({**LLAMA_OK, "qk_norm": True}, r"qk_norm = True: " + FAMILY_LLAMA + "False"),
    ({**LLAMA_OK, "mlp": "standard"}, r"mlp = 'standard': " + FAMILY_LLAMA + "'swiglu'"),
    ({**LLAMA_OK, "mlp": "geglu"}, r"mlp = 'geglu': " + FAMILY_LLAMA + "'swiglu'"),
    ({**LLAMA_OK, "norm": "layernorm"}, r"norm = 'layernorm': " + FAMILY_LLAMA + "'rmsnorm'"),
    ({**LLAMA_OK, "bias": True}, r"bias = True: " + FAMILY_LLAMA + "False"),
])
def test_export_refuses_what_hf_cannot_hold(variant: dict, message: str) -> None:
    model = GPT(ModelConfig(**{**SHAPE, "n_layer": 1}, **variant))
    with pytest.raises(GPTError, match=r"^\[model\] " + message):
        to_hf(model)
    with pytest.raises(GPTError, match=r"^\[model\] " + message):
        hf_config_from_model(model.config)


def test_export_refuses_an_activation_hf_cannot_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(convert._ACTIVATION_TO_HF, "relu2")  # as if HF had no name for it
    with pytest.raises(GPTError, match=r"activation = 'relu2': " + FAMILY_GPT2 + "one that HF"):
        check_hf_compatible(ModelConfig(**SHAPE, activation="relu2"))


def set_rope_type(config: transformers.LlamaConfig, rope_type: str) -> None:
    """A scaled RoPE, where each transformers version keeps it."""
    if isinstance(getattr(config, "rope_parameters", None), dict):  # transformers 5
        config.rope_parameters = {**config.rope_parameters, "rope_type": rope_type, "factor": 2.0}
    else:
        config.rope_scaling = {"rope_type": rope_type, "factor": 2.0}


@pytest.mark.parametrize("family, key, value, message", [
    ("gpt2", "scale_attn_by_inverse_layer_idx", True, r"scale_attn_by_inverse_layer_idx = True"),
    ("gpt2", "reorder_and_upcast_attn", True, r"reorder_and_upcast_attn = True"),
    ("gpt2", "scale_attn_weights", False, r"scale_attn_weights = False"),
    ("gpt2", "add_cross_attention", True, r"add_cross_attention = True"),
    ("gpt2", "activation_function", "quick_gelu", r"activation_function = 'quick_gelu'"),
    ("llama", "rope_type", "linear", r"rope_(parameters|scaling)\['rope_type'\] = 'linear'"),
    ("llama", "attention_bias", True, r"attention_bias = True"),
    ("llama", "mlp_bias", True, r"mlp_bias = True"),
    ("llama", "hidden_act", "gelu", r"hidden_act = 'gelu'"),
    ("llama", "head_dim", 16, r"head_dim = 16: gpt needs hidden_size / num_attention_heads = 12"),
])
def test_import_refuses_what_gpt_cannot_compute(family: str, key: str, value, message: str) -> None:
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=48, n_head=4, n_layer=1)
    else:
        config = transformers.LlamaConfig(hidden_size=48, num_attention_heads=4,
                                          num_hidden_layers=1)
    if key == "rope_type":
        set_rope_type(config, value)
    else:
        setattr(config, key, value)
    with pytest.raises(GPTError, match=r"^HF config " + message):
        model_config_from_hf(config)


def test_import_refuses_other_model_types() -> None:
    config = transformers.MistralConfig(hidden_size=48, num_attention_heads=4)
    with pytest.raises(GPTError, match=r"model_type 'mistral' does not convert; .*'gpt2'.*'llama'"):
        model_config_from_hf(config)
