"""What happens when things go wrong: bad input and faults, through the command line.

One table, one test. Each case builds its scene (a copy of a tiny trained run, then a file
damaged, a setting mistyped, a write made to fail), runs one command, and checks what a user
sees and what is kept: the exit code; on stderr one line, `error: ...` (`note: ...` for a fault
worked around; nothing for a closed pipe), naming the problem and the fix; no traceback; and
every file that was there before unchanged (all are hashed before and after), apart from those
the case names as written. docs/errors.md says the same in words.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import fnmatch
import functools
import hashlib
import importlib.util
import io
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import Result
from safetensors.torch import load_file
from typer.testing import CliRunner

from gpt import quant
from gpt.checkpoint import Checkpoint
from gpt.cli import app
from gpt.config import load_config
from gpt.data.prepare import prepare
from gpt.lock import FolderLock
from gpt.model import GPT
from gpt.train import train

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
TRAIN = ["train", "--config", "tiny.toml"]
RESUME = [*TRAIN, "--set", "train.max_iters=30"]  # the template's run, from 20 on to 30
SAMPLE = ["sample", "--checkpoint", "out", "--no-stream"]
LATEST = "out/ckpt-0000020"  # the template's newest checkpoint (ckpt-0000010 is the other)
DATA = "data/corpus-char"


pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------
# The scene every case starts from, and what a case may do to it


@dataclass
class Scene:
    """A case's folder (a copy of `template`, the working directory) and its tools for changing
    the world: monkeypatching (undone before `Case.after` runs) and cleanups."""

    folder: Path
    template: Path
    patch: pytest.MonkeyPatch
    cleanup: contextlib.ExitStack


@dataclass(frozen=True)
class Outcome:
    """What a command left for its user: the exit code (a process killed by signal N: -N) and
    the two streams."""

    code: int
    stdout: str
    stderr: str


Setup = Callable[[Scene], None]


@dataclass(frozen=True)
class Case:
    """One bad input or fault: run `args` on the scene `setup` leaves, expect exit `code` and,
    for errors, one `error:` line matching `message` (a regex naming the problem and the fix).

    `writes` are glob patterns of the paths (relative to the folder) that the case may create,
    change or remove; every other file must be left exactly as it was. `after` checks what is
    kept (a checkpoint still loads, the run resumes), with the case's patches undone. `run`
    replaces the in-process command line where a real process is needed (signals, standard
    output). Exit 0 is a fault worked around: `message` matches its one `note:` line, and
    `stdout` what the command still printed.
    """

    id: str
    args: list[str]
    message: str
    setup: Setup = lambda scene: None
    code: int = 2
    writes: tuple[str, ...] = ()
    after: Callable[[Scene], None] | None = None
    run: Callable[[list[str]], Outcome] | None = None
    marks: tuple[pytest.MarkDecorator, ...] = ()
    stdout: str = ""


def corpus() -> str:
    """The tiny run's text: 400 small Python functions, 29 distinct characters."""
    return "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory, write_tiny_run: Callable[..., Path]) -> Path:
    """The tiny char run trained to iteration 20 of 30 (checkpoints 10 and 20), its data
    prepared: what every case copies. lr_decay_iters is fixed, so going on to 30 later is the
    run that never stopped."""
    folder = write_tiny_run(tmp_path_factory.mktemp("template"), corpus(),
                            "lr_decay_iters = 30\n")  # [train] is the config's last section
    with working_directory(folder):
        assert train(load_config("tiny.toml", ["train.max_iters=20"])) == 0
    return folder


@contextlib.contextmanager
def working_directory(folder: Path) -> Iterator[None]:
    """Run in `folder` (configs name their files relative to it), then go back."""
    cwd = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(cwd)


@functools.cache
def continued_weights(template: Path) -> dict[str, torch.Tensor]:
    """The template run's weights at 30 when nothing went wrong: what a run that failed on the
    way and was resumed must end with, bit for bit."""
    folder = template.parent / "continued"
    shutil.copytree(template, folder)
    with working_directory(folder):
        assert train(load_config("tiny.toml", ["train.max_iters=30"])) == 0
    return load_file(str(folder / "out" / "ckpt-0000030" / "model.safetensors"))


def hashes(folder: Path) -> dict[str, str]:
    """Every file (and empty folder) under `folder`, by relative path: its sha256. A folder
    nobody may read (mode 000) is one entry, its contents unseen, as for everyone but root."""
    found, closed = {}, []
    for path in sorted(folder.rglob("*")):  # a folder before what it holds
        if any(shut in path.parents for shut in closed):
            continue
        name = str(path.relative_to(folder))
        if path.is_file():
            try:
                found[name] = hashlib.sha256(path.read_bytes()).hexdigest()
            except PermissionError:  # a case's unreadable file, as its mode says
                found[name] = f"unreadable, mode {path.stat().st_mode:o}"
        elif path.is_dir() and not path.stat().st_mode & 0o777:
            closed.append(path)
            found[name] = "unreadable folder"
        elif path.is_dir() and not any(path.iterdir()):
            found[name] = "empty folder"
    return found


# ---------------------------------------------------------------------------------------------
# Running a command


def in_process(args: list[str]) -> Outcome:
    """The command through typer's test runner; an exception that escapes it (what a user
    would see as a traceback) fails the test with that traceback."""
    result: Result = runner.invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise AssertionError(f"{args} raised instead of exiting") from result.exception
    return Outcome(result.exit_code, result.stdout, result.stderr)


ENV = {
    **os.environ,
    "OMP_NUM_THREADS": "1",
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
}


def gpt_process(
    args: list[str], script: str | None = None, stdout: int = subprocess.PIPE,
    env: dict[str, str] = ENV,
) -> subprocess.Popen[str]:
    """`python -m gpt ARGS` in a process of its own, or `script` (which ends by running the
    command line on its argv) for faults that need a hand inside the process; its standard
    output a pipe to read, or the file descriptor `stdout`."""
    command = ["-m", "gpt", *args] if script is None else ["-c", script, *args]
    return subprocess.Popen([sys.executable, *command], stdout=stdout,
                            stderr=subprocess.PIPE, text=True, env=env)


PROGRESS = re.compile(r"\[\d+:\d\d[^\]]*\]\s*$")  # the end of a tqdm frame: [00:01<00:02, ...]


def error_lines(stderr: str) -> list[str]:
    """The lines of stderr that are not progress bars (whose frames end in `\\r`)."""
    lines = (line.rsplit("\r", 1)[-1] for line in stderr.split("\n"))
    return [line for line in lines if line.strip() and not PROGRESS.search(line)]


# ---------------------------------------------------------------------------------------------
# Building blocks of the scenes


def edit(path: str, old: str, new: str) -> Setup:
    """Replace `old` (which must be there) with `new` in a text file."""

    def setup(scene: Scene) -> None:
        file = scene.folder / path
        text = file.read_text()
        assert old in text, (path, old)
        file.write_text(text.replace(old, new))

    return setup


def write(path: str, content: str | bytes) -> Setup:
    """Create (or replace) a file with `content`."""

    def setup(scene: Scene) -> None:
        file = scene.folder / path
        file.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            file.write_bytes(content)
        else:
            file.write_text(content)

    return setup


def truncate(path: str, remove: int) -> Setup:
    """Cut the last `remove` bytes off a file, as a copy that stopped short would."""

    def setup(scene: Scene) -> None:
        file = scene.folder / path
        file.write_bytes(file.read_bytes()[:-remove])

    return setup


def torchrun_env(world: int, per_node: int) -> Setup:
    """Rank 0 of `world` processes, `per_node` a node, as torchrun starts them: the processes'
    split is checked before they meet, so the others need not exist."""

    def setup(scene: Scene) -> None:
        env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": str(world),
               "LOCAL_WORLD_SIZE": str(per_node)}
        for key, value in env.items():
            scene.patch.setenv(key, value)

    return setup


def edit_json(path: str, change: Callable[[dict], None]) -> Setup:
    """Change a JSON file's data in place, as someone editing it by hand would."""

    def setup(scene: Scene) -> None:
        file = scene.folder / path
        data = json.loads(file.read_text())
        change(data)
        file.write_text(json.dumps(data))

    return setup


def rehash(checkpoint: str, name: str) -> Setup:
    """Record a replaced file's sha256 in its checkpoint's state.json, as someone who hands
    over a doctored checkpoint would."""

    def setup(scene: Scene) -> None:
        digest = hashlib.sha256((scene.folder / checkpoint / name).read_bytes()).hexdigest()
        edit_json(f"{checkpoint}/state.json", lambda s: s["sha256"].update({name: digest}))(scene)

    return setup


def remove(path: str) -> Setup:
    """Delete a file or a folder."""

    def setup(scene: Scene) -> None:
        target = scene.folder / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    return setup


def both(*setups: Setup) -> Setup:
    """The setups one after the other."""

    def setup(scene: Scene) -> None:
        for step in setups:
            step(scene)

    return setup


# ---------------------------------------------------------------------------------------------
# Checks of what is kept


Check = Callable[[Scene], None]


def loads(checkpoint: str) -> Check:
    """`checkpoint` (an out_dir or a ckpt-* folder) still opens and gives a model."""

    def check(scene: Scene) -> None:
        assert isinstance(Checkpoint.open(scene.folder / checkpoint).load_model(), GPT)

    return check


def resumes_exactly(scene: Scene) -> None:
    """The run, started again as it was, goes on from its last checkpoint to the weights of the
    run that never stopped, and clears what a failed save left."""
    outcome = in_process(RESUME)
    assert outcome.code == 0, outcome
    weights = load_file(str(scene.folder / "out" / "ckpt-0000030" / "model.safetensors"))
    expected = continued_weights(scene.template)
    assert weights.keys() == expected.keys()
    assert all(torch.equal(weights[k], expected[k]) for k in weights)
    assert not list((scene.folder / "out").glob(".tmp-*"))


def all_of(*checks: Check) -> Check:
    """The checks one after the other."""

    def check(scene: Scene) -> None:
        for one in checks:
            one(scene)

    return check


# ---------------------------------------------------------------------------------------------
# The cases

CONFIG = [
    Case("config-malformed-toml", TRAIN,
         r"tiny\.toml: malformed TOML: .*line 3, column 11.*; fix the file there",
         edit("tiny.toml", "n_layer = 2", "n_layer = ")),
    Case("config-key-outside-a-section", ["train", "--config", "top.toml"],
         r"top\.toml: key 'max_iters' is outside any section; put it under one of \[model\]",
         write("top.toml", "max_iters = 5\n[train]\nbatch_size = 2\n")),
    Case("config-unknown-section", TRAIN,
         r"tiny\.toml: unknown section \[trian\] \(did you mean \"train\"\?\); sections are",
         edit("tiny.toml", "[train]", "[trian]")),
    Case("config-unknown-key-in-file", TRAIN,
         r"tiny\.toml: unknown key 'batchsize' in \[train\] \(did you mean \"batch_size\"\?\)",
         edit("tiny.toml", "batch_size", "batchsize")),
    Case("config-unknown-key-in-set", [*TRAIN, "--set", "train.max_itrs=5"],
         r"--set train\.max_itrs=5: unknown key 'max_itrs' in \[train\] \(did you mean \"max_iters\"\?\)"),
    Case("config-wrong-type-in-file", TRAIN,
         r"\[model\] n_layer must be an integer, got '2' \(str\)",
         edit("tiny.toml", "n_layer = 2", 'n_layer = "2"')),
    Case("config-wrong-type-in-set", [*TRAIN, "--set", "train.batch_size=four"],
         r"\[train\] batch_size must be an integer, got 'four'"),
    Case("config-unknown-choice", [*TRAIN, "--set", "model.norm=batchnorm"],
         r"\[model\] norm: 'batchnorm' is not allowed; choose one of \"layernorm\", \"rmsnorm\""),
    Case("config-negative-learning-rate", [*TRAIN, "--set", "train.learning_rate=-3e-3"],
         r"\[train\] learning_rate: must be >= 0, got -0\.003"),
    Case("config-learning-rate-not-a-number", [*TRAIN, "--set", "train.learning_rate=nan"],
         r"\[train\] learning_rate must be a finite number, got nan"),
    Case("config-zero-batch-size", [*TRAIN, "--set", "train.batch_size=0"],
         r"\[train\] batch_size: must be > 0, got 0"),
    Case("config-dropout-of-one", [*TRAIN, "--set", "model.dropout=1.0"],
         r"\[model\] dropout: must be in \[0, 1\), got 1\.0"),
    Case("config-negative-dropout", [*TRAIN, "--set", "model.dropout=-0.1"],
         r"\[model\] dropout: must be in \[0, 1\), got -0\.1"),
    Case("config-width-not-divisible-by-heads", [*TRAIN, "--set", "model.n_head=3"],
         r"\[model\] n_embd: 32 is not divisible by n_head = 3; choose n_embd as a multiple"),
    Case("config-heads-not-divisible-by-kv-heads", [*TRAIN, "--set", "model.n_kv_head=3"],
         r"\[model\] n_kv_head: n_head = 2 is not divisible by n_kv_head = 3; choose a divisor"),
    Case("config-rope-with-odd-head-size",
         [*TRAIN, "--set", "model.n_embd=30", "--set", "model.pos_embedding=rope"],
         r"rope needs an even head size, but n_embd / n_head = 15; change n_embd or n_head"),
    Case("config-model-too-big-for-memory", [*TRAIN, "--set", "train.out_dir=new",
                                             "--set", f"model.vocab_size={2**50}"],  # 128 PiB
         r"out of memory on cpu \(asked for [\d,]+ bytes\); make the model smaller \(model\.n_layer, "
         r"n_embd, block_size; gpt info sizes it\) or lower train\.batch_size"),
    Case("config-vocab-smaller-than-tokenizer", [*TRAIN, "--set", "train.out_dir=new",
                                                 "--set", "model.vocab_size=10"],
         r"\[model\] vocab_size = 10 is smaller than the tokenizer's 29; raise it or leave it unset"),
    Case("config-unknown-device", [*TRAIN, "--set", "train.device=tpu"],
         r"\[train\] device: unknown device 'tpu'; use auto, cpu, cuda, cuda:N or mps"),
    Case("config-hsdp-replicas-below-one",
         [*TRAIN, "--set", "train.parallel=hsdp", "--set", "train.hsdp_replicas=0"],
         r"\[train\] hsdp_replicas: must be > 0, got 0$"),
    Case("train-hsdp-replicas-not-dividing-the-processes",
         [*TRAIN, "--set", "train.parallel=hsdp", "--set", "train.hsdp_replicas=3"],
         r"\[train\] hsdp_replicas = 3 does not split the 4 processes into equal replica "
         r"groups; choose a divisor of 4 \(one replica per node: the node count\)$",
         torchrun_env(4, 4)),
    Case("train-hsdp-unset-on-unequal-nodes", [*TRAIN, "--set", "train.parallel=hsdp"],
         r"\[train\] hsdp_replicas is unset and the processes do not form equal nodes \(6 "
         r"processes, LOCAL_WORLD_SIZE 4\); set train\.hsdp_replicas to the number of replica "
         r"groups, such as the node count$", torchrun_env(6, 4)),
    Case("config-set-without-equals", [*TRAIN, "--set", "train.max_iters"],
         r"--set train\.max_iters: expected section\.key=value, for example --set train\.max_iters=100"),
    Case("config-missing-file", ["train", "--config", "nowhere.toml"],
         r"config file nowhere\.toml not found; pass an existing TOML file to --config"),
    Case("config-file-not-utf8", ["train", "--config", "latin1.toml"],
         r"config file latin1\.toml is not UTF-8 text; save it as UTF-8",
         write("latin1.toml", '[train]\nout_dir = "café"\n'.encode("latin-1"))),
    Case("config-file-is-a-folder", ["train", "--config", "data"],
         r"cannot read config file data \(Is a directory\); pass a TOML file to --config"),
]


def hf_gpt2(scene: Scene) -> None:
    """A tiny GPT-2 of 64 positions as save_pretrained writes it, with a character vocabulary
    written by save_hf_tokenizer, and a config that finetunes it."""
    transformers = pytest.importorskip("transformers")
    from gpt.hf.tokenizers import save_hf_tokenizer

    chars = "".join(sorted(set(corpus())))
    newline = chars.index("\n")
    config = transformers.GPT2Config(vocab_size=len(chars), n_positions=64, n_embd=32, n_layer=2,
                                     n_head=4, bos_token_id=newline, eos_token_id=newline)
    transformers.GPT2LMHeadModel(config).save_pretrained(scene.folder / "gpt2-64")
    save_hf_tokenizer({"name": "char", "chars": chars}, scene.folder / "gpt2-64",
                      model_max_length=64)
    write("tune.toml", '[data]\nsource = "corpus.txt"\n\n[train]\ninit_from = "hf:gpt2-64"\n'
                       'out_dir = "tuned"\n')(scene)


CONFIG.append(
    Case("config-block-size-over-the-imported-model",
         ["train", "--config", "tune.toml", "--set", "model.block_size=128"],
         r"\[model\] block_size = 128 is longer than the 64 positions of init_from = "
         r"'hf:gpt2-64'; set it to at most 64", hf_gpt2),
)
CONFIG.extend([  # the speed options of [train], refused before any work where they cannot run
    Case("config-fp8-on-the-cpu", [*TRAIN, "--set", "train.fp8=true", "--set", "train.device=cpu"],
         r"\[train\] fp8 = true needs a CUDA GPU of compute capability 8\.9 or higher, and this "
         r"run is on cpu; set train\.fp8 = false$"),
    Case("config-fp8-with-lora", [*TRAIN, "--set", "train.fp8=true", "--set",
                                  "train.finetune=lora", "--set", "train.init_from=out"],
         r'\[train\] fp8: does not train LoRA finetunes \(their frozen base layers would turn '
         r'float8 too\); set train\.fp8 = false with finetune = "lora"$'),
    Case("config-document-masking-with-dropout", [*TRAIN, "--set", "train.document_masking=true"],
         r"\[train\] document_masking = true attends through FlexAttention, which has no "
         r"attention dropout; set model\.dropout = 0, or document_masking = false$"),
    Case("config-document-masking-without-an-eot-id",
         [*TRAIN, "--set", "train.document_masking=true", "--set", "model.dropout=0",
          "--set", "train.out_dir=masked"],
         rf"{DATA}/meta\.json records no end-of-text id \(eot_id\), where "
         r"train\.document_masking starts each document; rebuild with gpt prepare --force, or "
         r"set train\.document_masking = false$",
         edit_json(f"{DATA}/meta.json", lambda meta: meta.pop("eot_id"))),
    Case("config-loss-chunk-of-zero", [*TRAIN, "--set", "train.loss_chunk=0"],
         r"\[train\] loss_chunk: must be > 0, got 0$"),
    Case("config-unknown-compile-scope", [*TRAIN, "--set", "train.compile_scope=layers"],
         r"\[train\] compile_scope: 'layers' is not allowed; choose one of \"model\", \"blocks\"$"),
])


def unreadable(path: str) -> Setup:
    """A file nobody may read. Root reads it all the same, so there the reads of the data
    sources are refused as the kernel refuses everyone else."""

    def setup(scene: Scene) -> None:
        file = scene.folder / path
        file.write_text(corpus())
        file.chmod(0)
        scene.cleanup.callback(file.chmod, 0o644)  # so that pytest can remove it
        if os.geteuid() == 0:
            import gpt.data.sources

            def as_others_see_it(name: object, *args: object, **kwargs: object) -> object:
                if Path(str(name)).resolve() == file.resolve():
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
                return open(name, *args, **kwargs)  # type: ignore[call-overload]

            scene.patch.setattr(gpt.data.sources, "open", as_others_see_it, raising=False)

    return setup


def unreadable_folder(path: str) -> Setup:
    """A folder holding a copy of the run that nobody may list or enter (mode 000). Root may all
    the same, so there listing it, and looking at or opening what lies in it, are refused as
    the kernel refuses everyone else."""

    def setup(scene: Scene) -> None:
        folder = scene.folder / path
        shutil.copytree(scene.folder / "out", folder / "run")
        folder.chmod(0)
        scene.cleanup.callback(folder.chmod, 0o755)  # so that pytest can remove it
        if os.geteuid() != 0:
            return
        shut = os.path.abspath(folder)

        def refused(target: object, itself: bool) -> bool:
            if isinstance(target, int):  # a file descriptor, already open
                return False
            where = os.path.abspath(os.fsdecode(target))  # type: ignore[call-overload]
            return (itself and where == shut) or where.startswith(shut + os.sep)

        def as_others_see_it(call: Callable[..., object], itself: bool) -> Callable[..., object]:
            def guarded(target: object = ".", *args: object, **kwargs: object) -> object:
                if refused(target, itself):
                    if call is real_access:
                        return False
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(target))
                return call(target, *args, **kwargs)

            return guarded

        real_access = os.access
        for module, name, itself in ((os, "listdir", True), (os, "scandir", True),
                                     (os, "access", True), (os, "stat", False),
                                     (io, "open", False), (builtins, "open", False)):
            scene.patch.setattr(module, name, as_others_see_it(getattr(module, name), itself))

    return setup


def wide_vocabulary(scene: Scene) -> None:
    """Text of over 65,536 distinct characters: its ids need uint32."""
    text = "".join(chr(c) for c in range(0x100, 0x100 + 70_100) if not 0xD800 <= c < 0xE000)
    (scene.folder / "wide.txt").write_text(text * 2)


def stored_as_uint32(scene: Scene) -> None:
    """The wide vocabulary's data, prepared before the refusal, holds its ids unclipped."""
    meta = json.loads((scene.folder / "data" / "wide-char" / "meta.json").read_text())
    ids = np.fromfile(scene.folder / "data" / "wide-char" / "train.bin", dtype=np.uint32)
    assert meta["dtype"] == "uint32" and ids.max() >= 2**16


def prepared_with_gpt2(scene: Scene) -> None:
    """The tiny run's text prepared with GPT-2's BPE into data/gpt2."""
    with working_directory(scene.folder):
        prepare(load_config("tiny.toml", ["data.tokenizer=gpt2", "data.data_dir=data/gpt2"]).data,
                progress=False)


def disk_full_while_tokenizing(scene: Scene) -> None:
    """The disk fills as the token files are written."""
    import gpt.data.prepared

    def no_space(self: object, ids: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    scene.patch.setattr(gpt.data.prepared._TokenFile, "write", no_space)


reversed_vocabulary = edit_json(  # the same characters, other ids
    f"{DATA}/meta.json",
    lambda meta: meta["tokenizer"].update(chars="".join(sorted(meta["tokenizer"]["chars"])[::-1])),
)

DATA_CASES = [
    Case("data-missing-source", [*TRAIN, "--set", "data.source=nowhere.txt",
                                 "--set", "train.out_dir=new"],
         r"\[data\] source: nowhere\.txt does not exist; give a text file, a folder, a glob"),
    Case("data-empty-source", [*TRAIN, "--set", "data.source=empty.txt", "--set", "train.out_dir=new"],
         r"\[data\] source: text file empty\.txt holds no text; point it at a corpus",
         write("empty.txt", "")),
    Case("data-too-little-text", [*TRAIN, "--set", "data.source=short.txt",
                                  "--set", "train.out_dir=new"],
         r"the train split has 18 tokens, fewer than block_size \+ 1 = 33; add text, lower "
         r"model\.block_size", write("short.txt", "abc\n" * 5)),
    Case("data-not-utf8", [*TRAIN, "--set", "data.source=latin1.txt", "--set", "train.out_dir=new"],
         r"latin1\.txt is not UTF-8 text.*; .*convert it to UTF-8",
         write("latin1.txt", "café au lait\n".encode("latin-1") * 100)),
    Case("data-too-few-tokens-for-the-block",
         [*TRAIN, "--set", "train.out_dir=new", "--set", "model.block_size=100000"],
         r"the train split has 16002 tokens, fewer than block_size \+ 1 = 100001; add text, "
         r"lower model\.block_size"),
    Case("data-unknown-tokenizer", [*TRAIN, "--set", "data.tokenizer=gpt5", "--set", "train.out_dir=new"],
         r"unknown tokenizer 'gpt5'; choose one of"),
    Case("data-truncated-bin", RESUME,
         r"data/corpus-char/train\.bin has 31,994 bytes but meta\.json says 16,002 tokens "
         r"\(32,004 bytes\): truncated or corrupted; rebuild with gpt prepare --force",
         truncate(f"{DATA}/train.bin", 10)),
    Case("data-truncated-bin-in-eval", ["eval", "--checkpoint", "out"],
         r"data/corpus-char/val\.bin has .* bytes but meta\.json says .*: truncated or corrupted; "
         r"rebuild with gpt prepare --force", truncate(f"{DATA}/val.bin", 1)),
    Case("data-meta-missing", ["eval", "--checkpoint", "out"],
         r"data/corpus-char has no prepared data \(no meta\.json\); run gpt prepare first",
         remove(f"{DATA}/meta.json")),
    Case("data-meta-not-json", RESUME,
         r"data/corpus-char/meta\.json is damaged \(.*\); rebuild with gpt prepare --force",
         write(f"{DATA}/meta.json", '{"format_version": 2, "tokenizer"')),
    Case("data-meta-token-count-edited", RESUME,
         r"train\.bin has 32,004 bytes but meta\.json says 16,003 tokens .*rebuild with gpt prepare",
         edit_json(f"{DATA}/meta.json", lambda m: m["tokens"].update(train=16_003))),
    Case("data-prepared-from-other-settings",
         ["prepare", "--config", "tiny.toml", "--set", "data.val_fraction=0.2"],
         r"data/corpus-char holds data prepared from other settings \(val_fraction 0\.1 -> 0\.2\); "
         r"rebuild it with gpt prepare --force, or set data\.data_dir to another folder"),
    Case("data-unreadable-source", [*TRAIN, "--set", "data.source=secret.txt",
                                    "--set", "train.out_dir=new"],
         r"cannot read secret\.txt \(Permission denied\); make it readable, or set data\.source",
         unreadable("secret.txt")),
    Case("data-binary-source", [*TRAIN, "--set", "data.source=out/ckpt-0000010/model.safetensors",
                                "--set", "train.out_dir=new"],
         r"out/ckpt-0000010/model\.safetensors is not UTF-8 text \(a binary file, or another "
         r"encoding\); give a text file, or convert it to UTF-8"),
    Case("data-vocabulary-that-needs-uint32",
         [*TRAIN, "--set", "data.source=wide.txt", "--set", "train.out_dir=new",
          "--set", "model.vocab_size=65536"],
         r"\[model\] vocab_size = 65536 is smaller than the tokenizer's \d{5}; raise it or "
         r"leave it unset", wide_vocabulary, writes=("data/wide-char", "data/wide-char/*"),
         after=stored_as_uint32),
    Case("data-meta-vocabulary-edited", RESUME,
         r"data/corpus-char holds data of a 'char' vocabulary other than the one "
         r"out/ckpt-0000020 was trained with; rebuild it from the text the run was trained on "
         r"\(gpt prepare --force\), or use another train\.out_dir", reversed_vocabulary),
    Case("data-meta-vocabulary-edited-in-eval", ["eval", "--checkpoint", "out"],
         r"data/corpus-char was prepared with a 'char' vocabulary other than the model's; prepare "
         r"the data with the model's tokenizer", reversed_vocabulary),
    Case("data-of-another-tokenizer-on-resume", [*RESUME, "--set", "data.tokenizer=gpt2"],
         r"out/ckpt-0000020 was trained with the 'char' tokenizer, the config now says "
         r"data\.tokenizer = 'gpt2'; set data\.tokenizer = 'char', or use another train\.out_dir"),
    Case("data-of-another-tokenizer-on-finetune",
         [*TRAIN, "--set", "train.init_from=out", "--set", "train.out_dir=tuned",
          "--set", "data.tokenizer=gpt2"],
         r"out/ckpt-0000020 was trained with the 'char' tokenizer, the config now says "
         r"data\.tokenizer = 'gpt2'; set data\.tokenizer = 'char', or finetune another model"),
    Case("data-disk-full-while-rebuilding", ["prepare", "--config", "tiny.toml", "--force"],
         r"cannot write the token files into data/corpus-char \(No space left on device\); free "
         r"some space, or set data\.data_dir to another folder \(data prepared there before is "
         r"kept\)", disk_full_while_tokenizing, after=loads("out")),
    Case("data-of-another-tokenizer-in-eval",
         ["eval", "--checkpoint", "out", "--set", "data.data_dir=data/gpt2"],
         r"data/gpt2 was prepared with the 'gpt2' tokenizer but the model uses 'char'.*; prepare "
         r"the data with the model's tokenizer", prepared_with_gpt2),
]

CHECKPOINTS = [
    Case("checkpoint-missing", [*SAMPLE, "--checkpoint", "nowhere"],
         r"checkpoint path nowhere does not exist; pass a run's out_dir or a ckpt-\* folder"),
    Case("checkpoint-none-in-the-folder", [*SAMPLE, "--checkpoint", "data"],
         r"no latest checkpoint in data; train first \(gpt train\) or pass a ckpt-\* folder"),
    Case("checkpoint-not-a-command-option", ["sample", "--prompt", "x"],
         r"no model given: pass --checkpoint OUT_DIR \(or --config FILE for its out_dir\)"),
    Case("checkpoint-truncated", [*SAMPLE, "--prompt", "def"],
         r"out/ckpt-0000020/model\.safetensors is damaged \(its sha256 differs from state\.json\); "
         r"use another checkpoint of the run, such as out/ckpt-0000010",
         truncate(f"{LATEST}/model.safetensors", 100)),
    Case("checkpoint-state-replaced-by-random-bytes", [*SAMPLE, "--prompt", "def"],
         r"out/ckpt-0000020/state\.json is damaged \(not the JSON a checkpoint writes\); use "
         r"another checkpoint of the run, such as out/ckpt-0000010",
         write(f"{LATEST}/state.json", bytes(range(256)) * 4)),
    Case("checkpoint-weights-replaced-by-random-bytes", ["eval", "--checkpoint", "out"],
         r"out/ckpt-0000020/model\.safetensors is damaged \(.*\); use another checkpoint of the "
         r"run, such as out/ckpt-0000010",
         both(write(f"{LATEST}/model.safetensors", bytes(range(256)) * 64),
              rehash(LATEST, "model.safetensors"))),
    Case("checkpoint-config-of-another-shape", [*SAMPLE, "--prompt", "def"],
         r"out/ckpt-0000020/model\.safetensors does not fit the model that "
         r"out/ckpt-0000020/state\.json describes \(.*: \(\d+,\) saved, \(\d+,\) expected\).*; "
         r"use another checkpoint of the run, such as out/ckpt-0000010",
         edit_json(f"{LATEST}/state.json", lambda s: s["config"]["model"].update(n_embd=64))),
    Case("checkpoint-every-one-damaged", RESUME,
         r"every checkpoint in out is damaged; remove them or use another out_dir",
         both(truncate(f"{LATEST}/model.safetensors", 100),
              truncate("out/ckpt-0000010/model.safetensors", 100))),
    Case("checkpoint-shape-changed-on-resume", [*RESUME, "--set", "model.n_layer=3"],
         r"out/ckpt-0000020 was trained with model\.n_layer = 2, the config now says 3; set it "
         r"back, or use another train\.out_dir"),
    Case("checkpoint-optimizer-changed-on-resume", [*RESUME, "--set", "train.optimizer=muon"],
         r"out/ckpt-0000020 was trained with train\.optimizer = 'adamw', the config now says "
         r"'muon'; set it back, or train into a new train\.out_dir"),
    Case("checkpoint-weights-only-on-resume", RESUME,
         r"out/ckpt-0000020/optimizer\.pt is missing, so training cannot resume from it; set "
         r"train\.out_dir to a new folder", remove(f"{LATEST}/optimizer.pt")),
    Case("checkpoint-no-resume-on-a-run", [*RESUME, "--no-resume"],
         r"out already holds checkpoints \(ckpt-0000020\); resume by dropping --no-resume, or set "
         r"train\.out_dir to a new folder"),
]


class RunsCode:
    """What a hostile pickle holds: unpickling it calls open(marker, "w"), creating the marker."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, ...]:
        return (open, (str(self.marker), "w"))


def pickle_that_runs_code(scene: Scene) -> None:
    """optimizer.pt replaced by a pickle that would create a marker file when loaded, with its
    sha256 in state.json to match (as a checkpoint from a stranger would have)."""
    payload = {"state": RunsCode(scene.folder.parent / "marker")}
    torch.save(payload, scene.folder / LATEST / "optimizer.pt")
    rehash(LATEST, "optimizer.pt")(scene)
    proof = scene.folder.parent / "proof"  # that loading it without weights_only runs it
    torch.save({"state": RunsCode(proof)}, scene.folder.parent / "proof.pt")
    torch.load(scene.folder.parent / "proof.pt", weights_only=False)["state"].close()
    assert proof.exists()


def ran_no_code(scene: Scene) -> None:
    """The hostile pickle's marker was never created: nothing in it ran."""
    assert not (scene.folder.parent / "marker").exists()


def locked_by_a_trainer(scene: Scene) -> None:
    """out_dir's lock held, as a running `gpt train` holds it (an flock on a file of its own)."""
    lock = FolderLock(scene.folder / "out", "gpt train", "train.out_dir")
    scene.cleanup.callback(lock.release)


CHECKPOINTS += [
    Case("checkpoint-pickle-that-would-run-code", RESUME,
         r"out/ckpt-0000020/optimizer\.pt would call \S*open when unpickled, which no checkpoint "
         r"needs: it was refused and nothing in it ran; remove out/ckpt-0000020 to resume from "
         r"the checkpoint before it", pickle_that_runs_code, after=ran_no_code),
    Case("checkpoint-out-dir-locked-by-a-running-trainer", RESUME,
         rf"out is in use by another gpt train \(pid {os.getpid()} on .*\); wait for it to "
         r"finish, or set train\.out_dir to another folder", locked_by_a_trainer),
]

SAMPLING = [
    Case("sample-negative-temperature", [*SAMPLE, "--temperature", "-1"],
         r"\[sample\] temperature: must be >= 0, got -1\.0"),
    Case("sample-top-p-of-zero", [*SAMPLE, "--top-p", "0"],
         r"\[sample\] top_p: must be in \(0, 1\], got 0\.0"),
    Case("sample-top-p-over-one", [*SAMPLE, "--top-p", "1.5"],
         r"\[sample\] top_p: must be in \(0, 1\], got 1\.5"),
    Case("sample-top-k-of-zero", [*SAMPLE, "--top-k", "0"],
         r"\[sample\] top_k: must be >= 1, got 0"),
    Case("sample-negative-max-new-tokens", [*SAMPLE, "--max-new-tokens", "-1"],
         r"\[sample\] max_new_tokens: must be >= 0, got -1"),
    Case("sample-held-text-too-long", [*SAMPLE, "--max-new-tokens", "1000000"],
         r"--max-new-tokens 1,000,000 without streaming holds all the text until the end; stream "
         r"it \(--stream, one sample\) or ask for at most 100,000"),
    Case("sample-zero-samples", [*SAMPLE, "--num-samples", "0"],
         r"\[sample\] num_samples: must be > 0, got 0"),
    Case("sample-empty-stop-string", [*SAMPLE, "--stop", ""],
         r"\[sample\] stop: a stop string is empty; remove it or give some text"),
    Case("sample-unknown-device", [*SAMPLE, "--device", "tpu"],
         r"--device 'tpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    Case("sample-unknown-dtype", [*SAMPLE, "--dtype", "int4"],
         r"--dtype 'int4' is not one of auto, float32, bfloat16, float16"),
    Case("sample-float16-on-the-cpu", [*SAMPLE, "--device", "cpu", "--dtype", "float16"],
         r"--dtype float16 needs a GPU; use bfloat16 or float32 on the CPU"),
    Case("sample-unknown-which", [*SAMPLE, "--which", "newest"],
         r"unknown checkpoint choice 'newest'; use latest or best"),
    Case("sample-prompt-and-prompt-file", [*SAMPLE, "--prompt", "def", "--prompt-file", "tiny.toml"],
         r"give either --prompt or --prompt-file, not both"),
    Case("sample-both-checkpoint-and-config", [*SAMPLE, "--config", "tiny.toml"],
         r"give either --checkpoint or --config, not both"),
    Case("sample-model-override", [*SAMPLE, "--set", "model.n_layer=4"],
         r"--set model\.n_layer=4: gpt sample cannot apply model\.n_layer; it takes \[sample\] keys"),
    Case("sample-prompt-of-unknown-characters", [*SAMPLE, "--prompt", "☃☃☃"],
         r"text has 1 character\(s\) not in the char vocabulary: '☃'; remove them, or re-prepare"),
    Case("sample-streamed-prompt-of-unknown-characters",
         ["sample", "--checkpoint", "out", "--stream", "--prompt", "def ☃"],
         r"text has 1 character\(s\) not in the char vocabulary: '☃'; remove them"),
    Case("sample-model-too-big-for-memory", [*SAMPLE, "--prompt", "def"],
         r"out of memory on cpu \(asked for [\d,]+ bytes\); run it on a device with more memory",
         edit_json(f"{LATEST}/state.json",
                   lambda s: s["config"]["model"].update(vocab_size=2**50, padded_vocab_size=2**50))),
    Case("sample-cuda-on-a-machine-without", [*SAMPLE, "--device", "cuda"],
         r"--device 'cuda': no CUDA GPU is available here; use auto or cpu", marks=(no_cuda,)),
    Case("sample-prompt-longer-than-the-context", [*SAMPLE, "--prompt", "def f(x):\n" * 4],
         r"the prompt is 40 tokens, more than the 32 the model reads \(its block_size\); "
         r"shorten it to its last 32 tokens or fewer"),
    Case("sample-prompt-file-missing", [*SAMPLE, "--prompt-file", "nowhere.txt"],
         r"cannot read --prompt-file nowhere\.txt \(No such file or directory\); give a UTF-8 "
         r"text file"),
    Case("sample-prompt-file-not-utf8", [*SAMPLE, "--prompt-file", "latin1.txt"],
         r"--prompt-file latin1\.txt is not UTF-8 text; convert it to UTF-8",
         write("latin1.txt", "café".encode("latin-1"))),
    Case("sample-unknown-prompt-format", [*SAMPLE, "--prompt-format", "csv"],
         r"--prompt-format must be one of text, lines, jsonl, got 'csv'"),
    Case("sample-prompt-format-without-a-file", [*SAMPLE, "--prompt-format", "lines"],
         r"--prompt-format lines reads --prompt-file; give one"),
    Case("sample-prompt-file-without-prompts",
         [*SAMPLE, "--prompt-file", "blank.txt", "--prompt-format", "lines"],
         r"--prompt-file blank\.txt holds no prompts; give one per line",
         write("blank.txt", "\n  \n\n")),
    Case("sample-prompt-file-line-not-json",
         [*SAMPLE, "--prompt-file", "p.jsonl", "--prompt-format", "jsonl"],
         r"line 2 of --prompt-file p\.jsonl is not JSON \(Expecting value\); write one JSON "
         r'string or \{"prompt": "\.\.\."\} per line',
         write("p.jsonl", '"def"\nnot json\n')),
    Case("sample-prompt-file-line-without-a-prompt",
         [*SAMPLE, "--prompt-file", "p.jsonl", "--prompt-format", "jsonl"],
         r'line 1 of --prompt-file p\.jsonl has no prompt; write one JSON string or '
         r'\{"prompt": "\.\.\."\} per line',
         write("p.jsonl", '{"text": "def"}\n')),
    Case("sample-one-of-several-prompts-too-long",
         [*SAMPLE, "--prompt-file", "p.txt", "--prompt-format", "lines"],
         r"the prompt is 40 tokens, more than the 32 the model reads",
         write("p.txt", "def\n" + "def f(x): " * 4 + "\n")),
    Case("sample-value-of-the-wrong-type", [*SAMPLE, "--max-new-tokens", "many"],
         r"Invalid value for '--max-new-tokens': .*; see gpt sample --help"),
    Case("sample-unknown-option", [*SAMPLE, "--temprature", "0"],
         r"No such option: --temprature.*; see gpt sample --help"),
    Case("export-without-its-folder", ["export", "--checkpoint", "out"],
         r"Missing option '--out'; see gpt export --help"),
    Case("option-without-its-value", ["train", "--set"],
         r"Option '--set' requires an argument; see gpt train --help"),
    Case("unknown-command", ["trian"], r"No such command 'trian'.*; see gpt --help"),
    Case("eval-unknown-split", ["eval", "--checkpoint", "out", "--split", "test"],
         r"--split 'test' is not a split; use --split val or --split train"),
    Case("export-into-a-folder-that-holds-files", ["export", "--checkpoint", "out", "--out", "data"],
         r"--out data is not empty; choose a new folder, or pass --force to replace it"),
    Case("export-onto-a-file", ["export", "--checkpoint", "out", "--out", "corpus.txt"],
         r"--out corpus\.txt is a file; give a folder path"),
    Case("export-into-the-run-it-reads", ["export", "--checkpoint", "out", "--out", "out", "--force"],
         r"--out out holds the model being exported \(.*\); choose another folder"),
]


CHAT = ["chat", "--checkpoint", "out"]
CHATTING = [
    Case("chat-without-a-model", ["chat"],
         r"no model given: pass --checkpoint OUT_DIR \(or --config FILE for its out_dir\)"),
    Case("chat-checkpoint-missing", ["chat", "--checkpoint", "nowhere"],
         r"checkpoint path nowhere does not exist; pass a run's out_dir or a ckpt-\* folder"),
    Case("chat-checkpoint-truncated", CHAT,
         r"out/ckpt-0000020/model\.safetensors is damaged \(its sha256 differs from state\.json\); "
         r"use another checkpoint of the run, such as out/ckpt-0000010",
         truncate(f"{LATEST}/model.safetensors", 100)),
    Case("chat-negative-temperature", [*CHAT, "--temperature", "-1"],
         r"\[sample\] temperature: must be >= 0, got -1\.0"),
    Case("chat-top-p-over-one", [*CHAT, "--top-p", "1.5"],
         r"\[sample\] top_p: must be in \(0, 1\], got 1\.5"),
    Case("chat-no-room-for-a-reply", [*CHAT, "--max-new-tokens", "0"],
         r"\[sample\] max_new_tokens = 0 leaves no room for a reply; chat with --max-new-tokens 1 "
         r"or more"),
    Case("chat-model-override", [*CHAT, "--set", "model.n_layer=4"],
         r"--set model\.n_layer=4: gpt chat cannot apply model\.n_layer; it takes \[sample\] keys"),
    Case("chat-unknown-device", [*CHAT, "--device", "tpu"],
         r"--device 'tpu' is not a device; use auto, cpu, cuda, cuda:N or mps"),
    Case("chat-unknown-option", [*CHAT, "--prompt", "hi"],
         r"No such option: --prompt.*; see gpt chat --help"),
]


def non_finite_loss(scene: Scene) -> None:
    """Every training forward from now on gives a NaN loss (a learning rate that diverged)."""
    forward = GPT.forward

    def diverged(self: GPT, idx: torch.Tensor, targets: torch.Tensor | None = None,
                 context: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits, loss = forward(self, idx, targets, context)
        return logits, (loss * float("nan") if self.training and loss is not None else loss)

    scene.patch.setattr(GPT, "forward", diverged)


def disk_full_at_save(scene: Scene) -> None:
    """The disk fills while a checkpoint's weights are written: part of the file gets out."""
    import gpt.checkpoint

    def no_space(tensors: object, filename: str, *args: object, **kwargs: object) -> None:
        Path(filename).write_bytes(b"\0" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    scene.patch.setattr(gpt.checkpoint, "save_file", no_space)


KILLED_WHILE_SAVING = """
import os, signal, sys
import torch
save = torch.save
def killed_halfway(obj, path, *args, **kwargs):
    save(obj, path, *args, **kwargs)
    os.truncate(path, os.path.getsize(path) // 2)  # as far as the write got
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = killed_halfway
from gpt.cli import main
main()
"""


def killed_while_saving(args: list[str]) -> Outcome:
    """`gpt train ARGS` in a process that SIGKILLs itself halfway through writing a checkpoint's
    optimizer.pt, the largest file, into the folder the checkpoint is being written in."""
    process = gpt_process(args, KILLED_WHILE_SAVING)
    stdout, stderr = process.communicate(timeout=300)
    return Outcome(process.returncode, stdout, stderr)


def left_half_a_checkpoint(scene: Scene) -> None:
    """The killed save left its temporary folder, and nothing points at it."""
    tmp = scene.folder / "out" / ".tmp-ckpt-0000030"
    assert (tmp / "optimizer.pt").exists() and not (tmp / "state.json").exists()
    assert (scene.folder / "out" / "latest").read_text().strip() == "ckpt-0000020"


def terminated_while_training(args: list[str]) -> Outcome:
    """`gpt train ARGS` in its own process, sent SIGTERM once it has logged a few steps."""
    process = gpt_process(args)
    log = Path("new/metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) > 3:
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=120)
    return Outcome(process.returncode, stdout, stderr)


def saved_and_resumable(scene: Scene) -> None:
    """The checkpoint the signal saved is the latest and loads; training goes on from it."""
    saved = Checkpoint.open(scene.folder / "new")
    iteration = saved.state["iter"]
    assert saved.load_model() is not None and iteration > 0
    more = [*TRAIN, "--set", "train.out_dir=new", "--set", f"train.max_iters={iteration + 2}",
            "--set", "train.checkpoint_interval=1000000"]
    assert in_process(more).code == 0
    assert Checkpoint.open(scene.folder / "new").state["iter"] == iteration + 2


FAULTS = [
    Case("fault-sigkill-during-a-checkpoint-write", RESUME, "", code=-signal.SIGKILL,
         writes=("out/.lock", "out/metrics.jsonl", "out/.tmp-ckpt-0000030/*"),
         after=all_of(left_half_a_checkpoint, loads("out"), resumes_exactly),
         run=killed_while_saving, marks=(pytest.mark.slow,)),
    Case("fault-sigterm-during-training",
         [*TRAIN, "--set", "train.out_dir=new", "--set", "train.max_iters=1000000",
          "--set", "train.checkpoint_interval=1000000"],
         r"stopped by signal after iteration \d+; saved new/ckpt-\d+", code=143,
         writes=("new", "new/*"), after=saved_and_resumable, run=terminated_while_training,
         marks=(pytest.mark.slow,)),
    Case("fault-disk-full-during-a-checkpoint-write", RESUME,
         r"no space left on the disk of out for the checkpoint of iteration 30; free some space "
         r".*, then run gpt train again to resume from out/ckpt-0000020, which is intact",
         disk_full_at_save, writes=("out/metrics.jsonl",),
         after=all_of(loads(LATEST), resumes_exactly)),
    Case("fault-non-finite-loss", RESUME,
         r"non-finite loss at iteration 21; stopped before the optimizer step; last good "
         r"checkpoint: out/ckpt-0000020; lower train\.learning_rate or check the data",
         non_finite_loss, after=loads("out")),
    Case("fault-cuda-on-a-machine-without", [*TRAIN, "--set", "train.device=cuda"],
         r"\[train\] device 'cuda': no CUDA GPU is available here; use auto or cpu",
         marks=(no_cuda,)),
]

# Files read because a user named them: never a device, a FIFO or more than their purpose needs,
# and a file that cannot be read is said to be unreadable, not missing or damaged


def fifo(path: str) -> Setup:
    """A FIFO in a file's place, with no writer: opening it for reading would block forever."""

    def setup(scene: Scene) -> None:
        file = scene.folder / path
        if file.exists():
            file.unlink()
        os.mkfifo(file)

    return setup


def link(path: str, target: str) -> Setup:
    """A symbolic link at `path` to `target` (a device, say)."""

    def setup(scene: Scene) -> None:
        (scene.folder / path).symlink_to(target)

    return setup


def unreadable_file(path: str) -> Setup:
    """An existing file nobody may read. Root reads it all the same, so there gpt's opening of
    it (os.open, which every bounded read goes through) is refused as the kernel refuses
    everyone else."""

    def setup(scene: Scene) -> None:
        file = scene.folder / path
        file.chmod(0)
        scene.cleanup.callback(file.chmod, 0o644)
        if os.geteuid() == 0:
            for module, name in ((os, "open"), (builtins, "open")):
                scene.patch.setattr(module, name, refusing(getattr(module, name), file))

    return setup


def refusing(real_open: Callable[..., object], file: Path) -> Callable[..., object]:
    """`real_open` (os.open or open), refusing to open `file` as the kernel would."""

    def as_others_see_it(name: object, *args: object, **kwargs: object) -> object:
        if isinstance(name, (str, bytes, os.PathLike)) and (
                Path(os.fsdecode(name)).resolve() == file.resolve()):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(name))
        return real_open(name, *args, **kwargs)

    return as_others_see_it


def in_a_process(stdin: str | None = None, limit: int | None = None) -> Callable[[list[str]], Outcome]:
    """Run the command in a process of its own, bounded in time (a read that blocks fails the
    case instead of hanging the suite): stdin from the file `stdin`, files limited to `limit`
    bytes (writes past it fail as on a full disk)."""

    def run(args: list[str]) -> Outcome:
        def limited() -> None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        source = open(stdin, "rb") if stdin is not None else subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "gpt", *args], stdin=source, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, text=True, env=ENV,
                preexec_fn=limited if limit is not None else None)
            try:
                stdout, stderr = process.communicate(timeout=120)
            except subprocess.TimeoutExpired:
                process.kill()
                stdout, stderr = process.communicate()
                stderr += "\n(killed: still running after 120 s)"
        finally:
            if stdin is not None:
                source.close()  # type: ignore[union-attr]
        return Outcome(process.returncode, stdout, stderr)

    return run


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def nothing_exported(scene: Scene) -> None:
    """A failed export leaves neither the folder nor its temporary folder."""
    assert not [p for p in scene.folder.iterdir() if "exported" in p.name]


NOT_A_FILE = r"\(a (character device|FIFO), not a regular file\)"

READS = [
    Case("config-is-a-character-device", ["train", "--config", "/dev/zero"],
         rf"cannot read config file /dev/zero {NOT_A_FILE}; pass a TOML file to --config"),
    Case("config-links-to-a-random-device", ["train", "--config", "random.toml"],
         rf"cannot read config file random\.toml {NOT_A_FILE}; pass a TOML file to --config",
         link("random.toml", "/dev/urandom")),
    Case("config-is-a-fifo", ["train", "--config", "pipe.toml"],
         rf"cannot read config file pipe\.toml {NOT_A_FILE}; pass a TOML file to --config",
         fifo("pipe.toml"), run=in_a_process()),
    Case("config-larger-than-a-config", ["info", "--config", "huge.toml"],
         r"cannot read config file huge\.toml \(over 1 MiB, the limit for a config file\); pass "
         r"a TOML file to --config", write("huge.toml", "#" * (2**20 + 1))),
    Case("config-nested-too-deeply", ["info", "--config", "deep.toml"],
         r"deep\.toml: malformed TOML: nested too deeply; fix the file",
         write("deep.toml", f"[train]\nmax_iters = {nested_json(100_000)}\n")),
    Case("config-set-nested-too-deeply", ["info", "--set", f"train.max_iters={'[' * 100_000}"],
         r"\[train\] max_iters must be an integer, got '\[{50,}\.\.\. \(100,002 characters\)"),
    Case("config-number-of-too-many-digits", ["info", "--config", "digits.toml"],
         r"digits\.toml: malformed TOML: a number of more digits than can be read; fix the file",
         write("digits.toml", f"[train]\nseed = {'9' * 5000}\n")),
    Case("config-set-number-of-too-many-digits", ["info", "--set", f"train.seed={'9' * 5000}"],
         r"\[train\] seed must be an integer, got '9{50,}\.\.\. \(5,002 characters\) \(str\)$"),
    Case("config-set-integer-of-a-hundred-digits", ["info", "--set", f"train.seed={'9' * 100}"],
         r"\[train\] seed: must be in \[-2\*\*63, 2\*\*63 - 1\] \(a 64-bit integer\), got an "
         r"integer of about 100 digits$"),
    Case("config-unreadable", TRAIN,
         r"cannot read config file tiny\.toml \(Permission denied\); pass a TOML file to --config",
         unreadable_file("tiny.toml")),
    Case("sample-prompt-file-is-a-character-device", [*SAMPLE, "--prompt-file", "/dev/zero"],
         rf"cannot read --prompt-file /dev/zero {NOT_A_FILE}; give a UTF-8 text file"),
    Case("sample-prompt-file-is-a-fifo", [*SAMPLE, "--prompt-file", "pipe.txt"],
         rf"cannot read --prompt-file pipe\.txt {NOT_A_FILE}; give a UTF-8 text file",
         fifo("pipe.txt"), run=in_a_process()),
    Case("sample-prompt-file-over-its-limit",
         [*SAMPLE, "--prompt-file", "long.txt", "--set", "sample.max_prompt_bytes=1000"],
         r"--prompt-file long\.txt is over 1,000 bytes, the limit for a prompt; give a shorter "
         r"one, or raise the limit with --set sample\.max_prompt_bytes=4000",
         write("long.txt", "def " * 251)),
    Case("sample-endless-prompt-on-stdin", [*SAMPLE, "--prompt", "-"],
         r"the prompt on stdin is over 16 MiB, the limit for a prompt; give a shorter one, or "
         r"raise the limit with --set sample\.max_prompt_bytes=67108864",
         run=in_a_process(stdin="/dev/zero")),
    Case("sample-max-prompt-bytes-of-zero", [*SAMPLE, "--set", "sample.max_prompt_bytes=0"],
         r"\[sample\] max_prompt_bytes: must be > 0, got 0"),
    Case("data-source-is-a-character-device",
         [*TRAIN, "--set", "data.source=/dev/zero", "--set", "train.out_dir=new"],
         r"\[data\] source: /dev/zero is a character device, not a regular file; give a text "
         r"file, a folder, a glob"),
    Case("data-source-is-a-fifo",
         [*TRAIN, "--set", "data.source=pipe.txt", "--set", "train.out_dir=new"],
         r"\[data\] source: pipe\.txt is a FIFO, not a regular file; give a text file",
         fifo("pipe.txt"), run=in_a_process()),
    Case("eval-data-is-a-character-device", ["eval", "--checkpoint", "out", "--data", "/dev/urandom"],
         r"\[data\] source: /dev/urandom is a character device, not a regular file"),
    Case("data-meta-unreadable", RESUME,
         r"cannot read data/corpus-char/meta\.json \(Permission denied\); make it readable, or "
         r"rebuild with gpt prepare --force", unreadable_file(f"{DATA}/meta.json")),
    Case("data-tokens-unreadable", RESUME,
         r"cannot read data/corpus-char/train\.bin \(Permission denied\); make it readable, or "
         r"rebuild with gpt prepare --force", unreadable_file(f"{DATA}/train.bin")),
    Case("data-meta-is-a-fifo", ["eval", "--checkpoint", "out"],
         rf"cannot read \S*data/corpus-char/meta\.json {NOT_A_FILE}; make it readable, or rebuild",
         fifo(f"{DATA}/meta.json"), run=in_a_process()),
    Case("checkpoint-best-pointer-of-binary-bytes", [*SAMPLE, "--which", "best"],
         r"out/best names no checkpoint folder of out; pass a ckpt-\* folder, or --which latest",
         write("out/best", b"\xff\xfe\x00\x80ckpt\x00")),
    Case("checkpoint-best-pointer-outside-the-run", [*SAMPLE, "--which", "best"],
         r"out/best names no checkpoint folder of out", write("out/best", "../../tiny.toml\n")),
    Case("checkpoint-state-nested-too-deeply", SAMPLE,
         r"out/ckpt-0000020/state\.json is damaged \(not the JSON a checkpoint writes\); use "
         r"another checkpoint of the run, such as out/ckpt-0000010",
         write(f"{LATEST}/state.json", nested_json(100_000))),
    Case("checkpoint-state-is-a-fifo", SAMPLE,
         rf"cannot read out/ckpt-0000020/state\.json {NOT_A_FILE}; use another checkpoint of the "
         r"run, such as out/ckpt-0000010", fifo(f"{LATEST}/state.json"), run=in_a_process()),
    Case("checkpoint-weights-unreadable", SAMPLE,
         r"cannot read out/ckpt-0000020/model\.safetensors \(Permission denied\); use another "
         r"checkpoint of the run, such as out/ckpt-0000010",
         unreadable_file(f"{LATEST}/model.safetensors")),
    Case("checkpoint-weights-unreadable-on-resume", RESUME,
         r"cannot read out/ckpt-0000020/model\.safetensors \(Permission denied\); make it "
         r"readable, then run gpt train again", unreadable_file(f"{LATEST}/model.safetensors"),
         after=loads(LATEST)),
    Case("checkpoint-weights-are-a-fifo", SAMPLE,
         rf"cannot read out/ckpt-0000020/model\.safetensors {NOT_A_FILE}; use another checkpoint",
         fifo(f"{LATEST}/model.safetensors"), run=in_a_process()),
    Case("checkpoint-metrics-log-is-a-fifo-on-resume", RESUME,
         rf"cannot read out/metrics\.jsonl {NOT_A_FILE}; make it readable, or move it away",
         fifo("out/metrics.jsonl"), run=in_a_process(), writes=("out/.lock",)),
    Case("plot-metrics-log-is-a-fifo", ["plot", "out", "--out", "plot.png"],
         rf"cannot read out/metrics\.jsonl {NOT_A_FILE}; make it a file you can read",
         fifo("out/metrics.jsonl"), run=in_a_process()),
    Case("hf-weights-unreadable", [*SAMPLE[:2], "hf:gpt2-64", "--no-stream"],
         r"hf:gpt2-64: cannot read gpt2-64/model\.safetensors \(Permission denied\); make it a "
         r"file you can read", both(hf_gpt2, unreadable_file("gpt2-64/model.safetensors"))),
    Case("hf-config-is-a-fifo", [*SAMPLE[:2], "hf:gpt2-64", "--no-stream"],
         rf"hf:gpt2-64: cannot read gpt2-64/config\.json {NOT_A_FILE}",
         both(hf_gpt2, fifo("gpt2-64/config.json")), run=in_a_process()),
    Case("export-onto-a-full-disk", ["export", "--checkpoint", "out", "--out", "exported"],
         r"--out exported: writing failed \(File too large\); choose another folder \(nothing "
         r"was replaced\)", run=in_a_process(limit=20_000),
         after=nothing_exported),
]

# gpt serve: what it refuses before it serves (its requests' errors are in test_serve.py)
SERVE = ["serve", "--checkpoint", "out"]


def port_in_use(args: list[str]) -> Outcome:
    """The command with --port naming a port another program listens on."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        return in_process([*args, "--port", str(taken.getsockname()[1])])


def without_serve_extra(scene: Scene) -> None:
    """FastAPI and uvicorn not installed, as after a plain `pip install gpt`."""
    find_spec = importlib.util.find_spec
    scene.patch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in (
        "fastapi", "uvicorn") else find_spec(name, *a))


SERVING = [
    Case("serve-port-in-use", SERVE,
         r"port \d+ on 127\.0\.0\.1 is in use \(another gpt serve\?\); stop that program or "
         r"choose another port with --port", run=port_in_use),
    Case("serve-without-the-extra", SERVE,
         r"gpt serve needs the serve extra: pip install 'gpt\[serve\]'", without_serve_extra),
    Case("serve-port-out-of-range", [*SERVE, "--port", "70000"],
         r"\[serve\] port: must be in \[0, 65535\] \(0 = any free port\), got 70000"),
    Case("serve-empty-host", [*SERVE, "--host", " "],
         r"\[serve\] host: is empty; give an address such as 127\.0\.0\.1"),
    Case("serve-context-over-block-size", [*SERVE, "--port", "0", "--set", "serve.context=64"],
         r"\[serve\] context = 64 is more than the model's block_size \(32\); lower it or leave "
         r"it unset"),
    Case("serve-model-override", [*SERVE, "--set", "model.n_layer=4"],
         r"--set model\.n_layer=4: gpt serve cannot apply model\.n_layer; it takes \[serve\] keys"),
    Case("serve-zero-batch", [*SERVE, "--set", "serve.max_batch=0"],
         r"\[serve\] max_batch: must be > 0, got 0"),
]

SMALLER_CASES = [
    Case("eval-hf-model-without-data", ["eval", "--checkpoint", "hf:gpt2-64"],
         r"hf:gpt2-64 is an HF model, not a run: no data was prepared for it \(/\S+/run/data/"
         r"python-stdlib-gpt2 holds none\); evaluate it on a text with --data FILE, or prepare a "
         r"split with its tokenizer \(gpt prepare --config FILE whose \[train\] init_from = "
         r"\"hf:gpt2-64\"\) and pass the folder it writes with --set data\.data_dir=FOLDER",
         hf_gpt2),
    Case("eval-data-folder-missing-named-in-full",
         ["eval", "--checkpoint", "out", "--set", "data.data_dir=nowhere"],
         r"^error: /\S+/run/nowhere has no prepared data \(no meta\.json\); run gpt prepare first"),
    Case("data-too-little-text-for-a-learned-bpe",
         [*TRAIN, "--set", "data.source=short.txt", "--set", "data.tokenizer=bpe",
          "--set", "train.out_dir=new"],
         r"the train split has at most 18 tokens, fewer than block_size \+ 1 = 33; add text, "
         r"lower model\.block_size", write("short.txt", "abc\n" * 5)),
    Case("data-one-letter-repeated-for-a-learned-bpe",
         [*TRAIN, "--set", "data.source=aaa.txt", "--set", "data.tokenizer=bpe",
          "--set", "train.out_dir=new"],
         r"the val split has \d+ tokens, fewer than block_size \+ 1 = 33; add text",
         write("aaa.txt", "a" * 200_000)),
    Case("sample-batch-too-big-for-memory",
         [*SAMPLE, "--num-samples", "50000000", "--max-new-tokens", "1",
          "--set", "sample.max_batch=50000000"],
         r"decoding 50,000,000 sequences of up to \d+ positions needs at least [\d,.]+ GiB on "
         r"\S+ for their KV cache and logits, more than the [\d,.]+ GiB free there; lower "
         r"--num-samples or --max-new-tokens, or decode fewer at once with --set "
         r"sample.max_batch=N"),
    Case("sample-too-much-text-held", [*SAMPLE, "--num-samples", "100000000"],
         r"--num-samples 100,000,000 of 1 prompt\(s\) at --max-new-tokens 256 holds up to "
         r"25,600,000,000 tokens of text until the end; ask for at most 100,000,000 in all"),
]

BUFFERED = {k: v for k, v in ENV.items() if k != "PYTHONUNBUFFERED"}  # as a user's shell runs it
FULL = (pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full"),
        pytest.mark.slow)  # in a process of its own
needs_matplotlib = pytest.mark.skipif(
    importlib.util.find_spec("matplotlib") is None, reason="gpt plot needs matplotlib"
)


def to_a_full_disk(args: list[str]) -> Outcome:
    """`gpt ARGS` in its own process, its standard output /dev/full, where every write fails as
    on a full disk (ENOSPC). Block-buffered, as a redirected stdout is: what the command prints
    without flushing fails only at the end."""
    with open("/dev/full", "w") as full:
        process = gpt_process(args, stdout=full.fileno(), env=BUFFERED)
    _, stderr = process.communicate(timeout=120)
    return Outcome(process.returncode, "", stderr)


def into_a_closed_pipe(args: list[str]) -> Outcome:
    """`gpt ARGS` in its own process, its standard output a pipe whose reader is gone, as in
    `gpt sample | head -c 0`: every write fails with EPIPE."""
    read, write = os.pipe()
    os.close(read)
    try:
        process = gpt_process(args, stdout=write, env=BUFFERED)
    finally:
        os.close(write)
    _, stderr = process.communicate(timeout=120)
    return Outcome(process.returncode, "", stderr)


FULL_AFTER_RESUMING = """
import os, sys
import gpt.parallel
print0 = gpt.parallel.Dist.print0
def then_full(self, *args):
    print0(self, *args)
    if str(args[0]).startswith("resuming"):  # from here on, standard output's disk is full
        os.dup2(os.open("/dev/full", os.O_WRONLY), sys.stdout.fileno())
gpt.parallel.Dist.print0 = then_full
from gpt.cli import main
main()
"""


def full_while_training(args: list[str]) -> Outcome:
    """`gpt train ARGS` whose standard output, unbuffered (each line written as it is printed),
    fills up once the run has resumed: the next line, of an evaluation, fails mid-run."""
    process = gpt_process(args, FULL_AFTER_RESUMING, env={**ENV, "PYTHONUNBUFFERED": "1"})
    stdout, stderr = process.communicate(timeout=300)
    return Outcome(process.returncode, stdout, stderr)


STDOUT_FULL = (r"cannot write to standard output \(No space left on device\); free space on its "
               r"disk, or redirect it elsewhere")

OUTPUT_CASES = [
    Case("output-full-sample", [*SAMPLE, "--prompt", "def"], STDOUT_FULL, code=1,
         run=to_a_full_disk, marks=FULL),
    Case("output-full-sample-streaming", ["sample", "--checkpoint", "out", "--stream"],
         STDOUT_FULL, code=1, run=to_a_full_disk, marks=FULL),
    Case("output-full-eval-json", ["eval", "--checkpoint", "out", "--json"], STDOUT_FULL,
         code=1, run=to_a_full_disk, marks=FULL),
    Case("output-full-info", ["info", "--config", "tiny.toml"], STDOUT_FULL, code=1,
         run=to_a_full_disk, marks=FULL),
    Case("output-full-prepare", ["prepare", "--config", "tiny.toml"], STDOUT_FULL, code=1,
         run=to_a_full_disk, marks=FULL),  # its one line is printed unflushed: it fails at exit
    Case("output-full-tokenizer", ["tokenizer", "--config", "tiny.toml"], STDOUT_FULL, code=1,
         run=to_a_full_disk, marks=FULL),
    Case("output-full-runs", ["runs"], STDOUT_FULL, code=1, run=to_a_full_disk, marks=FULL),
    Case("output-full-export", ["export", "--checkpoint", "out", "--out", "hf"], STDOUT_FULL,
         code=1, writes=("hf", "hf/*"), run=to_a_full_disk, marks=FULL),
    Case("output-full-plot", ["plot", "out", "--out", "loss.png"], STDOUT_FULL, code=1,
         writes=("loss.png",), run=to_a_full_disk, marks=(*FULL, needs_matplotlib)),
    Case("output-full-version", ["--version"], STDOUT_FULL, code=1, run=to_a_full_disk,
         marks=FULL),
    Case("output-full-help", ["sample", "--help"], STDOUT_FULL, code=1, run=to_a_full_disk,
         marks=FULL),
    Case("output-full-while-training", RESUME, STDOUT_FULL, code=1,
         writes=("out/.lock", "out/metrics.jsonl"),  # the lock names the process that held it
         after=all_of(loads(LATEST), resumes_exactly), run=full_while_training, marks=FULL),
    Case("output-closed-pipe-sample", [*SAMPLE, "--prompt", "def"], "", code=1,
         run=into_a_closed_pipe, marks=(pytest.mark.slow,)),
    Case("output-closed-pipe-runs", ["runs"], "", code=1, run=into_a_closed_pipe,
         marks=(pytest.mark.slow,)),
]

HUGE = "99999999999999999999"  # 1e20: more than 64 bits hold


def int64(key: str, value: str = HUGE) -> str:
    """The one message of an integer key given a value beyond 64 bits."""
    return rf"\[{key.replace('.', '] ')}: must be in \[-2\*\*63, 2\*\*63 - 1\] \(a 64-bit integer\), got {value}$"


OUTPUT_CASES += [
    Case("seed-beyond-64-bits-on-the-flag", [*SAMPLE, "--seed", HUGE], int64("sample.seed")),
    Case("seed-below-64-bits-on-the-flag", [*SAMPLE, "--seed", f"-{2**63 + 1}"],
         int64("sample.seed", f"-{2**63 + 1}")),
    Case("seed-beyond-64-bits-in-set-sample", [*SAMPLE, "--set", f"sample.seed={HUGE}"],
         int64("sample.seed")),
    Case("seed-beyond-64-bits-in-set-train", [*RESUME, "--set", f"train.seed={HUGE}"],
         int64("train.seed")),
    Case("seed-beyond-64-bits-in-set-data", [*TRAIN, "--set", f"data.seed={HUGE}"],
         int64("data.seed")),
    Case("seed-beyond-64-bits-in-the-file", TRAIN, int64("train.seed"),
         edit("tiny.toml", "[train]\n", f"[train]\nseed = {HUGE}\n")),
    Case("max-iters-beyond-64-bits", [*TRAIN, "--set", f"train.max_iters={2**64}"],
         int64("train.max_iters", str(2**64))),
    Case("checkpoint-interval-beyond-64-bits",
         [*TRAIN, "--set", f"train.checkpoint_interval={HUGE}"],
         int64("train.checkpoint_interval")),
    Case("max-new-tokens-beyond-64-bits", [*SAMPLE, "--max-new-tokens", HUGE],
         int64("sample.max_new_tokens")),
    Case("num-samples-beyond-64-bits", [*SAMPLE, "--num-samples", HUGE],
         int64("sample.num_samples")),
]
INFO = ["info", "--config", "tiny.toml"]
BIG = str(2**62)  # within 64 bits, but no tensor of it times another size fits in torch's


def too_large(key: str, tensor: str, elements: str) -> str:
    """The one message of a model size that makes a tensor torch cannot hold."""
    return (rf"\[model\] {key}: {BIG} makes {tensor} {elements} elements; torch holds fewer "
            r"than 2\*\*60 in one tensor; lower it$")


OUTPUT_CASES += [
    Case("info-width-given-as-a-float", [*INFO, "--set", "model.n_embd=1.2e26"],
         r"\[model\] n_embd must be an integer, got 1\.2e\+26 \(float\)$"),
    Case("info-block-size-given-as-a-float", [*INFO, "--set", "model.block_size=1e20"],
         r"\[model\] block_size must be an integer, got 1e\+20 \(float\)$"),
    Case("info-width-beyond-64-bits", [*INFO, "--set", f"model.n_embd={12 * 10**25}"],
         int64("model.n_embd", str(12 * 10**25))),
    Case("info-heads-beyond-64-bits", [*INFO, "--set", f"model.n_head={HUGE}"],
         int64("model.n_head")),
    Case("info-batch-beyond-64-bits", [*INFO, "--set", f"train.batch_size={HUGE}"],
         int64("train.batch_size")),
    Case("info-width-beyond-a-tensor", [*INFO, "--set", f"model.n_embd={BIG}"],
         too_large("n_embd", "attention's c_attn", r"6\.38e\+37")),
    Case("info-block-size-beyond-a-tensor", [*INFO, "--set", f"model.block_size={BIG}"],
         too_large("block_size", "the position embedding", r"1\.48e\+20")),
    Case("info-vocabulary-beyond-a-tensor", [*INFO, "--set", f"model.vocab_size={BIG}"],
         too_large("vocab_size", "the token embedding", r"1\.48e\+20")),
    Case("info-mlp-beyond-a-tensor", [*INFO, "--set", f"model.mlp_hidden={BIG}"],
         too_large("mlp_hidden", "the MLP's c_fc", r"1\.48e\+20")),
    Case("info-more-layers-than-build", [*INFO, "--set", f"model.n_layer={BIG}"],
         r"\[model\] n_layer: 4,611,686,018,427,387,904 blocks are more than the 10,000 gpt "
         r"builds; lower it$"),
    Case("train-width-beyond-a-tensor", [*TRAIN, "--set", f"model.n_embd={BIG}"],
         too_large("n_embd", "attention's c_attn", r"6\.38e\+37")),
    Case("train-more-layers-than-build", [*TRAIN, "--set", f"model.n_layer={BIG}"],
         r"\[model\] n_layer: 4,611,686,018,427,387,904 blocks are more than the 10,000"),
    Case("train-batch-beyond-what-64-bits-count",
         [*TRAIN, "--set", "train.out_dir=new", "--set", f"train.batch_size={BIG}"],
         r"out of memory on cpu \(asked for more than 2\*\*63 bytes\); make the model smaller "
         r".* or lower train\.batch_size", writes=("new", "new/*")),
]

SECRET = unreadable_folder("secret")  # holding secret/run, a copy of the run
OUTPUT_CASES += [
    Case("runs-over-an-unreadable-folder", ["runs"],
         r"^note: secret: cannot read this folder \(Permission denied\); runs in it are not "
         r"listed$", SECRET, code=0, stdout=r"\Aname [^\n]*\nout +20/20 [^\n]*finished\n\Z"),
    Case("runs-inside-an-unreadable-folder", ["runs", "secret/run"],
         r"cannot read secret/run \(Permission denied\); make it readable, or pass another "
         r"folder$", SECRET),
    Case("runs-of-an-unreadable-folder", ["runs", "secret"],
         r"Invalid value for 'folder': path 'secret' is not readable; see gpt runs --help$",
         SECRET),
    Case("plot-of-a-run-in-an-unreadable-folder", ["plot", "secret/run", "--out", "loss.png"],
         r"cannot read secret/run \(Permission denied\); make it readable, or pass another run "
         r"folder$", SECRET, marks=(needs_matplotlib,)),
    Case("sample-of-a-checkpoint-in-an-unreadable-folder", [*SAMPLE, "--checkpoint", "secret/run"],
         r"cannot read secret/run \(Permission denied\); make it readable, or pass another "
         r"checkpoint$", SECRET),
    Case("export-into-an-unreadable-folder", ["export", "--checkpoint", "out", "--out", "secret/hf"],
         r"cannot read --out secret/hf \(Permission denied\); choose a folder you can write$",
         SECRET),
    Case("train-into-an-unreadable-folder", [*TRAIN, "--set", "train.out_dir=secret/run"],
         r"cannot read secret/run \(Permission denied\); set train\.out_dir to a folder you can "
         r"write$", SECRET),
    Case("train-on-data-in-an-unreadable-folder",
         [*TRAIN, "--set", "train.out_dir=new", "--set", "data.data_dir=secret/data"],
         r"cannot read secret/data \(Permission denied\); make it readable, or set "
         r"data\.data_dir to another folder$", SECRET),
    Case("train-on-a-source-in-an-unreadable-folder",
         [*TRAIN, "--set", "train.out_dir=new", "--set", "data.source=secret/corpus.txt"],
         r"cannot read secret/corpus\.txt \(Permission denied\); make it readable, or set "
         r"data\.source to another file or folder$", SECRET),
]

# chat data: gpt prepare of a JSONL chat set with one bad row, at line 2
CHAT_PREPARE = ["prepare", "--config", "tiny.toml", "--set", "data.format=chat",
                "--set", "data.source=chat.jsonl", "--set", "data.data_dir=data/chat"]
GOOD_ROW = '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}'


def chat_rows(second: str) -> Setup:
    """chat.jsonl: a good row, `second`, and another good row."""
    return write("chat.jsonl", f"{GOOD_ROW}\n{second}\n{GOOD_ROW}\n")


def chat_prepared(scene: Scene) -> None:
    """A chat set prepared for the tiny run's block_size (32) into data/chat."""
    chat_rows(GOOD_ROW)(scene)
    with working_directory(scene.folder):
        cfg = load_config("tiny.toml", CHAT_PREPARE[4::2])
        prepare(cfg.data, block_size=cfg.model.block_size, progress=False)


CHAT_DATA = [
    Case("chat-data-row-not-json", CHAT_PREPARE,
         r"chat\.jsonl, line 2: is not JSON \(Expecting property name enclosed in double quotes, "
         r"column 2\); fix the row, or set data\.bad_rows = \"skip\" to skip such rows$",
         chat_rows("{messages: []}")),
    Case("chat-data-unknown-role", CHAT_PREPARE,
         r"chat\.jsonl, line 2: message 1 has role 'bot'; use one of system, user, assistant; "
         r"fix the row, or set data\.bad_rows = \"skip\"",
         chat_rows(GOOD_ROW.replace('"assistant"', '"bot"'))),
    Case("chat-data-no-assistant-turn", CHAT_PREPARE,
         r"chat\.jsonl, line 2: has no assistant turn, so nothing to train on; fix the row, or "
         r"set data\.bad_rows = \"skip\"",
         chat_rows('{"prompt": [{"role": "user", "content": "Hi"}], "completion": []}')),
    Case("chat-data-content-not-text", CHAT_PREPARE,
         r"chat\.jsonl, line 2: message 1 has content of type list; give it as text; fix the "
         r"row, or set data\.bad_rows = \"skip\"",
         chat_rows(GOOD_ROW.replace('"Yo"', '["Yo"]'))),
    Case("chat-data-conversation-too-long", [*CHAT_PREPARE, "--long-conversations", "fail"],
         r"chat\.jsonl, line 2: the conversation has 123 tokens, more than a row of "
         r"model\.block_size \+ 1 = 33; shorten it, raise model\.block_size, or set "
         r"data\.long_conversations = \"truncate\"$",
         chat_rows(GOOD_ROW.replace('"Yo"', '"' + "x" * 100 + '"'))),
    Case("chat-data-from-a-text-source", [*CHAT_PREPARE, "--set", "data.source=corpus.txt"],
         r"\[data\] source: text file corpus\.txt holds text, not conversations; give a \.jsonl "
         r"file or a dataset of chat rows, or set data\.format = \"text\"$"),
    Case("chat-data-of-another-block-size",
         [*TRAIN, "--set", "train.out_dir=new", *CHAT_PREPARE[3:], "--set", "model.block_size=64"],
         r"data/chat holds data prepared from other settings \(block_size 32 -> 64\); rebuild it "
         r"with gpt prepare --force", chat_prepared),
]

LORA = ["--set", "train.init_from=out", "--set", "train.finetune=lora"]
TRAIN_LORA = [*TRAIN, *LORA, "--set", "train.out_dir=lora"]


def lora_run(scene: Scene) -> None:
    """A LoRA finetune of the template's run (out/ckpt-0000020) to iteration 4, in lora/."""
    settings = [LORA[1], LORA[3], "train.out_dir=lora", "train.max_iters=4"]
    assert train(load_config("tiny.toml", settings)) == 0


def lora_base_changed(scene: Scene) -> None:
    """The LoRA run, then its base's checkpoint replaced by the run's earlier one."""
    lora_run(scene)
    shutil.copytree("out/ckpt-0000010", "out/ckpt-0000020", dirs_exist_ok=True)


def lora_base_gone(scene: Scene) -> None:
    lora_run(scene)
    shutil.rmtree("out/ckpt-0000020")


LORA_CASES = [
    Case("train-lora-without-init-from", [*TRAIN, "--set", "train.finetune=lora"],
         r'\[train\] finetune: "lora" adapts a trained model, but init_from is unset; set '
         r"train\.init_from to a run's out_dir or an HF model \(hf:\.\.\.\), or finetune = "
         r'"full"$'),
    Case("train-lora-rank-below-one", [*TRAIN_LORA, "--set", "train.lora_rank=0"],
         r"\[train\] lora_rank: must be > 0, got 0$"),
    Case("train-lora-unknown-target", [*TRAIN_LORA, "--set", "train.lora_targets=['q_proj']"],
         r"\[train\] lora_targets: 'q_proj' is not a layer of gpt's blocks \(c_attn holds q, k "
         r"and v together\); choose among c_attn, c_proj, c_fc, c_up$"),
    Case("train-lora-target-the-model-lacks", [*TRAIN_LORA, "--set", "train.lora_targets=['c_up']"],
         r"\[train\] lora_targets names 'c_up', which this model's blocks lack \(mlp = 'standard' "
         r"has no c_up\); remove it, or choose among c_attn, c_proj, c_fc$"),
    Case("train-lora-with-fsdp", [*TRAIN_LORA, "--set", "train.parallel=fsdp"],
         r'\[train\] parallel: "fsdp" does not shard LoRA finetunes \(their frozen base and '
         r'small adapters\); use parallel = "ddp" with finetune = "lora"$'),
    Case("train-lora-with-hsdp", [*TRAIN_LORA, "--set", "train.parallel=hsdp"],
         r'\[train\] parallel: "hsdp" does not shard LoRA finetunes \(their frozen base and '
         r'small adapters\); use parallel = "ddp" with finetune = "lora"$'),
    Case("train-lora-resumed-with-another-rank",
         [*TRAIN_LORA, "--set", "train.max_iters=8", "--set", "train.lora_rank=4"],
         r"lora/ckpt-0000004 was trained with train\.lora_rank = 8, the config now says 4; set "
         r"it back, or train into a new train\.out_dir with train\.init_from = "
         r'"lora/ckpt-0000004"$', lora_run),
    Case("train-lora-resumed-whose-base-changed", [*TRAIN_LORA, "--set", "train.max_iters=8"],
         r"lora/ckpt-0000004 holds LoRA adapters of out/ckpt-0000020, whose weights have changed "
         r"since \(their sha256 differs\); restore the base it was trained on, or finetune again "
         r"from this one$", lora_base_changed),
    Case("sample-lora-whose-base-changed", ["sample", "--checkpoint", "lora", "--no-stream"],
         r"lora/ckpt-0000004 holds LoRA adapters of out/ckpt-0000020, whose weights have "
         r"changed since", lora_base_changed),
    Case("sample-lora-whose-base-is-gone", ["sample", "--checkpoint", "lora", "--no-stream"],
         r"lora/ckpt-0000004 holds LoRA adapters of out/ckpt-0000020, which cannot be opened "
         r"\(.*\); put the base back where training found it$", lora_base_gone),
    Case("export-peft-of-a-whole-model", ["export", "--checkpoint", "out", "--out", "adapter",
                                          "--peft"],
         r"out/ckpt-0000020 holds a whole model, not LoRA adapters \(a run trained with "
         r'train\.finetune = "lora"\); export it without --peft$'),
]

def task_yaml(name: str, dataset: str) -> str:
    """A multiple-choice task of lm-evaluation-harness over `dataset` (a hub name, or json for
    tasks/NAME.jsonl), its cache kept in the scene."""
    local = f"json\ndataset_kwargs:\n  data_files:\n    test: tasks/{name}.jsonl\n" \
        "  cache_dir: tasks/cache"
    return (f"task: {name}\ndataset_path: {local if dataset == 'json' else dataset}\n"
            "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
            "doc_to_choice: '{{choices}}'\ndoc_to_target: 0\nmetric_list:\n  - metric: acc\n"
            "    aggregation: mean\n    higher_is_better: true\n")


def a_task(name: str, dataset: str, rows: str = "") -> Setup:
    """tasks/NAME.yaml (see task_yaml), and for a local one its rows, tasks/NAME.jsonl."""
    def setup(scene: Scene) -> None:
        write(f"tasks/{name}.yaml", task_yaml(name, dataset))(scene)
        if rows:
            write(f"tasks/{name}.jsonl", rows)(scene)

    return setup


def without_eval_extra(scene: Scene) -> None:
    """lm-evaluation-harness not installed, as after a plain `pip install gpt`."""
    scene.patch.setitem(sys.modules, "lm_eval", None)  # import lm_eval raises ImportError
    scene.patch.delitem(sys.modules, "gpt.harness", raising=False)


TASKS = ["eval", "--checkpoint", "out", "--device", "cpu", "--tasks"]
HARNESS = (pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                              reason="needs lm-eval (gpt[eval])"),)
TASK_CASES = [
    Case("eval-tasks-unknown", [*TASKS, "hellaswg"],
         r"--tasks 'hellaswg' is not a task of lm-evaluation-harness; did you mean hellaswag"
         r".*\? see lm-eval ls tasks, or give a folder of task YAML files with --include-path$",
         marks=HARNESS),
    Case("eval-tasks-with-data", [*TASKS, "hellaswag", "--data", "corpus.txt"],
         r"--tasks runs on the tasks' own data; give --data or --split without it$"),
    Case("eval-tasks-data-not-available-offline", [*TASKS, "net", "--include-path", "tasks"],
         r"--tasks net needs a data set that is not in the HF cache and cannot be downloaded "
         r"\(Couldn't reach 'gpt-tests/absent'.*\); run the same command once with network "
         r"access \(HF_DATASETS_OFFLINE unset\) to cache it, then it runs offline$",
         a_task("net", "gpt-tests/absent"), marks=HARNESS),
    Case("eval-tasks-text-outside-a-char-vocabulary", [*TASKS, "upper", "--include-path", "tasks"],
         r"a task's text cannot be encoded with the model's char tokenizer \(text has 1 "
         r"character\(s\) not in the char vocabulary: 'Z'\); evaluate it on tasks its "
         r"vocabulary covers, or evaluate a model whose tokenizer covers this one$",
         a_task("upper", "json", '{"q": "Zed", "choices": [" x", " y"]}\n'),
         writes=("tasks/cache*",), marks=HARNESS),
    Case("eval-tasks-output-in-a-missing-folder", [*TASKS, "hellaswag", "--output", "no/r.json"],
         r"--output no/r\.json: its folder does not exist; create it or choose another file$",
         marks=HARNESS),
    Case("eval-tasks-without-the-extra", [*TASKS, "hellaswag"],
         r"gpt eval --tasks runs EleutherAI's lm-evaluation-harness, which is not installed; "
         r"pip install 'gpt\[eval\]'$", without_eval_extra),
]

# --quantize int8: what it refuses, on every command that takes it

def kernel_looked_for_afresh(scene: Scene) -> None:
    """The int8 kernel's lookup forgotten (it is cached per process), now and after the case."""
    quant._library.cache_clear()
    scene.cleanup.callback(quant._library.cache_clear)


def without_vnni(scene: Scene) -> None:
    """A CPU with AVX2 but neither AVX512-VNNI nor AVX-VNNI."""
    scene.patch.setattr(quant, "_cpu_flags", lambda: {"avx2"})
    kernel_looked_for_afresh(scene)


def without_a_compiler(scene: Scene) -> None:
    """A CPU with VNNI, and no C compiler: CC unset, neither cc nor gcc on the PATH."""
    scene.patch.setattr(quant, "_cpu_flags", lambda: {"avx_vnni"})
    scene.patch.delenv("CC", raising=False)
    which = shutil.which
    scene.patch.setattr(shutil, "which", lambda name, *args, **kwargs: None if name in (
        "cc", "gcc") else which(name, *args, **kwargs))
    kernel_looked_for_afresh(scene)


def with_cc(command: str) -> Setup:
    """A CPU with VNNI, and $CC set to `command`."""
    def setup(scene: Scene) -> None:
        scene.patch.setattr(quant, "_cpu_flags", lambda: {"avx_vnni"})
        scene.patch.setenv("CC", command)
        kernel_looked_for_afresh(scene)

    return setup


def on_a_gpu_host(scene: Scene) -> None:
    """torch sees a CUDA GPU with bfloat16, so --device auto picks it (the refusal comes before
    anything reaches the GPU)."""
    scene.patch.setattr(torch.cuda, "is_available", lambda: True)
    scene.patch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)


X86 = (pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"),
                          reason="on another CPU the refusal names the CPU instead"),)
NO_VNNI = (r"--quantize int8 needs a CPU with AVX512-VNNI or AVX-VNNI, which this one lacks; run "
           r"without --quantize$")
QUANTIZE_CASES = [
    Case("sample-quantize-unknown-method", [*SAMPLE, "--quantize", "int4"],
         r"--quantize 'int4' is not a quantization; use --quantize int8 or leave it out$"),
    Case("sample-quantize-with-compile", [*SAMPLE, "--quantize", "int8", "--compile"],
         r"--compile cannot compile --quantize int8's kernel; give one of them, not both$"),
    Case("sample-quantize-without-vnni", [*SAMPLE, "--quantize", "int8"], NO_VNNI,
         without_vnni, marks=X86),
    Case("sample-quantize-without-a-compiler", [*SAMPLE, "--quantize", "int8"],
         r"--quantize int8 builds its kernel with a C compiler, and none was found \(cc, gcc or "
         r"\$CC\); install one \(such as gcc\) or run without --quantize$", without_a_compiler,
         marks=X86),
    Case("sample-quantize-cc-with-an-unclosed-quote", [*SAMPLE, "--quantize", "int8"],
         r"--quantize int8 builds its kernel with \$CC, '\"cc -O2', which is not a program here; "
         r"set CC to a C compiler \(such as gcc\), or unset it$", with_cc('"cc -O2'), marks=X86),
    Case("chat-quantize-cc-writes-no-library", [*CHAT, "--quantize", "int8"],
         r"--quantize int8: building its kernel with true failed \(it wrote no library\); run "
         r"without --quantize$", with_cc("true"), marks=X86),
    Case("sample-quantize-on-a-gpu", [*SAMPLE, "--quantize", "int8"],
         r"--quantize int8 runs on the CPU, not cuda; give --device cpu or run without "
         r"--quantize$", on_a_gpu_host),
    Case("chat-quantize-with-compile", [*CHAT, "--quantize", "int8", "--compile"],
         r"--compile cannot compile --quantize int8's kernel; give one of them, not both$"),
    Case("chat-quantize-without-vnni", [*CHAT, "--quantize", "int8"], NO_VNNI, without_vnni,
         marks=X86),
    Case("serve-quantize-unknown-method", [*SERVE, "--quantize", "int4"],
         r"--quantize 'int4' is not a quantization; use --quantize int8 or leave it out$"),
    Case("serve-quantize-without-vnni", [*SERVE, "--port", "0", "--quantize", "int8"], NO_VNNI,
         without_vnni, marks=X86),
    Case("eval-quantize-unknown-method", ["eval", "--checkpoint", "out", "--quantize", "int4"],
         r"--quantize 'int4' is not a quantization; use --quantize int8 or leave it out$"),
    Case("eval-quantize-without-vnni", ["eval", "--checkpoint", "out", "--quantize", "int8"],
         NO_VNNI, without_vnni, marks=X86),
    Case("eval-tasks-quantize-without-vnni",
         [*TASKS, "local", "--include-path", "tasks", "--quantize", "int8"], NO_VNNI,
         both(a_task("local", "json", '{"q": "def", "choices": [" x", " y"]}\n'), without_vnni),
         marks=(*HARNESS, *X86)),
]

CASES = [*CONFIG, *DATA_CASES, *CHECKPOINTS, *SAMPLING, *CHATTING, *FAULTS, *READS,
         *SMALLER_CASES, *OUTPUT_CASES, *SERVING, *CHAT_DATA, *LORA_CASES, *TASK_CASES,
         *QUANTIZE_CASES]


@pytest.mark.parametrize(
    "case", [pytest.param(case, id=case.id, marks=case.marks) for case in CASES]
)
def test_what_happens_when(
    case: Case, template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The case's command, run on a copy of the template as the case left it: its exit code,
    its one error line (problem and fix), no traceback, and only what it may write written."""
    folder = tmp_path / "run"
    shutil.copytree(template, folder)
    monkeypatch.chdir(folder)
    with contextlib.ExitStack() as cleanup:
        with monkeypatch.context() as patch:
            scene = Scene(folder, template, patch, cleanup)
            case.setup(scene)
            before = hashes(folder)
            outcome = (case.run or in_process)(case.args)
        after = hashes(folder)
        shown = f"exit {outcome.code}\nstdout: {outcome.stdout}\nstderr: {outcome.stderr}"
        assert outcome.code == case.code, shown
        for trace in ("Traceback", "Exception ignored"):  # the interpreter's, at exit
            assert trace not in outcome.stdout + outcome.stderr, shown
        if case.code == 2 or (case.code == 1 and case.message):
            # an error (exit 1: standard output failed): one line, naming the problem and the fix
            lines = error_lines(outcome.stderr)
            assert len(lines) == 1 and lines[0].startswith("error: "), shown
            assert re.search(case.message, lines[0]), f"{case.message!r} not in {lines[0]!r}"
            if case.args[0] in ("sample", "chat"):  # stdout carries the text alone: none, here
                assert outcome.stdout == "", shown
        elif case.code == 1:  # a closed pipe: its reader wants no more output, nor a word
            assert error_lines(outcome.stderr) == [], shown
        elif case.code == 0:  # worked around: one note, naming what could not be done
            lines = error_lines(outcome.stderr)
            assert len(lines) == 1 and lines[0].startswith("note: "), shown
            assert re.search(case.message, lines[0]), f"{case.message!r} not in {lines[0]!r}"
            assert re.search(case.stdout, outcome.stdout), shown
        elif case.message:
            assert re.search(case.message, outcome.stdout), shown
        changed = {path for path in before.keys() | after.keys()
                   if before.get(path) != after.get(path)}
        allowed = {path for path in changed
                   if any(fnmatch.fnmatch(path, pattern) for pattern in case.writes)}
        assert changed == allowed, f"changed, not allowed to: {sorted(changed - allowed)}"
        if case.after is not None:
            case.after(scene)


def test_the_table_covers_forty_distinct_cases() -> None:
    """Each case is there once, under its own name, and there are at least forty."""
    ids = [case.id for case in CASES]
    assert len(set(ids)) == len(ids) >= 40
