"""The `gpt` command line. The only module that imports typer.

Each command parses its options, resolves the config and calls one function of the package.
Every `GPTError` becomes a one-line `error: ...` on stderr and exit code 2 (a traceback only
with `gpt --debug ...`); standard output that cannot be written ends any command in `main`,
with exit code 1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TextIO, get_origin, get_type_hints

import typer
import typer.core

from gpt import __version__
from gpt.config import (
    SECTIONS,
    DataConfig,
    RunConfig,
    SampleConfig,
    ServeConfig,
    layer_on_checkpoint,
    load_config,
)
from gpt.errors import GPTError, compile_errors
from gpt.stdout import failing_stdout_ends_here

if TYPE_CHECKING:  # names for annotations only: each command imports what it runs
    from gpt.checkpoint import Checkpoint
    from gpt.hf.pretrained import Pretrained
    from gpt.model import GPT
    from gpt.plan import Plan

# the click that typer runs on: click itself, or the copy that newer typers carry inside
_click_errors = sys.modules[typer.BadParameter.__module__]


class _UsageError(_click_errors.UsageError):  # type: ignore[misc, name-defined]
    """A usage error shown as every other error is: one `error:` line, saying where help is."""

    def __init__(self, message: str, where: str) -> None:
        super().__init__(message)
        self.where = where

    def show(self, file: Any = None) -> None:
        typer.echo(f"error: {self.format_message().rstrip('.')}; see {self.where} --help",
                   err=True)


# `gpt` alone prints the help through a usage error of its own (click >= 8.2): left as it is
_LEFT_AS_THEY_ARE = tuple(
    e for e in (_UsageError, getattr(_click_errors, "NoArgsIsHelpError", None)) if e is not None
)


@contextlib.contextmanager
def _one_line_usage_errors(group: Any = None) -> Iterator[None]:
    """Click's usage errors as `_UsageError`s; `group` is the context of the command group,
    for errors of a command's options that carry no context of their own."""
    try:
        yield
    except _click_errors.UsageError as e:
        if isinstance(e, _LEFT_AS_THEY_ARE):
            raise
        if e.ctx is not None:
            where = e.ctx.command_path
        elif group is not None and group.invoked_subcommand:
            where = f"{group.command_path} {group.invoked_subcommand}"
        else:
            where = "gpt"
        raise _UsageError(e.format_message(), where) from None


class _Group(typer.core.TyperGroup):
    """gpt's commands, whose usage errors (an unknown option, a value of the wrong type, a
    missing one) are one line like every other error, not usage, hint and message on four."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors(ctx):
            return super().invoke(ctx)


app = typer.Typer(
    cls=_Group,
    name="gpt",
    help="Tokenize a corpus, train a GPT on it, sample from it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_state = {"debug": False}

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="TOML run config (see configs/).", show_default=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option(
        "--set",
        "-s",
        help="Override one key: --set section.key=value (repeatable; wins over the file).",
        show_default=False,
    ),
]


def command(*args: Any, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command whose GPTErrors end in one clean line and exit code 2."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*a: Any, **kw: Any) -> Any:
            try:
                return fn(*a, **kw)
            except GPTError as e:
                if _state["debug"]:
                    raise
                typer.echo(f"error: {e}", err=True)
                raise typer.Exit(2) from None

        return app.command(*args, **kwargs)(wrapper)

    return decorate


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gpt {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version.")
    ] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


@command()
def info(
    config: ConfigOption = None,
    set_: SetOption = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            "--checkpoint",
            help="Describe a trained model instead: a run's out_dir, one ckpt-* folder, or an "
            "HF model (hf:FOLDER, hf:OWNER/NAME, gpt2 ... gpt2-xl).",
            show_default=False,
        ),
    ] = None,
    which: Annotated[
        str | None,
        typer.Option(
            "--which", help="With --checkpoint: latest (default) or best.", show_default=False
        ),
    ] = None,
    nproc: Annotated[
        int,
        typer.Option(
            "--nproc", min=1,
            help="Also show the memory of each of this many training processes, as "
            "train.parallel (ddp, fsdp or hsdp) splits it.",
        ),
    ] = 1,
) -> None:
    """Show the resolved config, parameter count, FLOPs per token, memory estimate and the
    device's peak FLOP/s (MFU's denominator)."""
    from gpt.hf.pretrained import is_pretrained
    from gpt.info import describe

    planned = _info_plan(config, set_, checkpoint, which)
    hf_model = checkpoint is not None and is_pretrained(checkpoint)  # no run: only its model
    typer.echo(describe(planned, ("model",) if hf_model else tuple(SECTIONS), nproc))


def _info_plan(
    config: Path | None, overrides: list[str] | None, checkpoint: str | None, which: str | None
) -> Plan:
    """The run `gpt info` describes: --config and --set planned as gpt train plans them, or a
    checkpoint's model, as trained."""
    from gpt.plan import Plan, plan_run

    if checkpoint is None:
        if which is not None:
            raise GPTError("--which picks one checkpoint of an out_dir; give --checkpoint with it")
        return plan_run(load_config(config, overrides))
    if config is not None:
        raise GPTError("give either --checkpoint or --config, not both")
    if overrides:
        raise GPTError(
            "--set does not apply to --checkpoint, which describes the model as trained; drop "
            "--set, or size a changed model with --config and --set"
        )
    from gpt.hf.pretrained import open_model

    return Plan(open_model(checkpoint, which or "latest").config, None, None)


@command()
def prepare(
    config: ConfigOption = None,
    set_: SetOption = None,
    force: Annotated[
        bool, typer.Option("--force", help="Rebuild even if already prepared.")
    ] = False,
    bad_rows: BadRowsOption = None,
    long_conversations: LongConversationsOption = None,
) -> None:
    """Tokenize [data] source into train.bin, val.bin and meta.json in [data] data_dir (chat
    data: conversations packed into rows, with train.mask and val.mask)."""
    from gpt.plan import plan_run

    cfg = load_config(config, set_)
    flags = _given(bad_rows=bad_rows, long_conversations=long_conversations)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **flags))
    plan_run(cfg).prepare_data(force=force)


@command()
def tokenizer(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Bytes per token on [data] source's validation text for the learned BPE (once prepared),
    GPT-2's BPE and characters, and a few lines split into tokens."""
    from gpt.data.report import tokenizer_report

    cfg = load_config(config, set_)
    typer.echo(tokenizer_report(cfg.data))


@command()
def train(
    config: ConfigOption = None,
    set_: SetOption = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume/--no-resume",
            help="Continue from out_dir's latest checkpoint (default), or refuse to touch one.",
        ),
    ] = True,
) -> None:
    """Prepare the data if needed, then train, evaluate and checkpoint (torchrun for many GPUs)."""
    from gpt.train import train as run_training

    code = run_training(load_config(config, set_), resume=resume)
    if code:
        raise typer.Exit(code)


CHECKPOINT_HELP = (
    "A run's out_dir, one ckpt-* folder, or an HF model: hf:FOLDER (written by save_pretrained), "
    "hf:OWNER/NAME (the hub), gpt2, gpt2-medium, gpt2-large, gpt2-xl."
)
CheckpointOption = Annotated[
    str | None, typer.Option("--checkpoint", help=CHECKPOINT_HELP, show_default=False)
]
WhichOption = Annotated[
    str, typer.Option("--which", help="latest or best checkpoint of an out_dir.")
]
DeviceOption = Annotated[str, typer.Option("--device", help="auto, cpu, cuda, cuda:N, mps.")]
DtypeOption = Annotated[
    str,
    typer.Option(
        "--dtype", help="auto (bfloat16 where computed natively), float32, bfloat16, float16."
    ),
]
CompileOption = Annotated[bool, typer.Option("--compile", help="torch.compile the model.")]
QuantizeOption = Annotated[str | None, typer.Option(
    "--quantize", show_default=False,
    help="int8: the Linear layers' weights in int8, quantized at load (the checkpoint is not "
    "changed); on CPUs with AVX512-VNNI or AVX-VNNI, with a C compiler.")]


def _mirror(section: type[Any], key: str, *aliases: str, also: str = "") -> Any:
    """The option of a flag that mirrors a config key: named after the key, of its type and
    with its help text, as declared once in gpt/config.py (`also` adds what only the flag
    does); None while not given, so that the config decides."""
    (declared,) = [f for f in dataclasses.fields(section) if f.name == key]
    default = (declared.default if declared.default is not dataclasses.MISSING
               else declared.default_factory())
    hint = get_type_hints(section)[key]
    meaning = "; ".join(part for part in (declared.metadata["help"], also) if part)
    repeatable = " Repeatable." if get_origin(hint) is list else ""
    help_text = (f"{meaning[0].upper()}{meaning[1:]}.{repeatable} Default: "
                 f"[{section.section}] {key}, else {json.dumps(default)}.")
    flag = "--" + key.replace("_", "-")
    return Annotated[hint | None, typer.Option(flag, *aliases, help=help_text, show_default=False)]


# the flags of gpt sample, chat and serve that mirror a [sample] or [serve] key
PromptOption = _mirror(SampleConfig, "prompt", "-p", also="- reads stdin")
MaxNewTokensOption = _mirror(SampleConfig, "max_new_tokens")
TemperatureOption = _mirror(SampleConfig, "temperature")
TopKOption = _mirror(SampleConfig, "top_k")
TopPOption = _mirror(SampleConfig, "top_p")
NumSamplesOption = _mirror(SampleConfig, "num_samples")
SeedOption = _mirror(SampleConfig, "seed")
StopOption = _mirror(SampleConfig, "stop")
IgnoreEosOption = _mirror(SampleConfig, "ignore_eos")
BadRowsOption = _mirror(DataConfig, "bad_rows")
LongConversationsOption = _mirror(DataConfig, "long_conversations")
HostOption = _mirror(ServeConfig, "host")
PortOption = _mirror(ServeConfig, "port")

# gpt sample's own flags
PromptFileOption = Annotated[
    Path | None, typer.Option("--prompt-file", help="Read the prompt from a file.")
]
PromptFormatOption = Annotated[
    str, typer.Option("--prompt-format", help="How --prompt-file holds prompts: text (the "
                      "whole file is one), lines (one per line), jsonl (JSON strings or "
                      '{"prompt": ...} objects; the output is JSON Lines).')
]
StreamOption = Annotated[bool | None, typer.Option(
    "--stream/--no-stream", help="Print text as it is decoded (default: on a terminal).")
]


def _checkpoint_path(
    checkpoint: str | None, config: Path | None, overrides: list[str] | None
) -> str:
    """--checkpoint, or the out_dir of --config."""
    if checkpoint is not None and config is not None:
        raise GPTError("give either --checkpoint or --config, not both")
    if checkpoint is not None:
        return checkpoint
    if config is None:
        raise GPTError(
            "no model given: pass --checkpoint OUT_DIR (or --config FILE for its out_dir)"
        )
    return load_config(config, overrides).train.out_dir


def _given(**flags: Any) -> dict[str, Any]:
    """The flags the user gave (not None): each wins over its config key."""
    return {k: v for k, v in flags.items() if v is not None}


def _checkpoint_config(
    checkpoint: str | None, config: Path | None, set_: list[str] | None, which: str,
    section: str, command: str, flags: dict[str, Any] | None = None,
) -> tuple[str, Checkpoint | Pretrained, RunConfig]:
    """The model a command runs (its path and itself) and the config, layered: defaults, the
    checkpoint's config, --config, --set (of `section`'s keys, and --config's out_dir), then the
    `flags` given for `section`'s keys (checked before a large model loads)."""
    from gpt.hf.pretrained import open_model

    path = _checkpoint_path(checkpoint, config, set_)
    flags = flags or {}
    dataclasses.replace(SECTIONS[section](), **flags)  # bad flags fail before a model loads
    found = open_model(path, which)
    applies = (section,) if checkpoint is not None else (section, "train.out_dir")
    cfg = layer_on_checkpoint(found.config, config, set_, applies, command)
    flagged = dataclasses.replace(getattr(cfg, section), **flags)
    return path, found, dataclasses.replace(cfg, **{section: flagged})


@command()
def sample(
    checkpoint: CheckpointOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    which: WhichOption = "latest",
    prompt: PromptOption = None,
    prompt_file: PromptFileOption = None,
    prompt_format: PromptFormatOption = "text",
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    num_samples: NumSamplesOption = None,
    seed: SeedOption = None,
    stop: StopOption = None,
    ignore_eos: IgnoreEosOption = None,
    stream: StreamOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    compile_model: CompileOption = False,
    quantize: QuantizeOption = None,
) -> None:
    """Generate text from a trained checkpoint (model, tokenizer and defaults come from it)."""
    from gpt.quant import check_method
    from gpt.sample import check_prompt_format, load_for_inference, read_prompts, write_samples

    check_prompt_format(prompt_format, prompt_file)
    check_method(quantize, compile_model)
    flags = _given(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, num_samples=num_samples, seed=seed, stop=stop or None,
                   ignore_eos=ignore_eos)
    _, found, cfg = _checkpoint_config(checkpoint, config, set_, which, "sample", "gpt sample",
                                       flags)
    prompts = read_prompts(prompt, prompt_file, prompt_format, cfg.sample)
    stream = sys.stdout.isatty() if stream is None else stream  # before stdout is redirected
    with _stdout_for_text_only() as out:
        load = functools.partial(load_for_inference, found, device, dtype, compile_model, quantize)
        write_samples(load, prompts, cfg.sample, stream,
                      lambda text: typer.echo(text, nl=False, file=out))


@command()
def chat(
    checkpoint: CheckpointOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    which: WhichOption = "latest",
    system: Annotated[str, typer.Option("--system", help="The system message to start with.")] = "",
    max_new_tokens: MaxNewTokensOption = None,
    temperature: TemperatureOption = None,
    top_k: TopKOption = None,
    top_p: TopPOption = None,
    seed: SeedOption = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    compile_model: CompileOption = False,
    quantize: QuantizeOption = None,
) -> None:
    """Talk with a checkpoint's model: a message a line; /reset, /system TEXT, /quit; Ctrl-C
    stops a reply. Settings come from [sample], as for gpt sample."""
    from gpt.chat import Chat, check_settings, run_chat
    from gpt.quant import check_method
    from gpt.sample import load_for_inference

    check_method(quantize, compile_model)
    flags = _given(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed)
    _, found, cfg = _checkpoint_config(checkpoint, config, set_, which, "sample", "gpt chat",
                                       flags)
    check_settings(cfg.sample)
    with _stdout_for_text_only() as out, compile_errors("--compile"):
        model, tokenizer = load_for_inference(found, device, dtype, compile_model, quantize)
        run_chat(Chat(model, tokenizer, cfg.sample, system.strip()), stdout=out)


@contextlib.contextmanager
def _stdout_for_text_only() -> Iterator[TextIO]:
    """The real stdout, for the command's own output; meanwhile whatever libraries print goes to
    stderr, and their warnings and log records are silenced unless --debug."""
    out = sys.stdout
    with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
        if _state["debug"]:
            yield out
            return
        warnings.simplefilter("ignore")
        previous = logging.root.manager.disable
        logging.disable(logging.WARNING)
        try:
            yield out
        finally:
            logging.disable(previous)


@command()
def serve(
    checkpoint: CheckpointOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    which: WhichOption = "latest",
    host: HostOption = None,
    port: PortOption = None,
    api_key: Annotated[str | None, typer.Option(
        "--api-key", envvar="GPT_API_KEY", show_envvar=True, show_default=False,
        help="Require 'Authorization: Bearer KEY' on every API route.")] = None,
    cors_origin: Annotated[list[str] | None, typer.Option(
        "--cors-origin", show_default=False,
        help="Let pages from this origin call the API (repeatable); none by default.")] = None,
    device: DeviceOption = "auto",
    dtype: DtypeOption = "auto",
    quantize: QuantizeOption = None,
) -> None:
    """Serve a checkpoint over OpenAI's API (/v1/completions, /v1/chat/completions) with a chat
    page at / (needs the serve extra: pip install 'gpt[serve]')."""
    from gpt.quant import check_method
    from gpt.sample import load_for_inference
    from gpt.serve import require_extra

    require_extra()
    check_method(quantize)
    from gpt.serve.server import serve as serve_model
    from gpt.tokenizer import tokenizer_from_dict

    flags = _given(host=host, port=port)
    path, found, cfg = _checkpoint_config(checkpoint, config, set_, which, "serve", "gpt serve",
                                          flags)

    def load() -> GPT:  # in the engine's thread, once the port is bound
        with _stdout_for_text_only():
            return load_for_inference(found, device, dtype, False, quantize)[0]

    serve_model(load, tokenizer_from_dict(found.tokenizer), path, cfg.serve, api_key or None,
                cors_origin or ())


TasksOption = Annotated[str | None, typer.Option(
    "--tasks", help="Run these lm-evaluation-harness tasks instead (hellaswag,arc_easy,...; "
    "needs gpt[eval]).")]
IncludePathOption = Annotated[Path | None, typer.Option(
    "--include-path", help="A folder of your own task YAML files, for --tasks.")]
NumFewshotOption = Annotated[int | None, typer.Option(
    "--num-fewshot", help="Examples before each question (default: the task's).")]
LimitOption = Annotated[float | None, typer.Option(
    "--limit", help="Items per task (below 1: a fraction of them), for a quick check.")]
BatchSizeOption = Annotated[int, typer.Option(
    "--batch-size", help="Continuations scored or sequences decoded at once, for --tasks.")]
OutputOption = Annotated[Path | None, typer.Option(
    "--output", help="Write the harness's results to this JSON file.")]


@command(name="eval")
def eval_(
    checkpoint: CheckpointOption = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    which: WhichOption = "latest",
    split: Annotated[str | None, typer.Option("--split", help="val or train.")] = None,
    data: Annotated[
        str | None, typer.Option("--data", help="Evaluate on this text file or source instead.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    device: DeviceOption = "auto",
    quantize: QuantizeOption = None,
    tasks: TasksOption = None,
    include_path: IncludePathOption = None,
    num_fewshot: NumFewshotOption = None,
    limit: LimitOption = None,
    batch_size: BatchSizeOption = 16,
    output: OutputOption = None,
) -> None:
    """Loss, perplexity and bits per byte of a checkpoint over a whole split or a text; or its
    scores on lm-evaluation-harness tasks (--tasks)."""
    from gpt.evaluate import evaluate, tokens_of_source, tokens_of_split
    from gpt.quant import check_method
    from gpt.sample import load_for_inference

    check_method(quantize)
    if tasks is not None and (data is not None or split is not None):
        raise GPTError("--tasks runs on the tasks' own data; give --data or --split without it")
    if split not in (None, "val", "train"):
        raise GPTError(f"--split {split!r} is not a split; use --split val or --split train")
    _, found, cfg = _checkpoint_config(checkpoint, config, set_, which, "data", "gpt eval")
    if tasks is not None:
        from gpt.harness import TaskOptions, evaluate_tasks, parse_tasks  # needs gpt[eval]

        typer.echo(evaluate_tasks(found, TaskOptions(
            parse_tasks(tasks), num_fewshot, limit, batch_size, include_path, output), device,
            quantize))
        return
    model, tokenizer = load_for_inference(found, device, "float32", False, quantize)
    if data is not None:
        tokens, mask = tokens_of_source(cfg, data, tokenizer), None
    else:
        tokens, mask = tokens_of_split(cfg, split or "val", found)
    result = evaluate(model, tokens, tokenizer, progress=not as_json, mask=mask)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"loss {result['loss']:.4f}  perplexity {result['perplexity']:.3f}  "
            f"bits/byte {result['bits_per_byte']:.4f}  ({result['tokens']:,} tokens)"
        )


@command()
def export(
    checkpoint: Annotated[str, typer.Option("--checkpoint", help=CHECKPOINT_HELP)],
    out: Annotated[
        Path, typer.Option("--out", help="The folder to write (new, or empty).")
    ],
    which: WhichOption = "latest",
    force: Annotated[
        bool, typer.Option("--force", help="Replace --out even if it holds files.")
    ] = False,
    peft: Annotated[
        bool, typer.Option("--peft", help="Write a LoRA finetune's adapters alone, in PEFT's "
                           "format, instead of the merged model.")
    ] = False,
) -> None:
    """Write a model as an HF transformers folder: config.json, model.safetensors,
    generation_config.json and the tokenizer (GPT2LMHeadModel, LlamaForCausalLM, or
    Qwen3ForCausalLM for QK-norm); a LoRA finetune merged, or with --peft its adapters for
    PeftModel.from_pretrained."""
    from gpt.hf.export import export as export_model
    from gpt.hf.export import export_adapter
    from gpt.hf.pretrained import open_model

    found = open_model(checkpoint, which)
    if peft:
        with _stdout_for_text_only():
            folder = export_adapter(found, out, force)
        typer.echo(f"wrote {folder} (load it with peft's PeftModel.from_pretrained on its base)")
        return
    with _stdout_for_text_only():
        folder = export_model(found, out, force)
    typer.echo(f"wrote {folder} (load it with transformers' AutoModelForCausalLM.from_pretrained)")


@command()
def plot(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(help="Run folders (out_dirs), each holding metrics.jsonl.",
                       show_default=False),
    ],
    out: Annotated[
        Path, typer.Option("--out", "-o", help="The image to write: .png, .svg or .pdf.")
    ],
    width: Annotated[int, typer.Option("--width", help="Width in pixels.")] = 1000,
    height: Annotated[int, typer.Option("--height", help="Height in pixels.")] = 600,
) -> None:
    """Draw runs' train and val loss by iteration and by wall time, and their learning rate,
    from metrics.jsonl (needs matplotlib: pip install matplotlib)."""
    from gpt.plot import plot_runs

    for note in plot_runs(run_dirs, out, width, height):
        typer.echo(f"note: {note}", err=True)
    typer.echo(f"wrote {out}")


@command()
def runs(
    folder: Annotated[
        Path,
        typer.Argument(help="Where to look: this folder and two levels below it."),
    ] = Path("."),
) -> None:
    """List the runs under a folder: iterations, best val loss, tokens, wall time, last
    checkpoint and status (running, finished or interrupted)."""
    from gpt.runs import find_runs, summarize, table

    unreadable: list[tuple[Path, str]] = []
    found = [summarize(path) for path in find_runs(folder, unreadable)]
    if found:
        typer.echo(table(found))
    else:
        typer.echo(f"no runs in {folder} (folders holding metrics.jsonl or ckpt-*, at most two "
                   f"levels down)")
    for run in found:
        for note in run.notes:
            typer.echo(f"note: {run.path}: {note}", err=True)
    for path, reason in sorted(unreadable, key=lambda found: found[0].parts):
        typer.echo(f"note: {path}: cannot read this folder ({reason}); runs in it are not "
                   "listed", err=True)


def main() -> None:
    """Console-script entry point. Standard output that fails ends the command here, whichever
    it is (gpt/stdout.py): a closed pipe quietly, any other failure with one line; both exit 1."""
    with failing_stdout_ends_here(debug=lambda: _state["debug"]):
        app(prog_name="gpt")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
