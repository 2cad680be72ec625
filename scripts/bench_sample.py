"""Benchmark decoding speed on the CPU: gpt's KV-cached sampler vs HF generate vs llama.cpp.

A GPT-2-124M-shaped model (12 layers, 12 heads, 768 wide, block 1024, vocab 50257) with the same
random weights in `gpt` and in `transformers.GPT2LMHeadModel` (copied through gpt/hf/convert.py).
Batch 1, a 16-token prompt, top-k sampling; tokens/s are medians of several runs in this one
process. With `gpt.quant`, an int8 copy of the model is measured as well.
The memory-bandwidth bound is the measured read bandwidth divided by the bytes of weights read
per token. `--write-docs` puts the table into docs/performance.md (or `--docs PATH`).

llama.cpp decodes the same weights: exported with `gpt.hf.export`, converted by llama.cpp's own
`convert_hf_to_gguf.py` to each of `--gguf-types` (cached in `--work` for later runs), and
generated from the same prompt ids with as many threads as torch uses, by scripts/llama_decode.py
in a python that has llama-cpp-python, a process of its own started once per round. The anchors
are not dependencies: rows whose anchor is not named are skipped, saying why.

    --llama-python PATH    GPT_BENCH_LLAMA_PYTHON    a python with llama-cpp-python
    --convert PATH         GPT_BENCH_CONVERT         llama.cpp's convert_hf_to_gguf.py
    --convert-python PATH  GPT_BENCH_CONVERT_PYTHON  a python with the converter's requirements

    python scripts/bench_sample.py [--new-tokens 256] [--runs 3] [--gguf-types bf16,f16,q8_0]
        [--work DIR] [--write-docs [--docs PATH]]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import anchors
import doc_tables as docs
import torch

import gpt.generate as gpt_generate
from gpt.errors import GPTError
from gpt.generate import cache_dtype, generate
from gpt.hf.convert import to_hf
from gpt.hf.export import export
from gpt.model import GPT, Attention
from gpt.onednn import PackedLinear, pack_linears

try:
    from gpt.quant import Int8Linear, quantize, quantize_weight
except ImportError:  # a checkout from before int8 decoding: its row is skipped
    Int8Linear = quantize = quantize_weight = None

DECODE = Path(__file__).resolve().parent / "llama_decode.py"  # run by the llama-cpp-python python
GGUF_TYPES = ("bf16", "f16", "q8_0", "f32")  # what llama.cpp's converter writes
CHILD_TIMEOUT = 1800  # seconds one llama.cpp process may take, load included


def bandwidth_gb_s() -> float:
    """Read bandwidth: summing a 1 GB tensor, as decoding reads the weights. The fastest of 3
    reads, so that a busy moment cannot lower the bound the sampler is measured against."""
    data = torch.ones(256 * 2**20, dtype=torch.float32)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        data.sum()
        times.append(time.perf_counter() - start)
    return data.numel() * 4 / min(times) / 1e9


@torch.inference_mode()
def matmuls_alone(model: GPT, n: int) -> float:
    """Tokens/s if a decode step were its matrix-vector products and nothing else.

    Each Linear of the (packed) model, LM head included, in the order a step runs them, on a
    fixed input: the ceiling any eager sampler built on these kernels can reach.
    """
    linears = [m for m in model.modules() if isinstance(m, PackedLinear)]
    dtype = model.transformer.wte.weight.dtype
    inputs = [torch.randn(1, 1, linear.in_features, dtype=dtype) for linear in linears]
    start = time.perf_counter()
    for _ in range(n):
        for linear, x in zip(linears, inputs, strict=True):
            linear(x)
    return n / (time.perf_counter() - start)


def ours(model: GPT, prompt: torch.Tensor, n: int) -> float:
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in generate(model, prompt, n, temperature=1.0, top_k=50, generator=g):
        pass
    return n * prompt.size(0) / (time.perf_counter() - start)


@torch.inference_mode()
def no_cache(model: GPT, prompt: torch.Tensor, n: int) -> float:
    """nanoGPT's generate: the whole context is recomputed for every token."""
    start = time.perf_counter()
    seq = prompt
    for _ in range(n):
        logits, _ = model(seq[:, -model.config.block_size :])
        probs = torch.softmax(logits[:, -1], dim=-1)
        seq = torch.cat([seq, torch.multinomial(probs, 1)], dim=1)
    return n / (time.perf_counter() - start)


@torch.inference_mode()
def hf(hf_model, prompt: torch.Tensor, n: int) -> float:
    start = time.perf_counter()
    hf_model.generate(
        prompt, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=50,
        pad_token_id=0, attention_mask=torch.ones_like(prompt),
    )
    return n / (time.perf_counter() - start)


@torch.inference_mode()
def decode_step_ms(model: GPT, n: int, without_matmuls: bool = False) -> float:
    """Median ms of a decode step (one token against a 16-token cache that grows to 16 + n).

    `without_matmuls` makes every Linear return zeros of its output's shape: what is left is
    the rest of the step (attention, norms, adds, cache writes, Python).
    """
    kinds = [PackedLinear] + ([Int8Linear] if Int8Linear is not None else [])
    forwards = [kind.forward for kind in kinds]
    if without_matmuls:
        for kind in kinds:
            kind.forward = lambda self, x: x.new_zeros(*x.shape[:-1], self.out_features)
    try:
        cache = model.new_cache(1, 16 + n, cache_dtype(model))
        model(torch.zeros(1, 16, dtype=torch.long), cache=cache, last_only=True)
        token = torch.zeros(1, 1, dtype=torch.long)
        times = []
        for _ in range(n):
            start = time.perf_counter()
            model(token, cache=cache, last_only=True)
            times.append(time.perf_counter() - start)
    finally:
        for kind, forward in zip(kinds, forwards, strict=True):
            kind.forward = forward
    return statistics.median(times) * 1e3


def tensor_bytes(model: GPT) -> int:
    """Bytes of the weights a quantized model reads per token: every parameter and buffer (int8
    rows, their scales and sums, biases, norms) but the token embedding, of which a lookup reads
    one row, the head being an int8 copy of it."""
    lookup = model.transformer.wte.weight
    if getattr(model.lm_head, "weight", None) is lookup:  # a head still tied to it reads it all
        lookup = None
    tensors = {t.data_ptr(): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values() if t is not lookup)


@dataclass
class Decoded:
    """One llama_decode.py run, as it printed it."""

    tokens: int  # N, the new tokens
    tokens_s: float  # the prompt's evaluation and the N tokens
    decode_tokens_s: float  # the N - 1 tokens after the first
    tensor_bytes: int  # all the tensors of the file: what a token reads
    version: str  # llama-cpp-python's


def child_result(returncode: int, stdout: str, stderr: str) -> Decoded | str:
    """What a llama_decode.py process printed, or why it gave no figure (a crash by a signal, an
    exit status, output without its JSON line)."""
    if returncode < 0:
        return f"crashed (signal {-returncode})"
    if returncode != 0:
        lines = stderr.strip().splitlines() or ["no output"]
        return f"failed (exit {returncode}): {lines[-1][:200]}"
    try:
        printed = json.loads([line for line in stdout.splitlines() if line.startswith("{")][-1])
        return Decoded(int(printed["tokens"]), float(printed["tokens_s"]),
                       float(printed["decode_tokens_s"]), int(printed["tensor_bytes"]),
                       str(printed.get("version", "unknown")))
    except (IndexError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        return f"printed no result: {(stdout.strip().splitlines() or ['nothing'])[-1][:200]}"


@dataclass
class LlamaDecode:
    """llama.cpp decoding one GGUF file: each call a llama_decode.py process of the python with
    llama-cpp-python. One that fails keeps its reason and is not started again, so that a crash
    (Q8_0's, repacked, on AMX-INT8 CPUs) costs its row, not the benchmark."""

    python: str
    gguf: Path
    outtype: str
    threads: int
    no_repack: bool = False
    failure: str | None = None
    runs: list[Decoded] = field(default_factory=list)

    def __call__(self, prompt: torch.Tensor, n: int) -> float:
        """Tokens/s of the prompt's evaluation and `n` new tokens (nan once it has failed)."""
        if self.failure is not None:
            return math.nan
        command = [self.python, str(DECODE), str(self.gguf), "--new-tokens", str(n),
                   "--prompt", ",".join(str(t) for t in prompt[0].tolist()),
                   "--threads", str(self.threads), *(["--no-repack"] if self.no_repack else [])]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=CHILD_TIMEOUT)
            result = child_result(done.returncode, done.stdout, done.stderr)
        except (OSError, subprocess.TimeoutExpired) as e:
            result = f"did not run ({e})"
        if isinstance(result, str):
            self.failure = result
            print(f"llama.cpp {self.outtype.upper()}: {result}", flush=True)
            return math.nan
        self.runs.append(result)
        return result.tokens_s


def llama_decoders(args: argparse.Namespace, model: GPT) -> tuple[dict[str, LlamaDecode],
                                                                  list[str]]:
    """llama.cpp on `model`'s weights, by row label, and a line for each row that cannot run."""
    python = anchors.find_program(args.llama_python, "GPT_BENCH_LLAMA_PYTHON", None)
    if python is None:
        named = args.llama_python or os.environ.get("GPT_BENCH_LLAMA_PYTHON")
        return {}, [f"llama.cpp: --llama-python {named} is not a file" if named else
                    "llama.cpp: no python with llama-cpp-python is named (--llama-python or "
                    "GPT_BENCH_LLAMA_PYTHON)"]
    folder = args.work.resolve() / f"model-{anchors.weights_digest(model)}"
    hf_folder = folder / "hf"
    if not (hf_folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        export(anchors.InMemory(model, folder / "model"), hf_folder, force=True)
    decoders, skipped = {}, []
    threads = torch.get_num_threads()
    files = anchors.gguf_files(hf_folder, folder, args.gguf_types, args.convert,
                               args.convert_python)
    for outtype, gguf in files.items():
        label = f"llama.cpp {outtype.upper()}"
        if isinstance(gguf, str):
            skipped.append(f"{label}: {gguf}")
            continue
        decoders[label] = LlamaDecode(python, gguf, outtype, threads)
        if outtype == "q8_0":  # the weights as stored too: repacked, they crashed on AMX-INT8
            decoders[f"{label}, --no-repack"] = LlamaDecode(python, gguf, outtype, threads, True)
    return decoders, skipped


def decoding_rows(results: dict[str, list[float]], bandwidth: list[float],
                  weight_bytes: dict[str, int], llama: dict[str, LlamaDecode],
                  ) -> tuple[list[list[str]], dict[str, float]]:
    """The first table's rows (printed as they come), and each row's median tokens/s."""
    reference = statistics.median(results["HF transformers generate, fp32"])
    rows, rates = [], {}
    for label, measured in results.items():
        decoder = llama.get(label)
        if decoder is not None and decoder.failure is not None:
            print(f"{label:35s} {decoder.failure}")
            rows.append([label, decoder.failure, "", ""])
            continue
        size = weight_bytes[f"{decoder.outtype.upper()} GGUF" if decoder is not None else
                            next((k for k in ("int8", "bf16") if k in label), "fp32")]
        # each round's rate against the bound measured in that round (no cache: the first)
        of_bound = statistics.median(
            rate / (bw * 1e9 / size) for rate, bw in zip(measured, bandwidth, strict=False)
        )
        rate = rates[label] = statistics.median(measured)
        print(f"{label:35s} {rate:7.1f} tok/s  {rate / reference:5.2f}x HF  "
              f"{of_bound:4.0%} of the bound")
        name = f"{label} (reference)" if label.startswith("HF") else label
        rows.append([name, f"{rate:.1f}", f"{rate / reference:.2f}x", f"{of_bound:.0%}"])
    return rows, rates


def goal_lines(rates: dict[str, float]) -> list[str]:
    """gpt's sample path against llama.cpp on the same weights, as ratios of median tokens/s."""
    pairs = [("gpt sample path, bf16", "llama.cpp BF16"),
             ("gpt sample path, int8", "llama.cpp Q8_0"),
             ("gpt sample path, int8", "llama.cpp Q8_0, --no-repack")]
    return [f"{ours} / {theirs}, tokens/s: {rates[ours] / rates[theirs]:.2f}x"
            for ours, theirs in pairs
            if ours in rates and math.isfinite(rates.get(theirs, math.nan))]


def llama_notes(llama: dict[str, LlamaDecode], n: int) -> list[str]:
    """How the llama.cpp rows were measured, and their rates without the prompt."""
    runs = {label: [r for r in d.runs if r.tokens == n] for label, d in llama.items()}
    runs = {label: measured for label, measured in runs.items() if measured}
    if not runs:
        return []
    first = next(iter(runs.values()))[0]
    threads = next(iter(llama.values())).threads
    lines = [
        f"llama.cpp rows: llama-cpp-python {first.version} on GGUF files llama.cpp's converter "
        "wrote from the same weights; a process of its own in every round (loading outside the "
        f"timer, 8 tokens of warm-up), {threads} threads as torch's, the same 16 prompt ids, "
        "top-k 50 at temperature 1 (top-p, min-p and repeat penalty off), the end-of-text token "
        f"not stopping it; timed from the prompt's evaluation to the {n}th token, as gpt's rows",
        f"llama.cpp without the prompt (the {n - 1} tokens after the first), tokens/s: "
        + ", ".join(f"{label} {statistics.median(r.decode_tokens_s for r in measured):.1f}"
                    for label, measured in runs.items()),
    ]
    if any(d.no_repack for d in llama.values()):
        lines.append("--no-repack: the weights as the file holds them, as llama-server's flag of "
                     "that name loads them; llama.cpp's default repacks them for the CPU's kernels")
    return lines


class TorchInt8Linear(torch.nn.Module):
    """torch's own int8 weight-only matmul (`_weight_int8pack_mm`): each weight is turned back
    into a float inside the kernel. The alternative to gpt.quant's kernel, measured beside it."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.weight, self.scale = quantize_weight(linear.weight)  # (N, K) int8, (N,): gpt's own
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.size(-1))
        y = torch.ops.aten._weight_int8pack_mm(rows, self.weight, self.scale.to(x.dtype))
        y = y if self.bias is None else y + self.bias
        return y.view(*x.shape[:-1], -1)


def torch_int8(model: GPT) -> GPT:
    """`model` with every Linear (the tied head included) a TorchInt8Linear."""
    model.replace_linears(TorchInt8Linear)
    return model


def two_matmul_attention(self, q, k, v, group):  # noqa: ANN001, ANN201 (Attention's signature)
    """One-token decode attention written as softmax(q k^T / sqrt(hs)) v: two small matmuls,
    the alternative to SDPA's kernel measured beside it."""
    if q.size(-2) != 1:
        return ORIGINAL_ATTEND(self, q, k, v, group)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (b, nh, 1, S)
    if group.mask is not None:
        scores = scores.masked_fill(~group.mask, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v


ORIGINAL_ATTEND = Attention._attend_group


def patched(fn: Callable[..., float], target: object, name: str, value: object
            ) -> Callable[..., float]:
    """`fn` run with `target.name` replaced by `value`, restored afterwards."""
    def run(*args: object) -> float:
        original = getattr(target, name)
        setattr(target, name, value)
        try:
            return fn(*args)
        finally:
            setattr(target, name, original)
    return run


def ablation(copy: Callable[..., GPT], shipped: dict[str, GPT], prompt: torch.Tensor, n: int,
             runs: int) -> list[list[str]]:
    """The decode path with one of its choices undone at a time, against the path as shipped:
    batch-1 tokens/s, medians of alternating rounds. `shipped` holds the bf16 and int8 models as
    `gpt sample` runs them; `copy(dtype, prepare)` makes another."""
    bf16 = shipped["bf16"]
    variants: dict[str, tuple] = {
        "bf16, as shipped": (ours, bf16, prompt, n),
        "bf16, Linear weights unpacked (F.linear)": (ours, copy(torch.bfloat16, lambda m: m),
                                                    prompt, n),
        "bf16, KV cache in bf16 (not float32)": (
            patched(ours, gpt_generate, "cache_dtype", lambda m: torch.bfloat16), bf16, prompt, n),
        "bf16, one-token attention as two matmuls (not SDPA)": (
            patched(ours, Attention, "_attend_group", two_matmul_attention), bf16, prompt, n),
    }
    if "int8" in shipped:
        int8 = shipped["int8"]
        other = torch.float32 if int8.transformer.wte.weight.dtype == torch.bfloat16 else \
            torch.bfloat16
        variants.update({
            "int8, as shipped": (ours, int8, prompt, n),
            f"int8, activations in {str(other)[6:]}": (
                ours, copy(other, lambda m: quantize(m, "int8")), prompt, n),
            "int8, torch's weight-only kernel (_weight_int8pack_mm)": (
                ours, copy(int8.transformer.wte.weight.dtype, torch_int8), prompt, n),
        })
    rates = medians(runs, variants)
    rows = []
    for label, rate in rates.items():
        base = rates["int8, as shipped" if label.startswith("int8") else "bf16, as shipped"]
        print(f"{label:55s} {rate:7.1f} tok/s  {rate / base:5.2f}x as shipped")
        rows.append([label, f"{rate:.1f}", f"{rate / base:.2f}x"])
    return rows


def rounds(runs: int, measurements: dict) -> dict[str, list[float]]:
    """Each measurement `runs` times, taking turns so that load drifts hit all alike."""
    for fn, *fn_args in measurements.values():
        fn(*fn_args[:-1], 8)  # warm-up
    results: dict[str, list[float]] = {label: [] for label in measurements}
    for _ in range(runs):
        for label, (fn, *fn_args) in measurements.items():
            results[label].append(fn(*fn_args))
    return results


def medians(runs: int, measurements: dict) -> dict[str, float]:
    """The median of each measurement's rounds."""
    return {label: statistics.median(v) for label, v in rounds(runs, measurements).items()}


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def gguf_types(text: str) -> list[str]:
        found = [x.strip().lower() for x in text.split(",") if x.strip()]
        for outtype in found:
            if outtype not in GGUF_TYPES:
                raise argparse.ArgumentTypeError(f"unknown GGUF type {outtype!r}; choose from "
                                                 f"{', '.join(GGUF_TYPES)}")
        return found

    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gguf-types", type=gguf_types, default=["bf16", "f16", "q8_0"],
                        help=f"llama.cpp rows, comma-separated, from {', '.join(GGUF_TYPES)}")
    parser.add_argument("--llama-python", default=None, metavar="PATH",
                        help="a python with llama-cpp-python (or GPT_BENCH_LLAMA_PYTHON)")
    anchors.add_convert_options(parser)
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "gpt-bench-sample",
                        help="where the export and its GGUF files are kept for later runs")
    docs.add_doc_options(parser)
    args = parser.parse_args()
    if args.new_tokens < 2 or args.runs < 1:
        parser.error("--new-tokens must be at least 2 and --runs at least 1")
    return parser, args


def main() -> None:
    parser, args = parse_args()
    doc = docs.docs_target(parser, args, "bench-sample")
    load_before = docs.load_average()
    model = anchors.gpt2_model(seed=0).eval()  # GPT-2 124M's shape, HF's unpadded vocabulary
    hf_model = to_hf(model)

    def sampling_copy(dtype: torch.dtype, prepare: Callable[[GPT], GPT] = pack_linears) -> GPT:
        """The model as `gpt sample` runs it: in dtype, Linear weights packed for the CPU (or
        as `prepare` makes them)."""
        copy = GPT(model.config).eval()
        copy.load_state_dict(model.state_dict())
        return prepare(copy.to(dtype))

    model_fp32, model_bf16 = sampling_copy(torch.float32), sampling_copy(torch.bfloat16)
    prompt = torch.randint(0, 50257, (1, 16))
    n = args.new_tokens
    weight_bytes = {"fp32": model.num_params() * 4, "bf16": model.num_params() * 2}
    skipped, int8 = [], {}
    if quantize is None:
        skipped.append("gpt sample path, int8: this checkout has no gpt.quant")
    else:
        try:  # in place of pack_linears: the int8 kernels take the bf16 copy's Linear layers
            model_int8 = sampling_copy(torch.bfloat16, lambda m: quantize(m, "int8"))
        except GPTError as e:  # no int8 kernel on this CPU
            skipped.append(f"gpt sample path, int8: {e}")
        else:
            int8["gpt sample path, int8"] = (ours, model_int8, prompt, n)
            weight_bytes["int8"] = tensor_bytes(model_int8)
    llama, cannot = llama_decoders(args, model)
    skipped += cannot
    for line in skipped:
        print(f"skipped: {line}")

    print(f"threads: {torch.get_num_threads()}, load average before: {os.getloadavg()[0]:.2f}")
    # the bandwidth is measured in every round, next to the runs it bounds: on a shared host
    # it moves by tens of percent from one minute to the next
    results = rounds(args.runs, {
        "read bandwidth, GB/s": (lambda _: bandwidth_gb_s(), None),
        "HF transformers generate, fp32": (hf, hf_model, prompt, n),
        "gpt sample path, fp32": (ours, model_fp32, prompt, n),
        "gpt sample path, bf16": (ours, model_bf16, prompt, n),
        **int8,
        "gpt, fp32, unpacked Linear": (ours, model, prompt, n),
        "bf16 matmuls alone (no sampler)": (matmuls_alone, model_bf16, n),
        **{label: (decoder, prompt, n) for label, decoder in llama.items()},
    })
    bandwidth = results.pop("read bandwidth, GB/s")
    print(f"read bandwidth per round: {', '.join(f'{bw:.1f}' for bw in bandwidth)} GB/s")
    notes = [f"read bandwidth per round: {', '.join(f'{bw:.1f}' for bw in bandwidth)} GB/s"]
    for decoder in llama.values():
        if decoder.runs:
            weight_bytes[f"{decoder.outtype.upper()} GGUF"] = decoder.runs[0].tensor_bytes
    for dtype, size in weight_bytes.items():
        bounds = [bw * 1e9 / size for bw in bandwidth]
        print(f"bound ({dtype}, {size / 1e6:.0f} MB read per token): "
              f"{statistics.median(bounds):.1f} tok/s (median of rounds)")
        notes.append(f"bound ({dtype}, {size / 1e6:.0f} MB of weights read per token): "
                     f"{statistics.median(bounds):.1f} tokens/s (median of rounds)")
    results["no cache (nanoGPT's loop), fp32"] = [no_cache(model, prompt, min(n, 64))]
    rows, rates = decoding_rows(results, bandwidth, weight_bytes, llama)
    for line in [*goal_lines(rates), *llama_notes(llama, n)]:
        print(line)
        notes.append(line)
    notes += [f"skipped: {line}" for line in skipped]
    more = []
    shipped = {"bf16": model_bf16}
    if int8:
        shipped["int8"] = int8["gpt sample path, int8"][1]
    for label, m in shipped.items():
        steps = medians(args.runs, {
            "whole": (decode_step_ms, m, n),
            "rest": (lambda m, k: decode_step_ms(m, k, without_matmuls=True), m, n),
        })
        whole, rest = steps["whole"], steps["rest"]
        print(f"{label} decode step: {whole:.2f} ms; without its matmuls (Linear layers return "
              f"zeros): {rest:.2f} ms ({rest / whole:.0%})")
        more.append([f"{label} decode step, whole / Linear layers returning zeros",
                     f"{whole:.2f} ms / {rest:.2f} ms ({rest / whole:.0%})"])
    batch = prompt.repeat(8, 1)
    batch_rates = medians(
        args.runs, {"fp32": (ours, model_fp32, batch, n), "bf16": (ours, model_bf16, batch, n)}
    )
    for label, rate in batch_rates.items():
        print(f"gpt {label}, batch 8: {rate:.1f} tok/s in total")
        more.append([f"gpt sample path, {label}, batch 8", f"{rate:.1f} tokens/s in total"])
    long_prompt = torch.randint(0, 50257, (1, 512))
    for label, m in (("fp32", model_fp32), ("bf16", model_bf16)):
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            next(iter(generate(m, long_prompt, 1, temperature=0)))
            times.append(time.perf_counter() - start)
        print(f"time to first token, 512-token prompt, {label}: {statistics.median(times):.3f} s")
        more.append([f"time to first token, 512-token prompt, {label}",
                     f"{statistics.median(times):.3f} s"])
    with torch.inference_mode():
        a = model(long_prompt[:, :128])[0].float()
        b = model_bf16(long_prompt[:, :128])[0].float()
    agree = (a.argmax(-1) == b.argmax(-1)).float().mean().item()
    diff = (a - b).abs().max().item()
    kl = torch.nn.functional.kl_div(
        b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1).mean().item()  # KL(fp32 || bf16) per position, in nats
    top_a, top_b = a.topk(50, dim=-1).indices, b.topk(50, dim=-1).indices  # (1, 128, 50)
    overlap = (top_a[..., :, None] == top_b[..., None, :]).any(-1).float().mean().item()
    closeness = (f"bf16 vs fp32 logits (random weights, whose logits are nearly flat: std "
                 f"{a.std().item():.2f}): max abs diff {diff:.3f}, KL {kl:.1e} nats per token, "
                 f"top-50 sets {overlap:.1%} shared, argmax agreement {agree:.2%}")
    print(closeness)
    print(f"load average after: {os.getloadavg()[0]:.2f} (other processes slow every row)")
    ablated = ablation(sampling_copy, shipped, prompt, n, args.runs)
    tables = [docs.markdown_table(["decoding path", "tokens/s", "vs HF", "of the bound"], rows),
              docs.markdown_table(["measurement", "median"], more),
              docs.markdown_table(["ablation: one choice undone", "tokens/s", "vs as shipped"],
                                  ablated)]
    docs.publish(doc, "bench-sample", tables, load_before, [
        "model: GPT-2-124M shape, random weights; batch 1 unless stated, a 16-token prompt, "
        f"{n} new tokens (no cache: {min(n, 64)}), top-k 50; medians of {args.runs} rounds",
        *notes,
        closeness,
    ])


if __name__ == "__main__":
    main()
