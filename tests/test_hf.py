"""GPT-2 equivalence: our model with weights copied from HF transformers gives the same logits."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not transformers.is_torch_available():  # a transformers release needing a newer torch
    pytest.skip(f"transformers {transformers.__version__} does not support torch "
                f"{torch.__version__}", allow_module_level=True)

from gpt.config import ModelConfig  # noqa: E402
from gpt.errors import GPTError  # noqa: E402
from gpt.hf.convert import from_hf_gpt2, to_hf_gpt2  # noqa: E402
from gpt.model import GPT  # noqa: E402


def tiny_hf_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=101, n_positions=32, n_embd=48, n_layer=3, n_head=4,
        bos_token_id=100, eos_token_id=100,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def test_weights_from_hf_gpt2_give_the_same_logits() -> None:
    hf = tiny_hf_gpt2()
    ours = from_hf_gpt2(hf).eval()
    cfg = ours.config
    assert (cfg.norm, cfg.activation, cfg.pos_embedding, cfg.bias, cfg.tie_embeddings) == (
        "layernorm", "gelu_tanh", "learned", True, True,
    )
    idx = torch.randint(0, 101, (2, 32))
    with torch.no_grad():
        expected = hf(idx).logits
        logits, _ = ours(idx)
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_export_to_hf_gpt2_round_trips() -> None:
    torch.manual_seed(1)
    ours = GPT(
        ModelConfig(vocab_size=101, block_size=32, n_layer=2, n_head=4, n_embd=48,
                    activation="gelu_tanh")
    ).eval()
    hf = to_hf_gpt2(ours)
    idx = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, ours(idx)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("variant, message", [
    (dict(norm="rmsnorm"), r"\[model\] norm = 'rmsnorm': GPT-2 needs 'layernorm'"),
    (dict(activation="relu2"), r"\[model\] activation = 'relu2': GPT-2 needs 'gelu_tanh'"),
    (dict(qk_norm=True), r"\[model\] qk_norm = True: GPT-2 needs False"),
    (dict(logit_softcap=30.0), r"\[model\] logit_softcap = 30.0: GPT-2 needs it unset"),
])
def test_export_refuses_non_gpt2_variants(variant: dict, message: str) -> None:
    shape = {"activation": "gelu_tanh", **variant}  # GPT-2's but for the variant
    model = GPT(ModelConfig(vocab_size=101, block_size=32, n_layer=1, n_head=4, n_embd=48, **shape))
    with pytest.raises(GPTError, match=message):
        to_hf_gpt2(model)


def test_zero_init_proj_is_only_an_initialisation_and_exports() -> None:
    model = GPT(ModelConfig(vocab_size=101, block_size=32, n_layer=1, n_head=4, n_embd=48,
                            activation="gelu_tanh", zero_init_proj=True)).eval()
    idx = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(to_hf_gpt2(model)(idx).logits, model(idx)[0], rtol=0, atol=1e-5)

