"""Where and in what precision to run: the device and dtype rules of training and sampling.

Both commands take `auto` or a name; the rules (what auto picks, what a CPU refuses) live here
once, and each caller passes the option's name so the error says what to change.
"""

from __future__ import annotations

import contextlib
import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from gpt.errors import GPTError
from gpt.onednn import bfloat16_is_native, packing_works

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N or mps"


def resolve_device(name: str, option: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; a named device must exist here."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise GPTError(f"{option} {name!r} is not a device; use {DEVICE_CHOICES}") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise GPTError(f"{option} {name!r} is not supported; use {DEVICE_CHOICES}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GPTError(f"{option} {name!r}: no CUDA GPU is available here; use auto or cpu")
    if device.type == "mps" and not mps_available():
        raise GPTError(f"{option} {name!r}: MPS is not available here; use auto or cpu")
    return device


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_dtype(
    name: str, device: torch.device, option: str, inference: bool = False
) -> torch.dtype:
    """The compute dtype for `name` on `device`.

    auto: bfloat16 on GPUs that have it, float16 on older GPUs. On other devices float32 for
    training; for inference bfloat16 where the CPU computes it natively, since decoding is
    bound by the bytes of weights read per token and bfloat16 halves them.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if inference and device.type == "cpu" and fast_cpu_bfloat16():
            return torch.bfloat16
        return torch.float32
    if name not in DTYPES:
        raise GPTError(f"{option} {name!r} is not one of auto, {', '.join(DTYPES)}")
    if name == "float16" and device.type == "cpu":
        raise GPTError(f"{option} float16 needs a GPU; use bfloat16 or float32 on the CPU")
    return DTYPES[name]


FP8_CAPABILITY = (8, 9)  # Ada and Hopper on: the first GPUs with float8 tensor cores
FP8_FIX = "set train.fp8 = false"


def check_fp8(device: torch.device) -> None:
    """`[train] fp8` needs float8 tensor cores (CUDA compute capability 8.9 or higher: L4,
    L40S, RTX 4090, H100, H200, B200) and torchao, which converts the layers; refused before
    any work elsewhere."""
    if device.type != "cuda":
        raise GPTError(f"[train] fp8 = true needs a CUDA GPU of compute capability 8.9 or higher, "
                       f"and this run is on {device.type}; {FP8_FIX}")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < FP8_CAPABILITY:
        raise GPTError(f"[train] fp8 = true needs float8 tensor cores (compute capability 8.9 or "
                       f"higher), and {torch.cuda.get_device_name(device)} has {major}.{minor}; "
                       f"{FP8_FIX}")
    if importlib.util.find_spec("torchao") is None:
        raise GPTError("[train] fp8 = true trains through torchao's float8, which is not "
                       f"installed; pip install torchao (or gpt[fp8]), or {FP8_FIX}")


def to_float8(model: nn.Module) -> None:
    """Swap, in place, the blocks' Linear layers for torchao's float8 training ones (dynamic
    per-tensor scales); the embeddings and the LM head stay in the compute dtype, as does any
    layer whose sides are not multiples of 16 (float8 matmuls need them)."""
    from torchao.float8 import convert_to_float8_training

    def in_blocks(module: nn.Module, fqn: str) -> bool:
        return (fqn.startswith("transformer.h.") and isinstance(module, nn.Linear)
                and module.in_features % 16 == 0 and module.out_features % 16 == 0)

    convert_to_float8_training(model, module_filter_fn=in_blocks)


def fast_cpu_bfloat16() -> bool:
    """bfloat16 decoding is only faster where the CPU computes it natively and its weights can
    be packed; elsewhere (AVX2-only CPUs, say) bfloat16 runs emulated, slower than float32."""
    return bfloat16_is_native() and packing_works(torch.bfloat16)


def free_memory(device: torch.device) -> int | None:
    """Bytes `device` can still allocate, or None where that cannot be told: a CUDA GPU's free
    memory and what torch's allocator holds unused; for the CPU the host's available memory
    (Linux's MemAvailable), within the container's limit (cgroup v2). Checks refuse with it
    what would run out anyway."""
    if device.type == "cuda":
        unused = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + unused
    if device.type != "cpu":
        return None
    free = None
    with contextlib.suppress(OSError, ValueError):
        meminfo = Path("/proc/meminfo").read_text()
        found = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE)
        free = int(found.group(1)) * 1024 if found else None
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            left = max(int(limit) - used, 0)
            free = left if free is None else min(free, left)
    return free


@contextlib.contextmanager
def memory_errors(device: torch.device, fix: str) -> Iterator[None]:
    """An allocation that `device` cannot serve (a model too large for it, a batch too big for
    a GPU) as one line saying so and what to change (`fix`), not the allocator's page."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        text = str(e)
        # a tensor of more bytes than 64 bits count (a batch of 2**62 rows): refused before any
        # allocator sees it
        overflow = "Storage size calculation overflowed" in text
        # CUDA: "Tried to allocate 2.00 GiB"; the CPU: "you tried to allocate 1024 bytes"
        if not isinstance(e, (MemoryError, torch.OutOfMemoryError)) and not overflow and (
            "can't allocate memory" not in text and "MPS backend out of memory" not in text
        ):
            raise
        asked = re.search(r"(?i)tried to allocate (?:(\d+) bytes|([\d.]+ \w+))", text)
        if overflow:
            amount = " (asked for more than 2**63 bytes)"
        elif asked is None:
            amount = ""
        elif asked.group(1):
            amount = f" (asked for {int(asked.group(1)):,} bytes)"
        else:
            amount = f" (asked for {asked.group(2)})"
        raise GPTError(f"out of memory on {_where(e, device)}{amount}; {fix}") from None


def _where(error: BaseException, device: torch.device) -> str:
    """The device that ran out, from the error: a model is built in host memory before it moves
    to a GPU, so host memory can run out under `--device cuda` too."""
    text = str(error)
    if "DefaultCPUAllocator" in text or isinstance(error, MemoryError):
        return "cpu (host memory)" if device.type != "cpu" else "cpu"
    if "MPS backend out of memory" in text:
        return "mps"
    return str(device)
