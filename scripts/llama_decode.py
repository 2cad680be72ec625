"""llama.cpp's batch-1 decoding speed through llama-cpp-python, for scripts/bench_sample.py.

Run by a python that has llama-cpp-python, not by gpt's (it imports neither torch nor gpt). It
loads a GGUF file, evaluates the prompt's token ids and generates exactly `--new-tokens` tokens
with top-k sampling at temperature 1 (top-p, min-p, typical and repeat penalty off; the
end-of-text token does not stop it), after a warm-up of 8 tokens, then prints one JSON line:

    {"tokens": N, "tokens_s": ..., "decode_tokens_s": ..., "tensor_bytes": ..., "version": ...}

`tokens_s` times the prompt's evaluation and the N tokens, the span bench_sample times gpt's
sampler over; `decode_tokens_s` the N - 1 steps after the first token (no prompt). Loading the
model is outside both timers. `--no-repack` loads the weights as the file holds them, as
llama-server's flag of that name does, instead of repacking them for the CPU's kernels.

    python scripts/llama_decode.py MODEL.gguf --prompt 464,2068,7586 --new-tokens 256 --threads 2
        [--top-k 50] [--seed 0] [--no-repack]
"""

from __future__ import annotations

import argparse
import json
import time


def generate(llm, prompt: list[int], n: int, top_k: int) -> tuple[float, float]:
    """Seconds for the prompt and the N tokens, and for the N - 1 tokens after the first."""
    llm.reset()  # from position 0: the prompt is evaluated whole, not found in the cache
    tokens = llm.generate(prompt, top_k=top_k, top_p=1.0, min_p=0.0, typical_p=1.0, temp=1.0,
                          repeat_penalty=1.0)
    start = time.perf_counter()
    next(tokens)  # evaluates the prompt, then samples the first token
    first = time.perf_counter()
    for _ in range(n - 1):
        next(tokens)
    end = time.perf_counter()
    tokens.close()
    return end - start, end - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="a GGUF file")
    parser.add_argument("--prompt", required=True,
                        help="the prompt's token ids, comma-separated")
    parser.add_argument("--new-tokens", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-repack", action="store_true",
                        help="keep the weights as stored (Q8_0 crashed repacked on AMX-INT8 CPUs)")
    args = parser.parse_args()
    prompt = [int(t) for t in args.prompt.split(",")]
    if args.new_tokens < 2 or not prompt:
        parser.error("--new-tokens must be at least 2, and --prompt needs a token")

    import llama_cpp  # here, so that --help works in any python

    if args.no_repack:  # Llama() takes no such argument: it builds on the default parameters
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def without_repacking() -> llama_cpp.llama_model_params:
            params = defaults()
            params.use_extra_bufts = False  # the extra buffer types are the repacked layouts
            return params

        llama_cpp.llama_cpp.llama_model_default_params = without_repacking
    llm = llama_cpp.Llama(
        args.model, n_ctx=len(prompt) + max(args.new_tokens, 8) + 1,
        n_batch=len(prompt),  # the prompt in one batch, as gpt's sampler takes it
        n_threads=args.threads, n_threads_batch=args.threads, seed=args.seed, verbose=False,
    )
    generate(llm, prompt, 8, args.top_k)  # warm-up
    whole, after_first = generate(llm, prompt, args.new_tokens, args.top_k)
    print(json.dumps({
        "tokens": args.new_tokens,
        "tokens_s": args.new_tokens / whole,
        "decode_tokens_s": (args.new_tokens - 1) / after_first,
        "tensor_bytes": llama_cpp.llama_model_size(llm.model),
        "version": llama_cpp.__version__,
    }))


if __name__ == "__main__":
    main()
