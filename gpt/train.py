"""Training: a run's state, its setup (fresh or resumed), one optimizer step, and the loop.

`train(config)` runs in one process or, under torchrun, in each DDP or FSDP process. Everything
a run needs to continue exactly (weights, optimizer, RNGs, data streams, counters) goes into
checkpoints, so a run killed at any moment and resumed is, on CPU, bitwise the run that was
never interrupted. Where it starts is resolved in gpt/plan.py, the processes are
gpt/parallel/'s, the optimizer and its schedule gpt/optim.py's, and what a checkpoint holds
and when it is written gpt/checkpoint.py's.
"""

from __future__ import annotations

import contextlib
import functools
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from gpt import parallel
from gpt.checkpoint import Checkpointer, Each, RandomStates
from gpt.config import RunConfig, TrainConfig, to_dict
from gpt.data.prepared import BatchSampler
from gpt.device import check_fp8, memory_errors, resolve_device, resolve_dtype, to_float8
from gpt.errors import GPTError, compile_errors
from gpt.layout import METRICS
from gpt.lock import FolderLock
from gpt.lora import LoRA, add_adapters, weights_sha256
from gpt.metrics import MetricsLog, Throughput, peak_flops, start_wandb
from gpt.model import GPT
from gpt.optim import (
    NonFiniteSteps,
    Optimizer,
    Schedule,
    config_peaks,
    make_optimizer,
    muon_class,
    step_unless,
)
from gpt.parallel import Dist, StopFlag, sharding
from gpt.plan import CHAT_TOKENS_ADDED, Start, resolve_start

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
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.iteration, self.tokens_seen = state["iter"], state["tokens"]
        best = state["best_val_loss"]
        self.best_val_loss = math.inf if best is None else best
        self.elapsed_s, self.since = state.get("elapsed_s", 0.0), time.perf_counter()
        self.wandb_id = state.get("wandb_id")


@dataclass
class Run:
    """Everything a training run works with, built fresh or resumed by `setup_run`."""

    cfg: RunConfig  # as the run trains: its start's shape, its data's vocabulary
    world: Dist
    dtype: torch.dtype  # the compute dtype ([train] dtype resolved for the device)
    autocast: contextlib.AbstractContextManager[Any]  # reentrant: torch.autocast or a no-op
    model: GPT  # the model (FSDP-sharded in place): checkpoints, evaluation, clipping
    trained: torch.nn.Module  # what the step calls: the model, compiled and/or DDP-wrapped
    optimizer: Optimizer  # AdamW, or Muon and AdamW combined
    schedule: Schedule
    scaler: torch.amp.GradScaler
    samplers: Each  # train, and the two evaluation streams
    state: TrainState
    checkpointer: Checkpointer
    nonfinite: NonFiniteSteps  # the first step kept from the weights, checked before logs and saves
    metrics: MetricsLog | None = None  # rank 0 only

    @property
    def device(self) -> torch.device:
        return self.world.device

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint on disk, for messages."""
        return self.checkpointer.latest

    @property
    def tokens_per_iter(self) -> int:
        tcfg = self.cfg.train
        return tcfg.batch_size * self.cfg.model.block_size * tcfg.grad_accum_steps

    def record(self, **values: Any) -> None:
        """One metrics line at the current iteration (rank 0), with the last step's rates."""
        if self.metrics is not None:
            self.metrics.write({
                "iter": self.state.iteration,
                "elapsed_s": self.state.elapsed(),
                "tokens": self.state.tokens_seen,
                **self.schedule.rates(),
                **values,
            })


def setup_run(cfg: RunConfig, resume: bool, world: Dist, dtype: torch.dtype) -> Run:
    """Build a run, or resume the one in out_dir. Each checkpoint involved is read once."""
    begin = resolve_start(cfg, resume, world)
    cfg, tcfg = begin.cfg, begin.cfg.train
    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed % 2**32)  # numpy's takes 32 bits: the same seed for all that fit
    # the same initial weights on every rank (under FSDP, each rank's rows of them)
    model = world.build(cfg.model, dtype, draw=begin.weights is None,
                        adapt=functools.partial(adapt_modules, tcfg))
    model.activation_checkpointing = tcfg.activation_checkpointing
    model.loss_chunk = tcfg.loss_chunk
    if tcfg.document_masking:
        model.document_eot = begin.data.eot_id
    world.seed(tcfg.seed)
    lora = None
    if (start := begin.weights) is not None:
        lora = load_start(begin, model)  # one file, every layout: FSDP reads each rank's rows
        world.print0(f"resuming from {start.path} (iteration {start.state['iter']})"
                     if begin.resumed else f"initialised from {start.path} ({_finetune(model)})")
        if begin.adds_chat_tokens:
            added = begin.chat_tokens_record[CHAT_TOKENS_ADDED]
            world.print0(f"added the chat tokens {' and '.join(added['tokens'])} as ids "
                         f"{added['ids'][0]} and {added['ids'][1]}: their rows begin as "
                         f"{added['rows']}")
    trained = world.wrap(model, tcfg.compile and tcfg.compile_scope == "model")
    optimizer = make_optimizer(model, tcfg, world.device)
    scaler = torch.amp.GradScaler(world.device.type, enabled=dtype == torch.float16)
    samplers = Each({
        name: BatchSampler(begin.data, split, cfg.model.block_size, tcfg.batch_size, seed,
                           world.rank, world.world_size, world.device)
        for name, split, seed in (("train", "train", tcfg.seed),
                                  ("eval_train", "train", tcfg.seed + 1),
                                  ("eval_val", "val", tcfg.seed + 1))
    })
    state = TrainState()
    checkpointer = Checkpointer(
        Path(tcfg.out_dir), world, model, optimizer,
        states=[(None, state), ("samplers", samplers), ("scaler", scaler),
                (None, RandomStates(world))],
        fixed={"config": to_dict(cfg), "tokenizer": begin.tokenizer, **begin.chat_tokens_record,
               **({"lora": lora} if lora is not None else {})},
        interval=tcfg.save_interval, keep_last=tcfg.keep_last, damaged=begin.damaged,
        adapters_only=lora is not None,
    )
    if begin.resumed is not None:
        with config_peaks(optimizer):  # a resumed run with new peak rates takes them
            checkpointer.restore(begin.resumed)
    schedule = Schedule(optimizer, tcfg)
    schedule.apply(state.iteration)
    run = Run(
        cfg=cfg, world=world, dtype=dtype,
        # FSDP computes in `dtype` through its mixed-precision policy, not autocast
        autocast=(torch.autocast(world.device.type, dtype=dtype)
                  if dtype != torch.float32 and not world.sharded else contextlib.nullcontext()),
        model=model, trained=trained, optimizer=optimizer, schedule=schedule, scaler=scaler,
        samplers=samplers, state=state, checkpointer=checkpointer,
        nonfinite=NonFiniteSteps(world.device),
    )
    if world.main:
        wandb_run = start_wandb(cfg, Path(tcfg.out_dir), state.wandb_id)
        state.wandb_id = wandb_run.id if wandb_run is not None else state.wandb_id
        resume_iter = state.iteration if begin.resumed else None
        run.metrics = MetricsLog(Path(tcfg.out_dir) / METRICS, resume_iter, wandb_run)
    return run


def adapt_modules(tcfg: TrainConfig, model: GPT) -> None:
    """The training options that change the model's modules, applied before any sharding:
    float8 matmuls in the blocks (torchao's layers), and each block compiled on its own (the
    blocks are alike, so one graph serves them all and compiling takes a block's time)."""
    if tcfg.fp8:
        to_float8(model)
    if tcfg.compile and tcfg.compile_scope == "blocks":
        for block in model.transformer.h:
            block.compile()  # in place: the keys and the module tree stay the same


def load_start(begin: Start, model: GPT) -> dict[str, Any] | None:
    """The start's weights into `model`. A LoRA finetune's are its base's, frozen, with
    adapters added (fresh, or the resumed run's): it returns the record its checkpoints carry."""
    tcfg, start = begin.cfg.train, begin.weights
    assert start is not None
    if tcfg.finetune != "lora":
        begin.load_into(model)
        return None
    added = begin.chat_tokens_record.get(CHAT_TOKENS_ADDED, {})  # their rows train too
    lora = LoRA.from_config(tcfg, begin.cfg.model, rows=tuple(added.get("ids", ())))
    if begin.resumed is not None:
        begin.resumed.load_adapted(model, lora, tcfg.seed)
        return begin.resumed.lora
    begin.load_into(model)
    record = lora.record(str(start.path), weights_sha256(model))
    add_adapters(model, lora, tcfg.seed)
    return record


def _finetune(model: GPT) -> str:
    """How a finetune trains, for its first line: every weight, or LoRA's adapters alone."""
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    if trained == total:
        return "finetuning"
    return f"LoRA finetuning: {trained:,} adapter parameters train, {total - trained:,} frozen"


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
    run.schedule.apply(run.state.iteration)
    sampler = run.samplers["train"]
    loss_sum = torch.zeros((), device=run.device)
    for micro in range(accum):
        x, y = sampler.next_batch()  # (B, T) each
        with world.gradient_sync(run.trained, micro == accum - 1), run.autocast:
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
    norm = sharding.clip_grad_norm(run.model, max_norm)
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


class Validator:
    """The loss estimate the loop watches, every eval_interval steps and at the last: the mean
    loss over eval_iters random batches of each split, in every process. Cheap and noisy;
    `gpt eval` measures a whole split exactly."""

    def __init__(self, run: Run) -> None:
        self.run, self.interval = run, run.cfg.train.eval_interval

    def due(self, step: int, last_step: bool) -> bool:
        return step % self.interval == 0 or last_step

    @torch.no_grad()
    def estimate(self) -> dict[str, float]:
        run = self.run
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

    def validate(self, step: int, last_step: bool, bar: tqdm) -> bool:
        """Estimate, record and print the losses when due; whether val loss is the best yet."""
        if not self.due(step, last_step):
            return False
        state, losses = self.run.state, self.estimate()
        self.run.record(**losses)
        if last_step:
            bar.close()  # its final state printed once, then the last losses
        if self.run.world.main:
            tqdm.write(f"iter {step}: train loss {losses['train_loss']:.4f}, "
                       f"val loss {losses['val_loss']:.4f}")
        is_best = losses["val_loss"] < state.best_val_loss
        state.best_val_loss = min(state.best_val_loss, losses["val_loss"])
        return is_best


class Logger:
    """The step's loss, tokens/s and MFU, every log_interval steps and at the last: a metrics
    line and the progress bar's figures."""

    def __init__(self, run: Run, throughput: Throughput, bar: tqdm) -> None:
        self.run, self.throughput, self.bar = run, throughput, bar
        self.interval = run.cfg.train.log_interval

    def due(self, step: int, last_step: bool) -> bool:
        return step % self.interval == 0 or last_step

    def log(self, step: int, last_step: bool, loss: torch.Tensor) -> None:
        if not self.due(step, last_step):
            return
        values = {"loss": loss.item(), **self.throughput.read()}
        if self.run.device.type == "cuda":  # rank 0's, since the run began
            values["peak_mem_gib"] = torch.cuda.max_memory_allocated(self.run.device) / 2**30
        self.run.record(**values)
        postfix = {"loss": f"{values['loss']:.4f}", "tok_s": f"{values['tok_per_s']:,.0f}"}
        if "mfu" in values:
            postfix["mfu"] = f"{values['mfu']:.1%}"
        self.bar.set_postfix(postfix)


def fit(run: Run) -> int:
    """Train to max_iters: step, then the logger, the validator and the checkpointer each act
    when their interval comes; stop cleanly on a signal.

    Returns the exit code: 0, or 130/143 after SIGINT/SIGTERM (with a checkpoint saved).
    """
    tcfg, state, world, checkpointer = run.cfg.train, run.state, run.world, run.checkpointer
    if state.iteration >= tcfg.max_iters:
        world.print0(f"{tcfg.out_dir} is already at iteration {state.iteration} of max_iters = "
                     f"{tcfg.max_iters}; raise train.max_iters to train further")
    throughput = Throughput(run.model.flops_per_token(), world.world_size,
                            peak_flops(tcfg, run.device, run.dtype))
    bar = tqdm(total=tcfg.max_iters, initial=state.iteration, disable=not world.main, unit="it")
    logger, validator = Logger(run, throughput, bar), Validator(run)
    run.model.train()
    try:
        if state.iteration == 0 and checkpointer.latest is None:
            with throughput.paused():
                run.record(**validator.estimate())
            bar.unpause()  # the bar's rate and ETA count training steps only
        with StopFlag() as stop:
            while state.iteration < tcfg.max_iters:
                loss = train_step(run)  # on the device: read only where it is logged
                throughput.add(run.tokens_per_iter)
                bar.update(1)
                step, last = state.iteration, state.iteration == tcfg.max_iters
                # the host waits for the device only to log, evaluate or save, each time first
                # checking that no step since was kept from the weights
                if logger.due(step, last) or validator.due(step, last):
                    run.nonfinite.check(checkpointer.latest)
                logger.log(step, last, loss)
                with throughput.paused():  # evaluation is not training time
                    is_best = validator.validate(step, last, bar)
                stopping = stop.seen(world)  # after evaluating: a signal during it stops here
                if checkpointer.due(step, last, stopping):
                    run.nonfinite.check(checkpointer.latest)
                    with throughput.paused():  # nor is saving
                        checkpointer.save(step, last_step=last, stopping=stopping,
                                          is_best=is_best)
                if stopping:
                    world.print0(f"stopped by signal after iteration {step}; "
                                 f"saved {checkpointer.latest}")
                    return stop.exit_code
    finally:
        bar.close()
        if run.metrics is not None:
            run.metrics.close()
    return 0


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
    if tcfg.document_masking and cfg.model.dropout > 0:
        raise GPTError(
            "[train] document_masking = true attends through FlexAttention, which has no "
            "attention dropout; set model.dropout = 0, or document_masking = false"
        )
    if tcfg.optimizer == "muon":
        muon_class()  # a torch without Muon is refused before any work
    device = resolve_device(tcfg.device, "[train] device")
    if tcfg.fp8:
        check_fp8(device)
    dtype = resolve_dtype(tcfg.dtype, device, "[train] dtype")
    world = parallel.start(tcfg, device, dtype)
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
            memory_errors(world.device, TOO_BIG),
        ):
            code = fit(setup_run(cfg, resume, world, dtype))
        world.barrier()  # no rank tears the process group down while another uses it
        return code
    finally:
        if lock is not None:
            if created and [p.name for p in out_dir.iterdir()] == [lock.path.name]:
                shutil.rmtree(out_dir, ignore_errors=True)  # a run that failed before any output
            lock.release()  # after: no second run can take the folder while it is removed
        world.close()
