"""Device and dtype rules, shared by training and sampling; errors name the option."""

from __future__ import annotations

import pytest
import torch

import gpt.device
from gpt.device import free_memory, resolve_device, resolve_dtype
from gpt.errors import GPTError

CPU = torch.device("cpu")


@pytest.mark.parametrize("native, packs, expected", [
    (True, True, torch.bfloat16),
    (True, False, torch.float32),  # an AVX2-only CPU: bf16 would run emulated, slower
    (False, True, torch.float32),
])
def test_auto_inference_dtype_takes_bfloat16_only_where_it_is_fast(
    monkeypatch: pytest.MonkeyPatch, native: bool, packs: bool, expected: torch.dtype
) -> None:
    monkeypatch.setattr(gpt.device, "bfloat16_is_native", lambda: native)
    monkeypatch.setattr(gpt.device, "packing_works", lambda dtype: packs)
    assert resolve_dtype("auto", CPU, "--dtype", inference=True) == expected
    assert resolve_dtype("auto", CPU, "[train] dtype") == torch.float32  # training: float32


def test_named_dtypes_and_refusals() -> None:
    assert resolve_dtype("bfloat16", CPU, "--dtype") == torch.bfloat16
    with pytest.raises(GPTError, match="--dtype float16 needs a GPU; use bfloat16 or float32"):
        resolve_dtype("float16", CPU, "--dtype")
    with pytest.raises(GPTError, match=r"\[train\] dtype 'int8' is not one of auto, float32"):
        resolve_dtype("int8", CPU, "[train] dtype")


def test_devices_and_refusals(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(gpt.device, "mps_available", lambda: False)
    assert resolve_device("auto", "--device") == CPU
    with pytest.raises(GPTError, match="--device 'cuda:1': no CUDA GPU is available here"):
        resolve_device("cuda:1", "--device")
    with pytest.raises(GPTError, match=r"\[train\] device 'gpu' is not a device"):
        resolve_device("gpu", "[train] device")


def test_free_memory_of_the_cpu_is_at_most_the_host_memory() -> None:
    free = free_memory(CPU)
    if free is None:
        pytest.skip("this system does not tell its available memory")
    import os

    assert 0 < free <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert free_memory(torch.device("meta")) is None  # a device that cannot be asked
