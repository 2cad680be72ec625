"""Regenerate the config reference table in README.md from the declarations in gpt/config.py.

Run after adding or changing a key: `python scripts/config_reference.py`. A test fails while
README.md and the declarations disagree.
"""

from __future__ import annotations

import re
from pathlib import Path

from gpt.config import reference_markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def main() -> None:
    readme = Path(__file__).resolve().parents[1] / "README.md"
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"README.md lacks the markers {START} ... {END}")
    block = f"{START}\n{reference_markdown()}\n{END}"
    pattern = re.escape(START) + ".*?" + re.escape(END)
    readme.write_text(re.sub(pattern, lambda _: block, text, flags=re.S))
    print(f"updated {readme}")


if __name__ == "__main__":
    main()
