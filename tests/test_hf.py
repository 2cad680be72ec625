"""HF transformers equivalence: GPT-2, Llama and Qwen3 models convert both ways with the same
logits, the same weights and the same greedy tokens; what either side cannot hold is refused by
name."""

from __future__ import annotations

import json
import re
import sys
import types

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
HF_QWEN3 = {
    "qwen3-mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),  # its default: 32
    "qwen3-gqa-untied": dict(num_key_value_heads=2, tie_word_embeddings=False, rms_norm_eps=3e-6,
                             rope_theta=500000.0),
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
    "qwen3-mha-tied": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                           qk_norm=True),
    "qwen3-gqa-untied-manual": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu",
                                    bias=False, qk_norm=True, n_kv_head=2, tie_embeddings=False,
                                    attention="manual", rope_base=500000.0, norm_eps=1e-6),
}
ARCHITECTURES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}


def perturb(model: torch.nn.Module) -> None:
    """Move every weight off its initial value, so that norm gains (ones), biases (zeros) and
    zero-initialised projections all matter to the logits."""
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)


def tiny_hf(name: str) -> transformers.PreTrainedModel:
    """A random HF model from HF_GPT2 / HF_LLAMA / HF_QWEN3, in eval mode; a Qwen3's QK-norm
    gains stay at one, the only ones gpt's gainless QK-norm computes."""
    torch.manual_seed(0)
    rope = dict(vocab_size=VOCAB, max_position_embeddings=BLOCK, hidden_size=48,
                intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, head_dim=12,
                bos_token_id=None, eos_token_id=None)
    if name in HF_GPT2:
        config = transformers.GPT2Config(
            vocab_size=VOCAB, n_positions=BLOCK, n_embd=48, n_layer=2, n_head=4,
            bos_token_id=None, eos_token_id=None, **HF_GPT2[name],
        )
    elif name in HF_LLAMA:
        config = transformers.LlamaConfig(**rope, **HF_LLAMA[name])
    else:
        config = transformers.Qwen3Config(**rope, **HF_QWEN3[name])
    model = transformers.AutoModelForCausalLM.from_config(config)
    perturb(model)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if key.endswith(("q_norm.weight", "k_norm.weight")):
                param.fill_(1.0)
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


@pytest.mark.parametrize("name", [*HF_GPT2, *HF_LLAMA, *HF_QWEN3])
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
    assert not llama.qk_norm


def test_hf_qwen3_config_maps_to_the_qk_norm_variant() -> None:
    qwen3 = model_config_from_hf(tiny_hf("qwen3-gqa-untied").config)
    assert (qwen3.norm, qwen3.mlp, qwen3.pos_embedding, qwen3.bias, qwen3.qk_norm) == (
        "rmsnorm", "swiglu", "rope", False, True)
    assert (qwen3.n_kv_head, qwen3.rope_base, qwen3.norm_eps) == (2, 500000.0, 3e-6)


@pytest.mark.parametrize("name", ["gpt2-tied-gelu_new", "gpt2-untied-gelu", "llama-gqa-untied",
                                  "llama-mha-tied", "qwen3-gqa-untied", "qwen3-mha-tied"])
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


@pytest.mark.parametrize("name", ["gpt2-untied-gelu", "llama-gqa-untied", "qwen3-gqa-untied"])
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


def test_weights_from_hf_takes_qwen3_qk_norm_gains_only_at_one() -> None:
    """gpt's QK-norm has no gain: a Qwen3 whose q_norm or k_norm learned one computes another
    function, and a file without them does not describe a Qwen3."""
    hf = tiny_hf("qwen3-gqa-untied")
    config = model_config_from_hf(hf.config)
    gain = "model.layers.1.self_attn.k_norm.weight"
    trained = {**hf.state_dict(), gain: torch.full((12,), 1.5)}
    with pytest.raises(GPTError, match=r"^HF weight " + re.escape(gain) + r" is not all ones: "
                       r"gpt's QK-norm learns no gain; gpt cannot convert this model$"):
        weights_from_hf(config, trained)
    wrong = {**hf.state_dict(), gain: torch.ones(48)}
    with pytest.raises(GPTError, match=r"k_norm\.weight has shape \(48,\).* needs \(12,\)"):
        weights_from_hf(config, wrong)
    without = {k: v for k, v in hf.state_dict().items() if k != gain}
    with pytest.raises(GPTError, match=r"missing " + re.escape(gain) + r"; unexpected none"):
        weights_from_hf(config, without)
    in_bfloat16 = {k: v.to(torch.bfloat16) for k, v in hf.state_dict().items()}
    assert weights_from_hf(config, in_bfloat16).keys() == weights_from_hf(config, hf.state_dict()).keys()


@pytest.mark.parametrize("name", list(OURS))
def test_our_models_export_with_the_same_logits(name: str) -> None:
    ours = tiny_ours(name)
    hf = to_hf(ours)
    assert not hf.training
    assert type(hf).__name__ == ARCHITECTURES[name.split("-")[0]]
    idx = torch.randint(0, VOCAB, (2, BLOCK))
    torch.testing.assert_close(logits(hf, idx), logits(ours, idx), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [*HF_GPT2, *HF_LLAMA, *HF_QWEN3])
def test_hf_to_gpt_to_hf_gives_the_same_weights(name: str) -> None:
    hf = tiny_hf(name)
    assert_same_state(to_hf(from_hf(hf)).state_dict(), hf.state_dict())


@pytest.mark.parametrize("name", list(OURS))
def test_gpt_to_hf_to_gpt_gives_the_same_weights(name: str) -> None:
    ours = tiny_ours(name)
    assert_same_state(from_hf(to_hf(ours)).state_dict(), ours.state_dict())


@pytest.mark.parametrize("name", ["gpt2-tied-gelu_tanh", "llama-mha-tied", "qwen3-mha-tied"])
def test_weights_to_hf_leaves_a_tied_head_out_with_or_without_ours(name: str) -> None:
    ours = tiny_ours(name)
    state = ours.state_dict()
    without = {k: v for k, v in state.items() if k != "lm_head.weight"}
    assert weights_to_hf(ours.config, state).keys() == weights_to_hf(ours.config, without).keys()
    hf_state = weights_to_hf(ours.config, state)
    assert "lm_head.weight" not in hf_state
    assert all(v.is_contiguous() for v in hf_state.values())


def test_weights_to_hf_gives_qwen3_unit_qk_norm_gains_in_the_weights_dtype() -> None:
    model = tiny_ours("qwen3-gqa-untied-manual").to(torch.bfloat16)
    hf_state = weights_to_hf(model.config, model.state_dict())
    gains = {k: v for k, v in hf_state.items() if k.endswith(("q_norm.weight", "k_norm.weight"))}
    assert len(gains) == 2 * model.config.n_layer
    assert all(torch.equal(v, torch.ones(12, dtype=torch.bfloat16)) for v in gains.values())


def test_weights_to_hf_names_missing_keys() -> None:
    ours = tiny_ours("llama-gqa-untied-manual")
    state = {k: v for k, v in ours.state_dict().items() if k != "lm_head.weight"}
    with pytest.raises(GPTError, match=r"missing lm_head\.weight; unexpected none"):
        weights_to_hf(ours.config, state)


@pytest.mark.parametrize("name", ["gpt2-untied-relu2-manual", "gpt2-tied-gelu_tanh",
                                  "llama-gqa-untied-manual", "llama-mha-tied",
                                  "qwen3-gqa-untied-manual", "qwen3-mha-tied"])
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


@pytest.mark.parametrize("name", ["gpt2-tied-gelu_tanh", "llama-gqa-untied-manual",
                                  "qwen3-gqa-untied-manual"])
def test_saved_config_carries_what_llama_cpp_reads(name: str, tmp_path) -> None:
    """GPT-2's context length as n_ctx (which llama.cpp's converter reads, as GPT-2's own
    config.json has it), Llama's and Qwen3's theta at the top level (which transformers 4.x
    reads), Qwen3's head size and its sliding window off; each config loads back into the same
    model config."""
    config = ModelConfig(**{**SHAPE, **OURS[name]})
    hf_config_from_model(config).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["architectures"] == [ARCHITECTURES[name.split("-")[0]]]
    if config.pos_embedding == "learned":
        assert saved["n_ctx"] == saved["n_positions"] == BLOCK
    else:
        assert saved["rope_theta"] == config.rope_base == 500000.0
    if config.qk_norm:
        assert (saved["head_dim"], saved["num_key_value_heads"], saved["rms_norm_eps"]) == (
            12, 2, 1e-6)
        assert saved["use_sliding_window"] is False and saved["sliding_window"] is None
        assert saved["attention_bias"] is False and saved["tie_word_embeddings"] is False
    loaded = transformers.AutoConfig.from_pretrained(tmp_path)
    assert model_config_from_hf(loaded) == model_config_from_hf(hf_config_from_model(config))


def greedy_hf(hf: transformers.PreTrainedModel, idx: torch.Tensor, n: int) -> torch.Tensor:
    hf.generation_config.eos_token_id = None  # nothing may end it early
    out = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=n,
                      min_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[:, idx.size(1):]


@pytest.mark.parametrize("name", ["gpt2-untied-gelu", "llama-gqa-untied", "qwen3-gqa-untied"])
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
QWEN3_OK = {**LLAMA_OK, "qk_norm": True}
FAMILY_GPT2 = r"HF GPT-2, the family of pos_embedding = 'learned', needs "
FAMILY_LLAMA = r"HF Llama, the family of pos_embedding = 'rope', needs "
FAMILY_QWEN3 = r"HF Qwen3, the family of pos_embedding = 'rope' with qk_norm, needs "
GEMMA2 = (r"it unset \(HF's models with cap \* tanh\(logits / cap\), Gemma 2 and its "
          r"successors, also norm every sublayer's output and scale the embeddings by "
          r"sqrt\(n_embd\), which gpt does not\)$")
ARCEE = (r"'swiglu' \(a standard MLP, ReLU² included, with RoPE would need HF Arcee, which gpt "
         r"does not export to\)$")


@pytest.mark.parametrize("variant, message", [
    ({**GPT2_OK, "norm_position": "post"}, r"norm_position = 'post': " + FAMILY_GPT2 + "'pre'"),
    ({**GPT2_OK, "cross_attention": True}, r"cross_attention = True: " + FAMILY_GPT2 + "False"),
    ({**GPT2_OK, "qk_norm": True}, r"qk_norm = True: " + FAMILY_GPT2 + "False"),
    ({**GPT2_OK, "qk_norm": True}, r"qk_norm = True: " + FAMILY_GPT2 + r"False \(QK-norm "
     r"exports as HF Qwen3, with pos_embedding = 'rope'\)$"),
    ({**GPT2_OK, "logit_softcap": 30.0}, r"logit_softcap = 30.0: " + FAMILY_GPT2 + "it unset"),
    ({**GPT2_OK, "logit_softcap": 30.0}, r"logit_softcap = 30.0: " + FAMILY_GPT2 + GEMMA2),
    ({**GPT2_OK, "mlp": "geglu"}, r"mlp = 'geglu': " + FAMILY_GPT2 + "'standard'"),
    ({**GPT2_OK, "mlp": "swiglu"}, r"mlp = 'swiglu': " + FAMILY_GPT2 + "'standard'"),
    ({**GPT2_OK, "norm": "rmsnorm"}, r"norm = 'rmsnorm': " + FAMILY_GPT2 + "'layernorm'"),
    ({**GPT2_OK, "bias": False}, r"bias = False: " + FAMILY_GPT2 + "True"),
    ({**GPT2_OK, "n_kv_head": 2}, r"n_kv_head = 2: " + FAMILY_GPT2 + "it unset or n_head = 4"),
    ({**LLAMA_OK, "norm_position": "post"}, r"norm_position = 'post': " + FAMILY_LLAMA),
    ({**LLAMA_OK, "logit_softcap": 15.0}, r"logit_softcap = 15.0: " + FAMILY_LLAMA + GEMMA2),
    ({**LLAMA_OK, "mlp": "standard"}, r"mlp = 'standard': " + FAMILY_LLAMA + "'swiglu'"),
    ({**LLAMA_OK, "mlp": "standard", "activation": "relu2"},
     r"mlp = 'standard': " + FAMILY_LLAMA + ARCEE),
    ({**LLAMA_OK, "mlp": "geglu"}, r"mlp = 'geglu': " + FAMILY_LLAMA + "'swiglu'"),
    ({**LLAMA_OK, "norm": "layernorm"}, r"norm = 'layernorm': " + FAMILY_LLAMA + "'rmsnorm'"),
    ({**LLAMA_OK, "bias": True}, r"bias = True: " + FAMILY_LLAMA + "False"),
    ({**QWEN3_OK, "norm_position": "post"}, r"norm_position = 'post': " + FAMILY_QWEN3),
    ({**QWEN3_OK, "cross_attention": True}, r"cross_attention = True: " + FAMILY_QWEN3 + "False"),
    ({**QWEN3_OK, "logit_softcap": 30.0}, r"logit_softcap = 30.0: " + FAMILY_QWEN3 + GEMMA2),
    ({**QWEN3_OK, "mlp": "standard", "activation": "relu2"},
     r"mlp = 'standard': " + FAMILY_QWEN3 + ARCEE),
    ({**QWEN3_OK, "mlp": "geglu"}, r"mlp = 'geglu': " + FAMILY_QWEN3 + "'swiglu'$"),
    ({**QWEN3_OK, "norm": "layernorm"}, r"norm = 'layernorm': " + FAMILY_QWEN3 + "'rmsnorm'"),
    ({**QWEN3_OK, "bias": True}, r"bias = True: " + FAMILY_QWEN3 + "False"),
])
def test_export_refuses_what_hf_cannot_hold(variant: dict, message: str) -> None:
    model = GPT(ModelConfig(**{**SHAPE, "n_layer": 1}, **variant))
    with pytest.raises(GPTError, match=r"^\[model\] " + message):
        to_hf(model)
    with pytest.raises(GPTError, match=r"^\[model\] " + message):
        hf_config_from_model(model.config)


def test_export_of_qk_norm_names_the_transformers_it_needs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A transformers from before Qwen3 (4.51) is named, with the upgrade; GPT-2 and Llama
    still export with it."""
    old = types.ModuleType("transformers")
    old.__version__ = "4.50.3"
    old.GPT2Config, old.LlamaConfig = transformers.GPT2Config, transformers.LlamaConfig
    monkeypatch.setitem(sys.modules, "transformers", old)
    with pytest.raises(GPTError, match=r"^\[model\] qk_norm exports as HF Qwen3, which "
                       r"transformers 4\.50\.3 lacks; upgrade it to 4\.51 or later"):
        hf_config_from_model(ModelConfig(**SHAPE, **QWEN3_OK))
    assert hf_config_from_model(ModelConfig(**SHAPE, **LLAMA_OK)).architectures == [
        "LlamaForCausalLM"]


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
    ("qwen3", "use_sliding_window", True,
     r"use_sliding_window = True: gpt's attention sees every earlier position"),
    ("qwen3", "rope_type", "yarn", r"rope_(parameters|scaling)\['rope_type'\] = 'yarn'"),
    ("qwen3", "attention_bias", True, r"attention_bias = True"),
    ("qwen3", "head_dim", 128, r"head_dim = 128: gpt needs hidden_size / num_attention_heads = 12"),
])
def test_import_refuses_what_gpt_cannot_compute(family: str, key: str, value, message: str) -> None:
    if family == "gpt2":
        config = transformers.GPT2Config(n_embd=48, n_head=4, n_layer=1)
    else:
        config_class = transformers.LlamaConfig if family == "llama" else transformers.Qwen3Config
        config = config_class(hidden_size=48, num_attention_heads=4, num_key_value_heads=4,
                              num_hidden_layers=1, head_dim=12)
    if key == "rope_type":
        set_rope_type(config, value)
    else:
        setattr(config, key, value)
    with pytest.raises(GPTError, match=r"^HF config " + message):
        model_config_from_hf(config)


def test_import_refuses_other_model_types() -> None:
    config = transformers.MistralConfig(hidden_size=48, num_attention_heads=4)
    with pytest.raises(GPTError, match=r"model_type 'mistral' does not convert; .*'gpt2'.*'llama'"
                                       r".*'qwen3' \(Qwen3ForCausalLM\)"):
        model_config_from_hf(config)
