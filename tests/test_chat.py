"""gpt chat: a scripted conversation through the command line, replies equal to a plain greedy
loop over the ids gpt/template.py gives (the ones gpt serve uses), the history kept within the
context, and Ctrl-C stopping a reply in a real process without ending the conversation."""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from gpt import checkpoint as ckpt
from gpt.chat import Chat, run_chat
from gpt.cli import app
from gpt.config import ModelConfig, RunConfig, SampleConfig, to_dict
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.parallel import Dist
from gpt.template import chat_prompt
from gpt.tokenizer import CharTokenizer, Tokenizer, get_tokenizer

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
CHARS = CharTokenizer([chr(c) for c in range(32, 127)])  # printable ASCII and the newline
GREEDY = SampleConfig(temperature=0.0, max_new_tokens=24)

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_model(tokenizer: Tokenizer, block_size: int, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=block_size,
                         vocab_size=tokenizer.vocab_size)
    return GPT(config).eval()


def save(folder: Path, model: GPT, tokenizer: Tokenizer, sample: SampleConfig) -> Path:
    """A checkpoint of `model` (untrained: chat needs only a model that runs)."""
    config = RunConfig(model=model.config, sample=sample)
    state = {"tokens": 0, "best_val_loss": None, "wandb_id": None, "config": to_dict(config),
             "tokenizer": tokenizer.to_dict()}
    optimizer = torch.optim.AdamW(model.parameters())
    return ckpt.Checkpointer(folder, Dist(), model, optimizer, fixed=state, keep_last=1).save(1)


@torch.no_grad()
def greedy_reply(model: GPT, tokenizer: Tokenizer, messages: list[dict[str, str]],
                 max_new_tokens: int) -> str:
    """The reply by hand: the whole sequence through the model for every token (no cache, no
    engine), the most likely id each time, until the end-of-text id, "\\n\\nUser:" or the
    context; the text before the stop, stripped."""
    ids = chat_prompt(tokenizer, messages)
    new: list[int] = []
    for _ in range(min(max_new_tokens, model.config.block_size - len(ids))):
        logits, _ = model(torch.tensor([ids + new]))
        token = int(logits[0, -1, :tokenizer.vocab_size].argmax())
        if token == tokenizer.eot_id:
            break
        new.append(token)
        if "\n\nUser:" in tokenizer.decode(new):
            break
    return tokenizer.decode(new).split("\n\nUser:")[0].strip()


@pytest.fixture(scope="module")
def char_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("chat") / "out"
    save(out, tiny_model(CHARS, 256), CHARS, GREEDY)
    return out


def test_scripted_chat_prints_each_greedy_reply(char_run: Path) -> None:
    result = runner.invoke(
        app, ["chat", "--checkpoint", str(char_run), "--device", "cpu", "--dtype", "float32"],
        input="Hello\n/system be brief\nHi\n/reset\n/quit\nnever read\n",
    )
    assert result.exit_code == 0, result.output
    model = ckpt.Checkpoint.open(char_run).load_model()
    first = greedy_reply(model, CHARS, [{"role": "user", "content": "Hello"}], 24)
    second = greedy_reply(model, CHARS, [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": first}, {"role": "user", "content": "Hi"},
    ], 24)
    assert first and second  # replies of this model are not empty: the comparison means something
    assert result.stdout == f"{first}\n{second}\n"
    assert result.stderr.splitlines() == ["(system message set)", "(the conversation is forgotten)"]


def test_a_reply_is_the_engine_continuation_of_the_template_ids() -> None:
    """Sampled replies too: the engine's tokens for chat_prompt's ids, seeded seed + reply."""
    from gpt.engine import Engine, Request

    model = tiny_model(CHARS, 128)
    settings = SampleConfig(temperature=1.0, top_k=20, max_new_tokens=16, seed=5)
    chat = Chat(model, CHARS, settings)
    shown: list[str] = []
    for i, text in enumerate(["Hello", "Hi there"]):
        ids = chat_prompt(CHARS, [*chat.messages(), {"role": "user", "content": text}])
        request = Request(ids, 16, 1.0, 20, 1.0, seed=5 + i, stop_ids=frozenset({CHARS.eot_id}))
        tokens = [e.token for e in Engine(model, max_batch=1).run([request])
                  if e.token is not None and e.finish != "stop"]
        expected = CHARS.decode(tokens).split("\n\nUser:")[0].strip()
        assert chat.reply(text, shown.append, print) == expected
    assert "".join(shown) == "".join(m["content"] for m in chat.turns[1::2])


def test_the_oldest_turns_are_dropped_to_fit_the_context() -> None:
    model = tiny_model(CHARS, 64)
    chat = Chat(model, CHARS, SampleConfig(temperature=0.0, max_new_tokens=8), system="be brief")
    history = [{"role": role, "content": f"{role} {i}"}
               for i in range(6) for role in ("user", "assistant")]
    chat.turns = [*history, {"role": "user", "content": "last"}]
    notices: list[str] = []
    ids = chat.prompt(notices.append)
    kept = len(chat.turns)
    assert ids == chat_prompt(CHARS, chat.messages())
    assert len(ids) + 8 <= 64  # room for the reply
    assert chat.messages()[0] == {"role": "system", "content": "be brief"}
    assert chat.turns == [*history, {"role": "user", "content": "last"}][-kept:]  # the newest
    assert chat.turns[0]["role"] == "user"
    one_more = [*history, {"role": "user", "content": "last"}][-kept - 2:]
    assert len(chat_prompt(CHARS, [chat.messages()[0], *one_more])) + 8 > 64  # as many as fit
    dropped = (len(history) + 1 - kept) // 2
    assert notices == [f"(dropped the {dropped} oldest turns to keep the conversation within the "
                       "model's 64-token context)"]


def test_a_message_too_long_for_the_context_is_refused_and_the_chat_goes_on() -> None:
    chat = Chat(tiny_model(CHARS, 64), CHARS, GREEDY)
    size = len(chat_prompt(CHARS, [{"role": "user", "content": "x" * 50}]))
    with pytest.raises(GPTError, match=rf"the message is {size} tokens .* send a shorter one"):
        chat.reply("x" * 50, print, print)
    assert chat.turns == []
    stdin = io.StringIO("x" * 50 + "\n/help\nHi\n")
    stdout, stderr = io.StringIO(), io.StringIO()
    run_chat(chat, stdin, stdout, stderr)  # ends at the end of its input
    notices = stderr.getvalue().splitlines()
    assert notices[0].startswith(f"error: the message is {size} tokens")
    assert notices[1].startswith("unknown command /help; the commands are /reset")
    assert stdout.getvalue() == chat.turns[1]["content"] + "\n"
    assert [m["content"] for m in chat.turns[::2]] == ["Hi"]


def test_a_message_too_long_keeps_the_history_whole() -> None:
    """The refusal takes back only the message: no turn is dropped for it."""
    chat = Chat(tiny_model(CHARS, 64), CHARS, GREEDY)
    chat.reply("hi", lambda t: None, print)
    before = list(chat.turns)
    assert len(before) == 2
    with pytest.raises(GPTError, match="send a shorter one"):
        chat.reply("x" * 50, lambda t: None, print)
    assert chat.turns == before


def test_a_message_that_is_not_unicode_is_one_error_and_the_chat_goes_on() -> None:
    """Undecodable input bytes reach the chat as lone surrogates: one error line each."""
    chat = Chat(tiny_model(CHARS, 64), CHARS, GREEDY)
    stdout, stderr = io.StringIO(), io.StringIO()
    run_chat(chat, io.StringIO("hi\udcff\nHi\n"), stdout, stderr)
    assert stderr.getvalue().splitlines()[0] == (
        "error: the text is not valid Unicode (it holds '\\udcff', a lone surrogate, as "
        "undecodable bytes become); give UTF-8 text")
    assert [m["content"] for m in chat.turns[::2]] == ["Hi"]


@pytest.mark.slow
def test_ctrl_c_stops_a_reply_and_keeps_the_chat(tmp_path: Path) -> None:
    """SIGINT to a real `gpt chat` while it writes a long reply: the reply ends, the process
    reads on (a command after it runs), and it leaves at /quit."""
    gpt2 = get_tokenizer("gpt2")
    out = save(tmp_path / "out", tiny_model(gpt2, 1024), gpt2,
               SampleConfig(temperature=0.0, max_new_tokens=1000))
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}
    process = subprocess.Popen(
        [sys.executable, "-m", "gpt", "chat", "--checkpoint", str(out), "--device", "cpu",
         "--dtype", "float32"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )
    assert process.stdin is not None and process.stdout is not None
    try:
        process.stdin.write(b"Hello\n")
        process.stdin.flush()
        first = _read_some(process, timeout=120)  # the reply has begun
        process.send_signal(signal.SIGINT)
        rest, stderr = process.communicate(b"/system be brief\n/quit\n", timeout=120)
    finally:
        process.kill()
    assert process.returncode == 0, stderr.decode()
    reply = (first + rest).decode()
    assert reply.endswith("\n") and reply.count("\n") == 1
    full = greedy_reply_tokens(ckpt.Checkpoint.open(out).load_model(), gpt2, 1000)
    assert len(reply) - 1 < len(full)  # stopped before its end
    assert full.startswith(reply[:-1])
    assert stderr.decode().splitlines()[-2:] == ["(reply stopped)", "(system message set)"]


def _read_some(process: subprocess.Popen[Any], timeout: float) -> bytes:
    """The first bytes the process writes to its stdout, waiting at most `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([process.stdout], [], [], 0.1)
        if ready:
            return os.read(process.stdout.fileno(), 64)  # type: ignore[union-attr]
        assert process.poll() is None, process.stderr.read().decode()  # type: ignore[union-attr]
    raise AssertionError("no reply within the time given")


@torch.no_grad()
def greedy_reply_tokens(model: GPT, tokenizer: Tokenizer, max_new_tokens: int) -> str:
    """The whole greedy reply to "Hello", through the engine (a long reply by hand is slow)."""
    from gpt.engine import Engine, Request

    ids = chat_prompt(tokenizer, [{"role": "user", "content": "Hello"}])
    request = Request(ids, max_new_tokens, 0.0, stop_ids=frozenset({tokenizer.eot_id}))
    tokens = [e.token for e in Engine(model, max_batch=1).run([request])
              if e.token is not None and e.finish != "stop"]
    return tokenizer.decode(tokens).split("\n\nUser:")[0].strip()
