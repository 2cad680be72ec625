"""Text in, text out: a checkpoint's model and tokenizer around `gpt.generate`.

Handles what ids cannot: the prompt's encoding, stop strings (the output ends before them) and
streaming text as it is decoded; and `gpt sample`'s whole run, from its prompts to its output.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gpt import quant
from gpt.checkpoint import Checkpoint
from gpt.config import SampleConfig
from gpt.device import free_memory, memory_errors, resolve_device, resolve_dtype
from gpt.engine import Engine, Request
from gpt.errors import GPTError, compile_errors
from gpt.fileio import TooLargeError, read_stream_bounded, read_text_bounded
from gpt.generate import cache_length, decoding_bytes
from gpt.model import GPT
from gpt.onednn import pack_linears
from gpt.tokenizer import CharTokenizer, ChatTokenizer, Tokenizer, tokenizer_from_dict

if TYPE_CHECKING:
    from gpt.hf.pretrained import Pretrained


def load_for_inference(
    checkpoint: Checkpoint | Pretrained, device: str, dtype: str, compile_model: bool,
    quantize: str | None = None,
) -> tuple[GPT, Tokenizer]:
    """The checkpoint's (or HF model's) model, in eval mode, on device, in dtype, and tokenizer;
    its Linear layers quantized as `quantize` says (`--quantize int8`, gpt/quant.py).

    `dtype = "auto"` takes bfloat16 where it is computed natively (decoding reads every weight
    once per token, so half the bytes is nearly twice the speed), float32 elsewhere.
    """
    quant.check_method(quantize, compile_model)
    torch_device = resolve_device(device, "--device")
    torch_dtype = resolve_dtype(dtype, torch_device, "--dtype", inference=True)
    if quantize is not None:  # before the weights load
        quant.check_runs_here(quantize, torch_device, torch_dtype)
    tokenizer = tokenizer_from_dict(checkpoint.tokenizer)
    with memory_errors(torch_device, "run it on a device with more memory (--device)"):
        model = checkpoint.load_model(torch_device).to(torch_dtype)
    if quantize is not None:
        model = quant.quantize(model, quantize)  # int8 layers instead of packed ones
    elif compile_model:
        model = torch.compile(model, dynamic=True)  # type: ignore[assignment]
    else:
        model = pack_linears(model)  # CPU: weights in oneDNN's layout once, not per call
    return model, tokenizer


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """text up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def prompt_ids(tokenizer: Tokenizer, prompt: str) -> list[int]:
    """The ids generation starts from: the tokenizer's beginning-of-text id when it has one
    (what HF's `tokenizer(prompt)` gives a Llama model), then the prompt's. An empty prompt
    without one starts from the end-of-text id that separates training documents."""
    if tokenizer.bos_id is not None:
        return [tokenizer.bos_id, *tokenizer.encode(prompt)]
    return tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]


def encode_prompt(tokenizer: Tokenizer, prompt: str, block_size: int) -> list[int]:
    """`prompt_ids`, refused when the model cannot see them all: generation would silently
    start from the prompt's last block_size tokens, as if the rest had not been given."""
    ids = prompt_ids(tokenizer, prompt)
    added = 0 if tokenizer.bos_id is None else 1  # the beginning-of-text id takes a place too
    if len(ids) > block_size:
        raise GPTError(
            f"the prompt is {len(ids) - added:,} tokens, more than the {block_size - added:,} the "
            f"model reads (its block_size); shorten it to its last {block_size - added:,} tokens "
            "or fewer"
        )
    return ids


def check_batch_fits(model: GPT, rows: int, context: int, fix: str) -> None:
    """Refuse a KV cache of `rows` x `context` positions (and its logits) that passes the
    device's free memory, before building any of it: found out by allocating, a huge batch
    takes minutes to fail. `fix` says what to lower."""
    device = next(model.parameters()).device
    needed = decoding_bytes(model, rows, context)
    free = free_memory(device)
    if free is not None and needed > free:
        raise GPTError(
            f"decoding {rows:,} sequences of up to {context:,} positions needs at least "
            f"{needed / 2**30:,.2f} GiB on {device} for their KV cache and logits, more than "
            f"the {free / 2**30:,.2f} GiB free there; {fix}"
        )


def stop_ids(tokenizer: Tokenizer, ignore_eos: bool) -> frozenset[int]:
    """The ids that end a generation: the end-of-text id, unless `ignore_eos` or the tokenizer
    is a char vocabulary (whose separator is a newline, which is text); and the end of a chat
    turn (<|im_end|>) of a tokenizer with the chat tokens."""
    if ignore_eos:
        return frozenset()
    turn = {tokenizer.chat_ids[1]} if isinstance(tokenizer, ChatTokenizer) else set()
    if tokenizer.name == CharTokenizer.name:
        return frozenset(turn)
    return frozenset({tokenizer.eot_id, *turn})


class TextStream:
    """One sequence's text, decoded as its ids arrive and cut before the first stop string.

    `add` returns only text that is safe to show: it holds back an incomplete UTF-8 character
    and whatever could still turn out to be the start of a stop string.
    """

    def __init__(self, tokenizer: Tokenizer, stop: Sequence[str] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self.ids: list[int] = []
        self.text = ""
        self.stopped = False
        self._shown = 0
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add(self, token: int) -> str:
        """Take one new id; return the text now ready to show."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text, self.stopped = _cut_at_stop(self.tokenizer.decode(self.ids), self.stop)
        ready = len(self.text) if self.stopped else max(self._shown, len(self.text) - self._hold)
        while ready > self._shown and self.text[ready - 1] == "\ufffd":  # incomplete UTF-8
            ready -= 1
        return self._show(ready)

    def flush(self) -> str:
        """What was held back: the sequence has ended."""
        return self._show(len(self.text))

    def _show(self, upto: int) -> str:
        piece, self._shown = self.text[self._shown:upto], max(self._shown, upto)
        return piece


def sample_texts(
    model: GPT,
    tokenizer: Tokenizer,
    prompts: Sequence[str],
    settings: SampleConfig,
    on_text: Callable[[str], None] | None = None,
) -> list[list[str]]:
    """`settings.num_samples` continuations of each prompt, decoded together by the engine.

    Sample i of every prompt draws with seed `settings.seed + i`, so a prompt gives the same
    text alone as among others, and `--num-samples 1 --seed S+i` gives its sample i. With
    `on_text` (one prompt, one sample) text is passed on as soon as it is decoded.
    """
    block_size = model.config.block_size
    encoded = [encode_prompt(tokenizer, p, block_size) for p in prompts]
    new_tokens = settings.max_new_tokens
    if new_tokens == 0:
        return [[""] * settings.num_samples for _ in prompts]
    # positions a sequence holds: its prompt and all but its last token, at most block_size
    # (past it the window slides)
    context = max(cache_length(block_size, len(ids), new_tokens) for ids in encoded)
    rows = min(len(prompts) * settings.num_samples, settings.max_batch)
    check_batch_fits(model, rows, context, "lower --num-samples or --max-new-tokens, or decode "
                     "fewer at once with --set sample.max_batch=N")
    requests = [
        Request(ids, new_tokens, settings.temperature, settings.top_k, settings.top_p,
                settings.seed + i, stop_ids(tokenizer, settings.ignore_eos))
        for ids in encoded for i in range(settings.num_samples)
    ]
    engine = Engine(model, max_batch=rows, context=context)
    streams = [TextStream(tokenizer, settings.stop) for _ in requests]
    for event in engine.run(requests):
        stream = streams[event.seq]
        if event.token is not None and event.finish != "stop":
            piece = stream.add(event.token)
            if on_text is not None and piece:
                on_text(piece)
            if stream.stopped:
                engine.cancel(event.seq)
    if on_text is not None and (rest := streams[0].flush()):
        on_text(rest)
    texts = [s.text for s in streams]
    n = settings.num_samples
    return [texts[i * n:(i + 1) * n] for i in range(len(prompts))]


def sample_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    settings: SampleConfig,
    on_text: Callable[[str], None] | None = None,
) -> list[str]:
    """`settings.num_samples` continuations of one prompt (see sample_texts)."""
    return sample_texts(model, tokenizer, [prompt], settings, on_text)[0]


PROMPT_FORMATS = ("text", "lines", "jsonl")
MAX_HELD_TOKENS = 100_000  # per sample, when the text is printed only at the end
MAX_HELD_TOKENS_IN_ALL = 100_000_000  # over all samples and prompts


def check_prompt_format(prompt_format: str, prompt_file: Path | None) -> None:
    """Refuse an unknown --prompt-format, or one that reads a --prompt-file not given, before
    any model is opened."""
    if prompt_format not in PROMPT_FORMATS:
        raise GPTError(f"--prompt-format must be one of {', '.join(PROMPT_FORMATS)}, "
                       f"got {prompt_format!r}")
    if prompt_format != "text" and prompt_file is None:
        raise GPTError(f"--prompt-format {prompt_format} reads --prompt-file; give one")


@dataclass(frozen=True)
class Prompts:
    """What `gpt sample` continues: the text as given (echoed before a streamed sample), the
    prompts it holds, and whether the output is JSON Lines (--prompt-format jsonl)."""

    text: str
    prompts: list[str]
    as_json: bool


def read_prompts(
    prompt: str | None, prompt_file: Path | None, prompt_format: str, settings: SampleConfig
) -> Prompts:
    """The prompts of --prompt, --prompt-file (split as `prompt_format` says) or [sample]
    prompt (see read_prompt and split_prompts)."""
    text = read_prompt(prompt, prompt_file, settings.prompt, settings.max_prompt_bytes)
    prompts = split_prompts(text, prompt_format, f"--prompt-file {prompt_file}")
    return Prompts(text, prompts, prompt_format == "jsonl")


def split_prompts(text: str, prompt_format: str, source: str) -> list[str]:
    """The prompts a file holds: all of it (`text`), one per non-empty line (`lines`), or one
    per line of JSON Lines, each a string or an object with a "prompt" string (`jsonl`)."""
    if prompt_format == "text":
        return [text]
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise GPTError(f"{source} holds no prompts; give one per line")
    if prompt_format == "lines":
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise GPTError(f"line {n} of {source} is not JSON ({e.msg}); write one JSON string "
                           'or {"prompt": "..."} per line') from None
        if isinstance(item, dict):
            item = item.get("prompt")
        if not isinstance(item, str):
            raise GPTError(f'line {n} of {source} has no prompt; write one JSON string or '
                           '{"prompt": "..."} per line')
        prompts.append(item)
    return prompts


def read_prompt(prompt: str | None, prompt_file: Path | None, default: str, limit: int) -> str:
    """The prompt from --prompt (`-` = stdin), --prompt-file, or the config's default; at most
    `limit` bytes ([sample] max_prompt_bytes) are read from a file or stdin."""
    if prompt is not None and prompt_file is not None:
        raise GPTError("give either --prompt or --prompt-file, not both")
    larger = (f"give a shorter one, or raise the limit with --set sample.max_prompt_bytes="
              f"{limit * 4}")
    if prompt_file is not None:
        try:
            return read_text_bounded(prompt_file, limit, "a prompt")
        except TooLargeError as e:
            raise GPTError(f"--prompt-file {prompt_file} is {e.strerror}; {larger}") from None
        except OSError as e:
            raise GPTError(
                f"cannot read --prompt-file {prompt_file} ({e.strerror}); give a UTF-8 text file"
            ) from None
        except UnicodeDecodeError:
            raise GPTError(
                f"--prompt-file {prompt_file} is not UTF-8 text; convert it to UTF-8"
            ) from None
    if prompt == "-":  # bytes, decoded here: a UTF-8 locale's stdin would let bad bytes pass
        stdin = getattr(sys.stdin, "buffer", sys.stdin)  # a text stream only where embedded
        try:
            data = read_stream_bounded(stdin, limit, "a prompt", "stdin")
        except TooLargeError as e:
            raise GPTError(f"the prompt on stdin is {e.strerror}; {larger}") from None
        try:
            return data.decode("utf-8") if isinstance(data, bytes) else data
        except UnicodeDecodeError:
            raise GPTError("the prompt on stdin is not UTF-8 text; convert it to UTF-8") from None
    return default if prompt is None else prompt


def check_held_text(settings: SampleConfig, n_prompts: int, streaming: bool) -> None:
    """Refuse more text than is sensible to hold until the end: a long sample not streamed, or
    too many samples in all, before any model loads."""
    if not streaming and settings.max_new_tokens > MAX_HELD_TOKENS:
        raise GPTError(
            f"--max-new-tokens {settings.max_new_tokens:,} without streaming holds all the text "
            f"until the end; stream it (--stream, one sample) or ask for at most "
            f"{MAX_HELD_TOKENS:,}"
        )
    held = settings.num_samples * n_prompts * settings.max_new_tokens
    if held > MAX_HELD_TOKENS_IN_ALL:
        raise GPTError(
            f"--num-samples {settings.num_samples:,} of {n_prompts:,} prompt(s) at "
            f"--max-new-tokens {settings.max_new_tokens:,} holds up to {held:,} tokens of text "
            f"until the end; ask for at most {MAX_HELD_TOKENS_IN_ALL:,} in all"
        )


def write_samples(
    load: Callable[[], tuple[GPT, Tokenizer]],
    prompts: Prompts,
    settings: SampleConfig,
    stream: bool,
    write: Callable[[str], None],
) -> None:
    """`gpt sample`: decode `settings.num_samples` continuations of each prompt with the model
    and tokenizer `load` gives, and `write` them. One prompt and one sample with `stream` are
    written as they are decoded, after the prompt; otherwise all at the end (see
    format_samples). Every prompt is checked before any is written."""
    streaming = stream and len(prompts.prompts) == 1 and settings.num_samples == 1
    check_held_text(settings, len(prompts.prompts), streaming)
    with compile_errors("--compile"):
        model, tokenizer = load()
        for p in prompts.prompts:  # refused before any is echoed
            encode_prompt(tokenizer, p, model.config.block_size)
        on = next(model.parameters()).device  # the KV cache grows with samples and tokens:
        with memory_errors(on, "lower --num-samples or --max-new-tokens, or choose --device"):
            if streaming:
                write(prompts.text)
                sample_texts(model, tokenizer, prompts.prompts, settings, on_text=write)
                write("\n")
                return
            samples = sample_texts(model, tokenizer, prompts.prompts, settings)
    for line in format_samples(prompts.prompts, samples, prompts.as_json):
        write(line + "\n")


def format_samples(prompts: list[str], samples: list[list[str]], as_json: bool) -> list[str]:
    """The lines of each prompt with each of its continuations, separated by a rule; or one
    JSON object a line (prompt, sample, text: the continuation alone)."""
    lines: list[str] = []
    for prompt, texts in zip(prompts, samples, strict=True):
        for i, text in enumerate(texts):
            if as_json:
                lines.append(json.dumps({"prompt": prompt, "sample": i, "text": text},
                                        ensure_ascii=False))
                continue
            if lines:
                lines.append("\n" + "-" * 40)
            lines.append(prompt + text)
    return lines
