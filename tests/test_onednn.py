"""The CPU weight packing: both sides of its probe give the model's own outputs."""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch

import gpt.onednn
from gpt.config import ModelConfig
from gpt.model import GPT
from gpt.onednn import PackedLinear, pack_linears, packing_works


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_model_matches_the_plain_model(
    dtype: torch.dtype, tiny_config: Callable[..., ModelConfig]
) -> None:
    if not packing_works(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU or torch release")
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval().to(dtype)
    idx = torch.randint(0, 64, (2, 16))
    packed = pack_linears(copy.deepcopy(model))
    assert isinstance(packed.lm_head, PackedLinear)
    atol = 1e-5 if dtype == torch.float32 else 0.02
    torch.testing.assert_close(packed(idx)[0], model(idx)[0], rtol=0, atol=atol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_the_private_ops_the_model_keeps_plain_linears(
    dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch, tiny_config: Callable[..., ModelConfig]
) -> None:
    """A torch release without the ops (or a CPU they refuse) costs speed, not correctness."""
    monkeypatch.setattr(gpt.onednn, "packing_works", lambda dtype: False)
    torch.manual_seed(0)
    model = GPT(tiny_config()).eval().to(dtype)
    idx = torch.randint(0, 64, (2, 16))
    expected = model(idx)[0]
    fallback = pack_linears(model)
    assert not any(isinstance(m, PackedLinear) for m in fallback.modules())
    torch.testing.assert_close(fallback(idx)[0], expected, rtol=0, atol=0)


def test_probe_says_no_when_an_op_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    class NoOps:
        def __getattr__(self, name: str) -> object:
            raise AttributeError(name)

    packing_works.cache_clear()
    monkeypatch.setattr(torch.ops, "mkldnn", NoOps())
    try:
        assert packing_works(torch.float32) is False
        assert gpt.onednn.bfloat16_is_native() is False
    finally:
        packing_works.cache_clear()


def test_probe_refuses_dtypes_it_does_not_pack() -> None:
    assert packing_works(torch.float16) is False
