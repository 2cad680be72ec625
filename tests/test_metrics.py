"""Throughput: tokens per second over the training steps, evaluation and saving left out."""

from __future__ import annotations

import time

import pytest

from gpt.metrics import Throughput


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
