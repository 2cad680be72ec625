"""Tokenizing on worker processes: batches in, their results back in order, and workers that
end with the process that started them.

`in_order` is the one way the prepare pipeline (gpt/data/prepare.py) spreads its work: text
batches and conversation batches alike. Each worker holds the tokenizer, built once when it
starts, so a batch travels alone.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any, TypeVar

import numpy as np

from gpt.tokenizer import Tokenizer, tokenizer_from_dict

Batch = TypeVar("Batch")
Result = TypeVar("Result")
Encode = Callable[[Batch, Tokenizer, np.dtype], Result]  # a module-level function: pickled

PR_SET_PDEATHSIG = 1  # Linux prctl: the signal a process gets when its parent ends
PARENT_POLL_S = 0.5  # elsewhere: how often a worker looks whether its parent is still there

_worker_state: tuple[Tokenizer, np.dtype] | None = None


def in_order(
    batches: Iterator[Batch], encode: Encode[Batch, Result], workers: int,
    tokenizer: Tokenizer, dtype: np.dtype,
) -> Iterator[Result]:
    """Each batch's `encode(batch, tokenizer, dtype)`, in order: here, or with more than one
    worker on `workers` processes. While workers encode, this process reads the next batch and
    uses finished ones, so reading, encoding and writing overlap; at most `workers + 1` batches
    are in memory at once, whatever the corpus size."""
    if workers <= 1:
        for batch in batches:
            yield encode(batch, tokenizer, dtype)
        return
    in_flight: deque[Future[Result]] = deque()
    with _worker_pool(workers, tokenizer, dtype) as pool:
        for batch in batches:
            in_flight.append(pool.submit(_encode_in_worker, encode, batch))
            while len(in_flight) > workers:
                yield in_flight.popleft().result()
        while in_flight:
            yield in_flight.popleft().result()


def _worker_pool(workers: int, tokenizer: Tokenizer, dtype: np.dtype) -> ProcessPoolExecutor:
    """Processes rather than threads: tiktoken keeps the GIL for part of its work, so threads
    leave part of every extra core idle where processes use all of it."""
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return ProcessPoolExecutor(
        workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(os.getpid(), tokenizer.to_dict(), dtype.name),
    )


def _init_worker(parent: int, tokenizer_state: dict[str, Any], dtype_name: str) -> None:
    global _worker_state
    die_with_parent(parent)
    _worker_state = (tokenizer_from_dict(tokenizer_state), np.dtype(dtype_name))


def _encode_in_worker(encode: Encode[Batch, Result], batch: Batch) -> Result:
    """Worker-process side of `in_order`."""
    assert _worker_state is not None
    return encode(batch, *_worker_state)


def die_with_parent(parent: int, use_prctl: bool = True) -> None:
    """End this worker process when `parent` ends, however it ends (SIGKILL, the OOM killer).

    A pool's workers wait on a pipe whose other end they hold themselves, so without this they
    outlive a killed parent for good. On Linux the kernel sends SIGKILL
    (prctl(PR_SET_PDEATHSIG)); elsewhere, or if prctl fails, a thread looks every PARENT_POLL_S
    whether the worker has been handed to another parent.
    """
    if use_prctl and sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0:
            if os.getppid() != parent:  # it ended before prctl took effect
                os._exit(1)
            return
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)
