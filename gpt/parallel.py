"""One run over many processes: DDP or FSDP2, and the state that moves between those layouts.

DDP (`[train] parallel = "ddp"`) keeps the whole model, its gradients and its optimizer state in
every process and averages the gradients. FSDP2 (`"fsdp"`, `torch.distributed.fsdp.fully_shard`)
splits every parameter by rows (dim 0) across the processes: each block is gathered just before
it runs and freed after, and the gradients are reduce-scattered, so a process holds 1/N of the
weights, gradients and optimizer state.

Only this module sees DTensors. Checkpoints hold plain tensors: the weights gathered whole, the
optimizer state as each process's rows of it (`rows_of`), which any other layout can slice.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt.checkpoint import Rows
from gpt.config import TrainConfig
from gpt.model import GPT


@dataclass
class Dist:
    """This process's place in a torchrun launch (one process: rank 0 of 1), and the
    collectives the trainer needs: each is a no-op in one process."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def print0(self, *args: Any) -> None:
        """Print from rank 0 only, so N processes say things once."""
        if self.main:
            print(*args)

    def sum(self, tensor: torch.Tensor) -> None:
        """Sum `tensor` over the processes, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor)

    def mean(self, tensor: torch.Tensor) -> None:
        """Average `tensor` over the processes, in place."""
        if self.world_size > 1:
            dist.all_reduce(tensor)
            tensor /= self.world_size

    def any(self, flag: bool, device: torch.device) -> bool:
        """Whether `flag` is set in any process, so that every process takes the same branch."""
        if self.world_size == 1:
            return flag
        found = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(found)
        return found.item() > 0

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value` (picklable), rank by rank."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        """Wait until every process is here."""
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Tear the process group down (after a `barrier`: no process may still use it)."""
        if self.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def setup_distributed(device: torch.device) -> Dist:
    """DDP under torchrun (RANK/WORLD_SIZE set): NCCL on CUDA, gloo on CPU."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist()
    world = Dist(
        int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"])
    )
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return world


def wrap(
    model: GPT, compile_model: bool, world: Dist, device: torch.device, sharded: bool
) -> nn.Module:
    """The module the training step calls: compiled when asked, DDP-wrapped under torchrun
    (an FSDP model is sharded in place already)."""
    trained: nn.Module = torch.compile(model) if compile_model else model
    if world.world_size > 1 and not sharded:
        trained = DDP(trained, device_ids=[world.local_rank] if device.type == "cuda" else None)
    return trained


def shard(model: GPT, device: torch.device, dtype: torch.dtype) -> None:
    """FSDP2 on each block, then on the root (embeddings, final norm, head), in place.

    The model may still be on the CPU: fully_shard moves one block at a time to `device` and
    keeps its rows there, so a GPU never holds the whole model. With a compute dtype below
    float32, the weights are gathered in it and the gradients reduced in float32 (a
    MixedPrecisionPolicy, instead of autocast); the sharded weights and the optimizer state
    stay float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    options: dict[str, Any] = {"mesh": init_device_mesh(device.type, (dist.get_world_size(),))}
    if dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, **options)
    fully_shard(model, **options)


@contextlib.contextmanager
def gradient_sync(trained: nn.Module, sync: bool) -> Iterator[None]:
    """Whether this micro-batch's backward reduces the gradients across processes: only the
    last of an accumulation does; the others add to the local gradients."""
    if sync:
        yield
    elif isinstance(trained, DDP):
        with trained.no_sync():
            yield
    else:  # FSDP2: a setting, not a context
        trained.set_requires_gradient_sync(False)  # type: ignore[operator]
        try:
            yield
        finally:
            trained.set_requires_gradient_sync(True)  # type: ignore[operator]


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to `max_norm` in total; the norm before clipping, a plain 0-dim tensor
    (FSDP's is a DTensor, the same on every process)."""
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every weight, whole, on the CPU: gathered from the shards on rank 0 (a collective: every
    rank calls it; the others get an empty dict). A tied head is left out, as in any checkpoint.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if state and model.config.tie_embeddings:  # type: ignore[union-attr]
        state.pop("lm_head.weight", None)
    return {k: v.contiguous() for k, v in state.items()}


def rows_of(param: torch.Tensor) -> Rows | None:
    """The rows of `param` this process holds: None for a whole (unsharded) parameter.

    FSDP2 splits dim 0 as torch.chunk does: ceil(n / N) rows a process, the last ones fewer
    or none.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return None
    n, world = param.shape[0], param.device_mesh.size()
    rank = param.device_mesh.get_local_rank()
    chunk = -(-n // world)
    start, stop = min(rank * chunk, n), min((rank + 1) * chunk, n)
    held = param.to_local().shape[0]
    assert stop - start == held, f"{tuple(param.shape)}: rows {start}:{stop}, local {held}"
    return start, stop


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in the order of the optimizer's state dict (its integer keys)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def local_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state dict with this process's rows as plain tensors, and `rows`:
    {key: [start, stop]} for each sharded parameter."""
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: not edited
    rows = {}
    for key, param in enumerate(optimizer_params(optimizer)):
        if (held := rows_of(param)) is not None:
            rows[key] = list(held)
    local = {
        key: {name: value.to_local() if hasattr(value, "to_local") else value
              for name, value in entry.items()}
        for key, entry in state["state"].items()
    }
    return {"state": local, "param_groups": state["param_groups"], "rows": rows}


def load_local_optimizer_state(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Load a state dict whose tensors hold this process's rows (as `rows_of` gives them)."""
    from torch.distributed.tensor import DTensor

    params = optimizer_params(optimizer)

    def shard_like(param: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        if not isinstance(param, DTensor) or value.dim() == 0:  # the step is a scalar
            return value
        return DTensor.from_local(  # a moment, shaped like the parameter
            value, param.device_mesh, param.placements, run_check=False,
            shape=param.shape, stride=param.stride(),
        )

    entries = {
        key: {name: shard_like(params[key], value) for name, value in entry.items()}
        for key, entry in state["state"].items()
    }
    optimizer.load_state_dict({**state, "state": entries})


def memory_per_process(
    n_params: int, optimizer_bytes: int, largest_block: int, tcfg: TrainConfig, nproc: int
) -> dict[str, float]:
    """Bytes each of `nproc` processes holds for weights, gradients and optimizer state (all
    float32; `optimizer_bytes` for the whole model), before activations.

    DDP holds all of it in every process; FSDP 1/N of each, plus `gathered`: two blocks'
    weights whole (the one running and the next, gathered ahead), in float32 (half in bfloat16).
    """
    shards = nproc if tcfg.parallel == "fsdp" else 1
    return {
        "weights": 4 * n_params / shards,
        "gradients": 4 * n_params / shards,
        "optimizer": optimizer_bytes / shards,
        "gathered": 2 * 4 * largest_block if shards > 1 else 0.0,
    }
