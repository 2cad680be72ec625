"""Chat messages as ids, shared by `gpt chat`, `gpt serve` and chat training data.

`chat_prompt` gives the ids a model writes its reply after; `conversation_ids` gives a whole
conversation's ids for training, with a mask on what the assistant wrote. Three layouts:

- The built-in ChatML layout of a tokenizer with the turn boundaries as ids (`ChatTokenizer`,
  what `with_chat_tokens` gives gpt's own tokenizers): `<|im_start|>{role}\\n{content}<|im_end|>\\n`
  per message, and `<|im_start|>assistant\\n` before a reply. The boundaries are put in as ids
  and the text between them is encoded as text, so a message that holds the string
  "<|im_start|>" never yields the id. The ids are those HF's `apply_chat_template` gives for
  the same template (`CHATML_TEMPLATE`, which `gpt export` writes) on the exported tokenizer.
- A model with a chat template (an imported HF tokenizer's Jinja `chat_template`) gets its own
  layout, rendered as transformers renders it (`apply_chat_template(...,
  add_generation_prompt=True)`) and encoded with the template's special tokens as their ids, so
  the ids are HF's.
- Any other model gets the plain layout, suited to a model trained on plain text:

    System: You are brief.

    User: Hello

    Assistant: Hi there.

    User: How are you?

    Assistant:

  Each message is `Role: content` (content stripped of surrounding whitespace), messages are
  separated by a blank line, and the prompt ends with `Assistant:`; the reply ends at the next
  `\\n\\nUser:` (or the end-of-text id). A tokenizer with a beginning-of-text id (Llama's <s>)
  puts it first, as `gpt sample` does; a template writes its own.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping, Sequence
from typing import Any

from gpt.errors import GPTError, first_line
from gpt.tokenizer import CHAT_TOKENS, ChatTokenizer, HFTokenizer, Tokenizer

ROLES = {"system": "System", "user": "User", "assistant": "Assistant"}  # role -> plain label
PLAIN_SEPARATOR = "\n\n"
PLAIN_STOP = PLAIN_SEPARATOR + ROLES["user"] + ":"  # where the plain layout's next turn begins
REPLY_MARK = "GPTREPLYMARK"  # an assistant message whose rendering shows what follows a reply


def chat_prompt(tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]) -> list[int]:
    """The ids of `messages` laid out for `tokenizer`'s model, ending where the assistant's
    reply begins: the built-in layout or its chat template where it has one, else the plain
    layout."""
    checked = check_messages(messages)
    if isinstance(tokenizer, ChatTokenizer):
        return _chatml_ids(tokenizer, checked, add_generation_prompt=True)[0]
    if _has_template(tokenizer):
        return tokenizer.encode_with_special_tokens(render(tokenizer, checked))
    ids = tokenizer.encode(plain_text(checked))
    return ids if tokenizer.bos_id is None else [tokenizer.bos_id, *ids]


def conversation_ids(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, str]]
) -> tuple[list[int], list[int]]:
    """The ids of a whole conversation laid out with the tokenizer's template (no generation
    prompt after its last message), and a 0/1 mask of the same length: 1 on the tokens of each
    assistant message and on its end-of-turn token, what a model is trained to write."""
    checked = check_messages(messages)
    if isinstance(tokenizer, ChatTokenizer):
        return _chatml_ids(tokenizer, checked, add_generation_prompt=False)
    if _has_template(tokenizer):
        return _template_ids(tokenizer, checked)
    raise GPTError(
        f"the {tokenizer.name!r} tokenizer has no chat layout to train on: give "
        "with_chat_tokens(tokenizer), which adds ChatML's turn boundaries"
    )


def chat_stops(tokenizer: Tokenizer) -> list[str]:
    """Stop strings that end an assistant's turn: the plain layout's next-turn marker, or the
    token a chat template writes right after an assistant message (ChatML's <|im_end|>),
    if any. Generation also stops at the end-of-text id."""
    if isinstance(tokenizer, ChatTokenizer):
        return [CHAT_TOKENS[1]]
    if not _has_template(tokenizer):
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


def _has_template(tokenizer: Tokenizer) -> bool:
    return isinstance(tokenizer, HFTokenizer) and tokenizer.chat_template is not None


def _chatml_ids(
    tokenizer: ChatTokenizer, messages: list[dict[str, str]], add_generation_prompt: bool
) -> tuple[list[int], list[int]]:
    """The built-in layout's ids and assistant mask. Each message's role and content are
    encoded together, as HF encodes the text between two special tokens; the mask starts
    where the content's tokens part from the role's alone."""
    start, end = tokenizer.chat_ids
    newline = tokenizer.encode("\n")
    ids: list[int] = []
    mask: list[int] = []
    for message in messages:
        header = tokenizer.encode(f"{message['role']}\n")
        body = tokenizer.encode(f"{message['role']}\n{message['content']}")
        content = len(body) - _common_prefix(header, body)
        reply = int(message["role"] == "assistant")
        ids += [start, *body, end, *newline]
        mask += [0] * (1 + len(body) - content) + [reply] * (content + 1) + [0] * len(newline)
    if add_generation_prompt:
        ids += [start, *tokenizer.encode("assistant\n")]
    return ids, mask


def _template_ids(
    tokenizer: HFTokenizer, messages: list[dict[str, str]]
) -> tuple[list[int], list[int]]:
    """A chat template's ids of a whole conversation and its assistant mask, found as TRL's
    assistant-only loss finds it: each assistant message's tokens are those between the
    rendering of the conversation before it (with the generation prompt) and the rendering up
    to it, cut after the template's end-of-turn token."""
    text = render(tokenizer, messages, add_generation_prompt=False)
    ids = tokenizer.encode_with_special_tokens(text)
    mask = [0] * len(ids)
    stops = chat_stops(tokenizer)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(tokenizer, messages[:i], add_generation_prompt=True)
        upto = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (text.startswith(before) and text.startswith(upto) and len(before) <= len(upto)):
            raise GPTError(
                f"the model's chat template renders the conversation up to message {i} other "
                "than the start of the whole, so the assistant's tokens cannot be found; train "
                "on conversations that end with this assistant message"
            )
        if stops and (at := upto.rfind(stops[0], len(before))) >= 0:
            upto = upto[: at + len(stops[0])]  # what follows the end of the turn is not the reply
        first = _common_prefix(tokenizer.encode_with_special_tokens(before), ids)
        last = _common_prefix(tokenizer.encode_with_special_tokens(upto), ids)
        mask[first:last] = [1] * (last - first)
    return ids, mask


def _common_prefix(a: list[int], b: list[int]) -> int:
    """How many ids `a` and `b` start with alike."""
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


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
