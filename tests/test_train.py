"""gpt train end to end on a tiny char-level model: logs, checkpoints, exact resume, signals."""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gpt import optim
from gpt.checkpoint import Checkpoint, RandomStates, rng_state
from gpt.cli import app
from gpt.config import TrainConfig, load_config
from gpt.data.prepared import BatchSampler
from gpt.errors import GPTError
from gpt.lock import FolderLock
from gpt.model import GPT
from gpt.optim import (
    Muon,
    NonFiniteSteps,
    found_inf_skips,
    lr_at,
    make_optimizer,
    muon_math,
    skips_on_device,
)
from gpt.parallel import Dist, StopFlag
from gpt.train import TrainState, Validator, setup_run, train, train_step

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[1]
needs_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"),
                                reason="torch.optim.Muon arrived in torch 2.9")

pytestmark = pytest.mark.usefixtures("one_thread")


ENV = {**os.environ, "OMP_NUM_THREADS": "1"}  # the same for the subprocesses


def load_model_flops(out: Path) -> int:
    return Checkpoint.open(out).load_model().flops_per_token()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def gpt_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gpt", "train", "--config", "tiny.toml", *args]


@pytest.mark.parametrize("seed", [2**32, 2**63 - 1, -(2**63)])
def test_every_seed_the_config_takes_trains(tiny_run: Path, seed: int) -> None:
    """torch takes 64 bits and numpy's seed 32: any seed [train] seed accepts starts a run."""
    assert train(load_config("tiny.toml", ["train.max_iters=1", f"train.seed={seed}"])) == 0


def test_train_logs_checkpoints_and_resumes(tiny_run: Path) -> None:
    code = train(load_config("tiny.toml"))
    assert code == 0
    out = tiny_run / "out"
    records = metrics(out)
    assert {"iter", "elapsed_s", "tokens", "lr"} <= set(records[0])
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "val_loss" in r]
    assert [r["iter"] for r in train_lines] == [5, 10, 15, 20, 25, 30]
    assert [r["iter"] for r in eval_lines] == [0, 10, 20, 30]
    assert all("tok_per_s" in r for r in train_lines)
    assert train_lines[-1]["tokens"] == 30 * 4 * 32
    assert eval_lines[-1]["val_loss"] < eval_lines[0]["val_loss"]  # it learns
    assert sorted(p.name for p in out.glob("ckpt-*")) == ["ckpt-0000020", "ckpt-0000030"]  # keep_last 2
    assert (out / "latest").read_text().strip() == "ckpt-0000030"
    best = (out / "best").read_text().strip()
    assert (out / best / "model.safetensors").exists()
    state = json.loads((out / "ckpt-0000030" / "state.json").read_text())
    assert state["iter"] == 30 and state["tokens"] == 30 * 4 * 32
    model_cfg = state["config"]["model"]
    assert (model_cfg["vocab_size"], model_cfg["padded_vocab_size"]) == (29, 64)  # char ids, padded
    assert state["tokenizer"]["name"] == "char" and set(state["samplers"]) == {"train", "eval_train", "eval_val"}
    # a longer max_iters continues the same run
    assert train(load_config("tiny.toml", ["train.max_iters=40", "train.peak_flops=1e12"])) == 0
    resumed = [r for r in metrics(out) if "loss" in r]
    assert [r["iter"] for r in resumed][-2:] == [35, 40]
    flops = load_model_flops(out)
    assert resumed[-1]["mfu"] == pytest.approx(flops * resumed[-1]["tok_per_s"] / 1e12)


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=needs_muon)])
def test_resume_is_bitwise_exact(tiny_run: Path, optimizer: str) -> None:
    """30 iterations straight equal 20 iterations, a stop, and 10 more, bit for bit."""
    fixed = "train.lr_decay_iters=30"  # the schedule must not depend on where the first leg ends
    with open("tiny.toml", "a") as f:
        f.write(f'optimizer = "{optimizer}"\n')  # the [train] section is the file's last
    assert train(load_config("tiny.toml", ["train.out_dir=straight", fixed])) == 0
    assert train(load_config("tiny.toml", ["train.out_dir=split", "train.max_iters=20", fixed])) == 0
    assert train(load_config("tiny.toml", ["train.out_dir=split", fixed])) == 0
    a, b = metrics(tiny_run / "straight"), metrics(tiny_run / "split")
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("elapsed_s", "tok_per_s", "mfu")} for r in rs]  # noqa: E731
    # the split run re-evaluates nothing; the 20-iteration run's final eval is the straight run's
    assert strip(a) == strip(b)
    wa = load_file(str(tiny_run / "straight" / "ckpt-0000030" / "model.safetensors"))
    wb = load_file(str(tiny_run / "split" / "ckpt-0000030" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    saved = torch.load(tiny_run / "split" / "ckpt-0000030" / "optimizer.pt", weights_only=True)
    assert (sorted(saved) == ["adamw", "muon"]) == (optimizer == "muon")


@pytest.mark.slow
def test_sigkill_and_resume_gives_the_uninterrupted_run(tiny_run: Path) -> None:
    """Killed mid-run (no chance to save) and resumed: bitwise the run never interrupted.

    The killed run is given far more steps than it can finish before the kill, and the resume
    sets the real max_iters; lr_decay_iters is fixed, so both legs follow one schedule and the
    test never races the run's end.
    """
    settings = ["--set", "train.checkpoint_interval=7", "--set", "train.eval_interval=25",
                "--set", "train.batch_size=16", "--set", "train.lr_decay_iters=100"]
    subprocess.run(gpt_cmd(*settings, "--set", "train.max_iters=100", "--set", "train.out_dir=straight"),
                   check=True, timeout=300, capture_output=True, env=ENV)
    proc = subprocess.Popen(gpt_cmd(*settings, "--set", "train.max_iters=1000000", "--set", "train.out_dir=killed"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    log = tiny_run / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and any(json.loads(line)["iter"] >= 40 for line in log.read_text().splitlines() if line.endswith("}")):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with open(log, "a") as f:  # as if the kill had cut a line short
        f.write('{"iter": 41, "elapsed_s": 1.')
    subprocess.run(gpt_cmd(*settings, "--set", "train.max_iters=100", "--set", "train.out_dir=killed"),
                   check=True, timeout=300, capture_output=True, env=ENV)
    losses = lambda out: [(r["iter"], r.get("loss"), r.get("val_loss")) for r in metrics(out)]  # noqa: E731
    assert losses(tiny_run / "killed") == losses(tiny_run / "straight")
    wa = load_file(str(tiny_run / "straight" / "ckpt-0000100" / "model.safetensors"))
    wb = load_file(str(tiny_run / "killed" / "ckpt-0000100" / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.slow
def test_sigterm_saves_and_exits_143(tiny_run: Path) -> None:
    proc = subprocess.Popen(gpt_cmd("--set", "train.max_iters=100000", "--set", "train.checkpoint_interval=100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    log = tiny_run / "out" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and len(log.read_text().splitlines()) > 3):
        time.sleep(0.05)
    # a second trainer on the same out_dir is refused, naming the first
    second = subprocess.run(gpt_cmd(), capture_output=True, text=True, timeout=120, env=ENV)
    assert second.returncode == 2 and f"in use by another gpt train (pid {proc.pid}" in second.stderr
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, output
    latest = (tiny_run / "out" / "latest").read_text().strip()
    saved = json.loads((tiny_run / "out" / latest / "state.json").read_text())["iter"]
    assert 0 < saved < 100000 and f"stopped by signal after iteration {saved}" in output


def test_a_signal_during_an_evaluation_stops_after_the_step_it_evaluates(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """The loop looks for a signal after evaluating: one that comes during the evaluation of
    iteration 10 saves iteration 10 and stops, with no further step and no second save."""
    estimate = Validator.estimate

    def signalled_estimate(self):
        if self.run.state.iteration == 10:
            os.kill(os.getpid(), signal.SIGINT)
        return estimate(self)

    monkeypatch.setattr(Validator, "estimate", signalled_estimate)
    assert train(load_config("tiny.toml", ["train.checkpoint_interval=20"])) == 130
    assert "stopped by signal after iteration 10; saved out/ckpt-0000010" in capsys.readouterr().out
    assert (tiny_run / "out" / "latest").read_text().strip() == "ckpt-0000010"
    assert sorted(p.name for p in (tiny_run / "out").glob("ckpt-*")) == ["ckpt-0000010"]
    assert max(record["iter"] for record in metrics(tiny_run / "out")) == 10


def _file_size_limit(limit: int) -> Callable[[], None]:
    """For a child process: files may not grow past `limit` bytes (EFBIG at the write, as on a
    full disk, instead of SIGXFSZ), so the OS, not a patch, makes the writes fail."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


@pytest.mark.slow
def test_a_checkpoint_the_os_refuses_to_write_is_one_line_and_the_run_resumes(
    tiny_run: Path,
) -> None:
    """The writes of safetensors and torch.save, failing in the kernel: one line naming the
    intact previous checkpoint, no partial folder, and the run resumes to the uninterrupted
    run's weights once the writes succeed again."""
    fixed = ("--set", "train.lr_decay_iters=30")
    subprocess.run(gpt_cmd(*fixed, "--set", "train.out_dir=straight"), check=True, env=ENV,
                   capture_output=True)
    subprocess.run(gpt_cmd(*fixed, "--set", "train.max_iters=10"), check=True, env=ENV,
                   capture_output=True)
    weights = (tiny_run / "out" / "ckpt-0000010" / "model.safetensors").stat().st_size
    failed = subprocess.run(gpt_cmd(*fixed, "--set", "train.max_iters=20"), env=ENV, text=True,
                            capture_output=True, preexec_fn=_file_size_limit(weights // 2))
    assert failed.returncode == 2, failed.stderr
    error = [line for line in failed.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "Traceback" not in failed.stderr, failed.stderr
    assert "cannot write the checkpoint of iteration 20 into out" in error[0]
    assert "resume from out/ckpt-0000010, which is intact" in error[0]
    assert sorted(p.name for p in (tiny_run / "out").iterdir() if "ckpt" in p.name) == [
        "ckpt-0000010"]  # no temporary folder left
    assert train(load_config("tiny.toml", ["train.lr_decay_iters=30"])) == 0
    a = load_file(str(tiny_run / "straight" / "ckpt-0000030" / "model.safetensors"))
    b = load_file(str(tiny_run / "out" / "ckpt-0000030" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_corrupted_latest_falls_back_to_previous(tiny_run: Path, capsys: pytest.CaptureFixture) -> None:
    assert train(load_config("tiny.toml")) == 0
    out = tiny_run / "out"
    weights = out / "ckpt-0000030" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert train(load_config("tiny.toml", ["train.max_iters=40"])) == 0
    text = capsys.readouterr().out
    assert "ckpt-0000030/model.safetensors is damaged" in text
    assert "resuming from" in text and "ckpt-0000020" in text
    assert (out / "latest").read_text().strip() == "ckpt-0000040"


def test_pruning_after_a_fallback_keeps_the_good_checkpoints(
    tiny_run: Path, capsys: pytest.CaptureFixture
) -> None:
    """The latest checkpoint damaged, the run resumes from the one before and saves below it:
    keep_last = 2 keeps two good checkpoints, never the damaged one in place of a good one."""
    assert train(load_config("tiny.toml")) == 0  # ckpt 20 and 30 (keep_last = 2)
    out = tiny_run / "out"
    weights = out / "ckpt-0000030" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])

    def good() -> list[str]:
        names = []
        for folder in sorted(out.glob("ckpt-*")):
            with contextlib.suppress(GPTError):
                names.append(Checkpoint.open(folder).path.name)
        return names

    # resumes from 20 and saves at 25: the damaged 30 is neither kept as one of two nor deleted
    assert train(load_config("tiny.toml", ["train.max_iters=25", "train.checkpoint_interval=5"])) == 0
    assert "resuming from" in capsys.readouterr().out
    assert good() == ["ckpt-0000020", "ckpt-0000025"]
    assert (out / "ckpt-0000030").exists()
    # resumes from 25, saves at 28 and 35 (the interval changed): 30 is passed, never rewritten
    assert train(load_config("tiny.toml", ["train.max_iters=35", "train.checkpoint_interval=7"])) == 0
    assert good() == ["ckpt-0000028", "ckpt-0000035"]
    best = (out / "best").read_text().strip()
    assert {p.name for p in out.glob("ckpt-*")} - {best} <= {"ckpt-0000028", "ckpt-0000035"}


def test_resuming_a_weights_only_checkpoint_is_refused_and_init_from_takes_it(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without optimizer.pt a run cannot continue exactly: one line naming the file and the way
    out (a new out_dir, finetuning from the weights), before any data work, and nothing moved."""
    assert train(load_config("tiny.toml", ["train.max_iters=20"])) == 0
    out = tiny_run / "out"
    (out / "ckpt-0000020" / "optimizer.pt").unlink()
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with monkeypatch.context() as patched:
        patched.setattr("gpt.plan.prepare", lambda *a, **k: pytest.fail("prepare ran"))
        result = runner.invoke(app, ["train", "--config", "tiny.toml", "--set", "train.max_iters=30"])
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and "Traceback" not in result.output
    assert "ckpt-0000020/optimizer.pt is missing, so training cannot resume" in result.output
    assert "train.out_dir to a new folder" in result.output and "train.init_from" in result.output
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    tuned = ["train.out_dir=tuned", f"train.init_from={out / 'ckpt-0000020'}", "train.max_iters=5"]
    assert train(load_config("tiny.toml", tuned)) == 0
    assert (tiny_run / "tuned" / "ckpt-0000005" / "optimizer.pt").exists()


def test_second_trainer_on_the_same_out_dir_is_refused(tiny_run: Path) -> None:
    lock = FolderLock(tiny_run / "out", "gpt train", "train.out_dir")
    try:
        with pytest.raises(GPTError, match=rf"out is in use by another gpt train \(pid {os.getpid()}"):
            train(load_config("tiny.toml"))
    finally:
        lock.release()
    assert train(load_config("tiny.toml", ["train.max_iters=5"])) == 0  # free again


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_keys(tiny_run: Path) -> None:
    settings = ["train.max_iters=6", "model.dropout=0.0", "train.eval_interval=6",
                "train.checkpoint_interval=6"]
    assert train(load_config("tiny.toml", [*settings, "train.out_dir=eager"])) == 0
    assert train(load_config("tiny.toml", [*settings, "train.out_dir=compiled", "train.compile=true"])) == 0
    eager = [json.loads(line) for line in (tiny_run / "eager" / "metrics.jsonl").read_text().splitlines()]
    compiled = [json.loads(line) for line in (tiny_run / "compiled" / "metrics.jsonl").read_text().splitlines()]
    losses = [(e["loss"], c["loss"]) for e, c in zip(eager, compiled, strict=True) if "loss" in e]
    assert losses and all(c == pytest.approx(e, rel=1e-4) for e, c in losses)
    model = Checkpoint.open(tiny_run / "compiled").load_model()  # plain keys: loads into an uncompiled GPT
    assert isinstance(model, torch.nn.Module)


def test_compile_failure_is_one_line(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch._dynamo.exc import TorchDynamoException

    def fails(*args: object, **kwargs: object) -> None:
        raise TorchDynamoException("no working C++ compiler found")

    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: fails)
    with pytest.raises(GPTError, match=r"torch.compile failed \(no working C\+\+ compiler found\); run without train.compile = true"):
        train(load_config("tiny.toml", ["train.compile=true"]))


def test_an_unwritable_out_dir_is_refused_before_any_work(tiny_run: Path) -> None:
    (tiny_run / "a_file").write_text("not a folder")
    with pytest.raises(GPTError, match=r"cannot write .*a_file/out .*set train.out_dir to a folder you can write"):
        train(load_config("tiny.toml", ["train.out_dir=a_file/out"]))


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
@pytest.mark.parametrize("settings", [[], ["train.log_interval=100", "train.eval_interval=100"]],
                         ids=["checked at the log", "checked before the save"])
def test_non_finite_stops_before_the_step(tiny_run: Path, poison_forward, what: str, settings: list[str]) -> None:
    """Steps 16 on are bad: the error names 16, raised at the next log, evaluation or save (20),
    before anything is logged or saved from those steps."""
    poison_forward(what, after=15)
    with pytest.raises(GPTError, match=rf"non-finite {what} at iteration 16; .*last good checkpoint: .*ckpt-0000010"):
        train(load_config("tiny.toml", settings))
    weights = load_file(str(tiny_run / "out" / "ckpt-0000010" / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (tiny_run / "out" / "ckpt-0000020").exists()
    assert all(math.isfinite(r.get("loss", 0.0)) and r["iter"] <= 15 for r in metrics(tiny_run / "out"))


def adamw(run, fused: bool) -> torch.optim.AdamW:
    """The run's parameter groups under a fused AdamW (what runs get where torch has the kernel),
    or a foreach one (where it has not, so the step's flag is read on the host)."""
    tcfg = run.cfg.train
    groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "initial_lr": g["initial_lr"]}
              for g in run.optimizer.param_groups]
    return torch.optim.AdamW(groups, lr=tcfg.learning_rate, betas=(tcfg.beta1, tcfg.beta2),
                             fused=fused, foreach=None if fused else True)


def snapshot(run) -> list[torch.Tensor]:
    """Copies of the weights and every tensor of the optimizer state (moments, step counts)."""
    state = [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [t.detach().clone() for t in [*run.model.parameters(), *state]]


@pytest.mark.parametrize("what", ["loss", "gradient norm"])
@pytest.mark.parametrize("fused", [False, True], ids=["host check", "fused found_inf"])
def test_a_non_finite_step_never_reaches_the_weights(
    tiny_run: Path, poison_forward, what: str, fused: bool
) -> None:
    """The skipped step leaves weights, moments and step counts as they were, and the error
    names the first bad step when the loop checks."""
    cfg = load_config("tiny.toml", ["model.dropout=0.0"])
    run = setup_run(cfg, True, Dist(), torch.float32)
    try:
        run.optimizer = adamw(run, fused)
        assert skips_on_device(run.optimizer) is fused  # fused: no host read of the flag
        train_step(run)
        run.nonfinite.check(run.last_checkpoint)  # a good step: nothing to report
        before = snapshot(run)
        poison_forward(what, after=0)
        for _ in range(2):
            assert not torch.isfinite(train_step(run)) or what == "gradient norm"
        assert run.state.iteration == 3  # the loop goes on to its next check
        assert all(torch.equal(a, b) for a, b in zip(before, snapshot(run), strict=True))
        with pytest.raises(GPTError, match=rf"non-finite {what} at iteration 2; stopped before the optimizer step; last good checkpoint: none yet"):
            run.nonfinite.check(run.last_checkpoint)
    finally:
        run.metrics.close()


def test_the_found_inf_probe_refuses_a_fused_adamw_that_ignores_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert found_inf_skips.__wrapped__(cpu)  # this torch's fused CPU AdamW honours it
    step = torch.optim.AdamW.step

    def ignores_the_flag(self, *args, **kwargs):
        self.__dict__.pop("found_inf", None)
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", ignores_the_flag)
    assert not found_inf_skips.__wrapped__(cpu)  # so step_unless would read it on the host


def test_the_device_is_waited_for_only_at_logs_evaluations_and_saves(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """train_step hands back its loss on the device; the loop reads it where it logs (every 7
    steps and the last) and checks for non-finite steps only where it logs, evaluates or saves."""
    import gpt.train

    step, item, check = gpt.train.train_step, torch.Tensor.item, NonFiniteSteps.check
    losses: list[tuple[int, torch.Tensor]] = []  # (iteration, the step's loss)
    reads, checks = [], set()

    def recorded_step(run):
        loss = step(run)
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0
        losses.append((run.state.iteration, loss))
        return loss

    def recorded_item(self):
        reads.extend(i for i, loss in losses if loss is self)
        return item(self)

    def recorded_check(self, last_checkpoint):
        checks.add(losses[-1][0] if losses else 0)
        return check(self, last_checkpoint)

    monkeypatch.setattr(gpt.train, "train_step", recorded_step)
    monkeypatch.setattr(torch.Tensor, "item", recorded_item)
    monkeypatch.setattr(NonFiniteSteps, "check", recorded_check)
    assert train(load_config("tiny.toml", ["train.log_interval=7"])) == 0
    assert reads == [7, 14, 21, 28, 30]
    assert sorted(checks) == [7, 10, 14, 20, 21, 28, 30]  # evaluations and saves every 10


def test_bfloat16_autocast_on_the_cpu(tiny_run: Path) -> None:
    assert train(load_config("tiny.toml", ["train.dtype=bfloat16", "train.max_iters=10"])) == 0
    records = metrics(tiny_run / "out")
    assert all(math.isfinite(r.get("loss", 0.0)) for r in records)
    assert records[-1]["val_loss"] < records[0]["val_loss"]
    weights = load_file(str(tiny_run / "out" / "ckpt-0000010" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}  # autocast: fp32 master weights


def test_train_step_is_one_adamw_step_on_the_accumulated_gradient(tiny_run: Path) -> None:
    """train_step against the same step written out by hand: two micro-batches of the same
    stream, their mean loss, clipping, AdamW at the scheduled rate."""
    cfg = load_config("tiny.toml", ["train.grad_accum_steps=2", "model.dropout=0.0"])
    run = setup_run(cfg, True, Dist(), torch.float32)
    try:
        reference = GPT(run.cfg.model)
        reference.load_state_dict(run.model.state_dict())
        optimizer = make_optimizer(reference, cfg.train, torch.device("cpu"))
        for group in optimizer.param_groups:
            group["lr"] = lr_at(0, cfg.train)
        batches = BatchSampler(cfg.data.resolved_data_dir, "train", 32, 4, seed=0)
        batches.load_state_dict(run.samplers["train"].state_dict())  # the same stream
        losses = []
        for _ in range(2):
            _, loss = reference(*batches.next_batch())
            (loss / 2).backward()
            losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.train.grad_clip)
        optimizer.step()

        loss = train_step(run)
        assert loss.dim() == 0 and loss.device == run.device  # on the device, read by the caller
        assert loss.item() == pytest.approx(sum(losses) / 2, rel=1e-6)
        assert (run.state.iteration, run.state.tokens_seen) == (1, 2 * 4 * 32)
        for ours, theirs in zip(run.model.parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
            assert ours.grad is None  # gradients cleared for the next step
    finally:
        run.metrics.close()


@needs_muon
def test_muon_takes_the_blocks_matrices_and_adamw_the_rest(tiny_config) -> None:
    model = GPT(tiny_config(tie_embeddings=False, n_kv_head=2))
    cfg = TrainConfig(optimizer="muon", muon_lr=0.02, learning_rate=1e-3)
    optimizer = make_optimizer(model, cfg, torch.device("cpu"))
    muon, adamw = optimizer.optimizers["muon"], optimizer.optimizers["adamw"]
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    name = {id(p): n for n, p in model.named_parameters()}
    in_muon = {name[id(p)] for g in muon.param_groups for p in g["params"]}
    in_adamw = [name[id(p)] for g in adamw.param_groups for p in g["params"]]
    assert in_muon == {f"transformer.h.{i}.{m}.weight" for i in range(2)
                       for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert sorted([*in_muon, *in_adamw]) == sorted(name.values())  # each parameter once
    assert {"transformer.wte.weight", "transformer.wpe.weight", "lm_head.weight"} <= set(in_adamw)
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.02, 1e-3, 1e-3]
    assert muon.param_groups[0]["weight_decay"] == 0.0


def muon_steps(step: Callable[[torch.optim.Optimizer], None], optimizer_class: type,
               adjust_lr_fn: str | None = None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The weights and momentum buffers after three steps of random gradients (with and
    without Nesterov, with weight decay), from the same start every call."""
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(shape)) for shape in ((7, 5), (5, 7), (1, 4))]
    optimizer = optimizer_class([{"params": params[:2]}, {"params": params[2:], "nesterov": False}],
                                lr=0.02, weight_decay=0.1, adjust_lr_fn=adjust_lr_fn)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        step(optimizer)
    return params, [optimizer.state[p]["momentum_buffer"] for p in params]


def by_rows(optimizer: torch.optim.Optimizer) -> None:
    """The step sharded weights take, on whole ones: the rows of one process holding them all."""
    with torch.no_grad():
        for group in optimizer.param_groups:
            optimizer._step_by_rows(group)


@needs_muon
@pytest.mark.parametrize("adjust_lr_fn", [None, "match_rms_adamw"])
def test_muon_steps_as_torchs_bit_for_bit(adjust_lr_fn: str | None) -> None:
    """Our Muon is torch's: its step on whole tensors, and the step by rows that sharded weights
    take, give torch.optim.Muon's weights and momentum buffers, bit for bit."""
    want = muon_steps(lambda o: o.step(), torch.optim.Muon, adjust_lr_fn)
    for step in (lambda o: o.step(), by_rows):
        got = muon_steps(step, Muon, adjust_lr_fn)
        for ours, theirs in zip(got, want, strict=True):
            assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


@needs_muon
def test_muon_math_is_torchs_with_our_copy_where_torch_changed_it(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch's private Newton-Schulz and learning-rate scaling where they are as probed, and
    our copies, which give the same bits, where they are not."""
    from torch.optim import _muon

    assert muon_math() == (_muon._zeropower_via_newtonschulz, _muon._adjust_lr)
    torch.manual_seed(0)
    coefficients = (3.4445, -4.7750, 2.0315)
    for shape in ((7, 5), (5, 7), (6, 6)):
        grad = torch.randn(shape)
        assert torch.equal(optim.zeropower_via_newtonschulz(grad, coefficients, 5, 1e-7),
                           _muon._zeropower_via_newtonschulz(grad, coefficients, 5, 1e-7))
        for fn in (None, "original", "match_rms_adamw"):
            assert optim.adjust_lr(0.02, fn, grad.shape) == _muon._adjust_lr(0.02, fn, grad.shape)
    torch_muon = muon_steps(lambda o: o.step(), torch.optim.Muon)
    monkeypatch.delattr(_muon, "_zeropower_via_newtonschulz")  # torch's own step fails now
    muon_math.cache_clear()
    try:
        assert muon_math() == (optim.zeropower_via_newtonschulz, optim.adjust_lr)
        ours = muon_steps(by_rows, Muon)
        for a, b in zip(ours, torch_muon, strict=True):
            assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    finally:
        muon_math.cache_clear()


@needs_muon
def test_grad_scaler_steps_and_skips_muon_and_adamw_together(tiny_config) -> None:
    """float16 training's GradScaler sees the combined optimizer as one: it unscales every
    group, and an inf gradient in one optimizer's parameters skips both steps."""
    torch.manual_seed(0)
    model = GPT(tiny_config())
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    idx = torch.randint(0, 64, (2, 16))
    for poisoned in (False, True):
        _, loss = model(idx, idx)
        scaler.scale(loss).backward()
        if poisoned:
            model.transformer.h[0].attn.c_attn.weight.grad[0, 0] = float("inf")  # Muon's
        scaler.unscale_(optimizer)
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        unchanged = [torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
        assert all(unchanged) if poisoned else not any(unchanged)
    assert scaler.get_scale() == 512.0


@needs_muon
def test_train_step_with_muon_is_muon_and_adamw_written_out(tiny_run: Path) -> None:
    """train_step against torch's Muon on the blocks' matrices and AdamW on the rest, each at
    its own peak times the warmup's first factor."""
    cfg = load_config("tiny.toml", ["train.optimizer=muon", "train.muon_lr=0.05", "model.dropout=0.0"])
    run = setup_run(cfg, True, Dist(), torch.float32)
    try:
        reference = GPT(run.cfg.model)
        reference.load_state_dict(run.model.state_dict())
        warmup = 1 / (cfg.train.warmup_iters + 1)
        hidden = [p for n, p in reference.named_parameters() if n.startswith("transformer.h.") and p.dim() == 2]
        rest = [p for p in reference.parameters() if all(p is not h for h in hidden)]
        muon = torch.optim.Muon(hidden, lr=0.05 * warmup, weight_decay=0.0)
        adamw = torch.optim.AdamW([
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": cfg.train.weight_decay},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ], lr=3e-3 * warmup, betas=(cfg.train.beta1, cfg.train.beta2))
        batches = BatchSampler(cfg.data.resolved_data_dir, "train", 32, 4, seed=0)
        batches.load_state_dict(run.samplers["train"].state_dict())
        _, loss = reference(*batches.next_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), cfg.train.grad_clip)
        muon.step()
        adamw.step()

        assert train_step(run) == pytest.approx(loss.item(), rel=1e-6)
        for (name, ours), theirs in zip(run.model.named_parameters(), reference.parameters(), strict=True):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        run.metrics.close()


@pytest.mark.parametrize("optimizer", ["adamw", pytest.param("muon", marks=needs_muon)])
def test_metrics_record_the_rate_each_optimizer_stepped_with(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch, optimizer: str
) -> None:
    """Each line's `lr` is AdamW's rate at the last step and, on a Muon run only, `muon_lr`
    Muon's, as read from the optimizers' groups when they stepped."""
    stepped: dict[str, list[float]] = {"lr": [], "muon_lr": []}
    classes = {"lr": torch.optim.AdamW, "muon_lr": getattr(torch.optim, "Muon", None)}
    for key, cls in classes.items():
        if cls is None:
            continue

        def spied(self, *args, _step=cls.step, _key=key, **kwargs):  # type: ignore[no-untyped-def]
            if "initial_lr" in self.param_groups[0]:  # the run's, not a probe's
                stepped[_key].append(self.param_groups[0]["lr"])
            return _step(self, *args, **kwargs)

        monkeypatch.setattr(cls, "step", spied)
    sets = [f"train.optimizer={optimizer}", "train.muon_lr=0.05", "train.max_iters=12"]
    assert train(load_config("tiny.toml", sets)) == 0
    keys = ["lr", "muon_lr"] if optimizer == "muon" else ["lr"]
    assert [len(stepped[k]) for k in keys] == [12] * len(keys)
    lines = [line for line in metrics(tiny_run / "out") if line["iter"] > 0]
    assert lines
    for line in lines:
        assert [line[k] for k in keys] == pytest.approx([stepped[k][line["iter"] - 1] for k in keys])
    assert all(("muon_lr" in line) == (optimizer == "muon") for line in metrics(tiny_run / "out"))


@needs_muon
def test_changing_the_optimizer_on_resume_is_refused_before_any_data_work(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert train(load_config("tiny.toml", ["train.max_iters=5"])) == 0
    monkeypatch.setattr("gpt.plan.prepare", lambda *a, **k: pytest.fail("prepare ran"))
    with pytest.raises(GPTError, match=r"ckpt-0000005 was trained with train.optimizer = 'adamw', "
                       r"the config now says 'muon'; set it back, or .*train.init_from"):
        train(load_config("tiny.toml", ["train.optimizer=muon", "train.max_iters=10"]))


@needs_muon
def test_resume_takes_the_configs_peak_rates_not_the_checkpoints(tiny_run: Path) -> None:
    """The optimizer state holds each group's initial_lr; a resumed run with new rates uses
    the new ones, as it always did for learning_rate."""
    assert train(load_config("tiny.toml", ["train.optimizer=muon", "train.max_iters=5"])) == 0
    cfg = load_config("tiny.toml", ["train.optimizer=muon", "train.max_iters=10",
                                    "train.learning_rate=1e-3", "train.muon_lr=0.01"])
    run = setup_run(cfg, True, Dist(), torch.float32)
    try:
        assert run.state.iteration == 5
        assert [g["initial_lr"] for g in run.optimizer.param_groups] == [0.01, 1e-3, 1e-3]
        assert run.optimizer.optimizers["muon"].state  # the momentum came back
    finally:
        run.metrics.close()


def test_muon_on_a_torch_without_it_is_one_line(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torch < 2.9 has no torch.optim.Muon: one line naming the key and both ways out."""
    monkeypatch.delattr(torch.optim, "Muon")
    result = runner.invoke(app, ["train", "--config", "tiny.toml", "--set", "train.optimizer=muon"])
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert '[train] optimizer = "muon" needs torch.optim.Muon (torch >= 2.9' in result.output
    assert 'upgrade torch, or set train.optimizer = "adamw"' in result.output
    assert not (tiny_run / "out").exists()
    with pytest.raises(GPTError, match="needs torch.optim.Muon"):
        make_optimizer(GPT(load_config("tiny.toml", ["model.vocab_size=64"]).model),
                       TrainConfig(optimizer="muon"), torch.device("cpu"))


def test_train_state_round_trips_through_its_state_dict() -> None:
    state = TrainState(iteration=7, tokens_seen=896, wandb_id="abc")
    saved = state.state_dict()
    assert saved["best_val_loss"] is None  # no evaluation yet: JSON has no infinity
    assert saved["iter"] == 7
    restored = TrainState()
    restored.load_state_dict(json.loads(json.dumps(saved)))
    assert (restored.iteration, restored.tokens_seen, restored.wandb_id) == (7, 896, "abc")
    assert restored.best_val_loss == math.inf
    assert restored.elapsed() >= saved["elapsed_s"]  # time keeps adding up across resumes
    restored.best_val_loss = 1.5
    again = TrainState()
    again.load_state_dict(restored.state_dict())
    assert again.best_val_loss == 1.5


def test_random_states_round_trip_and_each_process_takes_its_own() -> None:
    """One process saves its RNGs as `rng` (no `rng_ranks`); a process of several takes its
    own rank's, and rank 0's when the number of processes changed."""
    one = RandomStates(Dist())
    saved = json.loads(json.dumps(one.state_dict()))
    assert saved["rng_ranks"] is None
    expected = torch.rand(3)
    torch.rand(5)
    one.load_state_dict(saved)
    assert torch.equal(torch.rand(3), expected)
    torch.manual_seed(1)
    first = rng_state()
    torch.manual_seed(2)
    second = rng_state()
    RandomStates(Dist(rank=1, world_size=2)).load_state_dict({"rng": first, "rng_ranks": [first, second]})
    assert torch.equal(torch.get_rng_state(), torch.tensor(second["torch"], dtype=torch.uint8))
    RandomStates(Dist(rank=2, world_size=3)).load_state_dict({"rng": first, "rng_ranks": [first, second]})
    assert torch.equal(torch.get_rng_state(), torch.tensor(first["torch"], dtype=torch.uint8))


def test_second_signal_quits_at_once() -> None:
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.signum == signal.SIGINT  # the first only asks the loop to stop
        with pytest.raises(SystemExit) as exited:
            os.kill(os.getpid(), signal.SIGTERM)
    assert exited.value.code == 143
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def test_a_repeated_sigterm_still_saves() -> None:
    """SLURM signals every process of a job step and torchrun forwards the signal it got, so a
    worker sees SIGTERM twice: the same request, which still lets the loop save."""
    with StopFlag() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM and stop.exit_code == 143
        with pytest.raises(SystemExit):  # a person's Ctrl-C after it still quits at once
            os.kill(os.getpid(), signal.SIGINT)


def test_lr_schedule_values() -> None:
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=9, max_iters=109)
    assert lr_at(0, cfg) == pytest.approx(0.1)  # (0 + 1) / (9 + 1)
    assert lr_at(8, cfg) == pytest.approx(0.9)
    assert lr_at(9, cfg) == pytest.approx(1.0)  # cosine starts at the peak
    assert lr_at(59, cfg) == pytest.approx(0.55)  # halfway: min + (max - min) / 2
    assert lr_at(109, cfg) == pytest.approx(0.1) and lr_at(500, cfg) == pytest.approx(0.1)
    constant = TrainConfig(learning_rate=0.3, decay_lr=False)
    assert lr_at(0, constant) == lr_at(1000, constant) == 0.3


def test_wsd_schedule_values() -> None:
    """Warmup as cosine's, learning_rate held, then linear to min_lr over the last 20% of 110."""
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=9, max_iters=110,
                      lr_schedule="wsd", cooldown_fraction=0.2)
    assert lr_at(0, cfg) == pytest.approx(0.1)  # warmup start: (0 + 1) / (9 + 1)
    assert lr_at(9, cfg) == lr_at(50, cfg) == lr_at(87, cfg) == 1.0  # stable, exactly the peak
    assert lr_at(88, cfg) == 1.0  # the cooldown starts at 110 - 22 = 88
    assert lr_at(99, cfg) == pytest.approx(0.1 + 0.9 * 11 / 22)  # halfway down
    assert lr_at(109, cfg) == pytest.approx(0.1 + 0.9 / 22)
    assert lr_at(110, cfg) == lr_at(500, cfg) == 0.1  # the end
    whole = TrainConfig(learning_rate=1.0, min_lr=0.0, warmup_iters=0, lr_decay_iters=100,
                        lr_schedule="wsd", cooldown_fraction=1.0)
    assert [lr_at(i, whole) for i in (0, 25, 100)] == pytest.approx([1.0, 0.75, 0.0])
    assert lr_at(5, TrainConfig(lr_schedule="wsd", decay_lr=False, learning_rate=0.3)) == 0.3


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_a_group_with_its_own_peak_follows_the_curve_scaled(schedule: str) -> None:
    """Muon's group at muon_lr: the same warmup and decay, scaled by muon_lr / learning_rate."""
    cfg = TrainConfig(learning_rate=1e-3, min_lr=1e-4, warmup_iters=10, max_iters=100,
                      lr_schedule=schedule)
    for i in (0, 5, 10, 50, 85, 99, 100):
        assert lr_at(i, cfg, 0.02) == pytest.approx(lr_at(i, cfg) * 20)
    assert lr_at(50, cfg, cfg.learning_rate) == lr_at(50, cfg)  # the default peak: unrounded


def test_init_from_finetunes_from_another_run(tiny_run: Path) -> None:
    assert train(load_config("tiny.toml", ["train.out_dir=base", "train.max_iters=60"])) == 0
    base_final = [r for r in metrics(tiny_run / "base") if "val_loss" in r][-1]["val_loss"]
    fresh = [r for r in metrics(tiny_run / "base") if "val_loss" in r][0]["val_loss"]
    # zero_init_proj only says how fresh weights start: a finetune may set it
    assert train(load_config("tiny.toml", ["train.out_dir=tuned", "train.init_from=base",
                                           "train.max_iters=10", "train.learning_rate=1e-4",
                                           "model.zero_init_proj=true"])) == 0
    start = [r for r in metrics(tiny_run / "tuned") if "val_loss" in r][0]["val_loss"]
    assert abs(start - base_final) < 0.3 * abs(fresh - base_final)  # starts where base ended
    with pytest.raises(GPTError, match=r"trained with model.n_layer = 2, the config now says 3"):
        train(load_config("tiny.toml", ["train.out_dir=other", "train.init_from=base", "model.n_layer=3"]))


def test_char_finetuning_keeps_the_base_vocabulary(tiny_run: Path) -> None:
    assert train(load_config("tiny.toml", ["train.out_dir=base", "train.max_iters=10"])) == 0
    (tiny_run / "mine.txt").write_text("def fun(x):\n    return x + 1\n\n" * 100)
    tuned = ["train.out_dir=tuned", "train.init_from=base", "train.max_iters=5",
             "data.source=mine.txt", "data.data_dir=data/mine"]
    assert train(load_config("tiny.toml", tuned)) == 0
    base_vocab = json.loads((tiny_run / "base" / "ckpt-0000010" / "state.json").read_text())["tokenizer"]
    assert json.loads((tiny_run / "data" / "mine" / "meta.json").read_text())["tokenizer"] == base_vocab
    (tiny_run / "alien.txt").write_text("Ω" * 500)
    alien = ["train.out_dir=alien", "train.init_from=base", "data.source=alien.txt", "data.data_dir=data/alien"]
    with pytest.raises(GPTError, match=r"not in the char vocabulary: 'Ω'"):
        train(load_config("tiny.toml", alien))


@pytest.mark.slow
def test_wandb_offline_run_writes_history(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tiny_run))
    cfg = load_config("tiny.toml", ["log.wandb=true", "log.wandb_mode=offline", "log.wandb_run_name=tiny"])
    assert train(cfg) == 0
    final_val = [r for r in metrics(tiny_run / "out") if "val_loss" in r][-1]["val_loss"]
    state = json.loads((tiny_run / "out" / "ckpt-0000030" / "state.json").read_text())
    runs = list((tiny_run / "out" / "wandb").glob(f"offline-run-*-{state['wandb_id']}/run-*.wandb"))
    assert len(runs) == 1, "no offline wandb run with the checkpoint's run id"
    history = runs[0].read_bytes()  # protobuf records; values are stored as JSON text
    assert b"val_loss" in history and json.dumps(final_val).encode() in history
    # a resumed run continues the same wandb run
    assert train(load_config("tiny.toml", ["log.wandb=true", "log.wandb_mode=offline", "train.max_iters=40"])) == 0
    resumed = json.loads((tiny_run / "out" / "ckpt-0000040" / "state.json").read_text())
    assert resumed["wandb_id"] == state["wandb_id"]
    final_val = [r for r in metrics(tiny_run / "out") if "val_loss" in r][-1]["val_loss"]
    # (a run started in the same second as the last gets a "-1" suffix on its folder)
    runs = (tiny_run / "out" / "wandb").glob(f"offline-run-*-{state['wandb_id']}*/run-*.wandb")
    assert any(json.dumps(final_val).encode() in run.read_bytes() for run in runs)


def test_cli_errors_and_refusals(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = runner.invoke(app, ["train", "--config", "tiny.toml", "--set", "model.cross_attention=true"])
    assert result.exit_code == 2 and "cross_attention" in result.output
    assert runner.invoke(app, ["train", "--config", "tiny.toml", "--set", "train.max_iters=10"]).exit_code == 0
    with monkeypatch.context() as patched:  # refused before the data is looked at
        patched.setattr("gpt.plan.prepare", lambda *a, **k: pytest.fail("prepare ran"))
        refused = runner.invoke(app, ["train", "--config", "tiny.toml", "--no-resume"])
    assert refused.exit_code == 2 and "already holds checkpoints (ckpt-0000010)" in refused.output
    changed = runner.invoke(app, ["train", "--config", "tiny.toml", "--set", "model.n_embd=64"])
    assert changed.exit_code == 2 and "model.n_embd = 32" in changed.output
    assert "Traceback" not in changed.output
    bad_accum = runner.invoke(app, ["train", "--config", "tiny.toml", "--set", "train.dtype=float16"])
    assert bad_accum.exit_code == 2 and "float16 needs a GPU" in bad_accum.output


def test_a_run_that_fails_before_any_output_leaves_no_out_dir(tiny_run: Path) -> None:
    result = runner.invoke(app, ["train", "--config", "tiny.toml", "--set", "train.out_dir=fresh",
                                 "--set", "model.block_size=100000"])  # more than the data holds
    assert result.exit_code == 2 and "fewer than block_size + 1" in result.output
    assert not (tiny_run / "fresh").exists()
    (tiny_run / "kept").mkdir()  # a folder the user made stays, even if the run fails
    runner.invoke(app, ["train", "--config", "tiny.toml", "--set", "train.out_dir=kept",
                        "--set", "model.block_size=100000"])
    assert (tiny_run / "kept").is_dir()


def losses_by_iteration(out: Path) -> dict[int, float]:
    return {r["iter"]: r["loss"] for r in metrics(out) if "loss" in r}


@pytest.mark.slow
def test_two_process_gloo_matches_one_process(tiny_run: Path, torchrun: Callable) -> None:
    common = ["--set", "train.max_iters=12", "--set", "train.grad_accum_steps=2",
              "--set", "train.log_interval=1", "--set", "model.dropout=0.0"]
    subprocess.run(gpt_cmd(*common, "--set", "train.out_dir=one"), check=True, timeout=300,
                   capture_output=True, env=ENV)
    torchrun(*common, "--set", "train.out_dir=two")
    one, two = losses_by_iteration(tiny_run / "one"), losses_by_iteration(tiny_run / "two")
    assert sorted(one) == sorted(two) == list(range(1, 13))
    assert all(math.isclose(one[i], two[i], abs_tol=1e-5) for i in one)


@pytest.mark.slow
def test_two_process_resume_is_bitwise_exact(tiny_run: Path, torchrun: Callable) -> None:
    """With dropout each rank draws its own masks, so each rank's RNG must come back on resume."""
    common = ["--set", "train.grad_accum_steps=2", "--set", "train.log_interval=1",
              "--set", "train.lr_decay_iters=8", "--set", "train.eval_interval=4"]
    torchrun(*common, "--set", "train.max_iters=8", "--set", "train.out_dir=straight")
    torchrun(*common, "--set", "train.max_iters=4", "--set", "train.out_dir=split")
    torchrun(*common, "--set", "train.max_iters=8", "--set", "train.out_dir=split")
    losses = lambda out: [(r["iter"], r.get("loss"), r.get("val_loss")) for r in metrics(out)]  # noqa: E731
    assert len(losses(tiny_run / "straight")) == 8 + 3
    assert losses(tiny_run / "split") == losses(tiny_run / "straight")
    state = json.loads((tiny_run / "split" / "ckpt-0000008" / "state.json").read_text())
    assert len(state["rng_ranks"]) == 2 and state["rng_ranks"][0] != state["rng_ranks"][1]


def test_progress_bar_times_the_steps_and_ends_before_the_last_losses(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gpt.train

    estimate, calls = gpt.train.Validator.estimate, []

    def slow_first_estimate(validator):  # the step-0 evaluation of a large model takes a while
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.5)
        return estimate(validator)

    monkeypatch.setattr(gpt.train.Validator, "estimate", slow_first_estimate)
    result = runner.invoke(app, ["train", "--config", "tiny.toml"])
    assert result.exit_code == 0, result.output
    frames = result.stderr.replace("\r", "\n").splitlines()
    finals = [f for f in frames if "30/30 [" in f]
    assert finals and all("[00:00<" in f for f in finals)  # 1.5 s of evaluation not counted
    assert result.stdout.count("iter 30:") == 1
    lines = result.output.replace("\r", "\n").splitlines()
    last_bar = max(i for i, line in enumerate(lines) if "30/30" in line)
    assert last_bar < next(i for i, line in enumerate(lines) if line.startswith("iter 30:"))


@needs_muon
def test_the_fast_config_trains(tiny_run: Path) -> None:
    """configs/fast_char.toml as shipped (Muon, wsd, untied head, ReLU², QK-norm), on the tiny
    corpus for a few steps: the loss falls."""
    cfg = load_config(ROOT / "configs" / "fast_char.toml", [
        "data.source=corpus.txt", "train.out_dir=fast", "train.max_iters=12",
        "train.warmup_iters=2", "train.eval_interval=12", "train.eval_iters=2",
        "train.log_interval=1", "train.batch_size=8",
    ])
    assert train(cfg) == 0
    losses = [r["loss"] for r in metrics(tiny_run / "fast") if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0] - 0.5
