"""scripts/bench_vs_nanogpt.py: what it reads from each tool's output, and its ratios."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # it imports doc_tables from its folder
    path = ROOT / "scripts" / "bench_vs_nanogpt.py"
    spec = importlib.util.spec_from_file_location("bench_vs_nanogpt", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_vs_nanogpt", module)  # its dataclass looks it up
    spec.loader.exec_module(module)
    return module


def test_nanogpt_lines_are_read(bench) -> None:
    """The two lines nanoGPT's train.py prints, in its own format strings."""
    losses = {"train": 2.30611, "val": 2.39234}
    iter_num, lossf, dt, running_mfu = 250, 2.3125, 0.04972, 0.0123
    step = f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
    line = f"iter {iter_num}: loss {lossf:.4f}, time {dt*1000:.2f}ms, mfu {running_mfu*100:.2f}%"
    assert bench.NANO_EVAL.match(step).groups() == ("250", "2.3061", "2.3923")
    assert bench.NANO_STEP.match(line).groups() == ("250", "49.72")


def test_a_gpt_run_is_read_from_its_output_and_metrics(bench, tiny_run: Path) -> None:
    result = bench.run_gpt(tiny_run / "tiny.toml", tiny_run / "out", overrides=[
        f"data.source={tiny_run / 'corpus.txt'}", f"data.data_dir={tiny_run / 'data'}",
        "train.max_iters=6", "train.eval_interval=3", "train.log_interval=1",
        "train.eval_iters=2", "train.batch_size=4"])
    assert [step for _, step, _ in result.evals] == [3, 6]  # the initial one has no line
    assert all(0 < val < 10 for _, _, val in result.evals)
    assert [t for t, _, _ in result.evals] == sorted(t for t, _, _ in result.evals)
    assert result.tokens_per_step == 4 * 32 and result.step_ms > 0


def test_time_to_a_loss_is_the_first_evaluation_at_or_below_it(bench) -> None:
    result = bench.Result([(1.0, 0, 5.0), (2.0, 100, 2.0), (3.0, 200, 1.5), (4.0, 300, 1.6)])
    assert result.time_to(2.0) == 2.0 and result.time_to(1.55) == 3.0
    assert result.time_to(1.0) is None
    assert result.final_val == 1.6 and result.wall == 4.0


def test_comparison_ratios_pair_the_runs_of_one_round(bench) -> None:
    nano = [bench.Result([(100.0, 2000, 1.70)], step_ms=50.0),
            bench.Result([(110.0, 2000, 1.68)], step_ms=60.0)]
    same = [bench.Result([(90.0, 2000, 1.69)], step_ms=40.0),
            bench.Result([(95.0, 2000, 1.69)], step_ms=40.0)]
    fast = [bench.Result([(20.0, 100, 2.0), (30.0, 200, 1.65)], step_ms=80.0, tokens_per_step=2048),
            bench.Result([(22.0, 100, 2.0), (33.0, 200, 1.66)], step_ms=80.0, tokens_per_step=2048)]
    table, ratios = bench.comparison_tables({"nanoGPT": nano, "gpt, same": same,
                                             "gpt, fast": fast})
    assert "1.38 (1.25-1.50)" in ratios  # 50/40 and 60/40, each against its own round
    assert "0.30 (0.30-0.30)" in ratios  # 30/100 and 33/110: target 1.69, the median final
    rows = {line.split("|")[1].strip(): line for line in table.splitlines()}
    assert "not reached in 1 of 2 runs" in rows["nanoGPT"]  # its 1.70 run ended above 1.69
    assert rows["gpt, fast"].endswith("| 31.5 (30.0-33.0) |")


def test_a_fast_config_that_misses_the_target_is_said(bench) -> None:
    nano = [bench.Result([(100.0, 2000, 1.60)], step_ms=50.0)]
    same = [bench.Result([(90.0, 2000, 1.61)], step_ms=40.0)]
    fast = [bench.Result([(30.0, 200, 1.65)], step_ms=80.0)]
    table, ratios = bench.comparison_tables({"nanoGPT": nano, "gpt, same": same,
                                             "gpt, fast": fast})
    assert "not reached in 1 of 1 runs" in table
    assert "did not reach" in ratios
