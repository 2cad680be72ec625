"""One run over one or many processes: the only module that touches torch.distributed.

A `Dist` is built once per process (`start`): rank 0 of 1 for a plain run, one of N under
torchrun. It wraps the model for the layout, reduces, gathers and agrees across the processes,
and gives checkpoints the weights and optimizer state to write; each of these is a no-op in one
process, so the trainer never asks how many processes there are.

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
import gc
import importlib
import os
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt.config import TrainConfig
from gpt.errors import GPTError
from gpt.layout import OPTIMIZER, Rows, optimizer_file
from gpt.model import GPT

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class Dist:
    """This process's place in the run (one process: rank 0 of 1) and its device, and every
    collective the trainer and its checkpoints need."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sharded: bool = False  # FSDP: each process holds its rows of every weight and moment
    host_group: Any = None  # gloo, for agreements on host tensors (None: the default group)
    mesh: Any = None  # FSDP's DeviceMesh, which holds the process group until `close`

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

    def any(self, flag: bool) -> bool:
        """Whether `flag` is set in any process, so that every process takes the same branch."""
        return self.any_later(flag)()

    def any_later(self, flag: bool) -> Callable[[], bool]:
        """Start agreeing whether `flag` is set in any process, without waiting; returns what
        reads the answer. A host tensor reduced on the host group, so the answer never waits
        for the device, and reading it waits only for this all-reduce (`StopFlag` reads it a
        step later, when it has long arrived)."""
        if self.world_size == 1:
            return lambda: flag
        found = torch.tensor([1.0 if flag else 0.0])
        work = dist.all_reduce(found, group=self.host_group, async_op=True)

        def read() -> bool:
            work.wait()
            return found.item() > 0

        return read

    def gather(self, value: Any) -> list[Any]:
        """Every process's `value` (picklable), rank by rank."""
        if self.world_size == 1:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def seed(self, seed: int) -> None:
        """Different dropout masks in each process, as nanoGPT seeds them; one process keeps
        the stream its model's initial weights came from."""
        if self.world_size > 1:
            torch.manual_seed(seed + self.rank)

    def barrier(self) -> None:
        """Wait until every process is here."""
        if self.world_size > 1:
            dist.barrier()

    def close(self) -> None:
        """Tear the process groups down (after a `barrier`: no process may still use them),
        and with them their backends' threads (gloo's two workers and its transport loop).

        destroy_process_group only forgets a group: the group ends, joining its threads, when
        its last reference goes. One still held was never ended, and its threads still ran
        while the process exited, which is when about one FSDP launch in 40 aborted
        ("terminate called without an active exception"). So every reference this run made
        goes first: the run's model (freed by the collector: FSDP's hooks make cycles) and its
        mesh (which DTensor's sharding caches keep, and which holds the group).
        """
        if self.world_size > 1 and dist.is_initialized():
            gc.collect()
            if self.mesh is not None:
                release_groups(self.mesh)
            self.mesh = self.host_group = None
            dist.destroy_process_group()

    # the model and its state in this layout

    def wrap(self, model: GPT, compile_model: bool, dtype: torch.dtype) -> nn.Module:
        """Place `model` for this layout (FSDP: sharded in place, block by block; else moved to
        the device whole) and return what the training step calls: compiled when asked, and
        DDP-wrapped across several processes."""
        if self.sharded:
            self.mesh = shard(model, self.device, dtype)
        else:
            model.to(self.device)
        trained: nn.Module = torch.compile(model) if compile_model else model
        if self.world_size > 1 and not self.sharded:
            ids = [self.local_rank] if self.device.type == "cuda" else None
            trained = DDP(trained, device_ids=ids)
        return trained

    def model_state(
        self, model: nn.Module, keep: Callable[[str], bool] | None = None
    ) -> dict[str, torch.Tensor]:
        """Every weight (or those whose key `keep` keeps), whole, on the CPU, in rank 0 (the
        others get an empty dict; a collective under FSDP, which gathers the shards). A tied
        head is the embedding itself, so it is left out: a checkpoint stores it once."""
        if self.sharded:
            gathered = full_model_state(model)
            return {k: v for k, v in gathered.items() if keep is None or keep(k)}
        if not self.main:
            return {}
        plain = unwrap(model)
        state = {k: v.detach().cpu().contiguous() for k, v in plain.state_dict().items()
                 if keep is None or keep(k)}
        if plain.config.tie_embeddings:
            state.pop("lm_head.weight", None)
        return state

    def optimizer_state(self, optimizer: Any) -> tuple[str, dict[str, Any]] | None:
        """The optimizer file this process writes into a checkpoint, and what it holds: under
        FSDP each process's rows (`local_optimizer_state`), else rank 0's whole state."""
        if self.sharded:
            return optimizer_file(self.rank, self.world_size), local_optimizer_state(optimizer)
        return (OPTIMIZER, optimizer.state_dict()) if self.main else None

    def load_optimizer_state(
        self, optimizer: Any, saved: Callable[[Mapping[int, Rows] | None], dict[str, Any]]
    ) -> None:
        """Load a saved optimizer state, which may come from any layout: `saved(rows)` reads
        it, whole (rows None) or only the rows this process holds under FSDP."""
        if not self.sharded:
            optimizer.load_state_dict(saved(None))
            return
        params = optimizer_params(optimizer)
        rows = {key: held for key, p in enumerate(params) if (held := rows_of(p))}
        load_local_optimizer_state(optimizer, saved(rows))

    @contextlib.contextmanager
    def gradient_sync(self, trained: nn.Module, sync: bool) -> Iterator[None]:
        """Whether this micro-batch's backward reduces the gradients across processes: only
        the last of an accumulation does; the others add to the local gradients."""
        if sync or self.world_size == 1:
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


def start(tcfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> Dist:
    """This process's `Dist`: one process, or its rank under torchrun (RANK/WORLD_SIZE set),
    with the process group started (NCCL on CUDA, gloo on CPU) and the layout's own limits
    checked."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Dist(device=device)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # Its functions' defaults are `group=group.WORLD`, bound at import: imported after the
    # group starts (as FSDP and distributed checkpoints do), they would hold it for the life of
    # the interpreter, so that `Dist.close` could never end it. Imported now, they hold None.
    importlib.import_module("torch.distributed.nn.functional")

    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    # agreements (the stop flag) travel as host tensors: NCCL reduces only device tensors
    host_group = dist.new_group(backend="gloo") if dist.get_backend() != "gloo" else None
    world = Dist(rank, local_rank, world_size, device, sharded=tcfg.parallel == "fsdp",
                 host_group=host_group)
    if tcfg.grad_accum_steps % world_size:
        raise GPTError(
            f"[train] grad_accum_steps = {tcfg.grad_accum_steps} is not divisible by the "
            f"{world_size} processes; make it a multiple of the process count"
        )
    if world.sharded and dtype == torch.float16:
        raise GPTError(
            "[train] parallel = \"fsdp\" computes in bfloat16 or float32, not float16 (its "
            "gradients would need loss scaling across shards); set train.dtype = \"bfloat16\" "
            "(or \"float32\" on GPUs without it), or parallel = \"ddp\""
        )
    return world


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits 130/143.

    Across processes the flag is agreed one step late, so that no step waits for it: the
    all-reduce started after step N is read after step N+1, by when it has arrived, and every
    process stops after that same step. A second signal quits at once (the last checkpoint on
    disk stays intact: saves are atomic).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}
        self.pending: Callable[[], bool] | None = None  # the agreement started a step ago

    def __enter__(self) -> StopFlag:
        for sig in EXIT_CODES:
            self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise SystemExit(EXIT_CODES[signal.Signals(signum)])
        self.signum = signum

    def __exit__(self, *exc: object) -> None:
        if self.pending is not None and exc[0] is None:
            self.pending()  # no all-reduce is left running on a group about to be torn down
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def seen(self, world: Dist) -> bool:
        """Whether a rank was signalled (in one process: by now; across processes: by the
        step before this one), the same answer in every rank, so all stop after one step."""
        if world.world_size == 1:
            return self.signum is not None
        agreed = self.pending is not None and self.pending()
        self.pending = world.any_later(self.signum is not None)
        return agreed

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.signum or signal.SIGTERM, 143)


def unwrap(model: nn.Module) -> GPT:
    """The plain GPT inside torch.compile and DDP wrappers, whose keys carry `_orig_mod.` and
    `module.` prefixes that a checkpoint must never hold."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, DDP):
            model = model.module
        else:
            return model  # type: ignore[return-value]


def shard(model: GPT, device: torch.device, dtype: torch.dtype) -> Any:
    """FSDP2 on each block, then on the root (embeddings, final norm, head), in place; returns
    the device mesh it shards over.

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
    return options["mesh"]


def release_groups(mesh: Any) -> None:
    """Make `mesh` let go of its process groups, which it would otherwise keep alive for as
    long as DTensor's caches keep it. Its registry is private: in a torch without one there is
    nothing to release here, and tests/test_parallel.py says so by the threads left running."""
    registry = getattr(mesh, "_pg_registry", None)
    if isinstance(registry, dict):
        registry.clear()


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
    n_params: int, n_trained: int, optimizer_bytes: int, largest_block: int, tcfg: TrainConfig,
    nproc: int,
) -> dict[str, float]:
    """Bytes each of `nproc` processes holds for weights, gradients (of the `n_trained`
    parameters that train: all, or a LoRA finetune's adapters) and optimizer state (all
    float32; `optimizer_bytes` for the whole model), before activations.

    DDP holds all of it in every process; FSDP 1/N of each, plus `gathered`: two blocks'
    weights whole (the one running and the next, gathered ahead), in float32 (half in bfloat16).
    """
    shards = nproc if tcfg.parallel == "fsdp" else 1
    return {
        "weights": 4 * n_params / shards,
        "gradients": 4 * n_trained / shards,
        "optimizer": optimizer_bytes / shards,
        "gathered": 2 * 4 * largest_block if shards > 1 else 0.0,
    }
