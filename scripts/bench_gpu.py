"""Benchmark `gpt train` on one CUDA GPU: the GPT-2-124M shape in bfloat16, and what each speed
option of `[train]` buys.

Trains the config's model (configs/gpt2_124m.toml: block 1024, vocabulary 50,304 padded) through
`gpt train` itself, on random GPT-2 tokens cut into documents of 64 to 2,048 tokens (or, with
`--data config`, the config's own prepared data), once per row of the ablation:

    eager      not compiled
    compiled   torch.compile on the whole model (the baseline of the rows below)
    blocks     each block compiled on its own (train.compile_scope = "blocks")
    chunked    the LM head and loss over --loss-chunk tokens at a time (train.loss_chunk)
    docmask    FlexAttention within each document (train.document_masking)
    fp8        torchao's float8 matmuls in the blocks (train.fp8)
    all        blocks + chunked + fp8 together
    batch      compiled, at each of --batch-sizes

Each row's tokens/s is read from its metrics.jsonl: one figure per window of `--window` steps
after `--warmup` steps (compilation, the allocator's first steps), the median reported, with its
peak memory and the run's wall time (compilation included: inductor's cache is off, so every
row compiles from nothing). The reference is the plain loop nanoGPT's train.py runs (random
memmap windows, forward, backward, clip, fused AdamW) over the same model, data and precision,
compiled, timed over the same windows. MFU is tokens/s times `GPT.flops_per_token` over the
GPU's dense bf16 peak (gpt/metrics.py's table, or `--peak-flops`), for the fp8 rows too.

`--compare-steps N` (default 300; 0 skips it) then trains bf16 and fp8 side by side for N steps
on the interpreter's own standard library (text a model learns from, and on every machine) and
checks that fp8's final losses are within `--fp8-tolerance` (relative) of bf16's. A row that
cannot run (out of memory, fp8 on a GPU without float8) says why in the table instead.
`--write-docs` puts the tables into docs/performance.md (or `--docs PATH`). `--results PATH`
appends every record (setup, each row as it finishes, the comparison, the host) to PATH, and
`--merge PATH...` builds the tables from such files without measuring, so the rows can be
measured in several shorter runs and published as one block.

    python scripts/bench_gpu.py [--config configs/gpt2_124m.toml] [--rows eager,compiled,...]
        [--batch-size 16] [--batch-sizes 8,16,32,64] [--loss-chunk 4096] [--warmup 20]
        [--steps 50] [--window 10] [--no-reference] [--data random|config]
        [--compare-steps 300] [--fp8-tolerance 0.02] [--peak-flops F] [--results PATH]
        [--write-docs [--docs PATH]]
    python scripts/bench_gpu.py --merge PATH... [--write-docs [--docs PATH]]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import doc_tables as docs
import numpy as np
import torch

from gpt.config import RunConfig, load_config
from gpt.data.prepare import prepare
from gpt.data.prepared import PreparedData
from gpt.device import check_fp8
from gpt.errors import GPTError
from gpt.metrics import peak_flops
from gpt.model import GPT
from gpt.optim import make_optimizer
from gpt.tokenizer import get_tokenizer
from gpt.train import train

RANDOM_TOKENS = 2_000_000  # about 8 MB of text: tokenized in seconds, far more than is read
DOCUMENT_TOKENS = (64, 2048)  # the random corpus's documents: shorter and longer than a row
ROWS = ("eager", "compiled", "blocks", "chunked", "docmask", "fp8", "all", "batch")
COMPILED = ("train.compile=true", "train.compile_scope=model")
COMPILED_LABEL = "`gpt train`, compiled whole"
REFERENCE_LABEL = "plain loop, compiled (reference)"
DEVICE = "cuda"  # the tests run the plumbing on "cpu"
COMPARE_SOURCE = "python-stdlib"  # text a model learns from, on every machine, no download


@dataclass(frozen=True)
class Variant:
    """One row of the ablation: its label and the settings it adds to the common ones."""

    key: str
    label: str
    overrides: tuple[str, ...]


@dataclass
class Measured:
    """What one row's run gave: tokens/s per window, peak memory, wall time; or why it failed."""

    rates: list[float] = dataclasses.field(default_factory=list)
    peak_gib: float | None = None
    wall_s: float = 0.0
    error: str | None = None


def variants(rows: list[str], batch_sizes: list[int], loss_chunk: int) -> list[Variant]:
    """The ablation's rows, in `ROWS` order, of the keys in `rows`."""
    chunk = f"train.loss_chunk={loss_chunk}"
    blocks = ("train.compile=true", "train.compile_scope=blocks")
    table = {
        "eager": [Variant("eager", "`gpt train`, eager", ("train.compile=false",))],
        "compiled": [Variant("compiled", COMPILED_LABEL, COMPILED)],
        "blocks": [Variant("blocks", "compiled per block", blocks)],
        "chunked": [Variant("chunked", f"+ chunked loss ({loss_chunk:,} tokens)",
                            (*COMPILED, chunk))],
        "docmask": [Variant("docmask", "+ document masking (FlexAttention)",
                            (*COMPILED, "train.document_masking=true"))],
        "fp8": [Variant("fp8", "+ fp8 (torchao float8)", (*COMPILED, "train.fp8=true"))],
        "all": [Variant("all", "per block + chunked loss + fp8",
                        (*blocks, chunk, "train.fp8=true"))],
        "batch": [Variant("batch", f"compiled whole, batch {b}",
                          (*COMPILED, f"train.batch_size={b}")) for b in batch_sizes],
    }
    return [v for key in ROWS if key in rows for v in table[key]]


def random_corpus(folder: Path, tokens: int, seed: int = 0) -> None:
    """Text files of uniformly random GPT-2 tokens, `tokens` in all, each a document of
    DOCUMENT_TOKENS tokens, for `prepare` to tokenize with an end-of-text after each."""
    tokenizer = get_tokenizer("gpt2")
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written, n = 0, 0
    while written < tokens:
        length = int(rng.integers(*DOCUMENT_TOKENS))
        ids = rng.integers(0, tokenizer.eot_id, length)  # never the end-of-text itself
        (folder / f"doc{n:05d}.txt").write_text(tokenizer.decode(ids.tolist()), encoding="utf-8")
        written, n = written + length, n + 1


def timed_windows(
    step: Callable[[], None], sync: Callable[[], None], warmup: int, steps: int, window: int
) -> list[float]:
    """Seconds per window of `window` calls of `step`, after `warmup` calls; `sync` waits for
    the device at each window's ends."""
    for _ in range(warmup):
        step()
    sync()
    seconds = []
    for _ in range(steps // window):
        start = time.perf_counter()
        for _ in range(window):
            step()
        sync()
        seconds.append(time.perf_counter() - start)
    return seconds


def reference_tok_per_s(
    cfg: RunConfig, device: torch.device, dtype: torch.dtype, compile_model: bool,
    warmup: int, steps: int, window: int,
) -> list[float]:
    """Tokens/s per window of the plain loop: what a training step costs with nothing around it."""
    data = PreparedData(cfg.data.resolved_data_dir).tokens("train")
    torch.manual_seed(cfg.train.seed)
    model = GPT(cfg.model).to(device)
    optimizer = make_optimizer(model, cfg.train, device)
    trained = torch.compile(model) if compile_model else model
    B, T = cfg.train.batch_size, cfg.model.block_size
    offsets = np.arange(T + 1)

    def step() -> None:
        starts = torch.randint(len(data) - T, (B,)).numpy()
        batch = torch.from_numpy(data[starts[:, None] + offsets].astype(np.int64))  # (B, T + 1)
        if device.type == "cuda":
            batch = batch.pin_memory().to(device, non_blocking=True)
        x, y = batch[:, :-1], batch[:, 1:]  # (B, T) each
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = trained(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    seconds = timed_windows(step, lambda: _sync(device), warmup, steps, window)
    return [B * T * window / s for s in seconds]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def metrics_of(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def run_row(cfg: RunConfig, warmup: int) -> Measured:
    """Train `cfg` with `gpt train` in this process; its tokens/s per logged window ending
    after `warmup` steps, its peak memory and wall time, or the one line it failed with."""
    torch._dynamo.reset()  # each row compiles its own graphs
    gc.collect()  # a failed row's tensors, before the next one measures its peak
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    try:
        code = train(cfg)
    except GPTError as e:  # out of memory, fp8 on a GPU without float8: the row says so
        return Measured(error=str(e))
    if code != 0:
        return Measured(error=f"gpt train exited {code}")
    records = metrics_of(Path(cfg.train.out_dir))
    rates = [r["tok_per_s"] for r in records if "tok_per_s" in r and r["iter"] > warmup]
    peaks = [r["peak_mem_gib"] for r in records if "peak_mem_gib" in r]
    return Measured(rates, max(peaks) if peaks else None, time.perf_counter() - started)


def mfu_text(rate: float, flops: int, peak: float | None) -> str:
    return f"{flops * rate / peak:.1%}" if peak else "n/a"


def baseline_label(results: list[tuple[str, Measured]]) -> str | None:
    """The row the others are compared with: the whole model compiled where it ran, else the
    first row that ran."""
    ran = [label for label, m in results if m.error is None and m.rates]
    compiled = [label for label in ran if label == COMPILED_LABEL]
    return (compiled or ran or [None])[0]


def ablation_table(
    results: list[tuple[str, Measured]], flops: int, peak: float | None, reference: float | None
) -> str:
    """The Markdown table of the rows: median tokens/s, MFU, against the plain loop (when it
    ran) and against the baseline row (`baseline_label`), peak memory, wall time; a failed row
    its reason."""
    base_label = baseline_label(results)
    base = statistics.median(dict(results)[base_label].rates) if base_label else None
    rows = []
    for label, m in results:
        if m.error is not None or not m.rates:
            reason = f"did not run: {m.error or 'no windows'}"
            rows.append([label, "-", "-", "-", "-", "-", "-", reason])
            continue
        rate = statistics.median(m.rates)
        rows.append([
            label, f"{rate:,.0f}", mfu_text(rate, flops, peak),
            f"{rate / reference:.3f}" if reference else "n/a",
            f"{rate / base:.3f}" if base else "n/a",
            f"{m.peak_gib:.1f}" if m.peak_gib is not None else "n/a", f"{m.wall_s:.0f}", "",
        ])
    header = ["row", "tokens/s", "MFU", "vs plain loop", "vs baseline", "peak GiB",
              "wall s", "note"]
    return docs.markdown_table(header, rows)


@dataclass(frozen=True)
class Curve:
    """A comparison run's losses: the final validation loss, and the mean training loss over
    the last quarter of the logged steps."""

    val_loss: float
    late_train_loss: float


def curve_of(records: list[dict]) -> Curve:
    train_losses = [r["loss"] for r in records if "loss" in r]
    late = train_losses[-max(1, len(train_losses) // 4):]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    return Curve(val[-1], statistics.fmean(late))


def fp8_table(bf16: Curve, fp8: Curve, tolerance: float) -> tuple[str, bool]:
    """The bf16-against-fp8 table, and whether every fp8 loss is within `tolerance` (relative)
    of bf16's."""
    pairs = [("final val loss", bf16.val_loss, fp8.val_loss),
             ("mean train loss, last quarter", bf16.late_train_loss, fp8.late_train_loss)]
    rows, within = [], True
    for name, a, b in pairs:
        gap = abs(b - a) / a
        within &= gap <= tolerance
        rows.append([name, f"{a:.4f}", f"{b:.4f}", f"{gap:.2%}",
                     "within" if gap <= tolerance else "OUTSIDE"])
    header = ["loss", "bf16", "fp8", "relative gap", f"tolerance {tolerance:.0%}"]
    return docs.markdown_table(header, rows), within


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, Path | None]:
    """The options, checked; and the docs file to write (None without --write-docs)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpt2_124m.toml")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows to run, of {', '.join(ROWS)}")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sequences per step of every row but batch's (16 x 1024 fits an "
                             "80 GB GPU)")
    parser.add_argument("--batch-sizes", default="8,16,32,64",
                        help="the batch row's sizes, comma-separated")
    parser.add_argument("--loss-chunk", type=int, default=4096,
                        help="tokens per chunk of the chunked rows")
    parser.add_argument("--warmup", type=int, default=20, help="steps before timing")
    parser.add_argument("--steps", type=int, default=50, help="timed steps")
    parser.add_argument("--window", type=int, default=10, help="steps per timed window")
    parser.add_argument("--no-reference", dest="reference", action="store_false",
                        help="leave out the plain loop")
    parser.add_argument("--data", choices=("random", "config"), default="random",
                        help="random GPT-2 tokens in documents, or the config's [data] "
                             "(prepare it first)")
    parser.add_argument("--compare-steps", type=int, default=300,
                        help="steps of the bf16-against-fp8 loss comparison; 0 skips it")
    parser.add_argument("--fp8-tolerance", type=float, default=0.02,
                        help="the relative gap of fp8's losses to bf16's that passes")
    parser.add_argument("--peak-flops", type=float, default=None,
                        help="the GPU's peak bf16 FLOP/s, for a GPU gpt/metrics.py does not know")
    parser.add_argument("--results", type=Path, default=None, metavar="PATH",
                        help="append each record (setup, row, comparison, host) to PATH as JSON "
                             "lines as it is measured")
    parser.add_argument("--merge", type=Path, nargs="+", default=None, metavar="PATH",
                        help="measure nothing: build the tables from the --results files of "
                             "earlier runs (no GPU needed)")
    docs.add_doc_options(parser)
    args = parser.parse_args(argv)
    for name in ("warmup", "steps", "window"):
        if getattr(args, name) % args.window or getattr(args, name) <= 0:
            parser.error(f"--{name} must be a positive multiple of --window ({args.window})")
    args.rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown or not args.rows:
        parser.error(f"--rows: unknown {', '.join(unknown) or 'nothing'}; choose among "
                     f"{', '.join(ROWS)}")
    try:
        args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    except ValueError:
        parser.error(f"--batch-sizes {args.batch_sizes!r}: give whole numbers, comma-separated")
    if any(b <= 0 for b in [*args.batch_sizes, args.batch_size, args.loss_chunk]):
        parser.error("--batch-size, --batch-sizes and --loss-chunk must be positive")
    if args.compare_steps < 0 or not 0 < args.fp8_tolerance < 1:
        parser.error("--compare-steps must be >= 0 and --fp8-tolerance in (0, 1)")
    return args, docs.docs_target(parser, args, "bench-gpu")


def require_cuda() -> None:
    if not torch.cuda.is_available():
        raise SystemExit(
            f"bench_gpu.py needs a CUDA GPU, and this torch ({torch.__version__}, CUDA "
            f"{torch.version.cuda or 'not built in'}) sees none; run it on a GPU machine "
            "(scripts/bench_train.py measures training on the CPU)"
        )


def common_overrides(args: argparse.Namespace, out_dir: Path, steps: int) -> list[str]:
    """The settings every row shares: bfloat16 on the GPU, `steps` steps, one batch a step."""
    overrides = [
        f"train.device={DEVICE}", "train.dtype=bfloat16", f"train.batch_size={args.batch_size}",
        "train.grad_accum_steps=1", f"train.max_iters={steps}",
        f"train.log_interval={args.window}", f"train.eval_interval={steps}", "train.eval_iters=1",
        f"train.out_dir={out_dir}", "log.wandb=false",
    ]
    if args.peak_flops is not None:
        overrides.append(f"train.peak_flops={args.peak_flops}")
    return overrides


def with_vocabulary(cfg: RunConfig) -> RunConfig:
    """`cfg` with its data prepared and vocab_size taken from it where unset."""
    meta = prepare(cfg.data, progress=False, block_size=cfg.model.block_size)
    if cfg.model.vocab_size is None:
        cfg = dataclasses.replace(
            cfg, model=dataclasses.replace(cfg.model, vocab_size=meta["vocab_size"]))
    return cfg


def compare_fp8(args: argparse.Namespace, tmp: Path) -> tuple[Curve, Curve] | None:
    """bf16 and fp8 trained alike for --compare-steps steps on the standard library's text;
    None where fp8 cannot run here (said on stdout)."""
    try:
        check_fp8(torch.device(DEVICE))
    except GPTError as e:
        print(f"fp8 comparison skipped: {e}")
        return None
    curves = []
    for fp8 in (False, True):
        overrides = [
            *common_overrides(args, tmp / f"compare-{fp8}", args.compare_steps), *COMPILED,
            f"train.fp8={str(fp8).lower()}", "train.eval_iters=20", "train.log_interval=10",
            f"train.warmup_iters={max(1, args.compare_steps // 10)}",
            f"data.source={COMPARE_SOURCE}", "data.tokenizer=gpt2",
            f"data.data_dir={tmp / 'compare-data'}",
        ]
        measured = run_row(with_vocabulary(load_config(args.config, overrides)), 0)
        if measured.error is not None:
            print(f"fp8 comparison skipped: {measured.error}")
            return None
        curves.append(curve_of(metrics_of(tmp / f"compare-{fp8}")))
    return curves[0], curves[1]


class Results:
    """What a measurement found, record by record: the setup, each row, the fp8 comparison and
    the host. Each record is appended to the `--results` file as it comes (JSON lines), so a run
    stopped part way keeps its finished rows, and `--merge` builds the tables from the files of
    several runs (a GPU session's time limit may not hold every row in one run)."""

    def __init__(self, path: Path | None = None) -> None:
        self.path, self.records = path, []

    def add(self, kind: str, **values: object) -> None:
        record = {"kind": kind, **values}
        self.records.append(record)
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    @classmethod
    def read(cls, paths: list[Path]) -> Results:
        results = cls()
        for path in paths:
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
                results.records += [json.loads(line) for line in lines if line.strip()]
            except (OSError, ValueError) as e:
                raise SystemExit(f"--merge {path}: cannot read its records ({e}); give a file "
                                 "that bench_gpu.py --results wrote") from None
        if not results.of("setup"):
            raise SystemExit("--merge: no setup record in the files; give files that "
                             "bench_gpu.py --results wrote")
        return results

    def of(self, kind: str) -> list[dict]:
        return [r for r in self.records if r["kind"] == kind]

    def rows(self) -> list[tuple[str, Measured]]:
        return [(r["label"], Measured(r["rates"], r["peak_gib"], r["wall_s"], r["error"]))
                for r in self.of("row")]


def measure(args: argparse.Namespace, results: Results) -> None:
    """Run the rows, the plain loop and the fp8 comparison on the GPU, into `results`."""
    import torch._inductor.config as inductor_config

    inductor_config.force_disable_caches = True  # each row's wall time compiles afresh
    device, dtype = torch.device(DEVICE), torch.bfloat16
    load_before = docs.load_average()
    steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        data = []
        if args.data == "random":
            random_corpus(tmp / "random", RANDOM_TOKENS)
            data = [f"data.source={tmp / 'random'}", "data.tokenizer=gpt2", "data.glob=*.txt",
                    f"data.data_dir={tmp / 'data'}", "data.streaming=false"]
        cfg = with_vocabulary(load_config(args.config, [*common_overrides(args, tmp, steps),
                                                        *data]))
        model = GPT(cfg.model)
        results.add(
            "setup", gpu=torch.cuda.get_device_name(device),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            cuda=torch.version.cuda, config=args.config, params=model.num_params(),
            vocab=cfg.model.padded_vocab_size, flops=model.flops_per_token(),
            peak=peak_flops(cfg.train, device, dtype), batch_size=args.batch_size,
            block_size=cfg.model.block_size, data=args.data, warmup=args.warmup,
            steps=args.steps, window=args.window,
        )
        del model
        for i, variant in enumerate(variants(args.rows, args.batch_sizes, args.loss_chunk)):
            row_cfg = load_config(args.config, [*common_overrides(args, tmp / f"out-{i}", steps),
                                                *data, *variant.overrides])
            print(f"{variant.label}: training {steps} steps")
            m = run_row(dataclasses.replace(row_cfg, model=cfg.model), args.warmup)
            results.add("row", label=variant.label, **dataclasses.asdict(m))
        if args.reference:
            rates = reference_tok_per_s(cfg, device, dtype, True, args.warmup, args.steps,
                                        args.window)
            results.add("row", label=REFERENCE_LABEL, **dataclasses.asdict(Measured(rates)))
        if args.compare_steps and (curves := compare_fp8(args, tmp)) is not None:
            results.add("fp8", steps=args.compare_steps,
                        curves=[dataclasses.asdict(c) for c in curves])
    results.add("host", markdown=docs.host_markdown(load_before))


def report(results: Results, tolerance: float, doc: Path | None) -> None:
    """Print the tables of `results` and write them, with the setup and the host they were
    measured on, into the bench-gpu block of `doc` (None: print only)."""
    setup, rows = results.of("setup")[0], results.rows()
    reference = [statistics.median(m.rates) for label, m in rows if label == REFERENCE_LABEL]
    peak = setup["peak"]
    tables = [ablation_table(rows, setup["flops"], peak, reference[0] if reference else None)]
    notes = [
        f"GPU: {setup['gpu']}, compute capability {setup['capability']}, CUDA {setup['cuda']}; "
        + (f"peak {peak / 1e12:.0f} TFLOP/s (bf16 dense) for MFU, the fp8 rows' too" if peak
           else "peak unknown (pass --peak-flops for MFU)"),
        f"model: `{setup['config']}`, {setup['params']:,} parameters, vocabulary "
        f"{setup['vocab']:,} (padded), {setup['flops'] / 1e9:.3f} GFLOP per token",
        f"{setup['batch_size']} x {setup['block_size']} tokens per step (the batch rows aside), "
        f"bfloat16, data: {setup['data']}",
        f"baseline: {baseline_label(rows) or 'none ran'}; medians of "
        f"{setup['steps'] // setup['window']} windows of {setup['window']} steps after "
        f"{setup['warmup']} warm-up steps; wall time includes compiling, with inductor's cache off",
    ]
    for record in results.of("fp8"):
        table, within = fp8_table(*(Curve(**c) for c in record["curves"]), tolerance)
        tables.append(table)
        notes.append(f"fp8 against bf16: {record['steps']} steps each, compiled, on the standard "
                     f"library's text (gpt2 tokens): {'within' if within else 'OUTSIDE'} "
                     f"{tolerance:.0%}")
    hosts = [r["markdown"] for r in results.of("host")] or [
        "- host not recorded: the run stopped before its end"]
    if len(results.of("setup")) > 1:
        notes.append(f"rows of {len(results.of('setup'))} runs of this script, merged with "
                     "--merge; the hosts below, one list each")
    print("\n\n".join(tables))
    print("\n".join(notes))
    if doc is not None:
        notes_md = "\n".join(f"- {note}" for note in notes)
        docs.write_block(doc, "bench-gpu", "\n\n".join([*tables, notes_md, *hosts]))
        print(f"wrote the table into {doc}")


def main(argv: list[str] | None = None) -> None:
    args, doc = parse_args(argv)
    if args.merge:
        results = Results.read(args.merge)
    else:
        require_cuda()
        results = Results(args.results)
        measure(args, results)
    report(results, args.fp8_tolerance, doc)


if __name__ == "__main__":
    main()
