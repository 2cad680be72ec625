"""Continuous batching on token ids: many requests decoded at once, each joining the running
batch between steps and leaving it the moment it finishes.

Knows nothing of text or HTTP. The sampler, `gpt chat` and `gpt serve` all decode through it.

- The KV cache is allocated once for `max_batch` rows of `context` positions: that is the whole
  memory decoding takes. A request waits in a queue until a row is free; one that could never
  fit (a prompt longer than the context) is refused when it is submitted.
- Each step feeds, in one forward pass, one token to every decoding row and a chunk of at most
  `prefill_chunk` prompt tokens to rows still reading their prompts, so a long prompt does not
  stall the streams already running.
- Each request has its own settings and its own random generator: its tokens are the same
  whether it runs alone or in a busy batch.
- Rows are kept in place: decoding rows first, then prefilling ones, so every group of a pass
  is a contiguous slice of the cache (a view, not a copy). A finished row's slot is reused at
  the next step.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from gpt.errors import GPTError
from gpt.generate import cache_dtype, sample_next
from gpt.model import GPT

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """What to generate: a prompt of token ids and the settings of its sampling."""

    prompt: Sequence[int]
    max_tokens: int
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float = 1.0
    seed: int | None = None  # None = a random seed
    stop_ids: frozenset[int] = frozenset()  # ids that end it (such as the end-of-text id)


@dataclass(frozen=True)
class Event:
    """A request's new token, or its end.

    finish: None while it runs; "stop" (token is the stop id, which is not text), "length"
    (token is its last), "cancelled" (no token), "error" (no token; the step failed).
    """

    seq: int
    token: int | None
    finish: str | None = None


@dataclass(eq=False)
class _Sequence:
    """A request in the batch: its tokens, and how much of its window the cache holds."""

    seq: int
    request: Request
    generator: torch.Generator
    tokens: list[int]  # the prompt, then each new token: what the window slides over
    window: int = 0  # index in tokens where the cache's window begins
    cached: int = 0  # tokens of the window in the cache
    generated: int = 0

    @property
    def pending(self) -> list[int]:
        """Tokens to feed: the prompt (or a slid window) at first, then the last new token."""
        return self.tokens[self.window + self.cached:]

    @property
    def decoding(self) -> bool:
        return len(self.tokens) - self.window - self.cached == 1


@dataclass
class Engine:
    """Decodes many requests together on one model (single-threaded; see EngineThread)."""

    model: GPT
    max_batch: int = 16
    context: int | None = None  # positions per sequence; None = the model's block_size
    prefill_chunk: int = 256  # prompt tokens fed per step, over all rows that are prefilling
    _rows: list[_Sequence | None] = field(init=False, repr=False)
    _queue: deque[_Sequence] = field(init=False, repr=False)
    _ended: list[Event] = field(init=False, repr=False)
    _ids: Iterator[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        block_size = self.model.config.block_size
        self.context = block_size if self.context is None else self.context
        if not 1 <= self.context <= block_size:
            raise GPTError(f"the context must be 1 to {block_size:,} positions (the model's "
                           f"block_size), got {self.context:,}")
        if self.max_batch < 1 or self.prefill_chunk < 1:
            raise GPTError("max_batch and prefill_chunk must be at least 1")
        self.device = next(self.model.parameters()).device
        self.cache = self.model.new_cache(self.max_batch, self.context, cache_dtype(self.model))
        self._rows = [None] * self.max_batch
        self._queue = deque()
        self._ended: list[Event] = []  # cancellations, reported by the next step
        self._ids = itertools.count()

    @property
    def running(self) -> int:
        return sum(s is not None for s in self._rows)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    @property
    def busy(self) -> bool:
        return bool(self._queue or self._ended) or any(s is not None for s in self._rows)

    def check(self, request: Request) -> None:
        """Refuse a request that could never run, with what to change."""
        vocab = self.model.config.vocab_size
        if not request.prompt:
            raise GPTError("the prompt is empty; give at least one token")
        if len(request.prompt) > self.context:
            raise GPTError(f"the prompt is {len(request.prompt):,} tokens, more than the context "
                           f"of {self.context:,}; shorten it")
        if any(not 0 <= t < vocab for t in request.prompt):
            raise GPTError(f"the prompt holds an id outside the vocabulary (0 to {vocab - 1:,})")
        if request.max_tokens < 1:
            raise GPTError(f"max_tokens must be at least 1, got {request.max_tokens}")
        if request.temperature < 0:
            raise GPTError(f"temperature must be >= 0, got {request.temperature}")
        if request.top_k is not None and request.top_k < 1:
            raise GPTError(f"top_k must be >= 1, got {request.top_k}")
        if not 0.0 < request.top_p <= 1.0:
            raise GPTError(f"top_p must be in (0, 1], got {request.top_p}")

    def submit(self, request: Request, seq: int | None = None) -> int:
        """Queue a request (checked first); its id, or `seq` where the caller numbers them."""
        self.check(request)
        seq = next(self._ids) if seq is None else seq
        generator = torch.Generator(device=self.device)
        if request.seed is None:
            generator.seed()
        else:
            generator.manual_seed(request.seed)
        self._queue.append(_Sequence(seq, request, generator, list(request.prompt)))
        return seq

    def cancel(self, seq: int) -> None:
        """End a request now, queued or running (its row is free at once); the next step
        reports it with a "cancelled" event. Unknown or finished ids are ignored."""
        for s in self._queue:
            if s.seq == seq:
                self._queue.remove(s)
                self._ended.append(Event(seq, None, "cancelled"))
                return
        for row, s in enumerate(self._rows):
            if s is not None and s.seq == seq:
                self._rows[row] = None
                self._ended.append(Event(seq, None, "cancelled"))
                return

    def run(self, requests: Sequence[Request]) -> Iterator[Event]:
        """Submit every request and step until all have finished."""
        for request in requests:
            self.submit(request)
        while self.busy:
            yield from self.step()

    @torch.inference_mode()
    def step(self) -> list[Event]:
        """One round: admit queued requests to free rows, then one forward pass that feeds each
        decoding row its last token and the prefilling rows a chunk of their prompts, then one
        new token for every row whose pending tokens are all in."""
        ended, self._ended = self._ended, []
        self._admit()
        self._slide_full_windows()
        self._arrange()
        groups, fed_rows, tokens = self._plan()
        if not groups:
            return ended
        self.cache.plan(groups)
        idx = torch.tensor([tokens], dtype=torch.long, device=self.device)  # (1, N)
        logits, _ = self.model(idx, cache=self.cache, last_only=True)  # (rows, 1, V)
        ready = []  # (row, index in logits) of rows with nothing left to feed
        for i, (row, n) in enumerate(fed_rows):
            s = self._rows[row]
            assert s is not None
            s.cached += n
            if not s.pending:
                ready.append((row, i))
        if not ready:
            return ended
        vocab = self.model.config.vocab_size
        last = logits[[i for _, i in ready], -1, :vocab]  # (r, V) the tokenizer's ids only
        chosen = self._sample(last, [self._rows[row] for row, _ in ready])
        return ended + [self._append(row, t) for (row, _), t in zip(ready, chosen, strict=True)]

    def _admit(self) -> None:
        """Queued requests into free rows, lowest first (their positions start again at 0)."""
        for row in range(self.max_batch):
            if not self._queue:
                return
            if self._rows[row] is None:
                self._rows[row] = self._queue.popleft()
                self.cache.reset(slice(row, row + 1))

    def _slide_full_windows(self) -> None:
        """A row whose window fills the context drops its oldest tokens: its cache is computed
        afresh from the last `context` tokens (positions are absolute), as `generate` does."""
        for row, s in enumerate(self._rows):
            if s is not None and s.decoding and s.cached == self.context:
                s.window, s.cached = len(s.tokens) - self.context, 0
                self.cache.reset(slice(row, row + 1))

    def _arrange(self) -> None:
        """Decoding rows to [0, a), prefilling rows to [a, a + m): one swap per misplaced row."""
        def kind(s: _Sequence | None) -> int:
            return 2 if s is None else 0 if s.decoding else 1

        a = sum(kind(s) == 0 for s in self._rows)
        m = sum(kind(s) == 1 for s in self._rows)
        for wanted, lo, hi in ((0, 0, a), (1, a, a + m)):
            outside = [r for r in range(len(self._rows)) if kind(self._rows[r]) == wanted
                       and not lo <= r < hi]
            holes = [r for r in range(lo, hi) if kind(self._rows[r]) != wanted]
            for src, dst in zip(outside, holes, strict=True):
                self._swap(src, dst)

    def _swap(self, a: int, b: int) -> None:
        if self._rows[a] is None:
            self.cache.move(b, a)
        elif self._rows[b] is None:
            self.cache.move(a, b)
        else:
            self.cache.swap(a, b)
        self._rows[a], self._rows[b] = self._rows[b], self._rows[a]

    def _plan(self) -> tuple[list[tuple[slice, list[int]]], list[tuple[int, int]], list[int]]:
        """The pass: the decoding rows' one token each, then prefilling rows in order, each
        taking what is left of the step's prompt budget, padded to the longest (ids 0)."""
        groups: list[tuple[slice, list[int]]] = []
        fed_rows: list[tuple[int, int]] = []  # (row, tokens fed) in the pass's order
        tokens: list[int] = []
        row = 0
        while row < self.max_batch and (s := self._rows[row]) is not None and s.decoding:
            tokens.append(s.pending[0])
            fed_rows.append((row, 1))
            row += 1
        if row:
            groups.append((slice(0, row), [1] * row))
        first, budget, chunks = row, self.prefill_chunk, []
        while row < self.max_batch and (s := self._rows[row]) is not None and budget > 0:
            chunk = s.pending[:budget]
            chunks.append(chunk)
            fed_rows.append((row, len(chunk)))
            budget -= len(chunk)
            row += 1
        if chunks:
            T = max(map(len, chunks))
            for chunk in chunks:
                tokens += chunk + [0] * (T - len(chunk))
            groups.append((slice(first, row), [len(c) for c in chunks]))
        return groups, fed_rows, tokens

    def _sample(self, logits: Tensor, seqs: Sequence[_Sequence | None]) -> list[int]:
        """The next id of each row of logits (r, V), drawn with its own settings and generator;
        rows sharing settings are drawn together."""
        chosen = [0] * len(seqs)
        by_settings: dict[tuple[float, int | None, float], list[int]] = {}
        for i, s in enumerate(seqs):
            assert s is not None
            r = s.request
            by_settings.setdefault((r.temperature, r.top_k, r.top_p), []).append(i)
        for (temperature, top_k, top_p), rows in by_settings.items():
            part = logits if len(rows) == len(seqs) else logits[rows]
            uniforms = None
            if temperature > 0:
                uniforms = torch.cat([
                    torch.rand((1, 1), generator=seqs[i].generator, device=logits.device)  # type: ignore[union-attr]
                    for i in rows
                ])  # (r, 1)
            ids = sample_next(part, temperature, top_k, top_p, uniforms=uniforms).tolist()
            for i, token in zip(rows, ids, strict=True):
                chosen[i] = token
        return chosen

    def _append(self, row: int, token: int) -> Event:
        """Give row's sequence its new token; free the row if that ends it."""
        s = self._rows[row]
        assert s is not None
        s.tokens.append(token)
        s.generated += 1
        finish = ("stop" if token in s.request.stop_ids
                  else "length" if s.generated >= s.request.max_tokens else None)
        if finish is not None:
            self._rows[row] = None
        return Event(s.seq, token, finish)

    def abort(self) -> list[Event]:
        """End every request at once (after a failed step): an "error" event each."""
        seqs = [s.seq for s in self._queue] + [s.seq for s in self._rows if s is not None]
        ended, self._ended = self._ended, []
        self._queue.clear()
        self._rows = [None] * self.max_batch
        return ended + [Event(seq, None, "error") for seq in seqs]


class EngineThread:
    """An Engine stepping in a background thread, for servers: `submit` and `cancel` are
    thread-safe, and each request's events go to its callback, in the engine's thread.

    Give it a function that builds the engine (model loading included) rather than an engine
    where speed matters: the engine's thread then does all of the process's torch work. With
    torch work in two threads, libgomp runs two OpenMP teams over the cores, counts more
    threads than CPUs, and stops spinning at its barriers: decoding ran about a third slower.
    """

    def __init__(self, engine: Engine | Callable[[], Engine]) -> None:
        self._build = engine if callable(engine) and not isinstance(engine, Engine) else None
        if isinstance(engine, Engine):
            self.engine = engine
        self._built = threading.Event()
        self._build_error: BaseException | None = None
        self.tokens_generated = 0
        self._lock = threading.Condition()
        self._inbox: list[tuple[int, Request]] = []
        self._cancels: list[int] = []
        self._callbacks: dict[int, Callable[[Event], None]] = {}
        self._ids = itertools.count()
        self._accepting = True
        self._deadline: float | None = None  # set by stop(): when what still runs is cancelled
        self._thread = threading.Thread(target=self._run, name="gpt-engine", daemon=True)

    @property
    def running(self) -> int:
        return self.engine.running

    @property
    def waiting(self) -> int:
        return self.engine.waiting + len(self._inbox)

    @property
    def alive(self) -> bool:
        """Whether the engine's thread runs (for a health check)."""
        return self._thread.is_alive()

    def start(self) -> None:
        """Start the thread; with a builder, return once it has built the engine (raising
        what building raised)."""
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            self._thread.join()
            raise self._build_error

    def _run(self) -> None:
        try:
            if self._build is not None:
                self.engine = self._build()
        except BaseException as e:  # handed to start(), in the caller's thread
            self._build_error = e
            return
        finally:
            self._built.set()
        self._loop()

    def submit(self, request: Request, on_event: Callable[[Event], None]) -> int:
        """Queue a request (once started); raises GPTError at once if it could never run."""
        self.engine.check(request)
        with self._lock:
            if not self._accepting:
                raise GPTError("the engine is shutting down; retry on another server")
            seq = next(self._ids)
            self._inbox.append((seq, request))
            self._callbacks[seq] = on_event
            self._lock.notify()
        return seq

    def cancel(self, seq: int) -> None:
        with self._lock:
            self._cancels.append(seq)
            self._lock.notify()

    def stop(self, grace: float) -> None:
        """Refuse new requests, let those running finish for up to `grace` seconds, cancel the
        rest, and wait for the thread to end."""
        with self._lock:
            self._accepting = False
            self._deadline = time.monotonic() + grace
            self._lock.notify()
        if self._thread.is_alive():
            self._thread.join()

    def _loop(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                while not (self._inbox or self._cancels or engine.busy
                           or self._deadline is not None):
                    self._lock.wait()
                inbox, self._inbox = self._inbox, []
                cancels, self._cancels = self._cancels, []
                if self._deadline is not None and time.monotonic() >= self._deadline:
                    cancels += list(self._callbacks)
                if self._deadline is not None and not inbox and not engine.busy:
                    return
            try:
                for seq, request in inbox:
                    engine.submit(request, seq=seq)
                for seq in cancels:
                    engine.cancel(seq)
                events = engine.step()
            except Exception:  # a failed step (out of memory, say) ends what it was running
                log.exception("a decoding step failed; its requests end with an error")
                events = engine.abort()
                queued = {e.seq for e in events}
                events += [Event(seq, None, "error") for seq, _ in inbox if seq not in queued
                           and seq in self._callbacks]
            self.tokens_generated += sum(e.token is not None for e in events)
            self._deliver(events)

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            with self._lock:
                callback = (self._callbacks.pop(event.seq, None) if event.finish
                            else self._callbacks.get(event.seq))
            if callback is None:
                continue
            try:
                callback(event)
            except Exception:
                log.exception("a request's event handler failed")
