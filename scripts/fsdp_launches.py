"""Launch tiny FSDP runs back to back under torchrun and count how each one ended.

A launch ends `ok` (exit 0), `abort` (a process aborted: `terminate called without an active
exception`, or exit -6 / SIGABRT), `transport` (gloo's TCP transport dropped a connection, which
a loaded host does now and then), or `other` (anything else; its stderr's tail is printed).
Each launch trains a 2-layer model for `--iters` steps on 2 gloo processes (one thread each)
and saves at its last step, so it goes through everything a real run's teardown does.

    python scripts/fsdp_launches.py [--launches 200] [--iters 2] [--nproc 2]
"""

from __future__ import annotations

import argparse
import collections
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ABORT = "terminate called without an active exception"
TRANSPORT = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
             "Address already in use")
CONFIG = """
[model]
n_layer = 2
n_head = 2
n_embd = 32
block_size = 32

[data]
source = "corpus.txt"
tokenizer = "char"

[train]
out_dir = "out"
batch_size = 4
grad_accum_steps = 2
eval_iters = 1
log_interval = 1
"""


def write_tiny_run(folder: Path) -> Path:
    """`corpus.txt` and `tiny.toml` (a 2-layer char-level model) in `folder`."""
    (folder / "corpus.txt").write_text(
        "".join(f"def function_{i}(x):\n    return x * {i}\n\n" for i in range(200)))
    (folder / "tiny.toml").write_text(CONFIG)
    return folder


def outcome(returncode: int, stderr: str) -> str:
    """How one launch ended: ok, abort, transport or other."""
    if returncode == 0:
        return "ok"
    if ABORT in stderr or "exitcode  : -6" in stderr or returncode == -6:
        return "abort"
    if any(flake in stderr for flake in TRANSPORT):
        return "transport"
    return "other"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=200, help="how many runs to launch")
    parser.add_argument("--iters", type=int, default=2, help="training steps a run")
    parser.add_argument("--nproc", type=int, default=2, help="processes a run")
    args = parser.parse_args()
    if args.launches < 1 or args.iters < 1 or args.nproc < 2:
        raise SystemExit("--launches and --iters must be at least 1 and --nproc at least 2")
    folder = write_tiny_run(Path(tempfile.mkdtemp(prefix="fsdp-launches-")))
    # faulthandler prints every Python thread's stack where a process aborts
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONFAULTHANDLER": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    counts: collections.Counter[str] = collections.Counter()
    started = time.perf_counter()
    for i in range(args.launches):
        out = folder / f"out-{i}"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   f"--nproc_per_node={args.nproc}", "-m", "gpt", "train", "--config",
                   "tiny.toml", "--set", "train.parallel=fsdp",
                   "--set", f"train.max_iters={args.iters}", "--set", f"train.out_dir={out.name}"]
        done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True,
                              timeout=600)
        kind = outcome(done.returncode, done.stderr)
        counts[kind] += 1
        if kind != "ok":
            print(f"launch {i + 1}: {kind} (exit {done.returncode})\n{done.stderr[-2000:]}",
                  flush=True)
        shutil.rmtree(out, ignore_errors=True)
        if (i + 1) % 20 == 0:
            print(f"{i + 1} launches: {dict(counts)}", flush=True)
    elapsed = time.perf_counter() - started
    print(f"command: cd {folder} && {shlex.join(command)}")
    print(f"{args.launches} launches in {elapsed:.0f} s: " + ", ".join(
        f"{counts[k]} {k}" for k in ("ok", "abort", "transport", "other")))
    if counts["ok"] == args.launches:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
