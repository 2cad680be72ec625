"""Placeholder until the fileio module lands: atomic writes."""

from __future__ import annotations

from gpt.checkpoint import write_text_atomic as write_atomic  # noqa: F401
