"""scripts/doc_tables.py: the one writer of generated blocks in the docs."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("doc_tables", ROOT / "scripts" / "doc_tables.py")
doc_tables = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(doc_tables)


def test_write_block_replaces_only_the_block(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("# Title\n\n<!-- t:start -->\nold\n<!-- t:end -->\n\nprose after\n")
    doc_tables.write_block(doc, "t", "| a |\n| --- |\n| 1 |\n")
    doc_tables.write_block(doc, "t", "| a |\n| --- |\n| 1 |\n")  # idempotent
    assert doc.read_text() == (
        "# Title\n\n<!-- t:start -->\n| a |\n| --- |\n| 1 |\n<!-- t:end -->\n\nprose after\n"
    )


def test_write_block_leaves_other_blocks(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text("<!-- a:start -->\nA\n<!-- a:end -->\n<!-- b:start -->\nB\n<!-- b:end -->\n")
    doc_tables.write_block(doc, "b", "new")
    assert doc.read_text() == "<!-- a:start -->\nA\n<!-- a:end -->\n<!-- b:start -->\nnew\n<!-- b:end -->\n"


@pytest.mark.parametrize(
    "text", ["no markers\n", "<!-- t:start -->\n", "<!-- t:end -->\n<!-- t:start -->\n"]
)
def test_write_block_needs_its_markers(tmp_path: Path, text: str) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(text)
    with pytest.raises(SystemExit, match="<!-- t:start -->"):
        doc_tables.write_block(doc, "t", "x")
    assert doc.read_text() == text


def test_markdown_table_escapes_pipes() -> None:
    assert doc_tables.markdown_table(["a", "b"], [["x|y", "1"]]) == (
        "| a | b |\n| --- | --- |\n| x\\|y | 1 |"
    )


@pytest.mark.parametrize("name", ["bench-prepare", "bench-train", "bench-sample", "bench-serve", "bench-serve-run"])
def test_performance_page_holds_each_benchmark_block(name: str) -> None:
    assert doc_tables.marker_problem(ROOT / "docs" / "performance.md", name) is None


def test_training_page_holds_the_sharded_loading_benchmark_block() -> None:
    assert doc_tables.marker_problem(ROOT / "docs" / "training.md", "bench-sharded-load") is None


def test_finetuning_page_holds_the_lora_benchmark_block() -> None:
    assert doc_tables.marker_problem(ROOT / "docs" / "finetuning.md", "bench-lora") is None


def test_evaluation_page_holds_the_tasks_benchmark_block() -> None:
    assert doc_tables.marker_problem(ROOT / "docs" / "evaluation.md", "bench-tasks") is None


def test_sampling_page_holds_the_int8_quality_block() -> None:
    assert doc_tables.marker_problem(ROOT / "docs" / "sampling.md", "bench-quant") is None


def test_config_page_holds_the_reference_block() -> None:
    assert doc_tables.marker_problem(ROOT / "docs" / "config.md", "config-reference") is None


def test_training_page_holds_the_communication_block() -> None:
    assert doc_tables.marker_problem(ROOT / "docs" / "training.md", "comm-bytes") is None
