"""scripts/bench_gpu.py on the CPU: its options, its rows (every setting a real config key), its
tables, its random corpus and timing windows, and its one-line refusal without a GPU."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gpt.config import load_config
from gpt.tokenizer import get_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_gpu(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # it imports doc_tables from its folder
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "scripts" / "bench_gpu.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_gpu", module)  # its dataclasses look themselves up
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


def test_the_options_default_to_every_row(bench_gpu) -> None:
    args, doc = bench_gpu.parse_args([])
    assert args.rows == list(bench_gpu.ROWS) and args.batch_sizes == [8, 16, 32, 64]
    assert doc is None and args.compare_steps == 300 and args.fp8_tolerance == 0.02


@pytest.mark.parametrize(("argv", "message"), [
    (["--rows", "eager,turbo"], "--rows: unknown turbo"),
    (["--rows", ","], "--rows: unknown nothing"),
    (["--batch-sizes", "8,big"], "--batch-sizes '8,big': give whole numbers"),
    (["--batch-sizes", "8,0"], "must be positive"),
    (["--loss-chunk", "0"], "must be positive"),
    (["--steps", "15"], "--steps must be a positive multiple of --window"),
    (["--fp8-tolerance", "1.5"], "--fp8-tolerance in \\(0, 1\\)"),
    (["--docs", "x.md"], "--docs names where --write-docs writes"),
])
def test_bad_options_are_one_line(bench_gpu, capsys: pytest.CaptureFixture[str], argv: list[str],
                                  message: str) -> None:
    with pytest.raises(SystemExit) as exit_:
        bench_gpu.parse_args(argv)
    assert exit_.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_rows_come_in_order_and_each_setting_is_a_config_key(bench_gpu) -> None:
    rows = bench_gpu.variants(["fp8", "batch", "eager", "blocks", "chunked", "docmask", "all",
                               "compiled"], [8, 32], 2048)
    assert [v.key for v in rows] == ["eager", "compiled", "blocks", "chunked", "docmask", "fp8",
                                     "all", "batch", "batch"]
    for variant in rows:
        train = load_config(None, list(variant.overrides)).train  # real keys, valid values
        assert train.compile == (variant.key != "eager")
    by_key = {v.key: load_config(None, list(v.overrides)).train for v in rows[:-2]}
    assert by_key["blocks"].compile_scope == "blocks" and by_key["compiled"].compile_scope == "model"
    assert by_key["chunked"].loss_chunk == 2048 and by_key["docmask"].document_masking
    assert by_key["fp8"].fp8 and by_key["all"].fp8 and by_key["all"].loss_chunk == 2048
    assert [load_config(None, list(v.overrides)).train.batch_size for v in rows[-2:]] == [8, 32]


def test_the_ablation_table_says_why_a_row_did_not_run(bench_gpu) -> None:
    Measured = bench_gpu.Measured
    results = [("eager", Measured([50.0], 20.0, 5.0)),
               (bench_gpu.COMPILED_LABEL, Measured([100.0, 120.0, 110.0], 30.5, 61.0)),
               ("fp8", Measured(error="[train] fp8 = true needs float8 tensor cores")),
               ("blocks", Measured([132.0], None, 20.0))]
    table = bench_gpu.ablation_table(results, flops=10, peak=2000.0, reference=100.0)
    lines = table.splitlines()
    assert lines[0].startswith("| row | tokens/s | MFU | vs plain loop | vs baseline | peak GiB")
    assert lines[2] == "| eager | 50 | 25.0% | 0.500 | 0.455 | 20.0 | 5 |  |"
    assert lines[3] == "| `gpt train`, compiled whole | 110 | 55.0% | 1.100 | 1.000 | 30.5 | 61 |  |"
    assert lines[4].endswith("| did not run: [train] fp8 = true needs float8 tensor cores |")
    assert lines[5] == "| blocks | 132 | 66.0% | 1.320 | 1.200 | n/a | 20 |  |"


def test_the_baseline_is_the_compiled_model_else_the_first_row_that_ran(bench_gpu) -> None:
    Measured = bench_gpu.Measured
    failed, ran = Measured(error="out of memory"), Measured([1.0])
    assert bench_gpu.baseline_label([("a", failed), ("b", ran), (bench_gpu.COMPILED_LABEL, ran)]) \
        == bench_gpu.COMPILED_LABEL
    assert bench_gpu.baseline_label([("a", failed), ("b", ran), ("c", ran)]) == "b"
    assert bench_gpu.baseline_label([("a", failed)]) is None
    assert "| n/a | n/a |" in bench_gpu.ablation_table([("a", ran)], 10, None, None)


def test_fp8_losses_are_judged_against_the_tolerance(bench_gpu) -> None:
    records = [{"iter": i, "loss": 4.0 - i / 10} for i in range(1, 9)] + [{"iter": 8, "val_loss": 3.5}]
    bf16 = bench_gpu.curve_of(records)
    assert bf16 == bench_gpu.Curve(3.5, pytest.approx((3.3 + 3.2) / 2))
    table, within = bench_gpu.fp8_table(bf16, bench_gpu.Curve(3.55, 3.26), tolerance=0.02)
    assert within and "| final val loss | 3.5000 | 3.5500 | 1.43% | within |" in table
    _, within = bench_gpu.fp8_table(bf16, bench_gpu.Curve(3.6, 3.25), tolerance=0.02)
    assert not within


def test_the_random_corpus_is_documents_of_random_tokens(bench_gpu, tmp_path: Path) -> None:
    bench_gpu.random_corpus(tmp_path, 5000)
    files = sorted(tmp_path.glob("*.txt"))
    tokenizer = get_tokenizer("gpt2")
    lengths = [len(tokenizer.encode(f.read_text(encoding="utf-8"))) for f in files]
    assert len(files) >= 2 and sum(lengths) >= 4000
    assert all(tokenizer.eot_id not in tokenizer.encode(f.read_text(encoding="utf-8")) for f in files)


BENCH_MODEL = """[model]
n_layer = 1
n_head = 2
n_embd = 32
block_size = 64
"""


@pytest.fixture
def miniature(bench_gpu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., str]:
    """`miniature(*argv)`: the bench's main on the CPU with a tiny model, told it has a GPU
    ("Some GPU", compute capability 8.0) and with torch.compile left out; the bench-gpu block
    it wrote."""
    config, doc = tmp_path / "bench.toml", tmp_path / "performance.md"
    config.write_text(BENCH_MODEL)
    doc.write_text("before\n<!-- bench-gpu:start -->\nold\n<!-- bench-gpu:end -->\nafter\n")
    monkeypatch.setattr(bench_gpu, "DEVICE", "cpu")
    monkeypatch.setattr(bench_gpu, "RANDOM_TOKENS", 20_000)
    monkeypatch.setattr(bench_gpu, "require_cuda", lambda: None)
    monkeypatch.setattr(torch, "compile", lambda model=None, **kwargs: model)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.chdir(tmp_path)

    def run(*argv: str) -> str:
        bench_gpu.main(["--config", str(config), "--batch-size", "2", "--loss-chunk", "32",
                        "--warmup", "2", "--steps", "4", "--window", "2", "--compare-steps", "4",
                        "--peak-flops", "1e12", "--write-docs", "--docs", str(doc), *argv])
        block = doc.read_text()
        assert block.startswith("before\n<!-- bench-gpu:start -->\n| row | tokens/s | MFU |")
        assert "Some GPU, compute capability 8.0" in block and block.endswith("after\n")
        return block

    return run


def table_rows(block: str) -> list[list[str]]:
    return [line[2:-2].split(" | ") for line in block.splitlines()
            if line.startswith("| ") and "---" not in line]


@pytest.mark.slow
def test_the_whole_bench_runs_on_the_cpu_in_miniature(
    miniature: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    """Its plumbing end to end (every row through gpt train, the plain loop, fp8 refused in its
    row and in the comparison, the block written): what a GPU session would otherwise find
    broken."""
    block = miniature("--rows", "eager,blocks,chunked,docmask,fp8,batch", "--batch-sizes", "2,4")
    refused = "[train] fp8 = true needs a CUDA GPU of compute capability 8.9 or higher"
    assert f"fp8 comparison skipped: {refused}" in capsys.readouterr().out
    rows = table_rows(block)[1:]
    assert [row[0] for row in rows] == [
        "`gpt train`, eager", "compiled per block", "+ chunked loss (32 tokens)",
        "+ document masking (FlexAttention)", "+ fp8 (torchao float8)", "compiled whole, batch 2",
        "compiled whole, batch 4", "plain loop, compiled (reference)"]
    assert rows[4][-1].startswith(f"did not run: {refused}")
    assert all(row[-1] == "" and float(row[1].replace(",", "")) > 0
               for i, row in enumerate(rows) if i != 4)


@pytest.mark.slow
def test_the_fp8_comparison_runs_on_the_cpu_in_miniature(
    miniature: Callable[..., str], bench_gpu, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The comparison's plumbing, fp8 let through and left out (bf16 both times), on a small
    text instead of the standard library: its table and verdict in the block."""
    import gpt.train

    (tmp_path / "text.txt").write_text("def f(x):\n    return x + 1\n\n" * 2000)
    monkeypatch.setattr(bench_gpu, "COMPARE_SOURCE", str(tmp_path / "text.txt"))
    monkeypatch.setattr(bench_gpu, "check_fp8", lambda device: None)
    monkeypatch.setattr(gpt.train, "check_fp8", lambda device: None)
    monkeypatch.setattr(gpt.train, "to_float8", lambda model: None)
    block = miniature("--rows", "fp8", "--no-reference")
    rows = table_rows(block)
    assert rows[1][0] == "+ fp8 (torchao float8)" and rows[1][-1] == ""
    assert rows[2] == ["loss", "bf16", "fp8", "relative gap", "tolerance 2%"]
    assert [row[0] for row in rows[3:]] == ["final val loss", "mean train loss, last quarter"]
    assert all(row[3] == "0.00%" and row[4] == "within" for row in rows[3:])  # the same run twice
    assert "fp8 against bf16: 4 steps each" in block


@pytest.mark.slow
def test_rows_of_several_runs_are_merged_into_one_block_without_a_gpu(
    miniature: Callable[..., str], bench_gpu, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run's --results file holds its setup, its rows as they finished and its host;
    --merge builds the tables from them on a machine without a GPU."""
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    miniature("--rows", "eager", "--no-reference", "--compare-steps", "0", "--results", str(first))
    miniature("--rows", "compiled", "--compare-steps", "0", "--results", str(second))
    assert [json.loads(line)["kind"] for line in first.read_text().splitlines()] == [
        "setup", "row", "host"]

    def no_gpu() -> None:
        raise AssertionError("--merge measures nothing")

    monkeypatch.setattr(bench_gpu, "require_cuda", no_gpu)
    doc = tmp_path / "performance.md"
    bench_gpu.main(["--merge", str(first), str(second), "--write-docs", "--docs", str(doc)])
    block = doc.read_text()
    assert [row[0] for row in table_rows(block)[1:]] == [
        "`gpt train`, eager", bench_gpu.COMPILED_LABEL, bench_gpu.REFERENCE_LABEL]
    assert "rows of 2 runs of this script, merged with --merge" in block
    assert block.count("- CPU: ") == 2  # each run's host


def test_merging_what_is_not_a_results_file_is_one_line(bench_gpu, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not json\n")
    with pytest.raises(SystemExit, match=r"--merge .*notes.txt: cannot read its records"):
        bench_gpu.main(["--merge", str(tmp_path / "notes.txt")])
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(SystemExit, match=r"--merge: no setup record in the files"):
        bench_gpu.main(["--merge", str(tmp_path / "empty.jsonl")])
