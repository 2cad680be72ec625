"""scripts/bench_lora.py on a tiny model: a base, then a full and a LoRA finetune in processes of
their own, and a table whose rows say what each measured."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_benchmark_runs_both_finetunes_and_writes_its_block(tmp_path: Path) -> None:
    doc = tmp_path / "finetuning.md"
    doc.write_text("before\n<!-- bench-lora:start -->\nold\n<!-- bench-lora:end -->\nafter\n")
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_lora.py"), "--layers", "1", "--width",
         "64", "--block", "16", "--batch", "2", "--base-steps", "2", "--steps", "2",
         "--repeats", "1", "--write-docs", "--docs", str(doc)],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"},
    )
    assert done.returncode == 0, done.stdout + done.stderr
    text = doc.read_text()
    assert text.startswith("before\n") and text.endswith("after\n") and "old" not in text
    full, lora = (line for line in text.splitlines() if line.startswith(("| full", "| lora")))
    assert "MiB" in full and "→" in full and "lora (rank 8" in lora
    sizes = [float(row.split("|")[3].strip().split()[0].replace(",", "")) for row in (full, lora)]
    assert sizes[1] < sizes[0]  # adapters alone, against every weight and its moments
