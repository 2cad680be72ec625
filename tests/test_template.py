"""Chat templates shared by gpt chat and gpt serve: the plain layout's exact text and ids, and an
HF chat template's ids equal to transformers' `apply_chat_template` (tokenizer folders written
here, offline)."""

from __future__ import annotations

import json
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
from gpt.template import chat_prompt, chat_stops  # noqa: E402
from gpt.tokenizer import (  # noqa: E402
    CharTokenizer,
    HFTokenizer,
    get_tokenizer,
    same_tokenizer,
    tokenizer_from_dict,
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
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>"]


def tokenizer_folder(
    tmp_path: Path, template: str | None, where: str = "config", add_bos: bool = False
) -> Path:
    """A byte-level BPE trained here, saved as an HF model's tokenizer files by hand: its
    tokenizer.json, and a tokenizer_config.json holding the chat template as a string (`config`),
    as a list of named templates (`list`), or beside it in chat_template.jinja (`jinja`)."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    text = " ".join(m["content"] for m in MESSAGES) + " system user assistant INST SYS"
    backend.train_from_iterator([text] * 3, trainer)
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", backend.token_to_id("<s>"))],
        )
    folder = tmp_path / f"tok-{where}-{add_bos}"
    folder.mkdir()
    backend.save(str(folder / "tokenizer.json"))
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
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
@pytest.mark.parametrize("template", ["chatml", "llama2", "fancy"])
@pytest.mark.parametrize("add_bos", [False, True])
def test_hf_template_ids_are_transformers_ids(
    template: str, where: str, add_bos: bool, tmp_path: Path
) -> None:
    text = {"chatml": CHATML, "llama2": LLAMA2, "fancy": FANCY}[template]
    folder = tokenizer_folder(tmp_path, text, where, add_bos)
    ours = imported(folder)
    assert ours.chat_template == text
    for messages in (MESSAGES, MESSAGES[1:2], MESSAGES[:2]):
        ids = chat_prompt(ours, messages)
        assert ids == hf_ids(folder, messages, text)
        bos = ours.backend.token_to_id("<s>")
        assert ids.count(bos) == (template == "llama2")  # the template's own, and only once


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
