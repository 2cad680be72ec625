"""Chat templates shared by gpt chat, gpt serve and chat training: the plain layout's exact text
and ids, the built-in ChatML layout's ids and masks checked by hand, and an HF chat template's
ids and masks equal to transformers' `apply_chat_template` (tokenizer folders written here,
offline)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jinja2
import pytest
import torch

transformers = pytest.importorskip("transformers")
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from gpt import checkpoint as ckpt  # noqa: E402
from gpt.config import ModelConfig, RunConfig, to_dict  # noqa: E402
from gpt.errors import GPTError  # noqa: E402
from gpt.hf.tokenizers import save_hf_tokenizer, tokenizer_record_from_folder  # noqa: E402
from gpt.model import GPT  # noqa: E402
from gpt.parallel import Dist  # noqa: E402
from gpt.sample import load_for_inference  # noqa: E402
from gpt.template import chat_prompt, chat_stops, conversation_ids  # noqa: E402
from gpt.tokenizer import (  # noqa: E402
    BPETokenizer,
    CharTokenizer,
    ChatTokenizer,
    HFTokenizer,
    get_tokenizer,
    same_tokenizer,
    tokenizer_from_dict,
    with_chat_tokens,
)

MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": " Hi! 🙂 "},
    {"role": "user", "content": "  What is the world?\n"},
]
PLAIN = (
    "System: Be brief.\n\nUser: Hello there\n\nAssistant: Hi! 🙂\n\n"
    "User: What is the world?\n\nAssistant:"
)
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' "
    "+ '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2 = (  # Llama 2's own: bos written by the template, alternation enforced, eos after a reply
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system = '<<SYS>>\n' + messages[0]['content'] + '\n<</SYS>>\n\n' %}{% else %}"
    "{% set loop_messages = messages %}{% set system = '' %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 %}{% set content = system + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + content | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + content | trim + ' ' + eos_token }}{% endif %}{% endfor %}"
)
# block whitespace (trim_blocks, lstrip_blocks), namespace, loop controls, tojson without HTML
# escaping, transformers' {% generation %} tag
FANCY = """{%- set ns = namespace(n=0) -%}
{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% set ns.n = ns.n + 1 %}
        {% continue %}
    {% endif %}
    <|im_start|>{{ m['role'] }} {{ m['content'] | tojson }}
    {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant ({{ ns.n }} system, <b>&</b>)
{% endif %}"""
# Llama 3's own, with transformers' {% generation %} marks around what the assistant writes
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{{ (bos_token if loop.index0 == 0 else '') + '<|start_header_id|>' + message['role'] "
    "+ '<|end_header_id|>\n\n' }}{% if message['role'] == 'assistant' %}{% generation %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}{% else %}"
    "{{ message['content'] | trim + '<|eot_id|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)
LLAMA3_TOKENS = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
SPECIALS = ("<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
CONVERSATION = [*MESSAGES, {"role": "assistant", "content": "Fine, <|im_end|> thanks."}]


def tokenizer_folder(
    tmp_path: Path, template: str | None, where: str = "config", add_bos: bool = False,
    tokens: dict[str, str] | None = None, specials: tuple[str, ...] = SPECIALS,
) -> Path:
    """A byte-level BPE trained here, saved as an HF model's tokenizer files by hand: its
    tokenizer.json, and a tokenizer_config.json holding the chat template as a string (`config`),
    as a list of named templates (`list`), or beside it in chat_template.jinja (`jinja`)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = " ".join(m["content"] for m in CONVERSATION) + " system user assistant INST SYS"
    backend.train_from_iterator([text] * 3, trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))],
        )
    folder = tmp_path / f"tok-{where}-{add_bos}-{bool(tokens)}-{len(specials)}"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        **(tokens or {}),
    }
    if template is not None and where == "config":
        config["chat_template"] = template
    elif template is not None and where == "list":
        config["chat_template"] = [{"name": "tool_use", "template": "{{ raise_exception('no') }}"},
                                   {"name": "default", "template": template}]
    elif template is not None:
        (folder / "chat_template.jinja").write_text(template)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def imported(folder: Path) -> HFTokenizer:
    record = tokenizer_record_from_folder(folder, "tiny-chat")
    assert record is not None
    tokenizer = tokenizer_from_dict(json.loads(json.dumps(record)))  # as a checkpoint holds it
    assert isinstance(tokenizer, HFTokenizer)
    return tokenizer


def hf_ids(folder: Path, messages: list[dict[str, str]], template: str | None = None
           ) -> list[int]:
    """transformers' ids for `messages`, with the folder's template or `template` given
    outright (transformers before 4.50 does not read chat_template.jinja)."""
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    try:
        return list(hf.apply_chat_template(
            messages, chat_template=template, tokenize=True, add_generation_prompt=True,
            return_dict=False,
        ))
    except jinja2.TemplateSyntaxError as e:  # {% continue %} needs a newer transformers
        pytest.skip(f"this transformers cannot render the template: {e}")


def test_plain_layout_text_and_ids() -> None:
    gpt2 = get_tokenizer("gpt2")
    assert gpt2.chat_template is None
    assert chat_prompt(gpt2, MESSAGES) == gpt2.encode(PLAIN)
    assert gpt2.decode(chat_prompt(gpt2, MESSAGES)) == PLAIN
    assert chat_prompt(gpt2, MESSAGES[1:2]) == gpt2.encode("User: Hello there\n\nAssistant:")
    char = CharTokenizer(PLAIN)
    assert char.decode(chat_prompt(char, MESSAGES)) == PLAIN
    assert chat_stops(gpt2) == chat_stops(char) == ["\n\nUser:"]


def test_plain_layout_starts_with_the_bos_a_tokenizer_puts_before_text(tmp_path: Path) -> None:
    """An HF tokenizer without a template (a base Llama) gets the plain layout after its <s>,
    as HF's tokenizer(text) gives it."""
    folder = tokenizer_folder(tmp_path, None, add_bos=True)
    ours = imported(folder)
    assert ours.chat_template is None
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    assert chat_prompt(ours, MESSAGES) == hf(PLAIN)["input_ids"]
    assert chat_prompt(ours, MESSAGES)[0] == ours.bos_id
    assert chat_stops(ours) == ["\n\nUser:"]


@pytest.mark.parametrize("where", ["config", "list", "jinja"])
@pytest.mark.parametrize("template", ["chatml", "llama2", "llama3", "fancy"])
@pytest.mark.parametrize("add_bos", [False, True])
def test_hf_template_ids_are_transformers_ids(
    template: str, where: str, add_bos: bool, tmp_path: Path
) -> None:
    text = {"chatml": CHATML, "llama2": LLAMA2, "llama3": LLAMA3, "fancy": FANCY}[template]
    tokens = LLAMA3_TOKENS if template == "llama3" else None
    folder = tokenizer_folder(tmp_path, text, where, add_bos, tokens)
    ours = imported(folder)
    assert ours.chat_template == text
    for messages in (MESSAGES, MESSAGES[1:2], MESSAGES[:2]):
        ids = chat_prompt(ours, messages)
        assert ids == hf_ids(folder, messages, text)
        bos = ours.backend.token_to_id(ours.special_tokens["bos_token"])
        assert ids.count(bos) == (template in ("llama2", "llama3"))  # the template's, once


def test_hf_template_special_tokens_are_ids_and_stops(tmp_path: Path) -> None:
    ours = imported(tokenizer_folder(tmp_path, CHATML))
    start, end = (ours.backend.token_to_id(t) for t in ("<|im_start|>", "<|im_end|>"))
    ids = chat_prompt(ours, MESSAGES)
    assert ids.count(start) == 5 and ids.count(end) == 4
    assert ours.decode(ids).endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert chat_stops(ours) == ["<|im_end|>"]
    assert chat_stops(imported(tokenizer_folder(tmp_path, LLAMA2, "jinja"))) == ["</s>"]
    assert chat_stops(imported(tokenizer_folder(tmp_path, FANCY, "list"))) == ["<|im_end|>"]


def test_template_is_written_back_by_export(tmp_path: Path) -> None:
    ours = imported(tokenizer_folder(tmp_path, CHATML))
    save_hf_tokenizer(ours.to_dict(), tmp_path / "export", model_max_length=64)
    assert chat_prompt(ours, MESSAGES) == hf_ids(tmp_path / "export", MESSAGES)


BAD_MESSAGES = [
    ([], "at least one message"),
    ("Hello", "at least one message"),
    (["Hello"], "message 0 is not"),
    ([{"content": "Hi"}], "message 0 has role None"),
    ([{"role": "user", "content": "Hi"}, {"role": "robot", "content": "Hi"}],
     "message 1 has role 'robot'; use one of system, user, assistant"),
    ([{"role": "user", "content": None}], "message 0 has content of type NoneType"),
    ([{"role": "user", "content": ["Hi"]}], "message 0 has content of type list"),
]


@pytest.mark.parametrize(("messages", "message"), BAD_MESSAGES)
def test_bad_messages_are_one_line_errors(
    messages: Any, message: str, tmp_path: Path
) -> None:
    for tokenizer in (get_tokenizer("gpt2"), imported(tokenizer_folder(tmp_path, CHATML))):
        with pytest.raises(GPTError, match=message) as e:
            chat_prompt(tokenizer, messages)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize(("template", "messages", "message"), [
    (LLAMA2, [MESSAGES[1], MESSAGES[1]], r"refused these messages \(Conversation roles must alt"),
    ("{{ ''.__class__.__mro__ }}", MESSAGES, "refused these messages"),  # the sandbox holds
    ("{% set x = messages.append(1) %}", MESSAGES, "refused these messages"),  # immutable
    ("{% for m in messages %}", MESSAGES, "does not compile"),
])
def test_template_errors_are_one_line_errors(
    template: str, messages: list[dict[str, str]], message: str, tmp_path: Path
) -> None:
    ours = imported(tokenizer_folder(tmp_path, template))
    with pytest.raises(GPTError, match=message) as e:
        chat_prompt(ours, messages)
    assert "\n" not in str(e.value)


def test_named_templates_without_a_default_are_refused(tmp_path: Path) -> None:
    record = imported(tokenizer_folder(tmp_path, CHATML)).to_dict()
    record["config"]["chat_template"] = {"tool_use": CHATML}
    with pytest.raises(GPTError, match="none named 'default'"):
        chat_prompt(tokenizer_from_dict(record), MESSAGES)


def test_template_is_not_part_of_the_tokenizer_identity(tmp_path: Path) -> None:
    """Two tokenizers that give the same ids are one, whatever their chat templates."""
    record = imported(tokenizer_folder(tmp_path, CHATML)).to_dict()
    other = {**record, "config": {**record["config"], "chat_template": LLAMA2}}
    bare = {**record, "config": {k: v for k, v in record["config"].items() if k != "chat_template"}}
    assert same_tokenizer(record, other) and same_tokenizer(record, bare)
    assert not same_tokenizer(record, {**record, "special_tokens": {"eos_token": "<s>"}})
    assert same_tokenizer({"name": "gpt2"}, {"name": "gpt2"})
    assert not same_tokenizer({"name": "gpt2"}, record)


@pytest.mark.parametrize("kind", ["gpt2", "hf"])
def test_checkpoint_written_before_templates_loads(kind: str, tmp_path: Path) -> None:
    """A checkpoint whose tokenizer record has no chat template (as every one written before
    templates were used) loads, and chats in the plain layout."""
    record = {"name": "gpt2"}
    if kind == "hf":
        record = imported(tokenizer_folder(tmp_path, None, add_bos=True)).to_dict()
        record["config"].pop("chat_template", None)
        del record["config"]  # the oldest HF records had no settings
    config = RunConfig(model=ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64,
                                         vocab_size=50304))
    model = GPT(config.model)
    state = {"tokens": 0, "best_val_loss": None, "wandb_id": None, "config": to_dict(config),
             "tokenizer": record}
    optimizer = torch.optim.AdamW(model.parameters())
    folder = ckpt.Checkpointer(tmp_path / "out", Dist(), model, optimizer, fixed=state).save(1)
    _, tokenizer = load_for_inference(ckpt.Checkpoint.open(folder), "cpu", "float32", False)
    assert tokenizer.chat_template is None
    ids = chat_prompt(tokenizer, MESSAGES)
    assert tokenizer.decode(ids).endswith(PLAIN)
    assert chat_stops(tokenizer) == ["\n\nUser:"]


def masked_runs(tokenizer: Any, ids: list[int], mask: list[int]) -> list[str]:
    """The text of each run of masked ids."""
    runs: list[list[int]] = []
    for i, (token, on) in enumerate(zip(ids, mask, strict=True)):
        if on:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tokenizer.decode(run) for run in runs]


def test_builtin_layout_ids_and_mask_by_hand() -> None:
    """gpt2 with the chat tokens: each message is <|im_start|>, its role and content encoded
    together, <|im_end|> and a newline; the mask is on the reply and its <|im_end|> alone."""
    gpt2 = get_tokenizer("gpt2")
    chat = with_chat_tokens(gpt2)
    assert isinstance(chat, ChatTokenizer) and with_chat_tokens(chat) is chat
    assert chat.chat_ids == (50257, 50258) and chat.vocab_size == 50259
    start, end = 50257, 50258
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ids, mask = conversation_ids(chat, messages)
    user, reply, newline = gpt2.encode("user\nHi"), gpt2.encode("Hello"), gpt2.encode("\n")
    header = gpt2.encode("assistant\n")
    assert ids == [start, *user, end, *newline, start, *header, *reply, end, *newline]
    assert mask == ([0] * (len(user) + 2 + len(newline) + 1 + len(header)) + [1] * len(reply)
                    + [1] + [0] * len(newline))
    assert chat.decode(ids) == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n"
    prompt = chat_prompt(chat, messages[:1])
    assert prompt == [start, *user, end, *newline, start, *header]
    assert ids[: len(prompt)] == prompt  # training and chat lay the turn out alike
    assert chat_stops(chat) == ["<|im_end|>"]


@pytest.mark.parametrize("kind", ["gpt2", "char", "bpe"])
def test_builtin_layout_never_forges_the_turn_tokens(kind: str) -> None:
    """A message that holds the strings of the turn tokens is text: the ids appear only where
    the layout puts them, and the text decodes back."""
    base: Any = {"gpt2": lambda: get_tokenizer("gpt2"),
                 "char": lambda: CharTokenizer(PLAIN + "".join(m["content"] for m in CONVERSATION)
                                               + "<|>_ system user assistant"),
                 "bpe": lambda: BPETokenizer.learn([PLAIN] * 3, 300)}[kind]()
    chat = with_chat_tokens(base)
    assert chat.chat_ids == (base.vocab_size, base.vocab_size + 1)
    ids, mask = conversation_ids(chat, CONVERSATION)
    start, end = chat.chat_ids
    assert ids.count(start) == ids.count(end) == len(CONVERSATION)
    assert chat.encode("<|im_start|><|im_end|>") == base.encode("<|im_start|><|im_end|>")
    assert start not in chat.encode("<|im_start|>")
    assert masked_runs(chat, ids, mask) == [" Hi! 🙂 <|im_end|>", "Fine, <|im_end|> thanks.<|im_end|>"]
    rebuilt = tokenizer_from_dict(json.loads(json.dumps(chat.to_dict())))
    assert rebuilt.to_dict() == chat.to_dict() and rebuilt.vocab_size == chat.vocab_size
    assert conversation_ids(rebuilt, CONVERSATION) == (ids, mask)


@pytest.mark.parametrize("template", ["chatml", "llama3"])
def test_hf_template_conversation_ids_and_mask_are_transformers(
    template: str, tmp_path: Path
) -> None:
    """A whole conversation's ids are transformers' (no generation prompt); the mask covers
    each reply and its end-of-turn token: by hand for ChatML, and transformers' own assistant
    mask for the Llama 3 template, which marks the replies with {% generation %}."""
    text, tokens = (CHATML, None) if template == "chatml" else (LLAMA3, LLAMA3_TOKENS)
    folder = tokenizer_folder(tmp_path, text, tokens=tokens)
    ours = imported(folder)
    assert with_chat_tokens(ours) is ours  # a model's own template is kept
    ids, mask = conversation_ids(ours, CONVERSATION)
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    out = hf.apply_chat_template(CONVERSATION, tokenize=True, add_generation_prompt=False,
                                 return_dict=True, return_assistant_tokens_mask=template == "llama3")
    assert ids == list(out["input_ids"])
    end = "<|im_end|>" if template == "chatml" else "<|eot_id|>"
    assert masked_runs(ours, ids, mask) == [
        " Hi! 🙂 " + end if template == "chatml" else "Hi! 🙂" + end,
        "Fine, <|im_end|> thanks." + end,
    ]
    if template == "llama3":
        assert mask == list(out["assistant_masks"])


def test_conversation_ids_need_a_chat_layout() -> None:
    with pytest.raises(GPTError, match="has no chat layout to train on") as e:
        conversation_ids(get_tokenizer("gpt2"), MESSAGES)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("kind", ["gpt2", "char", "bpe", "hf"])
def test_export_with_chat_tokens_gives_transformers_the_same_ids(kind: str, tmp_path: Path) -> None:
    """The exported folder holds the chat tokens as special added tokens at our ids and the
    built-in layout as tokenizer_config.json's chat_template: HF's apply_chat_template gives
    our ids, with and without the generation prompt."""
    text = PLAIN + "".join(m["content"] for m in CONVERSATION) + " system user assistant"
    base: Any = {"gpt2": lambda: get_tokenizer("gpt2"), "char": lambda: CharTokenizer(text),
                 "bpe": lambda: BPETokenizer.learn([text] * 3, 300),
                 "hf": lambda: imported(tokenizer_folder(tmp_path, None, specials=("<s>", "</s>")))
                 }[kind]()
    chat = with_chat_tokens(base)
    assert isinstance(chat, ChatTokenizer)
    folder = tmp_path / "export"
    save_hf_tokenizer(chat.to_dict(), folder, model_max_length=64)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert config["chat_template"] == chat.chat_template
    added = {t["content"]: t for t in json.loads((folder / "tokenizer.json").read_text())
             ["added_tokens"]}
    for token, token_id in zip(["<|im_start|>", "<|im_end|>"], chat.chat_ids, strict=True):
        assert added[token]["id"] == token_id and added[token]["special"]
    hf = transformers.AutoTokenizer.from_pretrained(str(folder))
    conversation = [*MESSAGES, {"role": "assistant", "content": "Fine, thanks."}]
    whole = hf.apply_chat_template(conversation, tokenize=True, add_generation_prompt=False,
                                   return_dict=False)
    assert list(whole) == conversation_ids(chat, conversation)[0]
    assert hf_ids(folder, MESSAGES) == chat_prompt(chat, MESSAGES)


def test_hf_tokenizer_holding_the_chat_tokens_without_a_template_is_refused(tmp_path: Path) -> None:
    message = re.escape("has <|im_start|> in its vocabulary but no chat template")
    with pytest.raises(GPTError, match=message) as e:
        with_chat_tokens(imported(tokenizer_folder(tmp_path, None)))
    assert "\n" not in str(e.value)
