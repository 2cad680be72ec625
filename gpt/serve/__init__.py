"""`gpt serve`: an OpenAI-compatible HTTP server and its web page, around `gpt.engine`.

The only package that imports the web framework (FastAPI, Starlette, uvicorn), an optional
extra: `require_extra` says how to install it without importing any of it.
"""

from __future__ import annotations

import importlib.util

from gpt.errors import GPTError

EXTRA = "gpt serve needs the serve extra: pip install 'gpt[serve]'"


def require_extra() -> None:
    """One line naming the pip command when the web framework is not installed."""
    if any(importlib.util.find_spec(name) is None for name in ("fastapi", "uvicorn")):
        raise GPTError(EXTRA)
