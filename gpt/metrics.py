"""What a training run reports: metrics.jsonl, Weights & Biases, throughput and MFU.

Only rank 0 writes. metrics.jsonl keeps floats in full precision, one JSON record per line; on
resume, the lines past the checkpoint are dropped so the file reads as one uninterrupted run.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gpt.config import RunConfig, TrainConfig, to_dict
from gpt.errors import GPTError, first_line
from gpt.fileio import open_regular, write_atomic
from gpt.peak import cpu_peak_flops, dtype_name

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


def peak_flops(cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> float | None:
    """The device's peak FLOP/s for MFU in `dtype`, or None where unknown."""
    return describe_peak(cfg, device, dtype)[0]


def describe_peak(
    cfg: TrainConfig, device: torch.device, dtype: torch.dtype
) -> tuple[float | None, str]:
    """The device's peak FLOP/s and where it comes from: the config's, else a CPU's measured
    matmul rate (`gpt/peak.py`), else a GPU's from the table."""
    if cfg.peak_flops is not None:
        return cfg.peak_flops, "[train] peak_flops"
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return cpu_peak_flops(dtype), (
            f"CPU, {dtype_name(dtype)}, {threads} thread{'s' * (threads != 1)}, measured"
        )
    if device.type != "cuda":
        return None, f"no built-in peak for {device.type}; set [train] peak_flops"
    name = torch.cuda.get_device_name(device)
    flops = next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)
    if flops is None:
        return None, f"{name} is not in the built-in table; set [train] peak_flops"
    return flops, f"{name}, dense bfloat16/float16 from the built-in table"


class Throughput:
    """Tokens per second, and MFU given a peak, over the steps since the last reading."""

    def __init__(self, flops_per_token: int, world_size: int, peak: float | None) -> None:
        self.flops_per_token, self.world_size, self.peak = flops_per_token, world_size, peak
        self.started, self.tokens = time.perf_counter(), 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the time spent inside (evaluation, checkpoints) out of the rate."""
        started = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - started

    def read(self) -> dict[str, float]:
        """{"tok_per_s"} (all ranks together) and {"mfu"} (per process) when the peak is known."""
        now = time.perf_counter()
        tok_per_s = self.tokens / max(now - self.started, 1e-9)
        self.started, self.tokens = now, 0
        values = {"tok_per_s": tok_per_s}
        if self.peak:
            values["mfu"] = self.flops_per_token * tok_per_s / self.world_size / self.peak
        return values


def _lines_up_to(path: Path, last_iter: int) -> list[str]:
    """The records of a metrics.jsonl up to `last_iter`, as lines (damaged lines dropped)."""
    try:
        with open_regular(path) as f:
            lines = io.TextIOWrapper(f, encoding="utf-8", errors="replace")
            return [line.rstrip("\n") for line in lines
                    if (record := _parse_line(line)) is not None and record["iter"] <= last_iter]
    except OSError as e:  # unreadable, or not a file: a device, a FIFO
        raise GPTError(
            f"cannot read {path} ({e.strerror}); make it readable, or move it away to start the "
            "run's log afresh"
        ) from None


class MetricsLog:
    """metrics.jsonl (floats in full precision) and, when enabled, the wandb run."""

    def __init__(self, path: Path, resume_iter: int | None, wandb_run: Any) -> None:
        self.path = path
        if resume_iter is not None and path.exists():  # drop lines after the checkpoint
            write_atomic(path, "".join(line + "\n" for line in _lines_up_to(path, resume_iter)))
        elif resume_iter is None:
            path.unlink(missing_ok=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(path, "a")
        self.wandb_run = wandb_run
        self.failed = False  # a write failed (and said so)

    def write(self, record: dict[str, Any]) -> None:
        try:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
        except OSError as e:  # a full disk fills at a metrics line far sooner than at a save
            self.failed = True
            raise GPTError(
                f"cannot write {self.path} ({e.strerror or e}); free space on its disk (or make "
                "it writable), then run gpt train again: it resumes from the newest checkpoint"
            ) from None
        if self.wandb_run is not None:
            self.wandb_run.log(record, step=record["iter"])

    def close(self) -> None:
        try:
            self.file.close()
        except OSError:  # the line a failed write left in the buffer: already reported
            if not self.failed:
                raise
        if self.wandb_run is not None:
            import wandb

            self.wandb_run.finish()
            wandb.teardown()  # finish() may return before the history is on disk; this waits


def _parse_line(line: str) -> dict[str, Any] | None:
    """One metrics record, or None for a blank line or one a crash cut short."""
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # RecursionError: nested too deeply for the parser
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
