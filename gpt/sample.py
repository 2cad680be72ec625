"""Text in, text out: a checkpoint's model and tokenizer around `gpt.generate`.

Handles what ids cannot: the prompt's encoding, stop strings (the output ends before them) and
streaming text as it is decoded.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch

from gpt.checkpoint import load_model
from gpt.config import RunConfig, SampleConfig
from gpt.errors import GPTError
from gpt.generate import generate, pack_linears
from gpt.model import GPT
from gpt.tokenizer import Tokenizer, tokenizer_from_dict
from gpt.train import resolve_device

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _fast_bfloat16(device: torch.device) -> bool:
    """bfloat16 halves the bytes read per token (decoding is memory-bound) where the hardware
    computes it natively: CUDA GPUs with bf16, CPUs with AVX512-BF16/AMX. Elsewhere float32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def load_for_sampling(
    checkpoint: str | Path, which: str, device: str, dtype: str, compile_model: bool
) -> tuple[GPT, Tokenizer, RunConfig]:
    """Model (eval mode, on device, in dtype), tokenizer and run config from a checkpoint."""
    try:
        torch_device = resolve_device(device)
    except RuntimeError:
        raise GPTError(
            f"--device {device!r} is not a device; use auto, cpu, cuda, cuda:N or mps"
        ) from None
    except GPTError:
        raise GPTError(f"--device {device!r} is not available here; use auto or cpu") from None
    model, config, tokenizer_state = load_model(checkpoint, torch_device, which)
    if dtype == "auto":
        dtype = "bfloat16" if _fast_bfloat16(torch_device) else "float32"
    if dtype not in DTYPES:
        raise GPTError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    if dtype == "float16" and torch_device.type == "cpu":
        raise GPTError("--dtype float16 needs a GPU; use float32 or bfloat16 on the CPU")
    model = model.to(DTYPES[dtype])
    if compile_model:
        model = torch.compile(model, dynamic=True)  # type: ignore[assignment]
    else:
        model = pack_linears(model)  # CPU: weights in oneDNN's layout once, not per call
    return model, tokenizer_from_dict(tokenizer_state), config


def _cut_at_stop(text: str, stops: list[str]) -> tuple[str, bool]:
    """text up to the first stop string, and whether one was found."""
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


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
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eot_id]
    device = next(model.parameters()).device
    batch = torch.tensor([ids] * settings.num_samples, dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(settings.seed)
    new_ids: list[list[int]] = [[] for _ in range(settings.num_samples)]
    texts = [""] * settings.num_samples
    finished = [False] * settings.num_samples
    shown = 0
    hold = max((len(s) for s in settings.stop), default=1) - 1
    for step_ids in generate(
        model, batch, settings.max_new_tokens, settings.temperature, settings.top_k,
        settings.top_p, generator, vocab_size=tokenizer.vocab_size,
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


def read_prompt(prompt: str | None, prompt_file: Path | None, default: str) -> str:
    """The prompt from --prompt (`-` = stdin), --prompt-file, or the config's default."""
    if prompt is not None and prompt_file is not None:
        raise GPTError("give either --prompt or --prompt-file, not both")
    if prompt_file is not None:
        try:
            return prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise GPTError(f"cannot read --prompt-file {prompt_file}: {e}") from None
    if prompt == "-":
        return sys.stdin.read()
    return default if prompt is None else prompt
