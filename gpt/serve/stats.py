"""What `GET /metrics` reports, in Prometheus' text format, and the log line of each request."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("gpt.serve")
ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions")
MODEL_ROUTE = "/v1/models/{model}"
SHOWN_PATH = 200  # characters of a path a log line or an error message repeats


def route(path: str) -> str:
    """The label a request is counted under: its route's template, or "other", so that no
    client can add labels (or memory) to /metrics by asking for paths that do not exist."""
    if path in ROUTES:
        return path
    return MODEL_ROUTE if path.startswith("/v1/models/") else "other"


def shown_path(path: str) -> str:
    """`path` for log lines and error messages: cut to SHOWN_PATH characters, and escaped, so
    that a newline in it (%0A) cannot write a log line of its own."""
    cut = path if len(path) <= SHOWN_PATH else path[:SHOWN_PATH] + "..."
    return cut.encode("unicode_escape").decode("ascii") if not cut.isprintable() else cut


def label(value: object) -> str:
    """A label value escaped as Prometheus' text format requires (backslash, quote, newline)."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class EngineState(Protocol):
    running: int  # sequences in the batch
    waiting: int  # sequences queued for a place in it
    tokens_generated: int


@dataclass
class Stats:
    """Counters of the requests served, kept on the event loop's thread (no locks)."""

    max_batch: int
    requests: Counter[tuple[str, int]] = field(default_factory=Counter)  # (route(), status)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    first_token_seconds: float = 0.0  # summed over requests that produced a token
    first_token_count: int = 0
    request_seconds: float = 0.0  # summed over requests that finished generating
    request_count: int = 0
    in_flight: int = 0  # generation requests being answered now
    open: int = 0  # requests of any route being answered now

    def finished(self, request_id: str, path: str, prompt_tokens: int, completion_tokens: int,
                 first_token: float | None, total: float, finishes: list[str]) -> None:
        """Count a generation and log its line."""
        self.requests[(route(path), 200)] += 1
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens
        if first_token is not None:
            self.first_token_seconds += first_token
            self.first_token_count += 1
        self.request_seconds += total
        self.request_count += 1
        shown = "-" if first_token is None else f"{first_token:.3f} s"
        log.info("%s %s: %d prompt + %d completion tokens, first token %s, total %.3f s, "
                 "finish %s", request_id, shown_path(path), prompt_tokens, completion_tokens,
                 shown, total, ",".join(finishes))

    def refused(self, request_id: str, path: str, status: int, message: str) -> None:
        """Count a request answered with an error and log its line."""
        self.requests[(route(path), status)] += 1
        log.info("%s %s: %d %s", request_id, shown_path(path), status, message)

    def prometheus(self, engine: EngineState) -> str:
        """The metrics page: counters since the start, and the engine's state now."""
        lines = [
            "# HELP gpt_requests_total API requests answered, by route and HTTP status.",
            "# TYPE gpt_requests_total counter",
            *(f'gpt_requests_total{{route="{label(name)}",status="{status}"}} {n}'
              for (name, status), n in sorted(self.requests.items())),
        ]
        metrics = [
            ("gpt_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
             self.prompt_tokens),
            ("gpt_completion_tokens_total", "counter", "Tokens generated for finished requests.",
             self.completion_tokens),
            ("gpt_engine_tokens_generated_total", "counter",
             "Tokens the engine generated, cancelled sequences included.",
             engine.tokens_generated),
            ("gpt_requests_in_flight", "gauge", "Generation requests being answered now.",
             self.in_flight),
            ("gpt_queue_length", "gauge", "Sequences waiting for a place in the batch.",
             engine.waiting),
            ("gpt_batch_running", "gauge", "Sequences in the batch now.", engine.running),
            ("gpt_batch_size", "gauge", "Places in the batch ([serve] max_batch).",
             self.max_batch),
            ("gpt_batch_occupancy", "gauge", "Fraction of the batch's places in use.",
             engine.running / self.max_batch),
        ]
        for name, kind, help_text, value in metrics:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
        summaries = [
            ("gpt_time_to_first_token_seconds", "From a request's arrival to its first token.",
             self.first_token_seconds, self.first_token_count),
            ("gpt_request_duration_seconds", "From a request's arrival to its last token.",
             self.request_seconds, self.request_count),
        ]
        for name, help_text, total, count in summaries:
            lines += [f"# HELP {name} {help_text}", f"# TYPE {name} summary",
                      f"{name}_sum {total}", f"{name}_count {count}"]
        return "\n".join(lines) + "\n"
