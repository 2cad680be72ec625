"""Benchmark decoding speed on the CPU: gpt's KV-cached sampler vs HF generate vs no cache.

A GPT-2-124M-shaped model (12 layers, 12 heads, 768 wide, block 1024, vocab 50257) with the same
random weights in `gpt` and in `transformers.GPT2LMHeadModel` (copied through gpt/hf/convert.py).
Batch 1, a 16-token prompt, top-k sampling; tokens/s are medians of several runs in this one
process.
The memory-bandwidth bound is the measured read bandwidth divided by the bytes of weights read
per token. `--write-docs` puts the table into docs/performance.md (or `--docs PATH`).

    python scripts/bench_sample.py [--new-tokens 256] [--runs 3] [--write-docs [--docs PATH]]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import doc_tables as docs
import torch

from gpt.config import ModelConfig
from gpt.generate import cache_dtype, generate
from gpt.hf.convert import to_hf
from gpt.model import GPT
from gpt.onednn import PackedLinear, pack_linears


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
    forward = PackedLinear.forward
    if without_matmuls:
        PackedLinear.forward = lambda self, x: x.new_zeros(*x.shape[:-1], self.out_features)
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
        PackedLinear.forward = forward
    return statistics.median(times) * 1e3


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    docs.add_doc_options(parser)
    args = parser.parse_args()
    doc = docs.docs_target(parser, args, "bench-sample")
    load_before = docs.load_average()
    torch.manual_seed(0)
    gpt2 = ModelConfig(vocab_size=50257, padded_vocab_size=50257, activation="gelu_tanh")
    model = GPT(gpt2).eval()  # GPT-2 124M's shape, HF's unpadded vocabulary
    hf_model = to_hf(model)

    def sampling_copy(dtype: torch.dtype) -> GPT:
        """The model as `gpt sample` runs it: in dtype, Linear weights packed for the CPU."""
        copy = GPT(model.config).eval()
        copy.load_state_dict(model.state_dict())
        return pack_linears(copy.to(dtype))

    model_fp32, model_bf16 = sampling_copy(torch.float32), sampling_copy(torch.bfloat16)
    prompt = torch.randint(0, 50257, (1, 16))
    n = args.new_tokens

    print(f"threads: {torch.get_num_threads()}, load average before: {os.getloadavg()[0]:.2f}")
    weight_bytes = {"fp32": model.num_params() * 4, "bf16": model.num_params() * 2}
    # the bandwidth is measured in every round, next to the runs it bounds: on a shared host
    # it moves by tens of percent from one minute to the next
    results = rounds(args.runs, {
        "read bandwidth, GB/s": (lambda _: bandwidth_gb_s(), None),
        "HF transformers generate, fp32": (hf, hf_model, prompt, n),
        "gpt sample path, fp32": (ours, model_fp32, prompt, n),
        "gpt sample path, bf16": (ours, model_bf16, prompt, n),
        "gpt, fp32, unpacked Linear": (ours, model, prompt, n),
        "bf16 matmuls alone (no sampler)": (matmuls_alone, model_bf16, n),
    })
    bandwidth = results.pop("read bandwidth, GB/s")
    print(f"read bandwidth per round: {', '.join(f'{bw:.1f}' for bw in bandwidth)} GB/s")
    notes = [f"read bandwidth per round: {', '.join(f'{bw:.1f}' for bw in bandwidth)} GB/s"]
    for dtype, size in weight_bytes.items():
        bounds = [bw * 1e9 / size for bw in bandwidth]
        print(f"bound ({dtype}, {size / 1e6:.0f} MB read per token): "
              f"{statistics.median(bounds):.1f} tok/s (median of rounds)")
        notes.append(f"bound ({dtype}, {size / 1e6:.0f} MB of weights read per token): "
                     f"{statistics.median(bounds):.1f} tokens/s (median of rounds)")
    results["no cache (nanoGPT's loop), fp32"] = [no_cache(model, prompt, min(n, 64))]
    reference = statistics.median(results["HF transformers generate, fp32"])
    rows = []
    for label, rates in results.items():
        size = weight_bytes["bf16" if "bf16" in label else "fp32"]
        # each round's rate against the bound measured in that round (no cache: the first)
        of_bound = statistics.median(
            rate / (bw * 1e9 / size) for rate, bw in zip(rates, bandwidth, strict=False)
        )
        rate = statistics.median(rates)
        print(f"{label:35s} {rate:7.1f} tok/s  {rate / reference:5.2f}x HF  "
              f"{of_bound:4.0%} of the bound")
        name = f"{label} (reference)" if label.startswith("HF") else label
        rows.append([name, f"{rate:.1f}", f"{rate / reference:.2f}x", f"{of_bound:.0%}"])
    steps = rounds(args.runs, {
        "whole": (decode_step_ms, model_bf16, n),
        "without matmuls": (lambda m, k: decode_step_ms(m, k, without_matmuls=True), model_bf16, n),
    })
    whole, rest = (statistics.median(v) for v in steps.values())
    print(f"bf16 decode step: {whole:.2f} ms; without its matmuls (Linear layers return zeros): "
          f"{rest:.2f} ms ({rest / whole:.0%})")
    more = [["bf16 decode step, whole / Linear layers returning zeros",
             f"{whole:.2f} ms / {rest:.2f} ms ({rest / whole:.0%})"]]
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
    tables = [docs.markdown_table(["decoding path", "tokens/s", "vs HF", "of the bound"], rows),
              docs.markdown_table(["measurement", "median"], more)]
    docs.publish(doc, "bench-sample", tables, load_before, [
        "model: GPT-2-124M shape, random weights; batch 1 unless stated, a 16-token prompt, "
        f"{n} new tokens (no cache: {min(n, 64)}), top-k 50; medians of {args.runs} rounds",
        *notes,
        closeness,
    ])


if __name__ == "__main__":
    main()
