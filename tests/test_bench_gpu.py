"""scripts/bench_gpu.py: its timing windows, and its one-line refusal without a GPU."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_gpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # it imports doc_tables from its folder
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_timed_windows_time_whole_windows_after_the_warmup(bench_gpu) -> None:
    calls, synced_after = [], []
    seconds = bench_gpu.timed_windows(lambda: calls.append(1), lambda: synced_after.append(len(calls)),
                                      warmup=4, steps=6, window=2)
    assert len(seconds) == 3 and all(s >= 0 for s in seconds)
    assert len(calls) == 10 and synced_after == [4, 6, 8, 10]  # the device waited for at each edge


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_without_a_gpu_it_says_so_in_one_line(bench_gpu, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py"])
    with pytest.raises(SystemExit, match=r"bench_gpu.py needs a CUDA GPU, and this torch .* sees none"):
        bench_gpu.main()
