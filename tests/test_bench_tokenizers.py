"""scripts/bench_tokenizers.py: the training time it reports and the multilingual text it builds
from gettext catalogues."""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))  # it imports doc_tables from its folder
    spec = importlib.util.spec_from_file_location(
        "bench_tokenizers", ROOT / "scripts" / "bench_tokenizers.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_mo(path: Path, messages: dict[str, str], charset: str) -> None:
    """A GNU gettext .mo catalogue (the format msgfmt writes): a header entry naming the charset,
    then the messages, sorted, as offset tables into the strings."""
    entries = {"": f"Content-Type: text/plain; charset={charset}\n", **messages}
    keys = sorted(entries)
    ids = [k.encode(charset) for k in keys]
    strs = [entries[k].encode(charset) for k in keys]
    start = 7 * 4 + 16 * len(keys)
    id_table, str_table, blob = [], [], b""
    for text, table in [(t, id_table) for t in ids] + [(t, str_table) for t in strs]:
        table.append((len(text), start + len(blob)))
        blob += text + b"\0"
    header = struct.pack("<7I", 0x950412DE, 0, len(keys), 28, 28 + 8 * len(keys), 0, 0)
    tables = b"".join(struct.pack("<2I", *e) for e in id_table + str_table)
    path.parent.mkdir(parents=True)
    path.write_bytes(header + tables + blob)


def test_the_translations_text_holds_each_language_once(bench, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    lang = tmp_path / "vim91" / "lang"
    write_mo(lang / "ja" / "LC_MESSAGES" / "vim.mo", {"Yes": "はい", "No": "いいえ\n否"}, "utf-8")
    write_mo(lang / "ja.euc-jp" / "LC_MESSAGES" / "vim.mo", {"Yes": "はい"}, "euc-jp")
    write_mo(lang / "ru" / "LC_MESSAGES" / "vim.mo", {"Yes": "Да"}, "koi8-r")
    monkeypatch.setattr(bench, "VIM_LANG", tmp_path)
    text = bench.vim_translations(tmp_path / "out.txt")
    assert text is not None
    lines = text.read_text(encoding="utf-8").splitlines()
    assert sorted(lines) == sorted(["はい", "いいえ", "否", "Да"])  # ja once, koi8-r decoded

    monkeypatch.setattr(bench, "VIM_LANG", tmp_path / "nowhere")
    assert bench.vim_translations(tmp_path / "none.txt") is None


def test_training_time_leaves_the_evaluations_out(bench) -> None:
    records = [
        {"iter": 0, "tokens": 0, "val_loss": 4.0},  # an evaluation: no time of its own counted
        {"iter": 10, "tokens": 1000, "tok_per_s": 100.0},
        {"iter": 20, "tokens": 2000, "tok_per_s": 50.0},
        {"iter": 20, "tokens": 2000, "val_loss": 3.0},
    ]
    assert bench.training_seconds(records) == pytest.approx(10.0 + 20.0)
