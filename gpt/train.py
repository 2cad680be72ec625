"""The training loop: AdamW, warmup + cosine schedule, evaluation, logging, checkpoints, signals.

`train(config)` runs in one process or, under torchrun, in each DDP rank. Everything a run needs
to continue exactly (weights, optimizer, RNGs, data streams, counters) goes into checkpoints, so a
run killed at any moment and resumed is, on CPU, bitwise the run that was never interrupted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from gpt import checkpoint as ckpt
from gpt.config import RunConfig, TrainConfig, from_dict, to_dict
from gpt.data.prepare import prepare
from gpt.data.prepared import BatchSampler, PreparedData
from gpt.errors import GPTError, compile_errors, first_line
from gpt.fileio import write_atomic
from gpt.lock import FolderLock
from gpt.model import GPT
from gpt.tokenizer import padded_vocab_size

# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU; `[train] peak_flops` overrides.
PEAK_FLOPS = {
    "H200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "A10": 125e12,
    "L40": 181e12,
    "L4": 121e12,
    "V100": 125e12,
    "RTX 4090": 165e12,
    "RTX 3090": 71e12,
    "T4": 65e12,
}
EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


# ---------------------------------------------------------------------------------------------
# Pieces


def lr_at(iteration: int, cfg: TrainConfig) -> float:
    """Linear warmup to learning_rate, then cosine decay to min_lr at lr_decay_iters."""
    if not cfg.decay_lr:
        return cfg.learning_rate
    if iteration < cfg.warmup_iters:
        return cfg.learning_rate * (iteration + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.lr_decay_iters or cfg.max_iters
    if iteration >= decay_iters:
        return cfg.min_lr
    progress = (iteration - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
    coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW decaying matrices (weights, embeddings) but not biases and norm gains (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = {"fused": True} if device.type == "cuda" else {}
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **fused)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GPTError(f"[train] device = {name!r} but no CUDA GPU is available; use auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise GPTError(f"[train] device = {name!r} but MPS is not available; use auto or cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bfloat16 on GPUs that have it, float16 on older GPUs, float32 elsewhere."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtype = getattr(torch, name)
    if dtype == torch.float16 and device.type == "cpu":
        raise GPTError("[train] dtype = float16 needs a GPU; use bfloat16 or float32 on the CPU")
    return dtype


def peak_flops(cfg: TrainConfig, device: torch.device) -> float | None:
    if cfg.peak_flops is not None:
        return cfg.peak_flops
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


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


def gather_rng_states(world: Dist) -> list[dict[str, Any]]:
    """Every rank's RNG states, rank by rank (each rank draws its own dropout masks)."""
    if world.world_size == 1:
        return [rng_state()]
    states: list[Any] = [None] * world.world_size
    dist.all_gather_object(states, rng_state())
    return states


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


class MetricsLog:
    """metrics.jsonl (floats in full precision), the tqdm bar's postfix, and wandb."""

    def __init__(self, path: Path, resume_iter: int | None, wandb_run: Any) -> None:
        self.path = path
        if resume_iter is not None and path.exists():  # drop lines after the checkpoint
            kept = [
                line for line in path.read_text().splitlines()
                if (record := _parse_line(line)) is not None and record["iter"] <= resume_iter
            ]
            write_atomic(path, "".join(line + "\n" for line in kept))
        elif resume_iter is None:
            path.unlink(missing_ok=True)
        self.file = open(path, "a")
        self.wandb_run = wandb_run

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record["iter"])

    def close(self) -> None:
        self.file.close()
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.finish()
            wandb.teardown()  # finish() may return before the history is on disk; this waits


def _parse_line(line: str) -> dict[str, Any] | None:
    """One metrics record, or None for a blank line or one a crash cut short."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "iter" in record else None


def start_wandb(cfg: RunConfig, out_dir: Path, run_id: str | None) -> Any:
    """A wandb run (resumed by id), falling back to offline mode without credentials."""
    if not cfg.log.wandb or cfg.log.wandb_mode == "disabled":
        return None
    import wandb

    run_id = run_id or uuid.uuid4().hex[:8]
    kwargs = dict(
        project=cfg.log.wandb_project, name=cfg.log.wandb_run_name, id=run_id, resume="allow",
        config=to_dict(cfg), dir=str(out_dir),
    )
    try:
        return wandb.init(mode=cfg.log.wandb_mode, **kwargs)
    except Exception as e:  # no credentials, no network: keep the run, log locally
        reason = first_line(e, 100)
        print(f"wandb {cfg.log.wandb_mode} failed ({reason}); logging offline")
        return wandb.init(mode="offline", **kwargs)


# ---------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """DDP under torchrun (RANK/WORLD_SIZE set): NCCL on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    info = Dist(
        int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    )
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return info


def _resolve_model_config(cfg: RunConfig, meta: dict[str, Any]) -> RunConfig:
    """Fill `vocab_size` from the data's tokenizer (padded to a multiple of 64) and check it."""
    vocab = meta["vocab_size"]
    model_cfg = cfg.model
    if model_cfg.vocab_size is None:
        model_cfg = dataclasses.replace(model_cfg, vocab_size=padded_vocab_size(vocab))
    elif model_cfg.vocab_size < vocab:
        raise GPTError(
            f"[model] vocab_size = {model_cfg.vocab_size} is smaller than the tokenizer's "
            f"{vocab}; raise it or leave it unset"
        )
    return dataclasses.replace(cfg, model=model_cfg)


def _check_compatible(
    saved: RunConfig, cfg: RunConfig, tokenizer: dict, saved_tok: dict, where: Path
) -> None:
    """A checkpoint continues only with the same model shape and tokenizer."""
    ignore = {"dropout", "attention"}  # no effect on the weights' shapes
    for f in dataclasses.fields(saved.model):
        if f.name in ignore:
            continue
        old, new = getattr(saved.model, f.name), getattr(cfg.model, f.name)
        if old != new:
            raise GPTError(
                f"{where} was trained with model.{f.name} = {old!r}, the config now says {new!r}; "
                f"set it back, or use another train.out_dir (or init_from to finetune)"
            )
    if saved_tok != tokenizer:
        raise GPTError(
            f"{where} was trained with the {saved_tok.get('name')!r} tokenizer but the data uses "
            f"{tokenizer.get('name')!r}; point data at the same tokenizer or use another out_dir"
        )


def _load_resumable(out_dir: Path, log: Any) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that loads; a damaged one is reported and skipped."""
    for candidate in ckpt.list_checkpoints(out_dir):
        try:
            return candidate, ckpt.read_state(candidate)
        except GPTError as e:
            log(f"warning: {e}; trying the previous checkpoint")
    return None


def train(cfg: RunConfig, resume: bool = True) -> int:
    """Run training to `max_iters`; returns the exit code (0, or 130/143 after a signal)."""
    tcfg = cfg.train
    if cfg.model.cross_attention:
        raise GPTError(
            "[model] cross_attention = true needs a context sequence, which gpt train has no "
            "source for; train decoder-only models (cross_attention = false)"
        )
    device = resolve_device(tcfg.device)
    world = setup_distributed(device)
    if world.world_size > 1 and device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    log = print if world.main else (lambda *a, **k: None)
    if tcfg.grad_accum_steps % world.world_size:
        raise GPTError(
            f"[train] grad_accum_steps = {tcfg.grad_accum_steps} is not divisible by the "
            f"{world.world_size} processes; make it a multiple of the process count"
        )
    accum = tcfg.grad_accum_steps // world.world_size
    dtype = resolve_dtype(tcfg.dtype, device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    out_dir = Path(tcfg.out_dir)
    # before prepare: one run per out_dir
    lock = FolderLock(out_dir, "gpt train", "train.out_dir") if world.main else None
    try:
        if not resume and (existing := ckpt.list_checkpoints(out_dir)):  # before tokenizing
            raise GPTError(
                f"{out_dir} already holds checkpoints ({existing[0].name}); resume by dropping "
                "--no-resume, or set train.out_dir to a new folder"
            )
        # data: prepared once (by rank 0), then every rank reads it
        data_dir = cfg.data.resolved_data_dir
        vocabulary = None
        if tcfg.init_from and cfg.data.tokenizer == "char":  # finetune with the base model's ids
            vocabulary = ckpt.read_state(ckpt.find_checkpoint(tcfg.init_from))["tokenizer"]
        if world.main:
            prepare(cfg.data, progress=True, block_size=cfg.model.block_size, vocabulary=vocabulary)
        if world.world_size > 1:
            dist.barrier()
        meta = PreparedData(data_dir).meta
        cfg = _resolve_model_config(cfg, meta)
        tokenizer = meta["tokenizer"]
        with compile_errors("train.compile = true") if tcfg.compile else contextlib.nullcontext():
            return _run(cfg, resume, device, dtype, world, accum, data_dir, tokenizer, out_dir, log)
    finally:
        if lock is not None:
            lock.release()
        if world.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _run(
    cfg: RunConfig, resume: bool, device: torch.device, dtype: torch.dtype, world: Dist,
    accum: int, data_dir: Path, tokenizer: dict, out_dir: Path, log: Any,
) -> int:
    tcfg = cfg.train
    existing = ckpt.list_checkpoints(out_dir)
    found = _load_resumable(out_dir, log) if existing else None
    if existing and found is None:
        raise GPTError(
            f"every checkpoint in {out_dir} is damaged; remove them or use another out_dir"
        )

    torch.manual_seed(tcfg.seed)
    random.seed(tcfg.seed)
    np.random.seed(tcfg.seed)
    model = GPT(cfg.model)  # the same initial weights on every rank
    if world.world_size > 1:  # independent dropout masks per rank, as nanoGPT seeds them
        torch.manual_seed(tcfg.seed + world.rank)
    state: dict[str, Any] = {}
    if found is not None:
        where, state = found
        _check_compatible(from_dict(state["config"]), cfg, tokenizer, state["tokenizer"], where)
        ckpt.load_weights(where, model)
        log(f"resuming from {where} (iteration {state['iter']})")
    elif tcfg.init_from:
        source = ckpt.find_checkpoint(tcfg.init_from)
        init_state = ckpt.read_state(source)
        saved = from_dict(init_state["config"])
        _check_compatible(saved, cfg, tokenizer, init_state["tokenizer"], source)
        ckpt.load_weights(source, model)
        log(f"initialised from {source} (finetuning)")
    model.to(device)
    optimizer = make_optimizer(model, tcfg, device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if found is not None:
        optimizer.load_state_dict(ckpt.load_optimizer_state(found[0]))
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    samplers = {
        name: BatchSampler(data_dir, split, cfg.model.block_size, tcfg.batch_size, seed,
                           world.rank, world.world_size, device)
        for name, split, seed in (
            ("train", "train", tcfg.seed),
            ("eval_train", "train", tcfg.seed + 1),
            ("eval_val", "val", tcfg.seed + 1),
        )
    }
    start_iter, tokens_seen, best_val = 0, 0, math.inf
    if found is not None:
        for name, sampler in samplers.items():
            sampler.load_state_dict(state["samplers"][name])
        per_rank = state.get("rng_ranks") or [state["rng"]]
        set_rng_state(per_rank[world.rank] if len(per_rank) == world.world_size else state["rng"])
        start_iter, tokens_seen = state["iter"], state["tokens"]
        best_val = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf

    trained: torch.nn.Module = model
    if tcfg.compile:
        trained = torch.compile(model)
    if world.world_size > 1:
        trained = DDP(trained, device_ids=[world.local_rank] if device.type == "cuda" else None)
    autocast = (
        torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
        else contextlib.nullcontext()
    )

    def evaluate() -> dict[str, float]:
        model.eval()
        losses = {}
        with torch.no_grad():
            for name, key in (("eval_train", "train_loss"), ("eval_val", "val_loss")):
                total = torch.zeros((), device=device)
                for _ in range(tcfg.eval_iters):
                    x, y = samplers[name].next_batch()
                    with autocast:
                        _, loss = model(x, y)
                    total += loss.float()
                if world.world_size > 1:
                    dist.all_reduce(total)
                losses[key] = (total / (tcfg.eval_iters * world.world_size)).item()
        model.train()
        return losses

    wandb_id = state.get("wandb_id")
    wandb_run = start_wandb(cfg, out_dir, wandb_id) if world.main else None
    metrics = None
    if world.main:
        metrics = MetricsLog(out_dir / "metrics.jsonl", start_iter if found else None, wandb_run)
    if wandb_run is not None:
        wandb_id = wandb_run.id
    peak = peak_flops(tcfg, device)
    flops_per_token = model.flops_per_token()
    tokens_per_iter = tcfg.batch_size * cfg.model.block_size * tcfg.grad_accum_steps
    ckpt_interval = tcfg.checkpoint_interval or tcfg.eval_interval
    last_ckpt = found[0] if found else None
    started = time.perf_counter()
    elapsed_before = state.get("elapsed_s", 0.0)

    def record(iteration: int, **values: Any) -> None:
        if metrics is not None:
            metrics.write({
                "iter": iteration,
                "elapsed_s": elapsed_before + time.perf_counter() - started,
                "tokens": tokens_seen,
                "lr": lr_at(max(iteration - 1, 0), tcfg),  # the rate the last step used
                **values,
            })

    def save(iteration: int, is_best: bool, rngs: list[dict[str, Any]]) -> Path:
        run_state = {
            "tokens": tokens_seen,
            "best_val_loss": best_val if math.isfinite(best_val) else None,
            "wandb_id": wandb_id,
            "config": to_dict(cfg),
            "tokenizer": tokenizer,
            "samplers": {name: s.state_dict() for name, s in samplers.items()},
            "rng": rngs[0],
            "rng_ranks": rngs if len(rngs) > 1 else None,
            "scaler": scaler.state_dict() if scaler.is_enabled() else None,
            "elapsed_s": elapsed_before + time.perf_counter() - started,
        }
        return ckpt.save_checkpoint(
            out_dir, iteration, model, optimizer.state_dict(), run_state, tcfg.keep_last, is_best
        )

    if start_iter >= tcfg.max_iters:
        log(f"{out_dir} is already at iteration {start_iter} of max_iters = {tcfg.max_iters}; "
            "raise train.max_iters to train further")
    bar = tqdm(total=tcfg.max_iters, initial=start_iter, disable=not world.main, unit="it")
    model.train()
    exit_code = 0
    window_start, window_tokens = time.perf_counter(), 0
    try:
        if start_iter == 0 and found is None:
            losses = evaluate()
            record(0, **losses)
        with StopFlag() as stop:
            for iteration in range(start_iter, tcfg.max_iters):
                lr = lr_at(iteration, tcfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                loss_sum = torch.zeros((), device=device)
                for micro in range(accum):
                    x, y = samplers["train"].next_batch()
                    sync = world.world_size == 1 or micro == accum - 1
                    with (contextlib.nullcontext() if sync else trained.no_sync()), autocast:
                        _, loss = trained(x, y)
                        loss = loss / accum
                    scaler.scale(loss).backward()
                    loss_sum += loss.detach().float()
                if world.world_size > 1:
                    dist.all_reduce(loss_sum)
                    loss_sum /= world.world_size
                scaler.unscale_(optimizer)
                norm = torch.nn.utils.clip_grad_norm_(
                    model.parameters(), tcfg.grad_clip if tcfg.grad_clip > 0 else float("inf")
                )
                loss_value = loss_sum.item()
                # with a GradScaler, inf gradients are expected: it skips the step itself
                bad_norm = not scaler.is_enabled() and not torch.isfinite(norm)
                if not math.isfinite(loss_value) or bad_norm:
                    what = "loss" if not math.isfinite(loss_value) else "gradient norm"
                    good = last_ckpt or "none yet"
                    raise GPTError(
                        f"non-finite {what} at iteration {iteration + 1}; stopped before the "
                        f"optimizer step; last good checkpoint: {good}; lower train.learning_rate "
                        "or check the data"
                    )
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                tokens_seen += tokens_per_iter
                window_tokens += tokens_per_iter
                done = iteration + 1
                bar.update(1)

                if done % tcfg.log_interval == 0 or done == tcfg.max_iters:
                    now = time.perf_counter()
                    tok_per_s = window_tokens / max(now - window_start, 1e-9)
                    values: dict[str, Any] = {"loss": loss_value, "tok_per_s": tok_per_s}
                    if peak:
                        values["mfu"] = flops_per_token * tok_per_s / world.world_size / peak
                    record(done, **values)
                    postfix = {"loss": f"{loss_value:.4f}", "tok_s": f"{tok_per_s:,.0f}"}
                    if "mfu" in values:
                        postfix["mfu"] = f"{values['mfu']:.1%}"
                    bar.set_postfix(postfix)
                    window_start, window_tokens = now, 0
                is_best = False
                if done % tcfg.eval_interval == 0 or done == tcfg.max_iters:
                    losses = evaluate()
                    record(done, **losses)
                    if world.main:
                        bar.write(
                            f"iter {done}: train loss {losses['train_loss']:.4f}, "
                            f"val loss {losses['val_loss']:.4f}"
                        )
                    if losses["val_loss"] < best_val:
                        best_val, is_best = losses["val_loss"], True
                signal_seen = stop.signum is not None
                if world.world_size > 1:  # every rank stops at the same step
                    flag = torch.tensor([1.0 if signal_seen else 0.0], device=device)
                    dist.all_reduce(flag)
                    signal_seen = flag.item() > 0
                if done % ckpt_interval == 0 or done == tcfg.max_iters or signal_seen:
                    rngs = gather_rng_states(world)
                    if world.main:
                        last_ckpt = save(done, is_best, rngs)
                    if world.world_size > 1:
                        dist.barrier()
                if signal_seen:
                    exit_code = EXIT_CODES.get(stop.signum or signal.SIGTERM, 143)
                    log(f"stopped by signal after iteration {done}; saved {last_ckpt}")
                    break
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()
    return exit_code


def iterate_metrics(out_dir: str | Path) -> Iterator[dict[str, Any]]:
    """The records of a run's metrics.jsonl."""
    with open(Path(out_dir) / "metrics.jsonl") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)
