"""The CPU's peak FLOP/s for MFU: a matmul benchmark, run once per machine and cached.

GPUs have published peaks (the table in `gpt/metrics.py`); CPUs differ too much by model, core
count and instruction set for a table, so the peak is measured: square matmuls large enough to
be compute-bound, the best of a few, with torch's current thread count. The figure is kept in
memory for the process and in `peak_flops.json` in the user's cache folder (`$GPT_CACHE_DIR`,
else `$XDG_CACHE_HOME/gpt`, else `~/.cache/gpt`), keyed by everything that changes it: the CPU
model, the thread count, the torch version and the dtype. A cache that cannot be read is
measured over; one that cannot be written means measuring in each process, never an error.
"""

from __future__ import annotations

import json
import math
import platform
import time
from pathlib import Path
from typing import Any

import torch

from gpt.fileio import cache_folder, write_json_atomic

CPUINFO = Path("/proc/cpuinfo")  # Linux: the CPU's "model name"
CACHE_NAME = "peak_flops.json"
KEY_FIELDS = ("cpu", "threads", "torch", "dtype")
_MEASURED: dict[tuple[str, int, str, str], float] = {}  # this process's figures, by cache key


def cpu_peak_flops(dtype: torch.dtype, cache_file: Path | None = None) -> float:
    """The CPU's matmul FLOP/s in `dtype` at torch's current thread count: from this process's
    memory, else the cache file (default: `default_cache_file()`), else measured and saved."""
    key = cache_key(dtype)
    if key in _MEASURED:
        return _MEASURED[key]
    path = cache_file if cache_file is not None else default_cache_file()
    entries = _read_entries(path) if path is not None else []
    found = next((e["flop_per_s"] for e in entries if _entry_key(e) == key), None)
    if found is None:
        found = measure_matmul_flops(dtype)
        if path is not None:
            entry = dict(zip(KEY_FIELDS, key, strict=True), flop_per_s=found)
            _write_entries(path, [e for e in entries if _entry_key(e) != key] + [entry])
    _MEASURED[key] = found
    return found


def measure_matmul_flops(
    dtype: torch.dtype, size: int = 1024, repeats: int = 5, budget_s: float = 1.0
) -> float:
    """FLOP/s of the fastest of `repeats` (size, size) @ (size, size) matmuls after a warm-up,
    stopping early once `budget_s` has passed (a CPU that emulates bfloat16 is slow at it)."""
    generator = torch.Generator().manual_seed(0)  # the global RNG, which training seeds, untouched
    a = torch.randn(size, size, generator=generator).to(dtype)
    b = torch.randn(size, size, generator=generator).to(dtype)
    out = torch.mm(a, b)  # warm-up: starts the thread pool, picks the kernel
    best = math.inf
    deadline = time.perf_counter() + budget_s
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b, out=out)
        best = min(best, time.perf_counter() - started)
        if time.perf_counter() > deadline:
            break
    return 2 * size**3 / max(best, 1e-9)  # a multiply and an add per (i, j, k)


def cache_key(dtype: torch.dtype) -> tuple[str, int, str, str]:
    """(CPU model, torch threads, torch version, dtype): what the measured peak depends on."""
    return cpu_name(), torch.get_num_threads(), torch.__version__, dtype_name(dtype)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def cpu_name() -> str:
    """The CPU's model name ("AMD EPYC 7763 64-Core Processor"), or the best the platform says."""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def default_cache_file() -> Path | None:
    """`peak_flops.json` in gpt's cache folder (fileio.cache_folder); None when there is none."""
    folder = cache_folder()
    return None if folder is None else folder / CACHE_NAME


def _entry_key(entry: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(entry[field] for field in KEY_FIELDS)


def _read_entries(path: Path) -> list[dict[str, Any]]:
    """The cache's well-formed entries; none when the file is missing, unreadable or corrupt."""
    try:
        peaks = json.loads(path.read_text())["peaks"]
    except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError):
        return []
    if not isinstance(peaks, list):
        return []
    fields = {"cpu": str, "threads": int, "torch": str, "dtype": str, "flop_per_s": (int, float)}
    return [
        e for e in peaks
        if isinstance(e, dict) and all(isinstance(e.get(k), t) for k, t in fields.items())
        and math.isfinite(e["flop_per_s"]) and e["flop_per_s"] > 0
    ]


def _write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    """Save the cache atomically; a folder that cannot be written is left alone."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, {"peaks": entries})
    except OSError:
        pass
