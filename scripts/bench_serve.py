"""Serving under load: `gpt serve` against transformers serve and llama.cpp's server, one client.

Every server answers the same load on the same weights, one server at a time:

- `gpt serve` on a `gpt` checkpoint (`--dtype`, auto: bfloat16 where the CPU computes it), and
  with `--quantize int8` (server `gpt-int8`);
- `transformers serve` on the folder `gpt export` writes from it, with and without
  `--continuous-batching` (float32, its fastest on a CPU);
- llama.cpp's `llama-server` on that folder converted to GGUF by llama.cpp's own
  `convert_hf_to_gguf.py` (BF16; `--gguf-types bf16,f16` adds rows);
- with `--servers vllm` on a CUDA machine, `vllm serve` on the exported folder.

The load: N concurrent clients (`--clients 1,4,16,64`), each sending `--rounds` streaming
`/v1/completions` requests in a row over HTTP, a prompt of about `--prompt-tokens` tokens (its
own text for every request) and `--new-tokens` to generate, greedy. Per request the client
records the time to the first streamed text and every gap between text chunks; the tokens come
from the `usage` a server sends last (counted chunks where it sends none), so a server that
stops early shows it. Aggregate tokens/s = all streamed tokens / the level's wall time.
`gpt sample`'s path (the in-process batch-1 decode, as scripts/bench_sample.py measures it) runs
on the same checkpoint alongside, for the single-client goal.

The weights: a GPT-2-124M-shaped checkpoint with seeded random weights and GPT-2's tokenizer
(`--shape tiny` for a quick check of the plumbing), or a trained run (`--checkpoint RUN`); built,
exported and converted once into `--work` and reused by later runs.

The anchors are not dependencies: name them with flags or environment variables (a server that
is not named or found is skipped, saying why):

    --llama-server PATH    GPT_BENCH_LLAMA_SERVER   llama.cpp's llama-server
    --convert PATH         GPT_BENCH_CONVERT        llama.cpp's convert_hf_to_gguf.py
    --convert-python PATH  GPT_BENCH_CONVERT_PYTHON a python with the converter's requirements
    --transformers PATH    GPT_BENCH_TRANSFORMERS   `transformers` (of transformers[serving])
    --vllm PATH            GPT_BENCH_VLLM           the `vllm` command (GPU only)

    python scripts/bench_serve.py [--clients 1,4,16,64] [--servers gpt,gpt-int8,hf,hf-cb,llama]
        [--rounds 2] [--repeats 1] [--new-tokens 128] [--prompt-tokens 32]
        [--shape 124m | --checkpoint RUN] [--work DIR] [--write-docs [--docs PATH]]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import anchors
import doc_tables as docs
import httpx
import torch

from gpt.checkpoint import Checkpoint, Checkpointer
from gpt.config import to_dict
from gpt.device import resolve_dtype
from gpt.generate import generate
from gpt.hf.export import export
from gpt.parallel import Dist
from gpt.sample import load_for_inference
from gpt.tokenizer import Tokenizer, tokenizer_from_dict

ROOT = docs.ROOT
BLOCK = "bench-serve"  # the random 124M-shaped model's table
RUN_BLOCK = "bench-serve-run"  # a trained run's (--checkpoint), such as the quick start's
# changes to GPT-2 124M's shape (anchors.gpt2_model); `tiny` checks the plumbing in seconds
SHAPES = {
    "124m": {},
    "tiny": {"n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 256},
}
SERVERS = ("gpt", "gpt-int8", "hf", "hf-cb", "llama", "vllm")
WORDS = ("the river garden window music winter morning paper market letter station mountain "
         "doctor village kitchen story engine evening forest island bridge teacher summer "
         "number family water light city road friend house table school voice money night "
         "machine ocean silver orange quiet early little famous strong simple ancient").split()
LOG_TAIL = 20  # lines of a failed server's log shown


# ---------------------------------------------------------------------------------------------
# The weights: a checkpoint, its HF export and its GGUF conversions, cached in --work


@dataclass
class Weights:
    """One model in every format the servers read."""

    label: str  # what the table says the model is
    checkpoint: Path
    hf_folder: Path
    folder: Path  # where its conversions are cached
    block_size: int
    gguf: dict[str, Path | str] = field(default_factory=dict)  # outtype -> file, or why not


def random_checkpoint(folder: Path, shape: str, seed: int) -> Path:
    """A run folder holding one checkpoint of a GPT-2-shaped model with seeded random weights
    and GPT-2's tokenizer, written as `gpt train` writes its checkpoints."""
    out = folder / "run"
    if (out / "latest").is_file():
        return out
    model = anchors.gpt2_model(seed, **SHAPES[shape])
    source = anchors.InMemory(model, out)
    state = {"tokens": 0, "best_val_loss": None, "config": to_dict(source.config),
             "tokenizer": source.tokenizer}
    Checkpointer(out, Dist(), model, torch.optim.AdamW(model.parameters()), fixed=state).save(0)
    return out


def prepare_weights(args: argparse.Namespace) -> Weights:
    """The checkpoint (random or --checkpoint), its export and its GGUF files, built once."""
    if args.checkpoint is not None:
        found = Checkpoint.open(args.checkpoint)
        key = hashlib.sha256(str(found.path.resolve()).encode()).hexdigest()[:10]
        folder = args.work / f"run-{found.path.name}-{key}"
        checkpoint, label = found.path, f"the run {args.checkpoint} ({found.path.name})"
    else:
        folder = args.work / f"random-{args.shape}-seed{args.seed}"
        checkpoint = random_checkpoint(folder, args.shape, args.seed)
        found = Checkpoint.open(checkpoint)
        label = {"124m": "GPT-2-124M shape", "tiny": "tiny GPT-2 shape (2 layers, 128 wide)"}[
            args.shape] + f", random weights (seed {args.seed}), GPT-2's tokenizer"
    hf_folder = folder / "hf"
    if not (hf_folder / "config.json").is_file():
        export(found, hf_folder, force=True)
    weights = Weights(label, checkpoint, hf_folder.resolve(), folder,
                      found.config.model.block_size)
    weights.gguf = anchors.gguf_files(hf_folder, folder,
                                      args.gguf_types if "llama" in args.servers else [],
                                      args.convert, args.convert_python)
    return weights


# ---------------------------------------------------------------------------------------------
# The servers: how each is started, and what each request to it carries


@dataclass
class Server:
    """A server command line and what its requests need."""

    name: str  # as in --servers, plus the GGUF type for llama
    label: str  # the table's row name
    argv: list[str]  # {port} is replaced by the port picked
    model: str | None  # the request's "model" field
    fields: dict[str, object] = field(default_factory=dict)  # extra request fields it takes
    env: dict[str, str] = field(default_factory=dict)


USAGE = {"stream_options": {"include_usage": True}}  # a last chunk holding the token counts


def plan_servers(args: argparse.Namespace, weights: Weights, device: str, gpt_dtype: str,
                 slots: int, slot_context: int) -> tuple[list[Server], list[str]]:
    """The servers to run, and a line for each one asked for that cannot run here."""
    servers, skipped = [], []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    folder = str(weights.hf_folder)
    for name in args.servers:
        if name in ("gpt", "gpt-int8"):
            int8 = ["--quantize", "int8"] if name == "gpt-int8" else []
            servers.append(Server(name, f"gpt serve ({'int8' if int8 else gpt_dtype})", [
                sys.executable, "-m", "gpt", "serve", "--checkpoint", str(weights.checkpoint),
                "--port", "{port}", "--device", device, "--dtype", args.dtype, *int8,
                "--set", f"serve.max_batch={slots}", "--set", f"serve.context={slot_context}",
                "--set", f"serve.max_connections={slots + 8}",
            ], None, USAGE, {"PYTHONPATH": os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}))
        elif name in ("hf", "hf-cb"):
            program = anchors.find_program(args.transformers, "GPT_BENCH_TRANSFORMERS",
                                           "transformers")
            if program is None:
                skipped.append(f"{name}: `transformers` not found (--transformers or "
                               "GPT_BENCH_TRANSFORMERS; pip install 'transformers[serving]')")
                continue
            batching = ["--continuous-batching"] if name == "hf-cb" else []
            label = "transformers serve" + (" --continuous-batching" if batching else "")
            servers.append(Server(name, f"{label} ({args.hf_dtype})", [
                program, "serve", "--device", "cuda" if device == "cuda" else "cpu",
                "--dtype", args.hf_dtype, *batching, "--host", "127.0.0.1", "--port", "{port}",
                folder,
            ], folder, {}, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}))
        elif name == "llama":
            program = anchors.find_program(args.llama_server, "GPT_BENCH_LLAMA_SERVER",
                                           "llama-server")
            for outtype, gguf in weights.gguf.items():
                if program is None:
                    skipped.append(f"llama ({outtype}): llama-server not found (--llama-server "
                                   "or GPT_BENCH_LLAMA_SERVER)")
                elif isinstance(gguf, str):
                    skipped.append(f"llama ({outtype}): {gguf}")
                else:
                    # Q8_0 crashed at load on AMX-INT8 CPUs without --no-repack (docs/hf.md)
                    repack = ["--no-repack"] if outtype == "q8_0" else []
                    servers.append(Server(f"llama-{outtype}", f"llama-server ({outtype.upper()} "
                                          "GGUF)", [
                        program, "-m", str(gguf), "-t", str(cores), "--parallel", str(slots),
                        "-c", str(slots * slot_context), *repack, "--host", "127.0.0.1",
                        "--port", "{port}",
                    ], None, {**USAGE, "ignore_eos": True}))
        elif name == "vllm":
            program = anchors.find_program(args.vllm, "GPT_BENCH_VLLM", "vllm")
            if device != "cuda":
                skipped.append("vllm: needs a CUDA GPU")
            elif program is None:
                skipped.append("vllm: `vllm` not found (--vllm or GPT_BENCH_VLLM)")
            else:
                servers.append(Server("vllm", "vLLM", [
                    program, "serve", folder, "--host", "127.0.0.1", "--port", "{port}",
                    "--max-num-seqs", str(slots), "--max-model-len", str(slot_context),
                ], folder, {**USAGE, "ignore_eos": True}))
    return servers, skipped


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the server's process group, SIGKILL if it is still there 15 s later."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(15)
    settle(process.pid)


def settle(group: int, seconds: float = 15.0) -> None:
    """Wait until every process of the server's group is gone (a server's workers can outlive
    it by seconds), then a moment more: the next server measured must have the cores alone."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            break
        time.sleep(0.2)
    else:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    time.sleep(3)


class ServerFailed(Exception):
    """A server that did not come up; the message says why, with its log's last lines."""


@contextlib.contextmanager
def running(server: Server, log: Path, timeout: float) -> Iterator[str]:
    """The server started in a process group of its own, and its URL once /health answers 200;
    stopped on the way out, whatever happens (Ctrl-C included)."""
    port = free_port()
    argv = [a.replace("{port}", str(port)) for a in server.argv]
    with log.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT,
                                   env={**os.environ, **server.env}, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with {process.returncode}" if process.poll() is not None
                       else f"not ready after {timeout:.0f} s")
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL:])
                raise ServerFailed(f"{server.label} {why}: {' '.join(argv)}\n{tail}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=5, trust_env=False).status_code == 200:
                    break
            time.sleep(0.5)
        yield url
    finally:
        stop(process)


# ---------------------------------------------------------------------------------------------
# The client: one script for every server


@dataclass
class Record:
    """One streamed request, as the client saw it."""

    ttft: float | None = None  # seconds from sending to the first text
    gaps: list[float] = field(default_factory=list)  # seconds between text chunks
    chunks: int = 0  # chunks carrying text
    usage: int | None = None  # completion tokens the server reported
    error: str | None = None

    @property
    def tokens(self) -> int:
        return self.usage if self.usage is not None else self.chunks


async def stream_one(client: httpx.AsyncClient, url: str, body: dict) -> Record:
    """POST one streaming completion and time its server-sent events."""
    record, last = Record(), None
    start = time.perf_counter()
    try:
        async with client.stream("POST", url + "/v1/completions", json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                record.error = f"HTTP {response.status_code}: {text[:200]}"
                return record
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now, chunk = time.perf_counter(), json.loads(data)
                if "error" in chunk:
                    record.error = str(chunk["error"])[:200]
                    break
                if chunk.get("usage"):
                    record.usage = chunk["usage"].get("completion_tokens")
                if any(c.get("text") for c in chunk.get("choices") or []):
                    record.chunks += 1
                    if last is None:
                        record.ttft = now - start
                    else:
                        record.gaps.append(now - last)
                    last = now
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        record.error = f"{type(e).__name__}: {e}"
    return record


async def load(url: str, bodies: list[list[dict]], timeout: float) -> tuple[list[Record], float]:
    """Client i sends bodies[i] one after another, all clients at once; (records, wall s)."""
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits,
                                 trust_env=False) as client:

        async def one_client(mine: list[dict]) -> list[Record]:
            return [await stream_one(client, url, body) for body in mine]

        start = time.perf_counter()
        gathered = asyncio.gather(*(one_client(b) for b in bodies))
        try:
            done = await asyncio.wait_for(gathered, timeout * max(len(b) for b in bodies))
        finally:
            if gathered.done() and not gathered.cancelled():
                gathered.exception()  # read, so that an interrupted run logs no stray error
        return [r for records in done for r in records], time.perf_counter() - start


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank q-quantile (nan for no values)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


@dataclass
class Level:
    """One server at one client count: the figures of the table."""

    tokens_s: float
    ttft: tuple[float, float]  # p50, p99 seconds
    itl: tuple[float, float]  # p50, p99 seconds
    tokens: list[int]  # per request
    chunks: list[int]
    counted: bool  # tokens counted from chunks (the server sent no usage)
    errors: list[str]


def measure_level(records: list[Record], wall: float) -> Level:
    ok = [r for r in records if r.error is None]
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    gaps = [g for r in ok for g in r.gaps]
    return Level(
        tokens_s=sum(r.tokens for r in ok) / wall,
        ttft=(percentile(ttfts, 0.5), percentile(ttfts, 0.99)),
        itl=(percentile(gaps, 0.5), percentile(gaps, 0.99)),
        tokens=[r.tokens for r in ok], chunks=[r.chunks for r in ok],
        counted=any(r.usage is None for r in ok),
        errors=[r.error for r in records if r.error is not None],
    )


# ---------------------------------------------------------------------------------------------
# Prompts, the in-process sample path, the runs


def make_prompts(tokenizer: Tokenizer, count: int, length: int) -> list[str]:
    """`count` different texts of `length` tokens: seeded word salads, cut at a token."""
    prompts = []
    for k in range(count):
        words = random.Random(k).choices(WORDS, k=length * 2)
        ids = tokenizer.encode(f"{k}. " + " ".join(words))[:length]
        prompts.append(tokenizer.decode(ids))
    return prompts


def sample_path(checkpoint: Path, device: str, dtype: str, prompt: str, n: int,
                runs: int) -> float:
    """Tokens/s of `gpt sample`'s decode: batch 1, in this process, greedy; median of `runs`."""
    model, tokenizer = load_for_inference(Checkpoint.open(checkpoint), device, dtype, False)
    ids = torch.tensor([tokenizer.encode(prompt)], device=model.transformer.wte.weight.device)
    for _ in generate(model, ids, 8, temperature=0):  # warm-up
        pass
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        for _ in generate(model, ids, n, temperature=0):
            pass
        if device == "cuda":
            torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - start))
    return statistics.median(rates)


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def host_load() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {cores} cores"


def run_server(server: Server, args: argparse.Namespace, prompts: list[str], new_tokens: int,
               log: Path) -> dict[int, Level]:
    """Every client level against one server, after one warm-up request."""
    def body(prompt: str) -> dict:
        return {**({"model": server.model} if server.model else {}), "prompt": prompt,
                "max_tokens": new_tokens, "temperature": 0, "stream": True, **server.fields}

    results = {}
    print(f"{server.label}: starting ({host_load()})", flush=True)
    with running(server, log, args.start_timeout) as url:
        records, _ = asyncio.run(load(url, [[body(prompts[-1])]], args.timeout))
        if records[0].error is not None:
            raise ServerFailed(f"{server.label}: the warm-up request failed: {records[0].error}")
        for n in args.clients:
            bodies = [[body(prompts[i + n * r]) for r in range(args.rounds)] for i in range(n)]
            records, wall = asyncio.run(load(url, bodies, args.timeout))
            level = results[n] = measure_level(records, wall)
            print(f"  {n:3d} clients: {level.tokens_s:7.1f} tok/s, TTFT p50/p99 "
                  f"{level.ttft[0] * 1e3:.0f}/{level.ttft[1] * 1e3:.0f} ms, ITL p50/p99 "
                  f"{level.itl[0] * 1e3:.1f}/{level.itl[1] * 1e3:.1f} ms, tokens/request "
                  f"{min(level.tokens, default=0)}-{max(level.tokens, default=0)}"
                  + (f", {len(level.errors)} errors (first: {level.errors[0]})"
                     if level.errors else ""), flush=True)
    print(f"{server.label}: stopped ({host_load()})", flush=True)
    return results


# ---------------------------------------------------------------------------------------------
# The report


def median_spread(values: list[float], fmt: str) -> str:
    """The median, and the range when there is more than one value."""
    text = format(statistics.median(values), fmt)
    if len(values) > 1:
        text += f" ({format(min(values), fmt)}-{format(max(values), fmt)})"
    return text


def table(results: dict[str, list[dict[int, Level]]], labels: dict[str, str],
          sample: list[float], sample_label: str) -> str:
    """One row per server and client count: medians over the repeats (min-max)."""
    rows = []
    for name, repeats in results.items():
        for n in repeats[0]:
            levels = [r[n] for r in repeats]
            tokens = [t for level in levels for t in level.tokens]
            chunks = [c for level in levels for c in level.chunks]
            counted = " (counted)" if any(level.counted for level in levels) else ""
            errors = sum(len(level.errors) for level in levels)
            rows.append([
                labels[name], str(n), median_spread([lv.tokens_s for lv in levels], ".1f"),
                median_spread([lv.ttft[0] * 1e3 for lv in levels], ".0f"),
                median_spread([lv.ttft[1] * 1e3 for lv in levels], ".0f"),
                median_spread([lv.itl[0] * 1e3 for lv in levels], ".1f"),
                median_spread([lv.itl[1] * 1e3 for lv in levels], ".1f"),
                f"{statistics.mean(tokens):.1f}{counted} / {statistics.mean(chunks):.1f}"
                if tokens else "-",
                str(errors) if errors else "",
            ])
    if sample:
        rows.append([sample_label, "1 (in process)", median_spread(sample, ".1f"),
                     "", "", "", "", "", ""])
    return docs.markdown_table(
        ["server", "clients", "tokens/s (all clients)", "TTFT p50, ms", "TTFT p99, ms",
         "ITL p50, ms", "ITL p99, ms", "tokens / text chunks per request", "failed requests"],
        rows)


def goals(results: dict[str, list[dict[int, Level]]], labels: dict[str, str],
          sample: list[float], clients: list[int]) -> list[str]:
    """The serving goals, each as a ratio of medians against its target."""
    gpt = results.get("gpt")
    if not gpt:
        return ["goals: gpt serve was not measured"]
    high = 16 if 16 in clients else max(clients)
    at = plural(high, "client")

    def rate(name: str, n: int) -> float | None:
        repeats = results.get(name)
        if not repeats or n not in repeats[0]:
            return None
        return statistics.median(r[n].tokens_s for r in repeats)

    def line(what: str, value: float, target: str | None, ok: bool) -> str:
        if target is None:  # a comparison the goals do not set a figure for
            return f"{what}: {value:.2f}x"
        return f"{what}: {value:.2f}x (goal {target}x: {'met' if ok else 'missed'})"

    lines = []
    if 1 in clients and high != 1:
        ratio = rate("gpt", high) / rate("gpt", 1)
        lines.append(line(f"gpt serve, {at} / 1 client, tokens/s", ratio, ">= 8", ratio >= 8))
        itl = (statistics.median(r[high].itl[1] for r in gpt)
               / statistics.median(r[1].itl[1] for r in gpt))
        lines.append(line(f"gpt serve, p99 inter-token latency, {at} / 1 client", itl, "<= 3",
                          itl <= 3))
    for name in results:
        target = 3 if name.startswith("hf") else 1 if name.startswith("llama") else None
        if name != "gpt" and rate(name, high) is not None:
            ratio = rate("gpt", high) / rate(name, high)
            lines.append(line(f"gpt serve vs {labels[name]}, {at}, tokens/s", ratio,
                              None if target is None else f">= {target}",
                              target is not None and ratio >= target))
    if sample and 1 in clients:
        ratio = rate("gpt", 1) / statistics.median(sample)
        lines.append(line("gpt serve, 1 client / gpt sample path (batch 1, in process), "
                          "tokens/s", ratio, ">= 1", ratio >= 1))
    return lines


def anchor_version(server: Server) -> str | None:
    """The anchor's version as it reports it (bounded; None where it says nothing)."""
    program = server.argv[0]
    if server.name.startswith("llama"):
        command, marker = [program, "--version"], "version"  # "version: 0.5.0 (commit ...)"
    elif server.name.startswith("hf") or server.name == "vllm":
        marker = "transformers" if server.name.startswith("hf") else "vllm"
        python = Path(program).parent / "python"  # the environment the command belongs to
        command = [str(python), "-c", f"import {marker}; print('{marker}', {marker}.__version__)"]
    else:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = [s.strip() for s in (done.stdout + done.stderr).splitlines() if marker in s]
    if not lines:
        return None
    return f"llama.cpp {lines[0]}" if server.name.startswith("llama") else lines[0]


# ---------------------------------------------------------------------------------------------


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def ints(text: str) -> list[int]:
        return sorted({int(x) for x in text.split(",") if x.strip()})

    def names(text: str) -> list[str]:
        found = [x.strip() for x in text.split(",") if x.strip()]
        for name in found:
            if name not in SERVERS:
                raise argparse.ArgumentTypeError(f"unknown server {name!r}; choose from "
                                                 f"{', '.join(SERVERS)}")
        return found

    parser.add_argument("--clients", type=ints, default=[1, 4, 16, 64],
                        help="concurrent clients per level, comma-separated")
    parser.add_argument("--rounds", type=int, default=2, help="requests each client sends in a row")
    parser.add_argument("--repeats", type=int, default=1,
                        help="times the whole set of servers runs, in alternating order")
    parser.add_argument("--new-tokens", type=int, default=128, help="max_tokens of each request")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens of each prompt")
    parser.add_argument("--servers", type=names,
                        default=["gpt", "gpt-int8", "hf", "hf-cb", "llama"],
                        help=f"comma-separated, from {', '.join(SERVERS)}")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="124m",
                        help="the random model's shape (tiny: a quick check of the plumbing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--checkpoint", default=None, metavar="RUN",
                        help="a trained run (out_dir or ckpt-* folder) instead of random weights")
    parser.add_argument("--dtype", default="auto", help="gpt serve's and the sample path's dtype")
    parser.add_argument("--hf-dtype", default="float32", help="transformers serve's dtype")
    parser.add_argument("--device", default="auto", help="auto (cuda when there is one) or cpu")
    parser.add_argument("--gguf-types", type=lambda t: [x.strip() for x in t.split(",")],
                        default=["bf16"], help="llama-server rows: bf16, f16, q8_0, f32")
    parser.add_argument("--llama-server", default=None, metavar="PATH",
                        help="llama.cpp's llama-server (or GPT_BENCH_LLAMA_SERVER, or on PATH)")
    anchors.add_convert_options(parser)
    parser.add_argument("--transformers", default=None, metavar="PATH",
                        help="the `transformers` command (or GPT_BENCH_TRANSFORMERS, or on PATH)")
    parser.add_argument("--vllm", default=None, metavar="PATH",
                        help="the `vllm` command (or GPT_BENCH_VLLM, or on PATH); GPU only")
    parser.add_argument("--sample-runs", type=int, default=3,
                        help="runs of the in-process sample path per repeat (0: skip it)")
    parser.add_argument("--work", type=Path,
                        default=Path(tempfile.gettempdir()) / "gpt-bench-serve",
                        help="where the weights, conversions and server logs are kept")
    parser.add_argument("--start-timeout", type=float, default=300,
                        help="seconds a server may take to answer /health")
    parser.add_argument("--timeout", type=float, default=1800,
                        help="seconds one request may take (a queued one included)")
    docs.add_doc_options(parser)
    args = parser.parse_args()
    if min(args.clients, default=0) < 1 or args.rounds < 1 or args.repeats < 1:
        parser.error("--clients, --rounds and --repeats take positive numbers")
    if args.new_tokens < 2 or args.prompt_tokens < 1:
        parser.error("--new-tokens must be at least 2 (a gap needs two tokens), "
                     "--prompt-tokens at least 1")
    return parser, args


def interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> None:
    parser, args = parse_args()
    block = RUN_BLOCK if args.checkpoint is not None else BLOCK
    doc = docs.docs_target(parser, args, block)
    signal.signal(signal.SIGTERM, interrupt)  # stops the servers as Ctrl-C does
    load_before = docs.load_average()
    args.work = args.work.resolve()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"before: {host_load()}; work: {args.work}", flush=True)
    weights = prepare_weights(args)
    tokenizer = tokenizer_from_dict(Checkpoint.open(weights.checkpoint).tokenizer)
    new_tokens = min(args.new_tokens, weights.block_size - args.prompt_tokens)
    if new_tokens < args.new_tokens:
        print(f"note: the model's context is {weights.block_size} tokens: {new_tokens} new "
              f"tokens per request instead of {args.new_tokens}")
    slots, slot_context = max(args.clients), min(weights.block_size, 256 * math.ceil(
        (args.prompt_tokens + new_tokens + 1) / 256))
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device
    device = "cpu" if device == "auto" else device
    gpt_dtype = str(resolve_dtype(args.dtype, torch.device(device), "--dtype", inference=True)
                    ).removeprefix("torch.")
    servers, skipped = plan_servers(args, weights, device, gpt_dtype, slots, slot_context)
    for line in skipped:
        print(f"skipped: {line}")
    prompts = make_prompts(tokenizer, slots * args.rounds + 1, args.prompt_tokens)
    labels = {s.name: s.label for s in servers}
    sample_label = f"gpt sample path, batch 1 ({gpt_dtype})"
    results: dict[str, list[dict[int, Level]]] = {}
    sample: list[float] = []
    failed: set[str] = set()
    logs = weights.folder / "logs"
    logs.mkdir(exist_ok=True)
    for repeat in range(args.repeats):
        order = [None, *servers] if repeat % 2 == 0 else [*servers[::-1], None]  # None: sample
        for server in order:
            if server is None:
                if args.sample_runs > 0:
                    rate = sample_path(weights.checkpoint, device, args.dtype, prompts[0],
                                       new_tokens, args.sample_runs)
                    sample.append(rate)
                    print(f"{sample_label}: {rate:.1f} tok/s ({host_load()})", flush=True)
            elif server.name not in failed:
                try:
                    levels = run_server(server, args, prompts, new_tokens,
                                        logs / f"{server.name}-{repeat}.log")
                except ServerFailed as e:
                    print(f"failed: {e}", flush=True)
                    skipped.append(str(e).splitlines()[0])
                    failed.add(server.name)
                    continue
                results.setdefault(server.name, []).append(levels)
    results = {name: r for name, r in results.items() if name not in failed}
    print(f"after: {host_load()}")
    tables = [table(results, labels, sample, sample_label)]
    goal_lines = goals(results, labels, sample, args.clients)
    versions = {anchor_version(s) for s in servers if s.name in results} - {None}
    notes = [
        f"model: {weights.label}; a {args.prompt_tokens}-token prompt of its own per request, "
        f"{new_tokens} new tokens asked for, greedy; `ignore_eos` where the server takes it "
        "(llama-server, vLLM)",
        f"{', '.join(map(str, args.clients))} concurrent streaming clients over "
        f"`/v1/completions`, each sending {plural(args.rounds, 'request')} in a row; servers run "
        f"one at a time, {plural(args.repeats, 'time')} each, in alternating order"
        + (": medians (min-max)" if args.repeats > 1 else ""),
        f"every server is started with room for {plural(slots, 'sequence')} of "
        f"{slot_context} tokens",
        *goal_lines,
        *(f"skipped: {line}" for line in skipped),
        *(f"anchor: {v}" for v in sorted(versions)),
    ]
    print("\n" + tables[0] + "\n")
    for line in notes:
        print(f"- {line}")
    docs.publish(doc, block, tables, load_before, notes)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted; every server started was stopped", file=sys.stderr)
        sys.exit(130)
