"""The CPU decoding speed-up: Linear weights packed once into oneDNN's blocked layout.

A plain `F.linear` on the CPU repacks its weight on every call; decoding a token is one
matrix-vector product per weight, so the repacking costs about as much as the product itself.
Packing once needs private torch ops (`torch.ops.mkldnn.*`) that a torch release may drop or
change and that refuse some CPUs (bfloat16 packing needs AVX-512 or AVX-NE-CONVERT). So one
probe per dtype, run once, decides whether they work here and agree with `F.linear`; where they
do not, the model keeps its plain Linear layers: a missing op costs speed, never correctness.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from gpt.model import GPT


@functools.cache
def packing_works(dtype: torch.dtype) -> bool:
    """Whether oneDNN packs and multiplies `dtype` weights here, matching `F.linear`."""
    if dtype not in (torch.float32, torch.bfloat16) or not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(24, 16, generator=generator).to(dtype)  # (out, in)
        bias = torch.randn(24, generator=generator).to(dtype)
        x = torch.randn(2, 16, generator=generator).to(dtype)  # (B, in)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
        out = torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")  # (B, out)
        expected = F.linear(x, weight, bias)
        return out.shape == expected.shape and torch.allclose(
            out.float(), expected.float(), rtol=0.02, atol=0.05
        )
    except Exception:  # an op missing in this release, or refusing this CPU
        return False


def bfloat16_is_native() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16, AMX) as oneDNN reports it."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:
        return False


class PackedLinear(nn.Module):
    """A Linear whose weight oneDNN has reordered once, at load, into its blocked layout.

    Inference only: the packed weight has no gradient and is not in the state dict.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: Tensor) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears(model: GPT) -> GPT:
    """Swap, in place, the Linear layers of a CPU model for `PackedLinear`s where the probe
    says packing works for the model's dtype; otherwise return the model unchanged.

    Cross-attention keeps its Linear: it splits the fused weight at run time. The tied LM head
    gets its own packed copy of `wte`.
    """
    weight = model.transformer.wte.weight
    if weight.device.type == "cpu" and packing_works(weight.dtype):
        model.replace_linears(PackedLinear)
    return model
