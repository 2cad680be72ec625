"""The web app: OpenAI's endpoints over an `EngineThread`, the page, `/health` and `/metrics`.

The engine steps in its own thread; each request submits its sequences there and gets their
events back on the event loop (`loop.call_soon_threadsafe` into an asyncio queue of its own).
Text is decoded per sequence by `TextStream`, which also finds stop strings: a sequence that
reaches one is cancelled in the engine at once, freeing its place in the batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import (
    FileResponse,
    JSONResponse,
    PlainTextResponse,
    Response,
    StreamingResponse,
)
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from gpt.engine import EngineThread, Event
from gpt.engine import Request as EngineRequest
from gpt.errors import GPTError
from gpt.sample import TextStream, prompt_ids, stop_ids
from gpt.serve import api
from gpt.serve.api import APIError, Generation, Limits
from gpt.serve.guard import CORS, Guard, check_json, read_body
from gpt.serve.stats import Stats, shown_path
from gpt.template import chat_prompt, chat_stops
from gpt.tokenizer import Tokenizer

STATIC = Path(__file__).parent / "static"
log = logging.getLogger("gpt.serve")


class Ended(Exception):
    """The engine ended a sequence the request did not: "cancelled" (the server is stopping)
    or "error" (a decoding step failed)."""

    def error(self) -> APIError:
        if self.args[0] == "error":
            return APIError(500, "generation failed on the server (see its log); retry the "
                                 "request", type="server_error", code="engine_error")
        return APIError(503, "the server stopped before this request finished; retry it",
                        type="server_error", code="server_shutting_down")


@dataclass
class _Choice:
    index: int  # in the response's choices
    text: TextStream
    tokens: int = 0  # generated for it, a final end-of-text id included
    finish: str | None = None  # "stop" or "length" once it ends
    started: bool = False  # some text other than whitespace was given out


class Answer:
    """One request's sequences in the engine: their text as it is decoded, and what they cost.

    A chat reply is given out without its leading whitespace (the plain layout's reply starts
    with the space after "Assistant:"), as `gpt chat` writes it.
    """

    def __init__(self, engine: EngineThread, tokenizer: Tokenizer, generation: Generation,
                 strip_leading: bool = False) -> None:
        self.engine, self.tokenizer, self.generation = engine, tokenizer, generation
        self.strip_leading = strip_leading
        self.started = time.monotonic()
        self.first_token: float | None = None  # seconds from the start to the first token
        self.choices: dict[int, _Choice] = {}  # by the engine's seq id
        self.events: asyncio.Queue[Event] | None = None  # filled by the engine's thread

    @property
    def completion_tokens(self) -> int:
        return sum(c.tokens for c in self.choices.values())

    @property
    def finishes(self) -> list[str]:
        return [c.finish or "cancelled" for c in sorted(self.choices.values(),
                                                        key=lambda c: c.index)]

    def start(self) -> None:
        """Submit n sequences per prompt (seeds seed, seed + 1, ...), each ending at end-of-text.

        Called before any response is sent, so that the engine refusing them (it is stopping)
        is still an error status, not a stream cut after its headers. On the event loop.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        self.events = events

        def on_event(event: Event) -> None:  # in the engine's thread
            loop.call_soon_threadsafe(events.put_nowait, event)

        try:
            self._submit(on_event)
        except BaseException:
            self.cancel()
            raise

    def cancel(self) -> None:
        """Cancel the sequences still running, so their places go to other requests."""
        for seq, choice in self.choices.items():
            if choice.finish is None:
                choice.finish = "cancelled"
                self.engine.cancel(seq)

    def _submit(self, on_event: Callable[[Event], None]) -> None:
        g = self.generation
        for i, prompt in enumerate(g.prompts):
            for j in range(g.n):
                index = i * g.n + j
                request = EngineRequest(
                    prompt=prompt, max_tokens=g.max_tokens, temperature=g.temperature,
                    top_k=g.top_k, top_p=g.top_p,
                    seed=None if g.seed is None else g.seed + index,
                    stop_ids=stop_ids(self.tokenizer, ignore_eos=False),
                )
                seq = self.engine.submit(request, on_event)
                self.choices[seq] = _Choice(index, TextStream(self.tokenizer, g.stop))

    async def pieces(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, new text, finish reason or None) as the engine's events arrive.

        Whatever way this ends (finished, the client gone, an error), sequences still running
        are cancelled, so their places in the batch go to other requests.
        """
        events = self.events
        assert events is not None, "start() submits the sequences first"
        try:
            pending = sum(c.finish is None for c in self.choices.values())
            while pending:
                event = await events.get()
                choice = self.choices[event.seq]
                if choice.finish is not None:
                    continue  # the end of a sequence cut at a stop string: it was cancelled
                if event.finish in ("cancelled", "error"):
                    raise Ended(event.finish)
                text = ""
                if event.token is not None:
                    choice.tokens += 1
                    if self.first_token is None:
                        self.first_token = time.monotonic() - self.started
                    if event.finish != "stop":  # the end-of-text id has no text
                        text = choice.text.add(event.token)
                finish = event.finish
                if choice.text.stopped:
                    if finish is None:
                        self.engine.cancel(event.seq)
                    finish = "stop"
                if finish is not None:
                    text += choice.text.flush()
                    choice.finish = finish
                    pending -= 1
                if self.strip_leading and not choice.started:
                    text = text.lstrip()
                    choice.started = bool(text)
                if text or finish is not None:
                    yield choice.index, text, finish
        finally:
            self.cancel()


def create_app(
    engine: EngineThread,
    tokenizer: Tokenizer,
    limits: Limits,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    loopback_only: bool = True,
) -> FastAPI:
    """The app, around an engine thread that is already started. `app.state.stopping` set true
    makes it refuse new generations (503) while running ones finish. `loopback_only` (a server
    on a loopback address) refuses a Host header that is not a loopback name."""
    app = FastAPI(title="gpt serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.stopping = False
    stats = Stats(max_batch=limits.max_batch)
    app.state.stats = stats
    created = api.now()

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError) -> JSONResponse:
        stats.refused(_request_id(request), request.url.path, error.status, error.message)
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        fix = {404: "see GET /v1/models, POST /v1/completions and POST /v1/chat/completions",
               405: "check the method (GET or POST)"}.get(error.status_code, "check the request")
        code = {404: "not_found", 405: "method_not_allowed"}.get(error.status_code)
        return await api_error(request, APIError(
            error.status_code,
            f"{request.method[:20]} {shown_path(request.url.path)}: {error.detail}; {fix}",
            code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("%s %s: internal error", _request_id(request), request.url.path)
        return JSONResponse(APIError(500, "the server failed on this request; see its log",
                                     type="server_error").body(), status_code=500)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health() -> JSONResponse:
        status = ("stopping" if app.state.stopping
                  else "engine_stopped" if not engine.alive else "ok")
        return JSONResponse({"status": status, "model": limits.model},
                            status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(stats.prometheus(_EngineState(engine)),
                                 media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return api.models(limits.model, created)

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        api.check_model({"model": model}, limits.model)
        return api.model_card(limits.model, created)

    stopping = APIError(503, "the server is shutting down; retry on another server",
                        type="server_error", code="server_shutting_down")

    async def generate(request: Request, parse: Callable[[dict[str, Any]], Generation],
                       chat: bool) -> Response:
        check_json(request.headers)
        body = api.parse_body(await read_body(request, limits.max_body_bytes))
        generation = parse(body)
        if app.state.stopping:
            raise stopping
        answer = Answer(engine, tokenizer, generation, strip_leading=chat)
        try:
            answer.start()  # before any response starts: a refusal is still a status
        except GPTError as e:  # the engine refused a sequence: stopping, or a check missed
            raise (stopping if app.state.stopping else APIError(400, str(e))) from None
        reply = Reply(_request_id(request), request.url.path, limits.model, chat, answer, stats)
        if generation.stream:
            return EventStream(reply.stream(), on_close=answer.cancel)
        whole = await reply.whole(request.is_disconnected)
        return Response(status_code=499) if whole is None else JSONResponse(whole)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await generate(request, lambda body: api.parse_completion(
            body, tokenizer, limits, prompt_ids), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        stops = chat_stops(tokenizer)
        return await generate(request, lambda body: api.parse_chat(
            body, tokenizer, limits, chat_prompt, stops), chat=True)

    app.add_middleware(Guard, api_key=api_key, max_in_flight=limits.max_in_flight, stats=stats,
                       loopback_only=loopback_only)
    if cors_origins:  # outermost: it answers preflights, which carry no key
        app.add_middleware(CORS, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    return app


class _EngineState:
    """The engine thread's counters as the metrics read them."""

    def __init__(self, engine: EngineThread) -> None:
        self.running, self.waiting = engine.running, engine.waiting
        self.tokens_generated = engine.tokens_generated


class Reply:
    """One generation request's answer: streamed as server-sent events, or whole."""

    def __init__(self, request_id: str, route: str, model: str, chat: bool, answer: Answer,
                 stats: Stats) -> None:
        self.id, self.route, self.model, self.chat = request_id, route, model, chat
        self.answer, self.stats, self.created = answer, stats, api.now()

    def _finished(self) -> None:
        a = self.answer
        self.stats.finished(self.id, self.route, a.generation.prompt_tokens,
                            a.completion_tokens, a.first_token, time.monotonic() - a.started,
                            a.finishes)

    def _usage(self) -> dict[str, int]:
        return api.usage(self.answer.generation.prompt_tokens, self.answer.completion_tokens)

    async def whole(self, disconnected: Callable[[], Awaitable[bool]]) -> dict[str, Any] | None:
        """Every choice's text once all have finished; a client that leaves cancels them (and
        gets None: there is no one to answer)."""
        count = len(self.answer.generation.prompts) * self.answer.generation.n
        texts, finishes = [""] * count, ["length"] * count

        async def collect() -> None:
            async for index, text, finish in self.answer.pieces():
                texts[index] += text
                if finish is not None:
                    finishes[index] = finish

        task = asyncio.ensure_future(collect())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=0.25)
                if not task.done() and await disconnected():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task  # its sequences are cancelled as it ends
                    self.stats.refused(self.id, self.route, 499, "the client left; its "
                                                                 "sequences were cancelled")
                    return None
            task.result()
        except Ended as e:
            raise e.error() from None
        finally:
            task.cancel()
        self._finished()
        return api.completion_response(self.id, self.model, self.created, texts, finishes,
                                       self.chat, self._usage())

    async def stream(self) -> AsyncIterator[bytes]:
        """OpenAI's chunks as server-sent events, then `data: [DONE]`. A client that
        disconnects ends this generator (EventStream closes it), and so the sequences."""
        ended = False
        try:
            first = True
            async for index, text, finish in self.answer.pieces():
                if self.chat and first:  # the assistant's role comes first, as OpenAI's does
                    g = self.answer.generation
                    for i in range(len(g.prompts) * g.n):
                        yield api.sse(api.chunk(self.id, self.model, self.created, True, i, "",
                                                None, role=True))
                    first = False
                yield api.sse(api.chunk(self.id, self.model, self.created, self.chat, index,
                                        text if text or not self.chat else None, finish))
            if self.answer.generation.include_usage:
                yield api.sse(api.usage_chunk(self.id, self.model, self.created, self.chat,
                                              self._usage()))
            ended = True
            self._finished()
        except Ended as e:
            ended = True
            error = e.error()
            self.stats.refused(self.id, self.route, error.status, error.message)
            yield api.sse(error.body())
        finally:
            if not ended:
                self.stats.refused(self.id, self.route, 499, "the client left; its sequences "
                                                             "were cancelled")
        yield api.sse("[DONE]")


class EventStream(StreamingResponse):
    """Server-sent events whose generator is closed as soon as the response ends, however it
    ends: a client that left mid-stream frees its sequences now, not at garbage collection."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(events, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close  # also when the client left before the first event

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()  # type: ignore[attr-defined]
            self.on_close()


def _request_id(request: Request) -> str:
    """The request's id: `cmpl-...`, `chatcmpl-...` (OpenAI's prefixes), or `req-...` on
    other routes; made once and kept in its scope."""
    state = request.scope.setdefault("state", {})
    if "request_id" not in state:
        prefix = {"/v1/completions": "cmpl", "/v1/chat/completions": "chatcmpl"}.get(
            request.url.path, "req")
        state["request_id"] = f"{prefix}-{uuid.uuid4().hex[:24]}"
    return str(state["request_id"])
