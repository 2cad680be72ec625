"""Encoding speed of a learned BPE: tiktoken built from its ranks against the tokenizers
library's batched encoder, on the interpreter's own library sources.

    python scripts/bench_bpe.py [--mb 4] [--vocab 8192]
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path

from gpt.tokenizer import BPETokenizer


def _texts(limit: int) -> list[str]:
    texts, size = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        texts.append(text)
        size += len(text.encode())
        if size >= limit:
            break
    return texts


def _rate(run: Callable[[], object], n_bytes: int, repeats: int = 3) -> float:
    """MB/s of the best of `repeats` runs."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return n_bytes / best / 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="text to encode, in MB")
    parser.add_argument("--vocab", type=int, default=8192, help="ids to learn")
    args = parser.parse_args()
    texts = _texts(int(args.mb * 1e6))
    n_bytes = sum(len(t.encode()) for t in texts)
    tokenizer = BPETokenizer.learn(texts, args.vocab)
    same = all(tokenizer.encode(t) == tokenizer.backend.encode(t, add_special_tokens=False).ids
               for t in texts)
    print(f"{n_bytes / 1e6:.1f} MB in {len(texts)} files, {tokenizer.vocab_size} ids, "
          f"same ids: {same}")
    backend = tokenizer.backend
    runs = {
        "tiktoken, encode_ordinary_batch": lambda: tokenizer.encode_batch(texts),
        "tiktoken, one text at a time": lambda: [tokenizer.encode(t) for t in texts],
        "tokenizers, encode_batch_fast": lambda: backend.encode_batch_fast(
            texts, add_special_tokens=False),
    }
    for name, run in runs.items():
        print(f"{name:36s} {_rate(run, n_bytes):6.1f} MB/s")


if __name__ == "__main__":
    main()
