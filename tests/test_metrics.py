"""Throughput (tokens per second over the training steps, evaluation and saving left out) and
the device peak that MFU divides by."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from gpt.checkpoint import Checkpoint
from gpt.config import TrainConfig, load_config
from gpt.errors import GPTError
from gpt.metrics import MetricsLog, Throughput, peak_flops
from gpt.train import train


def test_paused_time_is_left_out_of_the_rate() -> None:
    meter = Throughput(flops_per_token=6, world_size=2, peak=12.0)
    time.sleep(0.05)
    meter.add(1000)
    with meter.paused():  # an evaluation as long as the steps: the rate must not halve
        time.sleep(0.2)
    values = meter.read()
    assert values["tok_per_s"] > 1000 / 0.15  # 0.05 s of steps (plus overhead), not 0.25 s
    assert values["mfu"] == pytest.approx(6 * values["tok_per_s"] / 2 / 12.0)
    assert meter.tokens == 0  # each reading starts a new window


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_peak_is_measured_in_the_runs_dtype(
    dtype: torch.dtype, measured_peak: tuple[float, list[torch.dtype]]
) -> None:
    flops, calls = measured_peak
    assert peak_flops(TrainConfig(), torch.device("cpu"), dtype) == flops
    assert calls == [dtype]


def test_the_configured_peak_wins_without_measuring(
    measured_peak: tuple[float, list[torch.dtype]]
) -> None:
    cfg = TrainConfig(peak_flops=3e11)
    assert peak_flops(cfg, torch.device("cpu"), torch.float32) == 3e11
    assert measured_peak[1] == []


def test_a_device_without_a_known_peak_has_none() -> None:
    assert peak_flops(TrainConfig(), torch.device("mps"), torch.float32) is None


def test_a_cpu_run_logs_mfu(tiny_run: Path, measured_peak: tuple[float, list[torch.dtype]]) -> None:
    flops, _ = measured_peak
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model gains nothing from two, and loses when cores are busy
    try:
        assert train(load_config("tiny.toml", ["train.max_iters=10", "train.device=cpu"])) == 0
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (tiny_run / "out" / "metrics.jsonl").open()]
    flops_per_token = Checkpoint.open(tiny_run / "out").load_model().flops_per_token()
    logged = [r for r in records if "loss" in r]
    assert logged and all(
        r["mfu"] == pytest.approx(flops_per_token * r["tok_per_s"] / flops) for r in logged
    )


def test_a_full_disk_at_a_metrics_line_is_one_error_and_closing_says_nothing_more(
    tmp_path: Path,
) -> None:
    log = MetricsLog(tmp_path / "metrics.jsonl", None, None)
    log.write({"iter": 1, "loss": 2.0})
    log.file.close()
    log.file = open("/dev/full", "a")  # every write: ENOSPC, as on a full disk
    with pytest.raises(GPTError, match=r"metrics.jsonl \(No space left on device\); free space "
                       r"on its disk .* run gpt train again: it resumes from the newest"):
        log.write({"iter": 2, "loss": 1.9})
    log.close()  # the unwritten line is not raised a second time
    assert (tmp_path / "metrics.jsonl").read_text() == '{"iter": 1, "loss": 2.0}\n'
