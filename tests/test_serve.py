"""gpt serve: OpenAI's API over a tiny random model, driven by the openai client and raw HTTP
on 127.0.0.1, every wait bounded.

The model is random but its end-of-text id can never win (its head row points away from every
hidden state), so each sequence runs to max_tokens unless a stop string ends it; the texts are
checked against a plain greedy loop (gpt.generate) and the engine itself, not the server.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'gpt[serve]'")
pytest.importorskip("uvicorn", reason="needs the serve extra: pip install 'gpt[serve]'")
httpx = pytest.importorskip("httpx", reason="needs httpx (the openai client's HTTP library)")
openai = pytest.importorskip("openai", reason="needs the openai client: pip install openai")

import uvicorn  # noqa: E402

import gpt.checkpoint as ckpt  # noqa: E402
from gpt.chat import Chat  # noqa: E402
from gpt.config import ModelConfig, RunConfig, SampleConfig, to_dict  # noqa: E402
from gpt.engine import Engine, EngineThread  # noqa: E402
from gpt.engine import Request as EngineRequest  # noqa: E402
from gpt.errors import GPTError  # noqa: E402
from gpt.generate import generate  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.parallel import Dist  # noqa: E402
from gpt.sample import load_for_inference, prompt_ids  # noqa: E402
from gpt.serve.api import APIError, Limits, parse_completion  # noqa: E402
from gpt.serve.app import create_app  # noqa: E402
from gpt.serve.server import bind, uvicorn_config  # noqa: E402
from gpt.serve.stats import label  # noqa: E402
from gpt.template import chat_prompt, chat_stops  # noqa: E402
from gpt.tokenizer import CharTokenizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CHARS = " \nabcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;!?'\"-()<>|/_é€"
CONTEXT = 64
LIMITS = dict(context=CONTEXT, max_tokens=48, default_max_tokens=20, max_sequences=4,
              max_batch=4, max_body_bytes=4096, max_in_flight=8)
WAIT = 20.0  # seconds any single wait may take before the test fails

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return CharTokenizer(CHARS)


def tiny_model(tokenizer: CharTokenizer) -> GPT:
    """A random model whose end-of-text id never wins: with ln_f's bias at 1 and the id's head
    row at -1, its logit is -n_embd (-32) against others near 0."""
    torch.manual_seed(0)
    config = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=CONTEXT,
                         vocab_size=tokenizer.vocab_size, tie_embeddings=False)
    model = GPT(config).eval()
    with torch.no_grad():
        model.transformer.ln_f.bias.fill_(1.0)
        model.lm_head.weight[tokenizer.eot_id].fill_(-1.0)
    return model


@pytest.fixture(scope="module")
def model(tokenizer: CharTokenizer) -> GPT:
    return tiny_model(tokenizer)


@dataclass
class Served:
    """A server on 127.0.0.1: its address, engine thread and app."""

    url: str
    engine: EngineThread
    app: object

    def client(self, **kwargs: object) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=kwargs.pop("api_key", "none"),
                             max_retries=0, timeout=WAIT, **kwargs)


@contextlib.contextmanager
def serving(model: GPT, tokenizer: CharTokenizer, api_key: str | None = None,
            cors: tuple[str, ...] = (), loopback_only: bool = True,
            **limits: int) -> Iterator[Served]:
    """uvicorn in a thread on a free port, with its own engine thread; stopped afterwards."""
    engine = EngineThread(Engine(model, max_batch=limits.get("max_batch", 4), context=CONTEXT))
    engine.start()
    app = create_app(engine, tokenizer, Limits(model="tiny", **{**LIMITS, **limits}), api_key,
                     cors, loopback_only)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn_config(app, grace=0))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.01)
    try:
        yield Served(f"http://127.0.0.1:{sock.getsockname()[1]}", engine, app)
    finally:
        server.should_exit = True
        thread.join(WAIT)
        engine.stop(0)
        sock.close()


@pytest.fixture(scope="module")
def served(model: GPT, tokenizer: CharTokenizer) -> Iterator[Served]:
    with serving(model, tokenizer) as s:
        yield s


def reference(model: GPT, ids: list[int], max_tokens: int) -> list[int]:
    """Greedy ids from gpt.generate's plain decoding loop: no engine, no server."""
    return [int(t) for t in generate(model, torch.tensor([ids]), max_tokens, temperature=0.0)]


def engine_ids(model: GPT, request: EngineRequest) -> list[int]:
    """The engine's own tokens for one request, run directly."""
    return [e.token for e in Engine(model, max_batch=2, context=CONTEXT).run([request])
            if e.token is not None]


def post(served: Served, path: str, body: object = None, content: bytes | None = None,
         headers: dict[str, str] | None = None) -> httpx.Response:
    """POST `body` as JSON, or `content` as it is (declared JSON unless `headers` say else)."""
    headers = {"Content-Type": "application/json", **(headers or {})}
    return httpx.post(served.url + path, json=body if content is None else None,
                      content=content, headers=headers, timeout=WAIT)


def metric(served: Served, name: str, headers: dict[str, str] | None = None) -> float:
    text = httpx.get(served.url + "/metrics", headers=headers, timeout=WAIT).text
    found = re.search(rf"^{name} (\S+)$", text, re.M)
    assert found, text
    return float(found.group(1))


def wait_until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# The openai client, not streaming and streaming


def test_completion_is_the_greedy_continuation(served: Served, model: GPT,
                                               tokenizer: CharTokenizer) -> None:
    reply = served.client().completions.create(model="tiny", prompt="Hello there", max_tokens=12,
                                               temperature=0)
    ids = prompt_ids(tokenizer, "Hello there")
    expected = reference(model, ids, 12)
    assert expected == engine_ids(model, EngineRequest(ids, 12, temperature=0.0))
    assert reply.choices[0].text == tokenizer.decode(expected)
    assert reply.choices[0].finish_reason == "length"
    assert reply.object == "text_completion" and reply.model == "tiny"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens,
            reply.usage.total_tokens) == (len(ids), 12, len(ids) + 12)


def test_streamed_completion_is_the_same_text(served: Served, model: GPT,
                                              tokenizer: CharTokenizer) -> None:
    chunks = list(served.client().completions.create(
        model="tiny", prompt="Once", max_tokens=15, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == tokenizer.decode(reference(model, prompt_ids(tokenizer, "Once"), 15))
    assert len([c for c in chunks if c.choices]) > 2  # it came in pieces
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15


def test_chat_renders_the_template_and_streams(served: Served, model: GPT,
                                               tokenizer: CharTokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    client = served.client()
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                           temperature=0)
    ids = chat_prompt(tokenizer, messages)
    text = tokenizer.decode(reference(model, ids, 10))
    for stop in chat_stops(tokenizer):
        text = text.split(stop)[0]
    text = text.lstrip()  # as gpt chat shows a reply
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == len(ids)
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10,
                                            temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == reply.choices[0].finish_reason


def test_chat_reply_starts_as_gpt_chat_writes_it(tokenizer: CharTokenizer) -> None:
    """A model that writes a space after "Assistant:", as a trained one does: serve's reply,
    whole and streamed, is the text `gpt chat` writes, without that space."""
    model = tiny_model(tokenizer)
    colon, space = tokenizer.encode(":")[0], tokenizer.encode(" ")[0]
    with torch.no_grad():  # a colon's embedding points along d, and so does the space's row
        d = torch.zeros(model.config.n_embd)
        d[0], d[1] = 1.0, -1.0
        model.transformer.wte.weight[colon] = 20 * d
        model.lm_head.weight[space] = 0.5 * d
    written: list[str] = []
    chat = Chat(model, tokenizer, SampleConfig(temperature=0.0, max_new_tokens=12))
    chat.reply("Hi!", written.append, lambda notice: None)
    expected = "".join(written)
    messages = [{"role": "user", "content": "Hi!"}]
    raw = tokenizer.decode(reference(model, chat_prompt(tokenizer, messages), 12))
    assert raw[0] == " " and raw.lstrip() == expected and expected.strip()  # the case at hand
    with serving(model, tokenizer) as s:
        client = s.client()
        reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=12,
                                               temperature=0)
        chunks = list(client.chat.completions.create(model="tiny", messages=messages,
                                                     max_tokens=12, temperature=0, stream=True))
    assert reply.choices[0].message.content == expected
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert reply.usage.completion_tokens == 12  # the space is still a token generated


def test_raw_stream_is_openai_server_sent_events(served: Served) -> None:
    """What curl sees: `data: {chunk}` events, a blank line after each, `data: [DONE]` last."""
    with httpx.stream("POST", served.url + "/v1/completions", timeout=WAIT,
                      json={"prompt": "ab", "max_tokens": 5, "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    events = body.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-2])
    assert {c["object"] for c in chunks} == {"text_completion"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


def test_n_choices_use_seed_then_seed_plus_one(served: Served, tokenizer: CharTokenizer) -> None:
    client = served.client()
    many = client.completions.create(model="tiny", prompt="x", max_tokens=10, n=3, seed=7,
                                     temperature=1.0)
    single = [client.completions.create(model="tiny", prompt="x", max_tokens=10, seed=7 + i,
                                        temperature=1.0).choices[0].text for i in range(3)]
    assert [c.index for c in many.choices] == [0, 1, 2]
    assert [c.text for c in many.choices] == single
    assert len(set(single)) > 1  # three seeds, not one text
    assert many.usage.completion_tokens == 30


def test_stop_string_cuts_the_text_and_frees_the_sequence(served: Served, model: GPT,
                                                          tokenizer: CharTokenizer) -> None:
    full = tokenizer.decode(reference(model, prompt_ids(tokenizer, "Stop"), 40))
    stop = full[6:9]
    cut = full[:full.index(stop)]
    for stream in (False, True):
        reply = served.client().completions.create(model="tiny", prompt="Stop", max_tokens=40,
                                                   temperature=0, stop=[stop], stream=stream)
        choices = [c.choices[0] for c in reply] if stream else reply.choices
        assert "".join(c.text for c in choices) == cut
        assert choices[-1].finish_reason == "stop"
    wait_until(lambda: served.engine.running == 0, "the stopped sequence to leave the batch")


@pytest.mark.parametrize("ends", [True, False], ids=["end-of-text", "char-newline-is-text"])
def test_end_of_text_finishes_with_stop(served: Served, model: GPT, tokenizer: CharTokenizer,
                                        monkeypatch: pytest.MonkeyPatch, ends: bool) -> None:
    """The end-of-text id ends a sequence: it counts as a token and has no text. A char
    vocabulary has none (its separator, a newline, is text), so there the reply goes on."""
    if ends:  # as for a tokenizer with a true end-of-text id
        monkeypatch.setattr("gpt.serve.app.stop_ids", lambda t, ignore_eos: {t.eot_id})
    row = model.lm_head.weight[tokenizer.eot_id]
    with torch.no_grad():
        row.fill_(1.0)  # now it always wins
    try:
        reply = served.client().completions.create(model="tiny", prompt="a", max_tokens=10)
    finally:
        with torch.no_grad():
            row.fill_(-1.0)
    if ends:
        assert reply.choices[0].text == "" and reply.choices[0].finish_reason == "stop"
        assert reply.usage.completion_tokens == 1
    else:
        assert reply.choices[0].text == "\n" * 10 and reply.choices[0].finish_reason == "length"


def test_default_max_tokens_fits_the_context(served: Served, tokenizer: CharTokenizer) -> None:
    short = served.client().completions.create(model="tiny", prompt="a", temperature=0)
    assert short.usage.completion_tokens == LIMITS["default_max_tokens"]
    prompt = "b" * (CONTEXT - 5)
    long = served.client().completions.create(model="tiny", prompt=prompt, temperature=0)
    assert long.usage.completion_tokens == 5  # the room left in the context


def test_token_id_prompts_and_several_prompts(served: Served, tokenizer: CharTokenizer) -> None:
    client = served.client()
    by_text = client.completions.create(model="tiny", prompt="abc", max_tokens=6, temperature=0)
    by_ids = client.completions.create(model="tiny", prompt=tokenizer.encode("abc"),
                                       max_tokens=6, temperature=0)
    both = client.completions.create(model="tiny", prompt=["abc", "xyz"], max_tokens=6,
                                     temperature=0)
    assert by_ids.choices[0].text == by_text.choices[0].text == both.choices[0].text
    assert both.choices[1].index == 1 and both.usage.prompt_tokens == 6


def test_models_health_and_metrics(served: Served) -> None:
    models = served.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert httpx.get(served.url + "/health", timeout=WAIT).json()["status"] == "ok"
    before = metric(served, "gpt_completion_tokens_total")
    served.client().completions.create(model="tiny", prompt="m", max_tokens=3)
    assert metric(served, "gpt_completion_tokens_total") == before + 3
    text = httpx.get(served.url + "/metrics", timeout=WAIT).text
    for name in ("gpt_requests_total", "gpt_queue_length", "gpt_batch_occupancy",
                 "gpt_prompt_tokens_total", "gpt_time_to_first_token_seconds_sum"):
        assert f"# TYPE {name}" in text or f"{name}" in text


def test_metrics_count_routes_not_paths(model: GPT, tokenizer: CharTokenizer,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Unknown paths, keyless or not, are counted as "other": no client can add labels (or
    memory) to /metrics, and log lines and messages repeat only the start of a path."""
    key = {"Authorization": "Bearer k"}
    long = "/v1/" + "x" * 5000
    paths = [long + str(i) for i in range(30)] + ['/v1/a"b\\c', "/v1/%0Ainjected", "/nope"]
    with serving(model, tokenizer, api_key="k") as s, caplog.at_level("INFO", "gpt.serve"):
        with httpx.Client(timeout=WAIT) as client:
            for path in paths:
                assert client.get(s.url + path).status_code == 401 or path == "/nope"
                assert client.get(s.url + path, headers=key).status_code == 404
            message = client.get(s.url + long, headers=key).json()["error"]["message"]
            assert client.get(s.url + "/v1/models/other", headers=key).status_code == 404
            text = client.get(s.url + "/metrics", headers=key).text
        requests = s.app.state.stats.requests  # type: ignore[attr-defined]
    labels = set(re.findall(r'^gpt_requests_total\{route="([^"]*)",', text, re.M))
    assert labels == {"other", "/v1/models/{model}"}, labels
    assert {route for route, _ in requests} == labels
    assert re.search(r'^gpt_requests_total\{route="other",status="401"\} 32$', text, re.M)
    assert len(message) < 400 and message.startswith("GET /v1/xxx")
    assert max(len(r.getMessage()) for r in caplog.records) < 600


def test_metric_labels_are_escaped() -> None:
    assert label('a\\b"c\nd') == 'a\\\\b\\"c\\nd'  # a\\b\"c\nd, as Prometheus reads it


def test_a_log_line_per_request(served: Served, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="gpt.serve"):
        reply = served.client().completions.create(model="tiny", prompt="log", max_tokens=4)
    line = next(r.getMessage() for r in caplog.records if reply.id in r.getMessage())
    assert re.search(r"3 prompt \+ 4 completion tokens, first token \d+\.\d+ s, total \d+\.\d+ s",
                     line), line


# ---------------------------------------------------------------------------------------------
# Bad requests: a 4xx with OpenAI's error JSON naming the field, and the server goes on

C, CHAT = "/v1/completions", "/v1/chat/completions"
ERRORS = [  # (id, path, body as bytes or JSON, status, param, code)
    ("malformed-json", C, b'{"prompt": "a",', 400, None, "invalid_json"),
    ("not-utf8", C, b'{"prompt": "\xff\xfe"}', 400, None, "invalid_encoding"),
    ("nan", C, b'{"prompt": "a", "temperature": NaN}', 400, None, "invalid_json"),
    ("not-an-object", C, b"[1, 2]", 400, None, "invalid_json"),
    ("empty-body", C, b"", 400, None, "invalid_json"),
    ("missing-prompt", C, {"max_tokens": 3}, 400, "prompt", "missing_required"),
    ("prompt-a-number", C, {"prompt": 5}, 400, "prompt", "invalid_type"),
    ("prompt-empty-list", C, {"prompt": []}, 400, "prompt", "invalid_value"),
    ("prompt-id-outside-vocabulary", C, {"prompt": [1, 999]}, 400, "prompt[1]", "invalid_value"),
    ("prompt-unknown-character", C, {"prompt": "日本"}, 400, "prompt", "invalid_value"),
    ("prompt-lone-surrogate", C, b'{"prompt": "a\\ud800"}', 400, "prompt", "invalid_value"),
    ("temperature-a-string", C, {"prompt": "a", "temperature": "hot"}, 400, "temperature",
     "invalid_type"),
    ("temperature-too-high", C, {"prompt": "a", "temperature": 3}, 400, "temperature",
     "invalid_value"),
    ("top-p-zero", C, {"prompt": "a", "top_p": 0}, 400, "top_p", "invalid_value"),
    ("top-k-zero", C, {"prompt": "a", "top_k": 0}, 400, "top_k", "invalid_value"),
    ("max-tokens-zero", C, {"prompt": "a", "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
    ("max-tokens-a-bool", C, {"prompt": "a", "max_tokens": True}, 400, "max_tokens",
     "invalid_type"),
    ("max-tokens-over-the-limit", C, {"prompt": "a", "max_tokens": 49}, 400, "max_tokens",
     "invalid_value"),
    ("prompt-longer-than-the-context", C, {"prompt": "a" * CONTEXT}, 400, "prompt",
     "context_length_exceeded"),
    ("prompt-and-max-tokens-over-the-context", C, {"prompt": "a" * 30, "max_tokens": 40}, 400,
     "prompt", "context_length_exceeded"),
    ("n-zero", C, {"prompt": "a", "n": 0}, 400, "n", "invalid_value"),
    ("n-over-the-limit", C, {"prompt": ["a", "b"], "n": 3}, 400, "n", "invalid_value"),
    ("seed-a-float", C, {"prompt": "a", "seed": 1.5}, 400, "seed", "invalid_type"),
    ("five-stops", C, {"prompt": "a", "stop": list("abcde")}, 400, "stop", "invalid_value"),
    ("empty-stop", C, {"prompt": "a", "stop": ["x", ""]}, 400, "stop[1]", "invalid_value"),
    ("stream-a-string", C, {"prompt": "a", "stream": "yes"}, 400, "stream", "invalid_type"),
    ("stream-options-without-stream", C, {"prompt": "a", "stream_options": {}}, 400,
     "stream_options", "invalid_value"),
    ("unknown-model", C, {"prompt": "a", "model": "../../etc/passwd"}, 404, "model",
     "model_not_found"),
    ("unknown-field", C, {"prompt": "a", "checkpoint": "/tmp/x"}, 400, "checkpoint",
     "unknown_parameter"),
    ("unsupported-logprobs", C, {"prompt": "a", "logprobs": 5}, 400, "logprobs",
     "unsupported_value"),
    ("empty-messages", CHAT, {"messages": []}, 400, "messages", "empty_array"),
    ("missing-messages", CHAT, {"max_tokens": 3}, 400, "messages", "missing_required"),
    ("unknown-role", CHAT, {"messages": [{"role": "wizard", "content": "x"}]}, 400,
     "messages[0].role", "invalid_value"),
    ("content-a-number", CHAT, {"messages": [{"role": "user", "content": 5}]}, 400,
     "messages[0].content", "invalid_type"),
    ("image-content", CHAT, {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content[0]",
     "invalid_value"),
    ("chat-too-long", CHAT, {"messages": [{"role": "user", "content": "a" * CONTEXT}]}, 400,
     "messages", "context_length_exceeded"),
    ("temperature-400-digits", C, {"prompt": "a", "temperature": 10**400}, 400, "temperature",
     "invalid_value"),
    ("top-p-minus-400-digits", C, {"prompt": "a", "top_p": -10**400}, 400, "top_p",
     "invalid_value"),
    ("role-a-list", CHAT, {"messages": [{"role": ["user"], "content": "hi"}]}, 400,
     "messages[0].role", "invalid_value"),
    ("role-an-object", CHAT, {"messages": [{"role": {"a": 1}, "content": "hi"}]}, 400,
     "messages[0].role", "invalid_value"),
    ("oversized-body", C, {"prompt": "a" * 5000}, 413, None, "request_too_large"),
    ("unknown-route", "/v1/embeddings", {"input": "a"}, 404, None, "not_found"),
]


def check_error(response: httpx.Response, status: int, param: str | None,
                code: str | None) -> str:
    """OpenAI's error shape exactly; returns the message."""
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["param"], error["code"]) == (param, code), error
    assert error["type"] in ("invalid_request_error", "requests", "server_error")
    assert isinstance(error["message"], str) and len(error["message"]) > 20
    if param is not None:
        assert f"'{param.split('[')[0].split('.')[0]}" in error["message"] or \
               param.split("[")[0] in error["message"], error["message"]
    return error["message"]


@pytest.mark.parametrize("case", ERRORS, ids=[case[0] for case in ERRORS])
def test_bad_request(served: Served, case: tuple) -> None:
    _, path, body, status, param, code = case
    content = body if isinstance(body, bytes) else None
    check_error(post(served, path, body, content), status, param, code)
    assert httpx.get(served.url + "/health", timeout=WAIT).status_code == 200


ODD_VALUES = [10**400, -(10**400), 1e308, [1], ["user"], {"a": 1}, "x", True, None, 2.5, -1]
FIELDS = {  # a valid body of each route, and the fields each takes
    C: ({"prompt": "a", "max_tokens": 2}, ["prompt", "model", "max_tokens", "temperature",
                                           "top_p", "top_k", "seed", "stop", "n", "stream",
                                           "stream_options", "user", "logprobs", "echo"]),
    CHAT: ({"messages": [{"role": "user", "content": "a"}], "max_tokens": 2},
           ["messages", "model", "max_completion_tokens", "temperature", "stop", "n",
            "tool_choice", "response_format", "metadata"]),
}


@pytest.mark.parametrize("path", [C, CHAT])
def test_odd_values_in_every_field_are_never_a_500(served: Served, path: str) -> None:
    """Huge integers where numbers go, unhashable values where strings go, in every field,
    a stop item, a message's role, content and name: each a 2xx or a 4xx with OpenAI's error."""
    valid, fields = FIELDS[path]
    bodies = [{**valid, field: value} for field in fields for value in ODD_VALUES]
    bodies += [{**valid, "stop": ["x", value]} for value in ODD_VALUES]
    if path == CHAT:
        bodies += [{**valid, "messages": [{"role": "user", "content": "a", key: value}]}
                   for key in ("role", "content", "name") for value in ODD_VALUES]
    with httpx.Client(timeout=WAIT) as client:
        for body in bodies:
            response = client.post(served.url + path, content=json.dumps(body),
                                   headers={"Content-Type": "application/json"})
            assert response.status_code < 500, (body, response.text)
            if response.status_code >= 400:
                assert len(response.json()["error"]["message"]) < 400, response.text
    assert 'status="500"' not in httpx.get(served.url + "/metrics", timeout=WAIT).text


def test_long_values_are_cut_in_messages(served: Served) -> None:
    digits = 10**400
    message = check_error(post(served, C, {"prompt": "a", "max_tokens": digits}), 400,
                          "max_tokens", "invalid_value")
    assert str(digits)[:30] in message and str(digits) not in message and "..." in message
    assert len(message) < 200


def test_prompts_are_counted_before_they_are_encoded(tokenizer: CharTokenizer) -> None:
    """90,000 prompts are refused at once: none of them is encoded first."""
    encoded = []

    def counting(t: CharTokenizer, text: str) -> list[int]:
        encoded.append(text)
        return prompt_ids(t, text)

    limits = Limits(model="tiny", **LIMITS)
    with pytest.raises(APIError) as caught:
        parse_completion({"prompt": ["a"] * 90_000}, tokenizer, limits, counting)
    assert (caught.value.status, caught.value.param) == (400, "n") and encoded == []
    with pytest.raises(APIError):
        parse_completion({"prompt": ["a", "b"], "n": 3}, tokenizer, limits, counting)
    assert encoded == []
    parse_completion({"prompt": ["a", "b"], "n": 2}, tokenizer, limits, counting)
    assert encoded == ["a", "b"]


def test_error_messages_say_the_fix(served: Served) -> None:
    message = check_error(post(served, C, {"prompt": "a" * 30, "max_tokens": 40}), 400,
                          "prompt", "context_length_exceeded")
    assert message.startswith(f"This model's maximum context length is {CONTEXT} tokens")
    assert "(30 in the prompt, 40 in the completion)" in message and "at most 34" in message
    message = check_error(post(served, C, {"prompt": "a", "temperature": "hot"}), 400,
                          "temperature", "invalid_type")
    assert "must be a number" in message


def test_body_without_length_is_cut_at_the_limit(served: Served) -> None:
    """A chunked body (no Content-Length) is refused as it passes the limit."""
    def body() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 1000
        yield b'"}'

    check_error(httpx.post(served.url + C, content=body(), timeout=WAIT,
                           headers={"Content-Type": "application/json"}), 413, None,
                "request_too_large")


def test_wrong_method_is_an_openai_error(served: Served,
                                         caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("INFO", logger="gpt.serve"):
        check_error(httpx.get(served.url + C, timeout=WAIT), 405, None, "method_not_allowed")
        check_error(httpx.post(served.url + "/v1/models", timeout=WAIT), 405, None,
                    "method_not_allowed")
    lines = [r.getMessage() for r in caplog.records if ": 405 " in r.getMessage()]
    assert lines[0].startswith("cmpl-") and lines[1].startswith("req-"), lines


def test_openai_client_sees_the_error(served: Served) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        served.client().completions.create(model="tiny", prompt="a", max_tokens=1000)
    assert caught.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        served.client().completions.create(model="gpt-4", prompt="a")


def test_no_errors_became_500s(served: Served) -> None:
    text = httpx.get(served.url + "/metrics", timeout=WAIT).text
    assert 'status="500"' not in text


# ---------------------------------------------------------------------------------------------
# Security: the API key, CORS, the limits


def test_api_key_guards_every_api_route(model: GPT, tokenizer: CharTokenizer) -> None:
    with serving(model, tokenizer, api_key="s3cret") as s:
        for path in ("/v1/models", "/metrics", "/v1/nothing"):
            check_error(httpx.get(s.url + path, timeout=WAIT), 401, None, "invalid_api_key")
        wrong = {"Authorization": "Bearer nope"}
        check_error(post(s, C, {"prompt": "a"}, headers=wrong), 401, None, "invalid_api_key")
        check_error(post(s, C, {"prompt": "a"}, headers={"Authorization": "s3cret"}), 401, None,
                    "invalid_api_key")
        with pytest.raises(openai.AuthenticationError):
            s.client(api_key="nope").models.list()
        reply = s.client(api_key="s3cret").completions.create(model="tiny", prompt="a",
                                                              max_tokens=2)
        assert reply.usage.completion_tokens == 2
        assert metric(s, "gpt_batch_size", {"Authorization": "Bearer s3cret"}) == 4
        for path in ("/health", "/"):  # the page and the health check stay open
            assert httpx.get(s.url + path, timeout=WAIT).status_code == 200


def test_no_cors_unless_an_origin_is_given(served: Served, model: GPT,
                                           tokenizer: CharTokenizer) -> None:
    origin = {"Origin": "http://elsewhere.test"}
    response = post(served, C, {"prompt": "a", "max_tokens": 1}, headers=origin)
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers
    preflight = {**origin, "Access-Control-Request-Method": "POST"}
    response = httpx.options(served.url + C, headers=preflight, timeout=WAIT)
    assert "access-control-allow-origin" not in response.headers
    with serving(model, tokenizer, api_key="k", cors=("http://elsewhere.test",)) as s:
        response = httpx.options(s.url + C, headers={
            **preflight, "Access-Control-Request-Headers": "authorization"}, timeout=WAIT)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://elsewhere.test"
        response = post(s, C, {"prompt": "a", "max_tokens": 1},
                        headers={**origin, "Authorization": "Bearer k"})
        assert response.headers["access-control-allow-origin"] == "http://elsewhere.test"
        other = httpx.options(s.url + C, headers={"Origin": "http://evil.test",
                                                  "Access-Control-Request-Method": "POST"},
                              timeout=WAIT)
        assert "access-control-allow-origin" not in other.headers
        check_error(other, 400, None, "cors_refused")


@contextlib.contextmanager
def slow(model: GPT, seconds: float) -> Iterator[None]:
    """Every forward pass of `model` takes at least `seconds` more: streams last a while."""
    forward = model.forward

    def slowed(*args: object, **kwargs: object) -> object:
        time.sleep(seconds)
        return forward(*args, **kwargs)

    model.forward = slowed  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.forward


def test_client_disconnect_mid_stream_frees_its_slot(model: GPT,
                                                     tokenizer: CharTokenizer) -> None:
    with serving(model, tokenizer) as s, slow(model, 0.05):
        with httpx.stream("POST", s.url + C, timeout=WAIT,
                          json={"prompt": "go", "max_tokens": 45, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            assert s.engine.running == 1
        # the connection is closed with 40-odd tokens still to come
        wait_until(lambda: s.engine.running == 0 and s.engine.waiting == 0,
                   "the engine to drop the sequence")
        assert metric(s, "gpt_batch_running") == 0
        generated = s.engine.tokens_generated
        time.sleep(0.3)
        assert s.engine.tokens_generated == generated < 45


def test_client_disconnect_while_waiting_whole_reply(model: GPT,
                                                     tokenizer: CharTokenizer) -> None:
    with serving(model, tokenizer) as s, slow(model, 0.05):
        port = int(s.url.rsplit(":", 1)[1])
        body = json.dumps({"prompt": "go", "max_tokens": 45}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as raw:
            raw.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                        b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
            wait_until(lambda: s.engine.running == 1, "the request to start")
        wait_until(lambda: s.engine.running == 0, "the engine to drop the sequence")
        assert s.engine.tokens_generated < 45


def test_a_client_leaving_a_whole_reply_leaves_no_traceback(
        model: GPT, tokenizer: CharTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    """Four sequences cancelled when the client goes; the server logs the 499, no error."""
    with serving(model, tokenizer) as s, slow(model, 0.05), caplog.at_level("INFO"):
        with pytest.raises(httpx.ReadTimeout):
            post_timeout = httpx.Timeout(0.5)
            httpx.post(s.url + C, json={"prompt": "User:", "max_tokens": 40, "n": 4},
                       timeout=post_timeout)
        wait_until(lambda: s.engine.running == 0 and s.engine.waiting == 0,
                   "the engine to drop the sequences")
        wait_until(lambda: any(": 499 " in r.getMessage() for r in caplog.records),
                   "the 499 log line")
        time.sleep(0.3)  # the request's task has ended: anything it logs is in by now
    assert s.engine.tokens_generated < 4 * 40
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []
    assert not any(r.exc_info for r in caplog.records)


def test_requests_past_the_limit_are_429(model: GPT, tokenizer: CharTokenizer) -> None:
    with serving(model, tokenizer, max_in_flight=1) as s, slow(model, 0.05):
        with httpx.stream("POST", s.url + C, timeout=WAIT,
                          json={"prompt": "go", "max_tokens": 20, "stream": True}) as response:
            lines = response.iter_lines()  # held: a dropped one closes the response
            next(lines)
            check_error(post(s, C, {"prompt": "a"}), 429, None, "rate_limit_exceeded")
            for path in ("/metrics", "/v1/models", "/health", "/"):  # only generations count
                assert httpx.get(s.url + path, timeout=WAIT).status_code == 200, path
            assert list(lines)[-2] == "data: [DONE]"  # the first is unharmed
        assert post(s, C, {"prompt": "a", "max_tokens": 1}).status_code == 200


def test_idle_connections_turn_no_one_away(model: GPT, tokenizer: CharTokenizer) -> None:
    """Connections holding half a request's head are not counted: requests still get in."""
    with serving(model, tokenizer, max_in_flight=1) as s:
        port = int(s.url.rsplit(":", 1)[1])
        idle = [socket.create_connection(("127.0.0.1", port), timeout=WAIT) for _ in range(40)]
        try:
            for raw in idle:
                raw.sendall(b"GET /health HTTP/1.1\r\nHo")
            time.sleep(0.2)
            assert httpx.get(s.url + "/health", timeout=WAIT).status_code == 200
            assert post(s, C, {"prompt": "a", "max_tokens": 1}).status_code == 200
        finally:
            for raw in idle:
                raw.close()


def test_too_many_requests_at_once_is_an_openai_503(served: Served) -> None:
    stats = served.app.state.stats  # type: ignore[attr-defined]
    stats.open += LIMITS["max_in_flight"] + 64  # as if that many were being answered
    try:
        check_error(httpx.get(served.url + "/health", timeout=WAIT), 503, None,
                    "server_overloaded")
    finally:
        stats.open -= LIMITS["max_in_flight"] + 64
    assert httpx.get(served.url + "/health", timeout=WAIT).status_code == 200


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/jsonx"])
def test_a_body_not_declared_json_is_415(served: Served, content_type: str | None) -> None:
    """A page elsewhere can POST these without a CORS preflight: refused before reading."""
    headers = {} if content_type is None else {"Content-Type": content_type}
    for path in (C, CHAT):
        response = httpx.post(served.url + path, content=b'{"prompt": "a", "max_tokens": 1}',
                              headers=headers, timeout=WAIT)
        check_error(response, 415, None, "unsupported_media_type")


def test_json_with_a_charset_is_accepted(served: Served) -> None:
    response = httpx.post(served.url + C, content=b'{"prompt": "a", "max_tokens": 1}',
                          headers={"Content-Type": "Application/JSON; charset=utf-8"},
                          timeout=WAIT)
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("host", ["evil.test", "evil.test:8000", "127.0.0.1.evil.test",
                                  "localhost.evil.test:80", "[::2]:80", "10.0.0.1"])
def test_a_loopback_server_refuses_other_host_names(served: Served, host: str) -> None:
    """DNS rebinding: a page at evil.test whose name now resolves to 127.0.0.1."""
    for path in ("/", "/health", "/v1/models"):
        check_error(httpx.get(served.url + path, headers={"Host": host}, timeout=WAIT), 400,
                    None, "invalid_host")


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:8000", "127.0.0.1", "127.0.0.1:1",
                                  "[::1]", "[::1]:8000"])
def test_a_loopback_server_answers_loopback_names(served: Served, host: str) -> None:
    response = httpx.get(served.url + "/v1/models", headers={"Host": host}, timeout=WAIT)
    assert response.status_code == 200, response.text


def test_another_address_answers_any_host_name(model: GPT, tokenizer: CharTokenizer) -> None:
    with serving(model, tokenizer, loopback_only=False) as s:
        response = httpx.get(s.url + "/v1/models", headers={"Host": "gpu-box.lan:8000"},
                             timeout=WAIT)
        assert response.status_code == 200, response.text


@pytest.mark.parametrize("stream", [False, True])
def test_engine_refusing_at_shutdown_is_a_503_before_the_stream(
        model: GPT, tokenizer: CharTokenizer, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture, stream: bool) -> None:
    """The engine stops between the app's check and the submit: a 503, not a cut stream."""
    with serving(model, tokenizer) as s, caplog.at_level("INFO"):
        def refuse(request: EngineRequest, on_event: object) -> int:
            s.app.state.stopping = True  # type: ignore[attr-defined]
            raise GPTError("the engine is shutting down; retry on another server")

        monkeypatch.setattr(s.engine, "submit", refuse)
        response = post(s, C, {"prompt": "a", "max_tokens": 3, "stream": stream})
        check_error(response, 503, None, "server_shutting_down")
    assert not any(r.exc_info for r in caplog.records)


# ---------------------------------------------------------------------------------------------
# A real `gpt serve` process: SIGTERM drains, the key from the environment, a port in use


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, tokenizer: CharTokenizer) -> Path:
    """The tiny model saved as a run's out_dir, as `gpt train` would leave it."""
    model = tiny_model(tokenizer)
    cfg = RunConfig(model=model.config)
    out = tmp_path_factory.mktemp("served") / "out"
    state = {"tokens": 0, "best_val_loss": None, "config": to_dict(cfg),
             "tokenizer": tokenizer.to_dict()}
    ckpt.Checkpointer(out, Dist(), model, torch.optim.AdamW(model.parameters()), fixed=state).save(1)
    return out


ENV = {**os.environ, "OMP_NUM_THREADS": "1",
       "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}


@contextlib.contextmanager
def gpt_serve(*args: str, env: dict[str, str] = ENV) -> Iterator[tuple[subprocess.Popen, str]]:
    """`gpt serve ARGS --port 0` in a process of its own, and its address once it listens."""
    process = subprocess.Popen([sys.executable, "-m", "gpt", "serve", *args, "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=env)
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in process.stderr],
                     daemon=True).start()
    try:
        seen = []
        while True:
            line = lines.get(timeout=60)
            seen.append(line)
            found = re.search(r"on (http://127\.0\.0\.1:\d+)", line)
            if found:
                break
            assert process.poll() is None, "".join(seen)
        process.lines = lines  # type: ignore[attr-defined]
        yield process, found.group(1)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(WAIT)


def drain(lines: queue.Queue[str]) -> list[str]:
    """The lines a finished process's reader thread has left, waiting briefly for the last."""
    found = []
    with contextlib.suppress(queue.Empty):
        while True:
            found.append(lines.get(timeout=1))
    return found


@pytest.mark.slow
def test_sigterm_drains_and_exits_zero(checkpoint: Path) -> None:
    env = {**ENV, "GPT_API_KEY": "from-env"}
    with gpt_serve("--checkpoint", str(checkpoint), "--set", "serve.grace=5", env=env) as (
            process, url):
        key = {"Authorization": "Bearer from-env"}
        assert httpx.get(url + "/v1/models", timeout=WAIT).status_code == 401
        assert httpx.get(url + "/v1/models", headers=key, timeout=WAIT).status_code == 200
        with httpx.stream("POST", url + C, headers=key, timeout=WAIT,
                          json={"prompt": "go", "max_tokens": 60, "stream": True}) as response:
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")
            process.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]"  # it finished, or ended with an error event
        last = json.loads(rest[-2].removeprefix("data: "))
        assert "error" in last or last["choices"][0]["finish_reason"] == "length"
        assert process.wait(WAIT) == 0
        with pytest.raises(httpx.ConnectError):
            httpx.get(url + "/health", timeout=WAIT)
        stderr = "".join(drain(process.lines))  # type: ignore[attr-defined]
        assert "Traceback" not in stderr
        assert re.search(r"cmpl-\w+ /v1/completions", stderr)


def test_port_in_use_is_one_line(checkpoint: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "gpt", "serve", "--checkpoint",
                               str(checkpoint), "--port", str(port)], capture_output=True,
                              text=True, env=ENV, timeout=120)
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use (another gpt serve?); stop that program or "
        "choose another port with --port"]


@pytest.mark.usefixtures("int8_kernel")
def test_serve_quantize_int8_serves_the_int8_model(checkpoint: Path,
                                                  tokenizer: CharTokenizer) -> None:
    """`gpt serve --quantize int8`: a greedy completion is the int8 model's, as the engine gives
    it in this process."""
    found = ckpt.Checkpoint.open(checkpoint)
    model, _ = load_for_inference(found, "cpu", "float32", False, "int8")
    ids = prompt_ids(tokenizer, "Hello")
    expected = tokenizer.decode(engine_ids(model, EngineRequest(ids, 20, temperature=0.0)))
    with gpt_serve("--checkpoint", str(checkpoint), "--device", "cpu", "--dtype", "float32",
                   "--quantize", "int8") as (_, url):
        reply = httpx.post(url + C, json={"prompt": "Hello", "max_tokens": 20, "temperature": 0},
                           timeout=WAIT)
    assert reply.status_code == 200 and reply.json()["choices"][0]["text"] == expected


def test_health_says_when_the_engine_thread_has_ended(model: GPT, tokenizer: CharTokenizer
                                                      ) -> None:
    """A server whose engine is gone answers 503, so a load balancer stops sending to it."""
    with serving(model, tokenizer) as served:
        assert httpx.get(served.url + "/health", timeout=WAIT).status_code == 200
        served.engine.stop(0)
        reply = httpx.get(served.url + "/health", timeout=WAIT)
        assert reply.status_code == 503 and reply.json()["status"] == "engine_stopped"
