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
from gpt.hf import from_hf_gpt2, to_hf_gpt2  # noqa: E402
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


def test_export_refuses_non_gpt2_variants() -> None:
    model = GPT(ModelConfig(vocab_size=101, block_size=32, n_layer=1, n_head=4, n_embd=48,
                            norm="rmsnorm"))
    with pytest.raises(GPTError, match="norm"):
        to_hf_gpt2(model)

