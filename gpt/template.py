"""Chat messages as the ids a model writes its reply after, shared by `gpt chat` and `gpt serve`.

A model with a chat template (an imported HF tokenizer's Jinja `chat_template`) gets its own
layout, rendered as transformers renders it (`apply_chat_template(..., add_generation_prompt=True)`)
and encoded with the template's special tokens as their ids, so the ids are HF's. Any other
model gets the plain layout, suited to a model trained on plain text:

    System: You are brief.

    User: Hello

    Assistant: Hi there.

    User: How are you?

    Assistant:

Each message is `Role: content` (content stripped of surrounding whitespace), messages are
separated by a blank line, and the prompt ends with `Assistant:`; the reply ends at the next
`\\n\\nUser:` (or the end-of-text id). A tokenizer with a beginning-of-text id (Llama's <s>) puts
it first, as `gpt sample` does; a template writes its own.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from gpt.errors import GPTError, first_line
from gpt.tokenizer import HFTokenizer, Tokenizer

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}  # role -> plain label
PLAIN_SEPARATOR = "\n\n"
PLAIN_STOP = PLAIN_SEPARATOR + ROLES["user"] + ":"  # where the plain layout's next turn begins
REPLY_MARK = "GPTREPLYMARK"  # an assistant message whose rendering shows what follows a reply


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The ids of `messages` laid out for `tokenizer`'s model, ending where the assistant's
    reply begins: its chat template where it has one, else the plain layout."""
    checked = check_messages(messages)
    if isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template is not None:
        return tokenizer.encode_with_special_tokens(render(tokenizer, checked))
    ids = tokenizer.encode(plain_text(checked))
    return ids if tokenizer.bos_id is None else [tokenizer.bos_id, *ids]


def chat_stops(tokenizer: Tokenizer) -> list[str]:
    """Stop strings that end an assistant's turn: the plain layout's next-turn marker, or the
    token a chat template writes right after an assistant message (ChatML's <|im_end|>),
    if any. Generation also stops at the end-of-text id."""
    if not (isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template is not None):
        return [PLAIN_STOP]
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": REPLY_MARK}]
    try:
        text = render(tokenizer, messages, add_generation_prompt=False)
    except GPTError:  # a template that refuses this conversation: the end-of-text id alone
        return []
    at = text.rfind(REPLY_MARK)
    after = text[at + len(REPLY_MARK):].lstrip() if at >= 0 else ""
    added = tokenizer.backend.get_added_tokens_decoder().values()
    ends = sorted((t.content for t in added if after.startswith(t.content)), key=len)
    return ends[-1:]  # the longest added token that starts what follows


def plain_text(messages: Sequence[Mapping[str, str]]) -> str:
    """The plain layout of checked `messages`, ending with the assistant's label."""
    turns = [f"{ROLES[m['role']]}: {m['content'].strip()}" for m in messages]
    return PLAIN_SEPARATOR.join([*turns, f"{ROLES['assistant']}:"])


def check_messages(messages: Sequence[Mapping[str, str]]) -> list[dict[str, str]]:
    """`messages` as plain dicts of role and content, or a GPTError naming the first bad one."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise GPTError("a chat needs at least one message: give a list of {role, content}")
    checked = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise GPTError(f"message {i} is not a {{role, content}} object; give one")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise GPTError(
                f"message {i} has role {role!r}; use one of {', '.join(ROLES)}"
            )
        if not isinstance(content, str):
            raise GPTError(
                f"message {i} has content of type {type(content).__name__}; give it as text"
            )
        checked.append({"role": role, "content": content})
    return checked


def render(
    tokenizer: HFTokenizer, messages: list[dict[str, str]], add_generation_prompt: bool = True
) -> str:
    """`messages` rendered by the tokenizer's chat template, as transformers renders it: its
    special tokens' strings (bos_token, eos_token, ...) are variables of the template."""
    template = _compile(tokenizer.chat_template or "")
    variables = {k: v for k, v in tokenizer.special_tokens.items() if v is not None}
    extra = tokenizer.config.get("extra_special_tokens")
    if isinstance(extra, dict):  # named extra tokens are variables too
        variables.update({str(k): str(v) for k, v in extra.items()})
    try:
        return template.render(
            messages=messages, tools=None, documents=None,
            add_generation_prompt=add_generation_prompt, **variables,
        )
    except Exception as e:  # the template's own raise_exception, or any failure of its code
        raise GPTError(
            f"the model's chat template refused these messages ({first_line(e)}); change the "
            "messages (many templates want user and assistant turns alternating)"
        ) from None


@functools.lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    """The Jinja template in the sandbox transformers renders chat templates in (they come
    with models, so they are not trusted), with its helpers."""
    try:
        import jinja2
        import jinja2.ext
        import jinja2.nodes
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise GPTError("chat templates need jinja2: pip install 'jinja2>=3.1.6'") from None

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any, ensure_ascii: bool = False, indent: int | None = None,
        separators: Any = None, sort_keys: bool = False,
    ) -> str:
        """As transformers' tojson: no HTML escaping, unlike Jinja's own."""
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(format: str) -> str:
        import datetime

        return datetime.datetime.now().strftime(format)

    class Generation(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}`, which marks the assistant's text for
        transformers' training masks, renders its body unchanged."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(
                lineno
            )

        def _body(self, caller: Any) -> str:
            return caller()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now)
    try:
        return env.from_string(template)
    except jinja2.exceptions.TemplateError as e:
        raise GPTError(
            f"the model's chat template does not compile ({first_line(e)}); fix chat_template "
            "in its tokenizer_config.json and import the model again"
        ) from None
