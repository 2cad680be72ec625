"""OpenAI's API, as shapes: a request's JSON checked into a `Generation` (what to generate),
and the responses, stream chunks and errors written the way OpenAI writes them.

No web framework here: every check is a plain function of the decoded body, so each error is
one `APIError` naming the field and the fix, which the app turns into OpenAI's error JSON.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpt.errors import GPTError
from gpt.tokenizer import Tokenizer

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STOPS = 4  # OpenAI's limit on `stop`
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


class APIError(Exception):
    """A request the server refuses: an HTTP status and OpenAI's error object."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status, message, param, type, code)

    def body(self) -> dict[str, Any]:
        """`{"error": {"message", "type", "param", "code"}}`, as OpenAI sends it."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass(frozen=True)
class Limits:
    """What one request may ask of this server ([serve] keys, resolved against the engine)."""

    model: str  # the one model name served
    context: int  # prompt and completion tokens of one sequence together
    max_tokens: int  # the most new tokens one sequence may ask for (<= context)
    default_max_tokens: int  # when a request gives none (less where the context has less room)
    max_sequences: int  # prompts times n of one request
    max_batch: int  # sequences the engine decodes together
    max_body_bytes: int  # the largest request body
    max_in_flight: int  # API requests answered at once


@dataclass(frozen=True)
class Generation:
    """A request, checked: the prompts as ids and the sampling settings of each sequence."""

    prompts: list[list[int]]  # each prompt's ids; each is generated n times
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int | None
    seed: int | None
    stop: list[str]  # text that ends a sequence (the text ends before it)
    n: int
    stream: bool
    include_usage: bool  # stream: a last chunk with the usage

    @property
    def prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)


# ---------------------------------------------------------------------------------------------
# The body


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object: UTF-8, valid JSON (no NaN), an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise APIError(400, f"the request body is not UTF-8 (byte 0x{raw[e.start]:02x} at "
                            f"position {e.start}); send JSON encoded as UTF-8",
                       code="invalid_encoding") from None
    if not text.strip():
        raise APIError(400, "the request body is empty; send a JSON object, for example "
                            '{"prompt": "Hello", "max_tokens": 16}', code="invalid_json")

    def no_constant(name: str) -> None:
        raise ValueError(f"{name} is not JSON")

    try:
        body = json.loads(text, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise APIError(400, f"the request body is not valid JSON ({e.msg} at line {e.lineno}, "
                            f"column {e.colno}); send a JSON object", code="invalid_json") from None
    except (ValueError, RecursionError) as e:
        why = "nested too deeply" if isinstance(e, RecursionError) else str(e)
        raise APIError(400, f"the request body is not valid JSON ({why}); send a JSON object",
                       code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body is JSON {_json_type(body)}, not an object; send "
                            'an object, for example {"prompt": "Hello"}', code="invalid_json")
    return body


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def shown(value: Any) -> str:
    """`value` as JSON, cut to 40 characters: an error message never repeats a whole body."""
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 40 else text[:40] + "..."


def _bad_type(param: str, expected: str, value: Any) -> APIError:
    return APIError(400, f"'{param}' must be {expected}, got {_json_type(value)} "
                         f"({shown(value)}); send {expected}", param, code="invalid_type")


def _bad_value(param: str, problem: str) -> APIError:
    return APIError(400, f"'{param}' {problem}", param, code="invalid_value")


# ---------------------------------------------------------------------------------------------
# Fields


def _int(body: Mapping[str, Any], key: str, low: int, high: int, default: int | None,
         fix: str = "") -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # 16.0 from a client that writes every number as a float
    if not isinstance(value, int) or isinstance(value, bool):
        raise _bad_type(key, "an integer", value)
    if not low <= value <= high:
        raise _bad_value(key, f"is {shown(value)}, outside [{low}, {high}]; "
                              f"{fix or 'send a value in it'}")
    return value


def _number(body: Mapping[str, Any], key: str, low: float, high: float, default: float,
            low_open: bool = False, fix: str = "") -> float:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise _bad_type(key, "a number", value)
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer of hundreds of digits: no float holds it
        finite = False
    if not finite or not (low < value if low_open else low <= value) or value > high:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise _bad_value(key, f"is {shown(value)}, outside {interval}; "
                              f"{fix or 'send a value in it'}")
    return float(value)


def _bool(body: Mapping[str, Any], key: str, default: bool) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad_type(key, "true or false", value)
    return value


def _text(value: Any, param: str) -> str:
    """A string that is valid Unicode (JSON can carry a lone surrogate such as \\ud800)."""
    if not isinstance(value, str):
        raise _bad_type(param, "a string", value)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _bad_value(param, f"holds an unpaired surrogate (U+{ord(value[e.start]):04X} at "
                                f"character {e.start}); send valid Unicode text") from None
    return value


# Fields of OpenAI's API this server has no use for: accepted at their neutral values only,
# so that a client sending a default works and one asking for the feature hears it is missing.
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "user": lambda v: v is None or isinstance(v, str),
    "presence_penalty": lambda v: v in (None, 0),
    "frequency_penalty": lambda v: v in (None, 0),
    "logit_bias": lambda v: v in (None, {}),
    "logprobs": lambda v: v in (None, False, 0),
    "top_logprobs": lambda v: v in (None, 0),
    "echo": lambda v: v in (None, False),
    "best_of": lambda v: v in (None, 1),
    "suffix": lambda v: v in (None, ""),
    "tools": lambda v: v in (None, []),
    "tool_choice": lambda v: v in (None, "none", "auto"),
    "parallel_tool_calls": lambda v: v is None or isinstance(v, bool),
    "response_format": lambda v: v is None or v == {"type": "text"},
    "store": lambda v: v in (None, False),
    "metadata": lambda v: v is None or isinstance(v, dict),
}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
          "stream_options"}
COMPLETION_FIELDS = COMMON | {"prompt"}
CHAT_FIELDS = COMMON | {"messages", "max_completion_tokens"}


def _check_fields(body: Mapping[str, Any], known: set[str]) -> None:
    for key, value in body.items():
        if key in NEUTRAL:
            if not NEUTRAL[key](value):
                raise APIError(400, f"'{key}' is not supported by this server (got "
                                    f"{shown(value)}); remove it", key, code="unsupported_value")
        elif key not in known:
            allowed = ", ".join(sorted(known))
            raise APIError(400, f"unrecognized request argument '{key}'; remove it (this "
                                f"endpoint takes {allowed})", key, code="unknown_parameter")


def check_model(body: Mapping[str, Any], model: str) -> None:
    """`model`, when given, names the model served: no request can name another model, a file
    or a checkpoint."""
    value = body.get("model")
    if value is None:
        return
    if not isinstance(value, str):
        raise _bad_type("model", "a string", value)
    if value != model:
        raise APIError(404, f"the model '{shown(value)[1:-1]}' does not exist; this server "
                            f"serves '{model}' (GET /v1/models)", "model",
                       code="model_not_found")


def _stops(body: Mapping[str, Any]) -> list[str]:
    value = body.get("stop")
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list):
        raise _bad_type("stop", "a string or a list of strings", value)
    if len(stops) > MAX_STOPS:
        raise _bad_value("stop", f"has {len(stops)} strings; send at most {MAX_STOPS}")
    for i, stop in enumerate(stops):
        param = "stop" if isinstance(value, str) else f"stop[{i}]"
        if _text(stop, param) == "":
            raise _bad_value(param, "is an empty string; remove it or give some text")
    return stops


def _n(body: Mapping[str, Any], prompts: int, limits: Limits) -> int:
    """Choices per prompt, with prompts times n within the sequences one request may ask for."""
    n = _int(body, "n", 1, limits.max_sequences, 1,
             f"this server generates at most {limits.max_sequences} sequences per request")
    assert n is not None
    if prompts * n > limits.max_sequences:
        raise _bad_value("n", f"is {n} for {prompts} prompts: {prompts * n} sequences, more "
                              f"than the {limits.max_sequences} this server generates per "
                              "request; lower n or send fewer prompts")
    return n


def _sampling(body: Mapping[str, Any], prompts: list[list[int]], n: int, param: str,
              limits: Limits, max_tokens_key: str, stop: list[str]) -> Generation:
    """The settings every endpoint shares, checked, and the prompts checked against the context."""
    max_tokens = _int(body, max_tokens_key, 1, INT64_MAX, None)
    if max_tokens is not None and max_tokens > limits.max_tokens:
        raise _bad_value(max_tokens_key, f"is {shown(max_tokens)}, more than the "
                                         f"{limits.max_tokens} this server allows; ask for at "
                                         f"most {limits.max_tokens}")
    longest = max(len(p) for p in prompts)
    room = limits.context - longest
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = f"{longest + (max_tokens or 1)} tokens ({longest} in the {param}, " \
                f"{max_tokens or 1} in the completion)"
        fix = (f"shorten the {param}" if room < 1
               else f"reduce the length of the {param} or {max_tokens_key} (at most {room})")
        raise APIError(400, f"This model's maximum context length is {limits.context} tokens. "
                            f"However, you requested {asked}. Please {fix}.", param,
                       code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(limits.default_max_tokens, limits.max_tokens, room)
    stream = _bool(body, "stream", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not stream:
            raise _bad_value("stream_options", "is only allowed with \"stream\": true; remove "
                                               "it or set stream")
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise _bad_type("stream_options", 'an object {"include_usage": true|false}', options)
        include_usage = _bool(options, "include_usage", False)
    top_k = _int(body, "top_k", 1, INT64_MAX, None)
    return Generation(
        prompts=prompts, max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.0, 2.0, 1.0, fix="send one in [0, 2] (0 = "
                                                                     "greedy)"),
        top_p=_number(body, "top_p", 0.0, 1.0, 1.0, low_open=True, fix="send one in (0, 1] "
                                                                       "(1 = off)"),
        top_k=top_k, seed=_int(body, "seed", INT64_MIN, INT64_MAX - limits.max_sequences, None),
        stop=stop, n=n, stream=stream, include_usage=include_usage,
    )


# ---------------------------------------------------------------------------------------------
# The two endpoints' requests


def parse_completion(body: Mapping[str, Any], tokenizer: Tokenizer, limits: Limits,
                     prompt_ids: Callable[[Tokenizer, str], list[int]]) -> Generation:
    """POST /v1/completions: `prompt` is a string, a list of strings, a list of token ids or a
    list of lists of them."""
    _check_fields(body, COMPLETION_FIELDS)
    check_model(body, limits.model)
    if "prompt" not in body:
        raise APIError(400, "'prompt' is missing; send the text to continue, for example "
                            '"prompt": "Once upon a time"', "prompt", code="missing_required")
    items = _prompt_list(body["prompt"])
    n = _n(body, len(items), limits)  # before encoding: 90,000 prompts are refused at once
    prompts = [_prompt(item, param, tokenizer, prompt_ids) for param, item in items]
    return _sampling(body, prompts, n, "prompt", limits, "max_tokens", _stops(body))


def _prompt_list(value: Any) -> list[tuple[str, Any]]:
    """One prompt or several, each with its name in errors: a string, ids, or a list of
    either."""
    if isinstance(value, str):
        return [("prompt", value)]
    if not isinstance(value, list):
        raise _bad_type("prompt", "a string, a list of strings or a list of token ids", value)
    if not value:
        raise _bad_value("prompt", "is an empty list; send a string or a non-empty list")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [("prompt", value)]  # one prompt given as ids
    return [(f"prompt[{i}]", item) for i, item in enumerate(value)]


def _prompt(item: Any, param: str, tokenizer: Tokenizer,
            prompt_ids: Callable[[Tokenizer, str], list[int]]) -> list[int]:
    if isinstance(item, list):
        if not item:
            raise _bad_value(param, "is an empty list of token ids; send at least one id")
        for i, token in enumerate(item):
            if not isinstance(token, int) or isinstance(token, bool):
                raise _bad_type(f"{param}[{i}]", "a token id (an integer)", token)
            if not 0 <= token < tokenizer.vocab_size:
                raise _bad_value(f"{param}[{i}]", f"is {shown(token)}, not a token id of this "
                                                  f"model; send ids in [0, "
                                                  f"{tokenizer.vocab_size - 1}]")
        return list(item)
    try:
        return prompt_ids(tokenizer, _text(item, param))
    except GPTError as e:
        raise _bad_value(param, f"cannot be encoded: {e}") from None


def parse_chat(body: Mapping[str, Any], tokenizer: Tokenizer, limits: Limits,
               chat_prompt: Callable[[Tokenizer, Sequence[Mapping[str, str]]], list[int]],
               chat_stops: list[str]) -> Generation:
    """POST /v1/chat/completions: `messages` rendered with the model's chat template; a turn
    also ends at the template's own end-of-turn text."""
    _check_fields(body, CHAT_FIELDS)
    check_model(body, limits.model)
    if "max_tokens" in body and "max_completion_tokens" in body:
        raise _bad_value("max_tokens", "and 'max_completion_tokens' are both given; send one")
    messages = _messages(body.get("messages"))
    try:
        prompt = chat_prompt(tokenizer, messages)
    except GPTError as e:
        raise _bad_value("messages", f"cannot be rendered: {e}") from None
    key = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
    stop = _stops(body)
    return _sampling(body, [prompt], _n(body, 1, limits), "messages", limits, key,
                     stop + [s for s in chat_stops if s not in stop])


def _messages(value: Any) -> list[dict[str, str]]:
    """[{"role", "content"}] with text content: a string, or a list of text parts."""
    if value is None:
        raise APIError(400, "'messages' is missing; send a list such as [{\"role\": \"user\", "
                            "\"content\": \"Hello\"}]", "messages", code="missing_required")
    if not isinstance(value, list):
        raise _bad_type("messages", "a list of messages", value)
    if not value:
        raise APIError(400, "'messages' is empty; send at least one message, such as "
                            "{\"role\": \"user\", \"content\": \"Hello\"}", "messages",
                       code="empty_array")
    messages = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _bad_type(where, 'an object {"role": ..., "content": ...}', message)
        extra = set(message) - {"role", "content", "name"}
        if extra:
            raise _bad_value(where, f"has {', '.join(sorted(extra))}, which this server does not "
                                    "support; send only role and content")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list or an object is unhashable
            raise _bad_value(f"{where}.role", f"is {shown(role)}; use one of "
                                              + ", ".join(f'"{r}"' for r in ROLES))
        messages.append({"role": ROLES[role],
                         "content": _content(message.get("content"), f"{where}.content")})
    return messages


def _content(value: Any, param: str) -> str:
    if isinstance(value, list):  # content parts: only text ones
        texts = []
        for j, part in enumerate(value):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _bad_value(f"{param}[{j}]", "is not a text part; this model reads only "
                                                  '{"type": "text", "text": ...} parts')
            texts.append(_text(part.get("text"), f"{param}[{j}].text"))
        return "".join(texts)
    return _text(value, param)


# ---------------------------------------------------------------------------------------------
# Responses


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_response(request_id: str, model: str, created: int, texts: list[str],
                        finishes: list[str], chat: bool, usage_: dict[str, int]) -> dict[str, Any]:
    """The whole reply of a request that did not stream."""
    if chat:
        choices = [{"index": i, "message": {"role": "assistant", "content": text},
                    "logprobs": None, "finish_reason": finish}
                   for i, (text, finish) in enumerate(zip(texts, finishes, strict=True))]
    else:
        choices = [{"index": i, "text": text, "logprobs": None, "finish_reason": finish}
                   for i, (text, finish) in enumerate(zip(texts, finishes, strict=True))]
    return {"id": request_id, "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": model, "choices": choices, "usage": usage_}


def chunk(request_id: str, model: str, created: int, chat: bool, index: int, text: str | None,
          finish: str | None, role: bool = False) -> dict[str, Any]:
    """One server-sent event of a stream: new text of one choice, or its finish reason."""
    if chat:
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if text is not None:
            delta["content"] = text
        choice: dict[str, Any] = {"index": index, "delta": delta, "logprobs": None,
                                  "finish_reason": finish}
    else:
        choice = {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [choice]}


def usage_chunk(request_id: str, model: str, created: int, chat: bool,
                usage_: dict[str, int]) -> dict[str, Any]:
    """The last event of a stream asked for with stream_options.include_usage."""
    return {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage_}


def sse(data: Mapping[str, Any] | str) -> bytes:
    """One server-sent event: `data: JSON` and a blank line."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n".encode()


def models(model: str, created: int) -> dict[str, Any]:
    """GET /v1/models: the one model served."""
    return {"object": "list", "data": [model_card(model, created)]}


def model_card(model: str, created: int) -> dict[str, Any]:
    return {"id": model, "object": "model", "created": created, "owned_by": "gpt"}


def now() -> int:
    return int(time.time())
