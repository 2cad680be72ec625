"""Training: a run's state, its setup (fresh or resumed), one optimizer step, and the loop.

`train(config)` runs in one process or, under torchrun, in each DDP rank. Everything a run needs
to continue exactly (weights, optimizer, RNGs, data streams, counters) goes into checkpoints, so a
run killed at any moment and resumed is, on CPU, bitwise the run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import errno
import math
import random
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gpt import checkpoint as ckpt
from gpt import parallel
from gpt.checkpoint import Checkpoint
from gpt.config import (
    RunConfig,
    to_dict,
)
from gpt.data.prepared import BatchSampler
from gpt.device import memory_errors, resolve_device, resolve_dtype
from gpt.errors import GPTError, compile_errors, first_line
from gpt.fileio import write_failure
from gpt.lock import FolderLock
from gpt.metrics import MetricsLog, Throughput, peak_flops, start_wandb
from gpt.model import GPT
from gpt.optim import NonFiniteSteps, Optimizer, lr_at, make_optimizer, muon_class, step_unless
from gpt.parallel import Dist
from gpt.resume import resolve_start

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


# ---------------------------------------------------------------------------------------------
# Random number generators, signals


def rng_state() -> dict[str, Any]:
    """Every RNG a run touches, as plain data."""
    np_state = np.random.get_state()
    state = {
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits 130/143.

    A second signal quits at once (the last checkpoint on disk stays intact: saves are atomic).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in EXIT_CODES:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise SystemExit(EXIT_CODES[signal.Signals(signum)])
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def seen(self, world: Dist, device: torch.device) -> bool:
        """Whether any rank was signalled, so every rank stops after the same step."""
        return world.any(self.signum is not None, device)


# ---------------------------------------------------------------------------------------------
# The run's state and setup


@dataclass
class TrainState:
    """The counters of a run, saved in every checkpoint's state.json and restored on resume."""

    iteration: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    elapsed_s: float = 0.0  # wall time of the run's earlier legs, up to `since`
    wandb_id: str | None = None
    rng_ranks: list[dict[str, Any]] = field(default_factory=list)  # at the last save, per rank
    since: float = field(default_factory=time.perf_counter, repr=False, compare=False)

    def elapsed(self) -> float:
        """Wall time of the whole run so far, across resumes."""
        return self.elapsed_s + time.perf_counter() - self.since

    def state_dict(self) -> dict[str, Any]:
        return {
            "iter": self.iteration,
            "tokens": self.tokens_seen,
            "best_val_loss": self.best_val_loss if math.isfinite(self.best_val_loss) else None,
            "elapsed_s": self.elapsed(),
            "wandb_id": self.wandb_id,
            "rng": self.rng_ranks[0] if self.rng_ranks else None,
            "rng_ranks": self.rng_ranks if len(self.rng_ranks) > 1 else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration, self.tokens_seen = state["iter"], state["tokens"]
        best = state["best_val_loss"]
        self.best_val_loss = math.inf if best is None else best
        self.elapsed_s, self.since = state.get("elapsed_s", 0.0), time.perf_counter()
        self.wandb_id = state.get("wandb_id")
        self.rng_ranks = state.get("rng_ranks") or [state["rng"]]

    def restore_rng(self, world: Dist) -> None:
        """This rank's RNGs as saved (rank 0's when the world size changed)."""
        same_world = len(self.rng_ranks) == world.world_size
        set_rng_state(self.rng_ranks[world.rank] if same_world else self.rng_ranks[0])


@dataclass
class Run:
    """Everything a training run works with, built fresh or resumed by `setup_run`."""

    cfg: RunConfig  # with the model's vocabulary filled in from the data
    world: Dist
    device: torch.device
    dtype: torch.dtype  # the compute dtype ([train] dtype resolved for the device)
    autocast: contextlib.AbstractContextManager[Any]  # reentrant: torch.autocast or a no-op
    model: GPT  # the model (FSDP-sharded in place): checkpoints, evaluation, clipping
    trained: torch.nn.Module  # what the step calls: the model, compiled and/or DDP-wrapped
    sharded: bool  # FSDP: each process holds its rows of every weight and optimizer moment
    optimizer: Optimizer  # AdamW, or Muon and AdamW combined
    scaler: torch.amp.GradScaler
    samplers: dict[str, BatchSampler]  # train, and the two evaluation streams
    tokenizer: dict[str, Any]
    state: TrainState
    metrics: MetricsLog | None  # rank 0 only
    last_checkpoint: Path | None  # the newest checkpoint on disk, for messages
    nonfinite: NonFiniteSteps  # the first step kept from the weights, checked before logs and saves
    # checkpoints newer than the resumed one that failed their check: never kept as good ones
    damaged_checkpoints: set[str] = field(default_factory=set)

    @property
    def tokens_per_iter(self) -> int:
        tcfg = self.cfg.train
        return tcfg.batch_size * self.cfg.model.block_size * tcfg.grad_accum_steps

    def record(self, **values: Any) -> None:
        """One metrics line at the current iteration (rank 0): the last step's rates, AdamW's
        as `lr` and, with Muon, Muon's as `muon_lr`."""
        if self.metrics is not None:
            tcfg, last = self.cfg.train, max(self.state.iteration - 1, 0)
            rates = {"lr": lr_at(last, tcfg)}
            if tcfg.optimizer == "muon":
                rates["muon_lr"] = lr_at(last, tcfg, tcfg.muon_lr)
            self.metrics.write({
                "iter": self.state.iteration,
                "elapsed_s": self.state.elapsed(),
                "tokens": self.state.tokens_seen,
                **rates,
                **values,
            })


def setup_run(
    cfg: RunConfig, resume: bool, world: Dist, device: torch.device, dtype: torch.dtype
) -> Run:
    """Build a run, or resume the one in out_dir. Each checkpoint involved is read once."""
    begin = resolve_start(cfg, resume, world)
    cfg, data, resumed, start = begin.cfg, begin.data, begin.resumed, begin.weights
    tcfg = cfg.train
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed % 2**32)  # numpy's takes 32 bits: the same seed for all that fit
    model = GPT(cfg.model)  # the same initial weights on every rank
    model.activation_checkpointing = tcfg.activation_checkpointing
    if world.world_size > 1:  # independent dropout masks per rank, as nanoGPT seeds them
        torch.manual_seed(tcfg.seed + world.rank)
    if start is not None:
        start.load_into(model)  # whole, before any sharding: one file serves every layout
        world.print0(f"resuming from {start.path} (iteration {start.state['iter']})"
                     if resumed else f"initialised from {start.path} (finetuning)")
    sharded = tcfg.parallel == "fsdp" and world.world_size > 1
    if sharded:
        parallel.shard(model, device, dtype)  # onto the device one block at a time
    else:
        model.to(device)
    samplers = {
        name: BatchSampler(data, split, cfg.model.block_size, tcfg.batch_size, seed,
                           world.rank, world.world_size, device)
        for name, split, seed in (
            ("train", "train", tcfg.seed),
            ("eval_train", "train", tcfg.seed + 1),
            ("eval_val", "val", tcfg.seed + 1),
        )
    }
    run = Run(
        cfg=cfg, world=world, device=device, dtype=dtype,
        # FSDP computes in `dtype` through its mixed-precision policy, not autocast
        autocast=(torch.autocast(device.type, dtype=dtype)
                  if dtype != torch.float32 and not sharded else contextlib.nullcontext()),
        model=model, trained=parallel.wrap(model, tcfg.compile, world, device, sharded),
        sharded=sharded,
        optimizer=make_optimizer(model, tcfg, device),
        scaler=torch.amp.GradScaler(device.type, enabled=dtype == torch.float16),
        samplers=samplers, tokenizer=begin.tokenizer,
        state=TrainState(), metrics=None,
        last_checkpoint=resumed.path if resumed else None, nonfinite=NonFiniteSteps(device),
        damaged_checkpoints=begin.damaged,
    )
    if resumed is not None:
        _restore(run, resumed)
    if world.main:
        wandb_run = start_wandb(cfg, Path(tcfg.out_dir), run.state.wandb_id)
        run.state.wandb_id = wandb_run.id if wandb_run is not None else run.state.wandb_id
        resume_iter = run.state.iteration if resumed else None
        run.metrics = MetricsLog(Path(tcfg.out_dir) / "metrics.jsonl", resume_iter, wandb_run)
    return run


def _restore(run: Run, resumed: Checkpoint) -> None:
    """Optimizer, scaler, data streams, counters and RNGs as the checkpoint left them.

    The optimizer state may come from another layout (one process, DDP, FSDP over any number
    of processes): under FSDP each process reads only its rows of it.
    """
    peaks = [group["initial_lr"] for group in run.optimizer.param_groups]
    if run.sharded:
        params = parallel.optimizer_params(run.optimizer)  # type: ignore[arg-type]
        rows = {key: held for key, p in enumerate(params) if (held := parallel.rows_of(p))}
        state = resumed.optimizer_state(rows)
        parallel.load_local_optimizer_state(run.optimizer, state)  # type: ignore[arg-type]
    else:
        run.optimizer.load_state_dict(resumed.optimizer_state())
    for group, peak in zip(run.optimizer.param_groups, peaks, strict=True):
        group["initial_lr"] = peak  # the config's, not the checkpoint's: a new rate takes effect
    if resumed.state.get("scaler"):
        run.scaler.load_state_dict(resumed.state["scaler"])
    for name, sampler in run.samplers.items():
        sampler.load_state_dict(resumed.state["samplers"][name])
    run.state.load_state_dict(resumed.state)
    run.state.restore_rng(run.world)


def save(run: Run, is_best: bool) -> None:
    """A checkpoint of the run at its current iteration. Every rank joins: rank 0 writes the
    weights (gathered from the shards under FSDP) and state.json; the optimizer state is rank
    0's, or under FSDP each rank's rows of it. A write that fails on any rank stops every rank
    with one error, and the previous checkpoint stays as it was."""
    world, iteration = run.world, run.state.iteration
    out_dir = Path(run.cfg.train.out_dir)
    rng_ranks = world.gather(rng_state())  # each rank's own (its dropout masks); a collective
    weights = parallel.full_model_state(run.model) if run.sharded else None  # likewise
    folder = ckpt.temporary_folder(out_dir, iteration)
    with _saving(run, folder):
        if world.main:
            ckpt.begin_checkpoint(out_dir, iteration)
    hashes: dict[str, str] = {}
    with _saving(run, folder):
        if run.sharded:
            name = ckpt.optimizer_file(world.rank, world.world_size)
            state = parallel.local_optimizer_state(run.optimizer)  # type: ignore[arg-type]
            hashes = ckpt.write_optimizer(folder, name, state)
        elif world.main:
            hashes = ckpt.write_optimizer(folder, ckpt.OPTIMIZER, run.optimizer.state_dict())
    if run.sharded:
        hashes = {name: sha for ranks in world.gather(hashes) for name, sha in ranks.items()}
    with _saving(run, folder):
        if world.main:
            run.state.rng_ranks = rng_ranks
            run.last_checkpoint = ckpt.finish_checkpoint(
                folder, weights or ckpt.model_state(run.model), _checkpoint_state(run), hashes,
                run.cfg.train.keep_last, is_best, run.damaged_checkpoints,
            )
            run.damaged_checkpoints.discard(run.last_checkpoint.name)  # overwritten: good now
    if not world.main:  # every rank names the new checkpoint in its messages
        run.last_checkpoint = out_dir / folder.name.removeprefix(".tmp-")


def _checkpoint_state(run: Run) -> dict[str, Any]:
    """What state.json holds besides the file hashes: counters, config, tokenizer, streams."""
    return {
        **run.state.state_dict(),
        "config": to_dict(run.cfg),
        "tokenizer": run.tokenizer,
        "samplers": {name: s.state_dict() for name, s in run.samplers.items()},
        "scaler": run.scaler.state_dict() if run.scaler.is_enabled() else None,
    }


@contextlib.contextmanager
def _saving(run: Run, folder: Path) -> Iterator[None]:
    """One step of a save, which every rank enters: a failure on any rank (a full disk, say)
    removes the temporary `folder` and raises the same one-line error on every rank, so none
    waits for the others at a collective. A failure that is no write failure is a bug: in one
    process it goes up as it is."""
    out_dir, world = folder.parent, run.world
    problem = None
    try:
        yield
    except Exception as e:
        failure = write_failure(e, out_dir)
        if failure is None and world.world_size == 1:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        problem = (_save_failed(out_dir, run.state.iteration, failure, run.last_checkpoint)
                   if failure is not None else
                   f"saving the checkpoint failed on rank {world.rank}: {first_line(e, 200)}")
    first = next((p for p in world.gather(problem) if p is not None), None)
    if first is not None:
        if world.main:
            shutil.rmtree(folder, ignore_errors=True)
        raise GPTError(first)


def _save_failed(out_dir: Path, iteration: int, error: OSError, previous: Path | None) -> str:
    """The one-line error of a checkpoint that could not be written: what failed, and that the
    run goes on from the previous checkpoint, which a failed save leaves as it was."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        problem = (f"no space left on the disk of {out_dir} for the checkpoint of iteration "
                   f"{iteration}; free some space (or lower train.keep_last)")
    else:
        problem = (f"cannot write the checkpoint of iteration {iteration} into {out_dir} "
                   f"({error.strerror or error}); make it writable")
    if previous is None:
        return f"{problem}, then run gpt train again (no checkpoint was saved yet)"
    return (f"{problem}, then run gpt train again to resume from {previous}, which is intact "
            "(checkpoints are written atomically)")


# ---------------------------------------------------------------------------------------------
# One step, the loss estimate, the loop


def train_step(run: Run) -> torch.Tensor:
    """One optimizer step: micro-batches (gradients synced on the last), clipping, and a step
    with a non-finite loss or gradient norm kept from the weights (`run.nonfinite` notes it).

    Returns the step's mean loss as a 0-dim tensor on the device: the step never waits for the
    device, so the host queues the next one while this one runs.
    """
    tcfg, world = run.cfg.train, run.world
    accum = tcfg.grad_accum_steps // world.world_size
    for group in run.optimizer.param_groups:  # each group's own peak, on one curve
        group["lr"] = lr_at(run.state.iteration, tcfg, group["initial_lr"])
    sampler = run.samplers["train"]
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(accum):
        x, y = sampler.next_batch()  # (B, T) each
        sync = world.world_size == 1 or micro == accum - 1
        with parallel.gradient_sync(run.trained, sync), run.autocast:
            _, loss = run.trained(x, y)
            loss = loss / accum
        if run.scaler.is_enabled():  # a non-finite loss makes every gradient NaN: a skipped step
            loss = loss * torch.where(torch.isfinite(loss.detach()), 1.0, math.nan)
        run.scaler.scale(loss).backward()
        sampler.prefetch()  # the next batch, drawn while this one's work runs
        loss_sum += loss.detach().float()
    world.mean(loss_sum)
    run.scaler.unscale_(run.optimizer)
    max_norm = tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf")
    norm = parallel.clip_grad_norm(run.model, max_norm)
    bad_loss = ~torch.isfinite(loss_sum)
    if run.scaler.is_enabled():
        # inf gradients are expected while the scaler finds its scale: it skips those steps
        # itself (and lowers the scale), so only a non-finite loss is an error
        run.nonfinite.note(run.state.iteration + 1, bad_loss, torch.zeros_like(bad_loss))
        run.scaler.step(run.optimizer)
    else:
        bad_norm = ~torch.isfinite(norm)
        run.nonfinite.note(run.state.iteration + 1, bad_loss, bad_norm)
        step_unless(run.optimizer, bad_loss | bad_norm)
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    run.state.iteration += 1
    run.state.tokens_seen += run.tokens_per_iter
    return loss_sum


@torch.no_grad()
def estimate_loss(run: Run) -> dict[str, float]:
    """Mean loss over eval_iters random batches of each split (all ranks): cheap and noisy,
    for watching a run; `gpt eval` measures a whole split exactly."""
    run.model.eval()
    losses = {}
    for sampler, key in (("eval_train", "train_loss"), ("eval_val", "val_loss")):
        total = torch.zeros((), device=run.device)
        for _ in range(run.cfg.train.eval_iters):
            x, y = run.samplers[sampler].next_batch()
            with run.autocast:
                _, loss = run.model(x, y)
            total += loss.float()
        run.world.sum(total)
        losses[key] = (total / (run.cfg.train.eval_iters * run.world.world_size)).item()
    run.model.train()
    return losses


def fit(run: Run) -> int:
    """Train to max_iters: step, log, evaluate, checkpoint, and stop cleanly on a signal.

    Returns the exit code: 0, or 130/143 after SIGINT/SIGTERM (with a checkpoint saved).
    """
    tcfg, state, world = run.cfg.train, run.state, run.world
    if state.iteration >= tcfg.max_iters:
        world.print0(f"{tcfg.out_dir} is already at iteration {state.iteration} of max_iters = "
                     f"{tcfg.max_iters}; raise train.max_iters to train further")
    checkpoint_interval = tcfg.checkpoint_interval or tcfg.eval_interval
    throughput = Throughput(
        run.model.flops_per_token(), world.world_size,
        peak_flops(tcfg, run.device, run.dtype),
    )
    bar = tqdm(total=tcfg.max_iters, initial=state.iteration, disable=not world.main, unit="it")
    run.model.train()
    try:
        if state.iteration == 0 and run.last_checkpoint is None:
            with throughput.paused():
                run.record(**estimate_loss(run))
            bar.unpause()  # the bar's rate and ETA count training steps only
        with StopFlag() as stop:
            while state.iteration < tcfg.max_iters:
                loss = train_step(run)  # on the device: read only where it is logged
                throughput.add(run.tokens_per_iter)
                bar.update(1)
                done, last = state.iteration, state.iteration == tcfg.max_iters
                # in one process the host waits for the device only at a log, an evaluation or
                # a save (DDP adds the signal check), each first checking that no step since
                # was kept from the weights
                if done % tcfg.log_interval == 0 or last:
                    run.nonfinite.check(run.last_checkpoint)
                    values = {"loss": loss.item(), **throughput.read()}
                    if run.device.type == "cuda":  # rank 0's, since the run began
                        values["peak_mem_gib"] = torch.cuda.max_memory_allocated(run.device) / 2**30
                    run.record(**values)
                    bar.set_postfix(_postfix(values))
                is_best = False
                if done % tcfg.eval_interval == 0 or last:
                    run.nonfinite.check(run.last_checkpoint)
                    with throughput.paused():
                        losses = estimate_loss(run)
                    run.record(**losses)
                    if last:
                        bar.close()  # its final state printed once, then the last losses
                    if world.main:
                        tqdm.write(f"iter {done}: train loss {losses['train_loss']:.4f}, "
                                   f"val loss {losses['val_loss']:.4f}")
                    is_best = losses["val_loss"] < state.best_val_loss
                    state.best_val_loss = min(state.best_val_loss, losses["val_loss"])
                stopping = stop.seen(world, run.device)
                if done % checkpoint_interval == 0 or last or stopping:
                    run.nonfinite.check(run.last_checkpoint)
                    with throughput.paused():
                        save(run, is_best)
                if stopping:
                    world.print0(f"stopped by signal after iteration {done}; "
                                 f"saved {run.last_checkpoint}")
                    return EXIT_CODES.get(stop.signum or signal.SIGTERM, 143)
    finally:
        bar.close()
        if run.metrics is not None:
            run.metrics.close()
    return 0


def _postfix(values: dict[str, float]) -> dict[str, str]:
    """The progress bar's loss, tokens/s and MFU."""
    postfix = {"loss": f"{values['loss']:.4f}", "tok_s": f"{values['tok_per_s']:,.0f}"}
    if "mfu" in values:
        postfix["mfu"] = f"{values['mfu']:.1%}"
    return postfix


TOO_BIG = ("make the model smaller (model.n_layer, n_embd, block_size; gpt info sizes it) or "
           "lower train.batch_size (a higher grad_accum_steps keeps the batch)")


def train(cfg: RunConfig, resume: bool = True) -> int:
    """Run training to `max_iters`; returns the exit code (0, or 130/143 after a signal)."""
    tcfg = cfg.train
    if cfg.model.cross_attention:
        raise GPTError(
            "[model] cross_attention = true needs a context sequence, which gpt train has no "
            "source for; train decoder-only models (cross_attention = false)"
        )
    if tcfg.optimizer == "muon":
        muon_class()  # a torch without Muon is refused before any work
    device = resolve_device(tcfg.device, "[train] device")
    world = parallel.setup_distributed(device)
    if world.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if tcfg.grad_accum_steps % world.world_size:
        raise GPTError(
            f"[train] grad_accum_steps = {tcfg.grad_accum_steps} is not divisible by the "
            f"{world.world_size} processes; make it a multiple of the process count"
        )
    dtype = resolve_dtype(tcfg.dtype, device, "[train] dtype")
    if tcfg.parallel == "fsdp" and world.world_size > 1 and dtype == torch.float16:
        raise GPTError(
            "[train] parallel = \"fsdp\" computes in bfloat16 or float32, not float16 (its "
            "gradients would need loss scaling across shards); set train.dtype = \"bfloat16\" "
            "(or \"float32\" on GPUs without it), or parallel = \"ddp\""
        )
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    # one run per out_dir, taken before any data work
    out_dir = Path(tcfg.out_dir)
    try:
        created = not out_dir.exists()
    except OSError as e:  # a folder above it cannot be read
        raise GPTError(f"cannot read {out_dir} ({e.strerror}); set train.out_dir to a folder you "
                       "can write") from None
    lock = FolderLock(out_dir, "gpt train", "train.out_dir") if world.main else None
    try:
        with (
            compile_errors("train.compile = true") if tcfg.compile else contextlib.nullcontext(),
            memory_errors(device, TOO_BIG),
        ):
            code = fit(setup_run(cfg, resume, world, device, dtype))
        world.barrier()  # no rank tears the process group down while another uses it
        return code
    finally:
        if lock is not None:
            if created and [p.name for p in out_dir.iterdir()] == [lock.path.name]:
                shutil.rmtree(out_dir, ignore_errors=True)  # a run that failed before any output
            lock.release()  # after: no second run can take the folder while it is removed
        world.close()
