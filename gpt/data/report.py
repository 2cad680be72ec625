"""What tokenizers do to a corpus: bytes per token on its validation text, and a few lines split
into tokens, for the learned BPE (once prepared), GPT-2's BPE and characters."""

from __future__ import annotations

from collections.abc import Iterator

from gpt.config import DataConfig
from gpt.data.prepare import _split_pieces, chat_texts
from gpt.data.prepared import PreparedData, has_prepared_data
from gpt.data.sources import open_source
from gpt.errors import GPTError
from gpt.tokenizer import BPETokenizer, Tokenizer, get_tokenizer, tokenizer_from_dict

REPORT_CHARS = 2_000_000  # validation text measured: enough for a stable ratio, quick to encode
EXAMPLES = 3


def _val_text(cfg: DataConfig) -> str:
    """Up to REPORT_CHARS of the validation split, the text no learned vocabulary has seen (of
    chat data, its conversations' roles and contents, a line each)."""
    source = open_source(cfg)
    if cfg.format == "chat":
        texts: Iterator[str] = (text + "\n" for text in chat_texts(source, cfg, "val"))
    else:
        texts = (text for split, text, _ in _split_pieces(source, cfg, warn=False)
                 if split == "val")
    parts, size = [], 0
    for text in texts:
        parts.append(text[: REPORT_CHARS - size])
        size += len(parts[-1])
        if size >= REPORT_CHARS:
            break
    return "".join(parts)


def _learned(cfg: DataConfig) -> Tokenizer | None:
    """The BPE learned into the configured data folder, None where none is prepared there."""
    if not has_prepared_data(cfg.resolved_data_dir):
        return None
    record = PreparedData(cfg.resolved_data_dir).tokenizer
    return tokenizer_from_dict(record) if record["name"] == BPETokenizer.name else None


def _split(tokenizer: Tokenizer | None, line: str) -> str:
    """`line` as its tokens, each between bars (characters when `tokenizer` is None)."""
    pieces = list(line) if tokenizer is None else [tokenizer.decode([i]) for i in
                                                   tokenizer.encode(line)]
    return "|" + "|".join(piece.replace("\n", "\\n") for piece in pieces) + "|"


def tokenizer_report(cfg: DataConfig) -> str:
    """Bytes per token of each tokenizer on the validation text, then a few of its lines split."""
    text = _val_text(cfg)
    if not text:
        raise GPTError(
            f"[data] source: {cfg.source} has no validation text to measure; point it at a "
            "corpus with more text"
        )
    n_bytes = len(text.encode("utf-8"))
    tokenizers: dict[str, Tokenizer | None] = {}
    learned = _learned(cfg)
    if learned is not None:
        tokenizers[f"bpe ({learned.vocab_size} ids, learned)"] = learned
    tokenizers[f"gpt2 ({get_tokenizer('gpt2').vocab_size} ids)"] = get_tokenizer("gpt2")
    tokenizers["char"] = None
    lines = [f"validation text of {cfg.source}: {n_bytes:,} bytes", "bytes per token:"]
    for name, tokenizer in tokenizers.items():
        count = len(text) if tokenizer is None else len(tokenizer.encode(text))
        lines.append(f"  {name:28s} {n_bytes / max(count, 1):6.2f}")
    if learned is None:
        lines.append(f"  (no learned bpe in {cfg.resolved_data_dir}: run gpt prepare with "
                     "data.tokenizer = \"bpe\" to compare it)")
    examples = [line for line in text.splitlines() if 20 <= len(line.strip()) <= 100]
    for line in examples[:: max(1, len(examples) // EXAMPLES)][:EXAMPLES]:
        lines.append(f"example: {line!r}")
        for name, tokenizer in tokenizers.items():
            lines.append(f"  {name.split()[0]:5s} {_split(tokenizer, line)}")
    return "\n".join(lines)
