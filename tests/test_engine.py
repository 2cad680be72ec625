"""The engine: requests decoded in a busy batch give exactly what they give alone (the reference
is `generate`, the plain lockstep loop), the cache bounds memory, cancellation frees a row."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import torch

from gpt.engine import Engine, EngineThread, Event, Request
from gpt.errors import GPTError
from gpt.generate import generate
from gpt.kvcache import KVCache
from gpt.model import GPT

SHAPES = [
    dict(pos_embedding="learned", attention="sdpa"),
    dict(pos_embedding="rope", attention="manual"),
    dict(pos_embedding="rope", attention="sdpa", n_kv_head=2, norm="rmsnorm", mlp="swiglu"),
    dict(pos_embedding="learned", attention="sdpa", qk_norm=True, logit_softcap=3.0),
]


def alone(model: GPT, request: Request) -> list[int]:
    """The request decoded by itself with generate (one row, its own generator), cut after its
    first stop id."""
    g = torch.Generator().manual_seed(request.seed or 0)
    steps = generate(model, torch.tensor([list(request.prompt)]), request.max_tokens,
                     request.temperature, request.top_k, request.top_p, g)
    out = []
    for ids in steps:
        out.append(int(ids[0]))
        if out[-1] in request.stop_ids:
            break
    return out


def tokens_by_request(events: list[Event]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for e in events:
        if e.token is not None:
            out.setdefault(e.seq, []).append(e.token)
    return out


def mixed_requests(n: int, block_size: int) -> list[Request]:
    """Prompts of different lengths (one filling the context, so its window slides), greedy
    and sampled rows with different settings."""
    torch.manual_seed(1)
    lengths = [1, 3, 7, block_size, 5, 11, 2, 9][:n]
    requests = []
    for i, length in enumerate(lengths):
        prompt = torch.randint(0, 50, (length,)).tolist()
        if i % 3 == 0:
            requests.append(Request(prompt, 12 + i, temperature=0.0))
        elif i % 3 == 1:
            requests.append(Request(prompt, 20, temperature=0.9, top_k=10, seed=i))
        else:
            requests.append(Request(prompt, 15, temperature=1.3, top_p=0.8, seed=100 + i))
    return requests


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(map(str, s.values())))
@pytest.mark.parametrize(("max_batch", "prefill_chunk"), [(8, 256), (3, 4), (1, 2)])
def test_a_request_in_a_busy_batch_gives_what_it_gives_alone(
    shape: dict, max_batch: int, prefill_chunk: int, tiny: Callable[..., GPT]
) -> None:
    """Greedy and sampled (each with its own seed), prompts of different lengths prefilled in
    chunks, rows joining and leaving, a window sliding past block_size."""
    model = tiny(**shape)
    requests = mixed_requests(8, model.config.block_size)
    engine = Engine(model, max_batch=max_batch, prefill_chunk=prefill_chunk)
    got = tokens_by_request(list(engine.run(requests)))
    for seq, request in enumerate(requests):
        assert got[seq] == alone(model, request), f"request {seq}"


def test_requests_joining_while_others_decode_are_unaffected(tiny: Callable[..., GPT]) -> None:
    """A request submitted mid-stream (its prompt prefilled beside running decodes) changes
    nothing for the running ones, nor they for it."""
    model = tiny(pos_embedding="rope")
    first, late = mixed_requests(2, model.config.block_size)
    engine = Engine(model, max_batch=4, prefill_chunk=3)
    engine.submit(first)
    events = engine.step() + engine.step() + engine.step()
    engine.submit(late)
    while engine.busy:
        events += engine.step()
    got = tokens_by_request(events)
    assert got[0] == alone(model, first) and got[1] == alone(model, late)


def test_the_cache_bounds_the_batch_and_the_rest_wait(tiny: Callable[..., GPT]) -> None:
    """max_batch rows at most, the others queued; every request still finishes, exactly."""
    model = tiny()
    requests = [Request([i + 1, 2, 3], 6, temperature=0.0) for i in range(7)]
    engine = Engine(model, max_batch=2)
    for r in requests:
        engine.submit(r)
    assert engine.cache.k.shape[1] == 2  # (L, rows, nkv, positions, hs): allocated once
    events, seen_running, seen_waiting = [], set(), []
    while engine.busy:
        events += engine.step()
        seen_running.add(engine.running)
        seen_waiting.append(engine.waiting)
    assert max(seen_running) == 2 and seen_waiting[0] == 5 and seen_waiting[-1] == 0
    got = tokens_by_request(events)
    assert all(got[i] == alone(model, r) for i, r in enumerate(requests))


@pytest.mark.parametrize(("request_", "message"), [
    (Request([], 4), "the prompt is empty"),
    (Request(list(range(17)), 4), "the prompt is 17 tokens, more than the context of 16"),
    (Request([1, 50], 4), "an id outside the vocabulary"),
    (Request([1], 0), "max_tokens must be at least 1"),
    (Request([1], 4, temperature=-1.0), "temperature must be >= 0"),
    (Request([1], 4, top_k=0), "top_k must be >= 1"),
    (Request([1], 4, top_p=0.0), "top_p must be in (0, 1]"),
])
def test_a_request_that_could_never_run_is_refused(
    request_: Request, message: str, tiny: Callable[..., GPT]
) -> None:
    engine = Engine(tiny())
    with pytest.raises(GPTError, match=message.replace("(", r"\(").replace(")", r"\)")):
        engine.submit(request_)
    assert not engine.busy


def test_a_context_shorter_than_block_size_bounds_prompts(tiny: Callable[..., GPT]) -> None:
    engine = Engine(tiny(), context=8)
    with pytest.raises(GPTError, match="more than the context of 8"):
        engine.submit(Request(list(range(9)), 1))
    with pytest.raises(GPTError, match="the context must be 1 to 16 positions"):
        Engine(tiny(), context=17)


def test_stop_ids_end_a_request_at_the_first_one(tiny: Callable[..., GPT]) -> None:
    """The request ends at its first stop id (reported as finish "stop"), as the alone
    reference cut there; without it, it runs to max_tokens."""
    model = tiny()
    free = alone(model, Request([3, 1, 4], 20, temperature=0.0))
    stop = free[5]
    request = Request([3, 1, 4], 20, temperature=0.0, stop_ids=frozenset({stop}))
    events = list(Engine(model).run([request]))
    assert [e.token for e in events] == free[: free.index(stop) + 1]
    assert events[-1].finish == "stop" and all(e.finish is None for e in events[:-1])
    events = list(Engine(model).run([Request([3, 1, 4], 20, temperature=0.0)]))
    assert len(events) == 20 and events[-1].finish == "length"


def test_cancelling_frees_the_row_at_once_and_leaves_others_exact(
    tiny: Callable[..., GPT]
) -> None:
    model = tiny()
    keep, drop, queued = (Request([i + 1, 5], 10, temperature=0.0) for i in range(3))
    engine = Engine(model, max_batch=2)
    k, d, q = (engine.submit(r) for r in (keep, drop, queued))
    events = engine.step() + engine.step()
    assert engine.running == 2 and engine.waiting == 1
    engine.cancel(d)
    assert engine.running == 1
    events += engine.step()  # reports the cancellation; the queued one takes the free row
    assert Event(d, None, "cancelled") in events and engine.running == 2
    while engine.busy:
        events += engine.step()
    got = tokens_by_request(events)
    assert got[k] == alone(model, keep) and got[q] == alone(model, queued)
    assert len(got[d]) == 2  # what it had before the cancel
    engine.cancel(12345)  # unknown ids are ignored
    assert engine.step() == []


def test_a_pass_of_unequal_rows_equals_full_passes(tiny: Callable[..., GPT]) -> None:
    """The cache's packed pass (rows at different positions feeding different numbers of
    tokens, padded) gives each row the logits a full uncached pass gives."""
    model = tiny(pos_embedding="rope", n_kv_head=2)
    seqs = [torch.randint(0, 50, (n,)) for n in (9, 4, 12)]
    cache = model.new_cache(3)
    first = [5, 1, 7]  # prefill these many, one row at a time
    for row, (seq, n) in enumerate(zip(seqs, first, strict=True)):
        cache.plan([(slice(row, row + 1), [n])])
        model(seq[None, :n], cache=cache)
    rest = [len(s) - n for s, n in zip(seqs, first, strict=True)]  # 4, 3, 5
    T = max(rest)
    idx = torch.cat([torch.nn.functional.pad(s[n:], (0, T - len(s[n:])))
                     for s, n in zip(seqs, first, strict=True)])[None]
    cache.plan([(slice(0, 3), rest)])
    logits, _ = model(idx, cache=cache, last_only=True)  # (3, 1, V)
    for row, seq in enumerate(seqs):
        full, _ = model(seq[None])
        torch.testing.assert_close(logits[row, 0], full[0, -1], rtol=0, atol=1e-5)
    assert cache.lengths == [9, 4, 12]


def test_cache_rows_move_and_swap_with_their_lengths() -> None:
    cache = KVCache(1, 3, 1, 4, 2, torch.device("cpu"), torch.float32)
    cache.k[0, 0, 0, :2] = 1.0
    cache.k[0, 1, 0, :3] = 2.0
    cache.lengths[:2] = [2, 3]
    cache.swap(0, 1)
    assert cache.lengths[:2] == [3, 2] and cache.k[0, 0, 0, 2, 0] == 2 and cache.k[0, 1, 0, 1, 0] == 1
    cache.move(0, 2)
    assert cache.lengths[2] == 3 and torch.equal(cache.k[0, 2], cache.k[0, 0])


def test_the_engine_thread_serves_many_callers_and_drains_on_stop(
    tiny: Callable[..., GPT]
) -> None:
    """Requests from several threads, each event delivered to its own callback, the last
    with finish set; cancel from another thread; stop() lets running requests finish."""
    model = tiny()
    requests = [Request([i + 1, 2], 8, temperature=0.0) for i in range(5)]
    runner = EngineThread(Engine(model, max_batch=2))
    runner.start()
    done = threading.Event()
    results: dict[int, list[Event]] = {}

    def submit(i: int) -> None:
        results[i] = []
        runner.submit(requests[i], lambda e, i=i: results[i].append(e))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    blocked = threading.Event()
    slow = runner.submit(Request([1], 16, temperature=0.0),
                         lambda e: blocked.wait(5) if e.finish is None else done.set())
    runner.cancel(slow)
    blocked.set()
    assert done.wait(10)
    runner.stop(grace=10)
    with pytest.raises(GPTError, match="shutting down"):
        runner.submit(requests[0], lambda e: None)
    for i, request in enumerate(requests):
        assert [e.token for e in results[i]] == alone(model, request)
        assert results[i][-1].finish == "length"


def test_stop_cancels_what_outlives_the_grace_period(tiny: Callable[..., GPT]) -> None:
    model = tiny()
    runner = EngineThread(Engine(model, max_batch=1))
    runner.start()
    events: list[Event] = []
    slow = threading.Event()

    def on_event(e: Event) -> None:
        events.append(e)
        if e.finish is None:
            slow.wait(0.05)  # decoding slower than the grace period allows

    runner.submit(Request([1], 10_000, temperature=0.0), on_event)
    runner.submit(Request([2], 10_000, temperature=0.0), on_event)  # still queued
    time.sleep(0.2)
    start = time.monotonic()
    runner.stop(grace=0.3)
    assert time.monotonic() - start < 5
    finishes = [e.finish for e in events if e.finish]
    assert finishes == ["cancelled", "cancelled"]


def test_a_failed_step_ends_its_requests_with_an_error(
    tiny: Callable[..., GPT], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The engine thread survives: the requests get an "error" event, later ones run."""
    model = tiny()
    engine = Engine(model)
    runner = EngineThread(engine)
    runner.start()
    failed, ok = threading.Event(), threading.Event()
    step = engine.step
    monkeypatch.setattr(engine, "step", lambda: (_ for _ in ()).throw(RuntimeError("boom")))
    runner.submit(Request([1], 4), lambda e: e.finish == "error" and failed.set())
    assert failed.wait(5)
    monkeypatch.setattr(engine, "step", step)
    runner.submit(Request([1], 4), lambda e: e.finish == "length" and ok.set())
    assert ok.wait(5)
    runner.stop(grace=1)


def test_the_engine_thread_can_build_its_engine_itself(tiny: Callable[..., GPT]) -> None:
    """A builder runs in the engine's thread (so all torch work happens there); what it
    raises comes out of start()."""
    built_in: list[str] = []

    def build() -> Engine:
        built_in.append(threading.current_thread().name)
        return Engine(tiny())

    runner = EngineThread(build)
    runner.start()
    assert built_in == ["gpt-engine"] and runner.engine.max_batch == 16
    done = threading.Event()
    runner.submit(Request([1], 3, temperature=0.0), lambda e: e.finish and done.set())
    assert done.wait(5)
    runner.stop(grace=1)

    def fail() -> Engine:
        raise GPTError("no model here")

    failing = EngineThread(fail)
    with pytest.raises(GPTError, match="no model here"):
        failing.start()
    assert not failing.alive
