"""Text in, text out: a checkpoint's model and tokenizer around `gpt.generate`.

Handles what ids cannot: the prompt's encoding, stop strings (the output ends before them) and
streaming text as it is decoded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gpt.checkpoint import Checkpoint
from gpt.config import SampleConfig
from gpt.device import free_memory, memory_errors, resolve_device, resolve_dtype
from gpt.errors import GPTError
from gpt.fileio import TooLargeError, read_stream_bounded, read_text_bounded
from gpt.generate import decoding_bytes, generate
from gpt.model import GPT
from gpt.onednn import pack_linears
from gpt.tokenizer import Tokenizer, tokenizer_from_dict

if TYPE_CHECKING:
    from gpt.hf.pretrained import Pretrained


def load_for_inference(
    checkpoint: Checkpoint | Pretrained, device: str, dtype: str, compile_model: bool
) -> tuple[GPT, Tokenizer]:
    """The checkpoint's (or HF model's) model, in eval mode, on device, in dtype, and tokenizer.

    `dtype = "auto"` takes bfloat16 where it is computed natively (decoding reads every weight
    once per token, so half the bytes is nearly twice the speed), float32 elsewhere.
    """
    torch_device = resolve_device(device, "--device")
    torch_dtype = resolve_dtype(dtype, torch_device, "--dtype", inference=True)
    tokenizer = tokenizer_from_dict(checkpoint.tokenizer)
    with memory_errors(torch_device, "run it on a device with more memory (--device)"):
        model = checkpoint.load_model(torch_device).to(torch_dtype)
    if compile_model:
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


def check_batch_fits(model: GPT, prompt_len: int, settings: SampleConfig) -> None:
    """Refuse a batch whose KV cache and logits alone pass the device's free memory before
    building any of it: found out by allocating, a huge --num-samples takes minutes to fail."""
    device = next(model.parameters()).device
    needed = decoding_bytes(model, settings.num_samples, prompt_len, settings.max_new_tokens)
    free = free_memory(device)
    if free is not None and needed > free:
        raise GPTError(
            f"--num-samples {settings.num_samples:,} at --max-new-tokens "
            f"{settings.max_new_tokens:,} needs at least {needed / 2**30:,.2f} GiB on {device} "
            f"for the batch's KV cache and logits, more than the {free / 2**30:,.2f} GiB free "
            f"there; lower --num-samples or --max-new-tokens"
        )


def sample_text(
    model: GPT,
    tokenizer: Tokenizer,
    prompt: str,
    settings: SampleConfig,
    on_text: Callable[[str], None] | None = None,
) -> list[str]:
    """Generate `settings.num_samples` continuations of `prompt` (one batch).

    With `on_text` (one sample only) text is passed on as soon as it is decoded, holding back
    only what could still turn out to be the start of a stop string.
    """
    ids = encode_prompt(tokenizer, prompt, model.config.block_size)
    check_batch_fits(model, len(ids), settings)
    device = next(model.parameters()).device
    batch = torch.tensor([ids], dtype=torch.long, device=device).repeat(settings.num_samples, 1)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    new_ids: list[list[int]] = [[] for _ in range(settings.num_samples)]
    texts = [""] * settings.num_samples
    finished = [False] * settings.num_samples
    shown = 0
    hold = max((len(s) for s in settings.stop), default=1) - 1
    for step_ids in generate(
        model, batch, settings.max_new_tokens, settings.temperature, settings.top_k,
        settings.top_p, generator,
    ):
        for i, token in enumerate(step_ids.tolist()):
            if finished[i]:
                continue
            new_ids[i].append(token)
            text = tokenizer.decode(new_ids[i])
            texts[i], finished[i] = _cut_at_stop(text, settings.stop)
        if on_text is not None:
            text = texts[0]
            ready = len(text) if finished[0] else max(shown, len(text) - hold)
            while ready > shown and text[ready - 1] == "\ufffd":  # an incomplete UTF-8 sequence
                ready -= 1
            if ready > shown:
                on_text(text[shown:ready])
                shown = ready
        if all(finished):
            break
    if on_text is not None and len(texts[0]) > shown:
        on_text(texts[0][shown:])
    return texts


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
