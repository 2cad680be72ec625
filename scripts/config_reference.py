"""Regenerate the config reference table in docs/config.md from the declarations in gpt/config.py.

Run after adding or changing a key: `python scripts/config_reference.py`. A test fails while
docs/config.md and the declarations disagree.
"""

from __future__ import annotations

from doc_tables import ROOT, write_block

from gpt.config import reference_markdown

CONFIG_MD = ROOT / "docs" / "config.md"


def main() -> None:
    write_block(CONFIG_MD, "config-reference", reference_markdown())
    print(f"updated {CONFIG_MD}")


if __name__ == "__main__":
    main()
