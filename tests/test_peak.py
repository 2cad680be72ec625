"""The CPU's peak FLOP/s: measured once, cached by what changes it, never an error to cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gpt import peak
from gpt.peak import cpu_name, cpu_peak_flops, default_cache_file, measure_matmul_flops

FakePeak = tuple[float, list[torch.dtype]]  # the measured_peak fixture: (figure, calls)

def forget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A new process: nothing measured in memory."""
    monkeypatch.setattr(peak, "_MEASURED", {})


def test_the_cache_is_written_once_and_reused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, measured_peak: FakePeak
) -> None:
    flops, calls = measured_peak
    cache = tmp_path / "gpt" / "peak_flops.json"
    assert cpu_peak_flops(torch.float32, cache) == flops
    assert cpu_peak_flops(torch.float32, cache) == flops  # from memory
    forget(monkeypatch)
    assert cpu_peak_flops(torch.float32, cache) == flops  # from the file
    assert calls == [torch.float32]
    (entry,) = json.loads(cache.read_text())["peaks"]
    assert entry == {"cpu": cpu_name(), "threads": torch.get_num_threads(),
                     "torch": torch.__version__, "dtype": "float32", "flop_per_s": flops}


@pytest.mark.parametrize("change", ["dtype", "threads", "torch", "cpu"])
def test_a_change_of_key_measures_again_and_keeps_both(
    change: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    measured_peak: FakePeak,
) -> None:
    _, calls = measured_peak
    cache = tmp_path / "peak_flops.json"
    cpu_peak_flops(torch.float32, cache)
    forget(monkeypatch)
    dtype = torch.bfloat16 if change == "dtype" else torch.float32
    if change == "threads":
        threads = torch.get_num_threads() + 1
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    elif change == "torch":
        monkeypatch.setattr(torch, "__version__", "0.0.1")
    elif change == "cpu":
        (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Another CPU\n")
        monkeypatch.setattr(peak, "CPUINFO", tmp_path / "cpuinfo")
    cpu_peak_flops(dtype, cache)
    assert calls == [torch.float32, dtype]
    assert len(json.loads(cache.read_text())["peaks"]) == 2


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[]", b'{"peaks": 3}', b'{"peaks": [{"cpu": 1}, 2]}',
     b'{"peaks": [{"cpu": "x", "threads": 1, "torch": "x", "dtype": "x", "flop_per_s": -1}]}'],
)
def test_a_corrupt_cache_is_measured_over_and_rewritten(
    content: bytes, tmp_path: Path, measured_peak: FakePeak
) -> None:
    flops, calls = measured_peak
    cache = tmp_path / "peak_flops.json"
    cache.write_bytes(content)
    assert cpu_peak_flops(torch.float32, cache) == flops
    assert calls == [torch.float32]
    assert [e["flop_per_s"] for e in json.loads(cache.read_text())["peaks"]] == [flops]


def test_an_unwritable_cache_folder_means_measuring_each_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, measured_peak: FakePeak
) -> None:
    flops, calls = measured_peak
    (tmp_path / "file").write_text("")
    cache = tmp_path / "file" / "peak_flops.json"  # its folder is a file: unwritable, even for root
    assert cpu_peak_flops(torch.float32, cache) == flops
    forget(monkeypatch)
    assert cpu_peak_flops(torch.float32, cache) == flops
    assert calls == [torch.float32, torch.float32]


def test_the_cache_folder_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path / "mine"))
    assert default_cache_file() == tmp_path / "mine" / "peak_flops.json"
    monkeypatch.delenv("GPT_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_file() == tmp_path / "xdg" / "gpt" / "peak_flops.json"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative")  # the XDG spec says to ignore it
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_file() == tmp_path / "home" / ".cache" / "gpt" / "peak_flops.json"


def test_the_cpu_name_comes_from_cpuinfo_else_the_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: X\nmodel name\t: Example CPU @ 3.0GHz\n")
    monkeypatch.setattr(peak, "CPUINFO", cpuinfo)
    assert cpu_name() == "Example CPU @ 3.0GHz"
    monkeypatch.setattr(peak, "CPUINFO", tmp_path / "missing")
    assert cpu_name()  # platform.processor() or machine(): some name, never empty


def test_the_benchmark_measures_a_plausible_rate_and_leaves_the_seeded_rng_alone() -> None:
    torch.manual_seed(0)
    rng = torch.get_rng_state()
    assert measure_matmul_flops(torch.float32, size=256, repeats=2) > 1e8
    assert torch.equal(torch.get_rng_state(), rng)  # training's dropout masks do not move
