"""One run over one or many processes: the only module that touches torch.distributed.

A `Dist` is built once per process (`start`): rank 0 of 1 for a plain run, one of N under
torchrun. It wraps the model for the layout, reduces, gathers and agrees across the processes,
and gives checkpoints the weights and optimizer state to write; each of these is a no-op in one
process, so the trainer never asks how many processes there are.

DDP (`[train] parallel = "ddp"`) keeps the whole model, its gradients and its optimizer state in
every process and averages the gradients. FSDP2 (`"fsdp"`, `torch.distributed.fsdp.fully_shard`)
splits every parameter by rows (dim 0) across the processes: each block is gathered just before
it runs and freed after, and the gradients are reduce-scattered, so a process holds 1/N of the
weights, gradients and optimizer state. HSDP (`"hsdp"`) is FSDP2 on a 2-D mesh: the processes form
R replica groups of S = N / R (one per node by default), each group shards as FSDP does over
its S processes, and the groups hold the same rows: gradients are reduce-scattered within a
group, then all-reduced across groups, so the slow links between nodes carry only 1/S of them.

This package is the only one that touches torch.distributed, and only it sees DTensors: this
module makes the processes and the layouts, gpt/parallel/sharding.py works on the rows of
sharded tensors. Checkpoints hold plain tensors: the weights gathered whole, the optimizer
state as each process's rows of it (`sharding.rows_of`), which any other layout can slice;
under HSDP the first replica's S processes write theirs, as an FSDP run of S processes does.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt.config import SHARDED, ModelConfig, TrainConfig
from gpt.errors import GPTError
from gpt.layout import OPTIMIZER, OptimizerRows, optimizer_file
from gpt.model import GPT
from gpt.parallel.sharding import (
    full_model_state,
    init_rows,
    load_local_optimizer_state,
    local_optimizer_state,
    optimizer_rows,
)

EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class Dist:
    """This process's place in the run (one process: rank 0 of 1) and its device, and every
    collective the trainer and its checkpoints need."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    sharded: bool = False  # FSDP, HSDP: each process holds its rows of every weight and moment
    replicas: int = 1  # HSDP's replica groups, each sharding over `shards` processes
    host_group: Any = None  # gloo, for agreements on host tensors (None: the default group)
    mesh: Any = None  # FSDP's DeviceMesh, which holds the process groups until `close`

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def shards(self) -> int:
        """The processes that split each weight by rows: all under FSDP, a replica's under HSDP,
        one (whole weights) under DDP."""
        return self.world_size // self.replicas if self.sharded else 1

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

    def build(
        self, config: ModelConfig, dtype: torch.dtype, draw: bool = True,
        adapt: Callable[[GPT], None] | None = None,
    ) -> GPT:
        """The model with its initial weights: whole, on the CPU; or under FSDP built on the
        meta device, sharded, materialised on the device and its rows drawn (`init_rows`; not
        `draw`n when a start's weights fill them), so that no process holds it whole.

        `adapt` changes the model's modules first (float8 layers, blocks compiled one by one),
        before any sharding, as torchao and torchtitan ask; it draws nothing from the RNG."""
        if not self.sharded:
            model = GPT(config)
            if adapt is not None:
                adapt(model)
            return model
        with torch.device("meta"):
            model = GPT(config)
        if adapt is not None:
            adapt(model)
        self.mesh = shard(model, self.device, dtype, self.replicas)
        model.to_empty(device=self.device)
        model.init_buffers()
        if draw:
            init_rows(model)
        return model

    def wrap(self, model: GPT, compile_model: bool) -> nn.Module:
        """Place `model` for this layout (FSDP: sharded by `build` already; else moved to the
        device whole) and return what the training step calls: compiled when asked, and
        DDP-wrapped across several processes."""
        if not self.sharded:
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
        FSDP each process's rows (`local_optimizer_state`), under HSDP those of the first
        replica's processes (ranks 0 to S - 1: the other replicas hold the same rows), else
        rank 0's whole state."""
        if self.sharded:
            if self.rank >= self.shards:
                return None
            return optimizer_file(self.rank, self.shards), local_optimizer_state(optimizer)
        return (OPTIMIZER, optimizer.state_dict()) if self.main else None

    def load_optimizer_state(
        self, optimizer: Any, saved: Callable[[OptimizerRows | None], dict[str, Any]]
    ) -> None:
        """Load a saved optimizer state, which may come from any layout: `saved(rows)` reads
        it, whole (rows None) or only the rows this process holds under FSDP or HSDP."""
        if not self.sharded:
            optimizer.load_state_dict(saved(None))
            return
        load_local_optimizer_state(optimizer, saved(optimizer_rows(optimizer)))

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
    local_world_size = os.environ.get("LOCAL_WORLD_SIZE")
    replicas = replica_groups(tcfg, world_size, int(local_world_size) if local_world_size else None)
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
    world = Dist(rank, local_rank, world_size, device, sharded=tcfg.parallel in SHARDED,
                 replicas=replicas, host_group=host_group)
    if tcfg.grad_accum_steps % world_size:
        raise GPTError(
            f"[train] grad_accum_steps = {tcfg.grad_accum_steps} is not divisible by the "
            f"{world_size} processes; make it a multiple of the process count"
        )
    if world.sharded and dtype == torch.float16:
        raise GPTError(
            f"[train] parallel = \"{tcfg.parallel}\" computes in bfloat16 or float32, not "
            "float16 (its gradients would need loss scaling across shards); set train.dtype = "
            "\"bfloat16\" (or \"float32\" on GPUs without it), or parallel = \"ddp\""
        )
    return world


def replica_groups(tcfg: TrainConfig, world_size: int, local_world_size: int | None) -> int:
    """HSDP's replica groups of the `world_size` processes: [train] hsdp_replicas, or one per
    node (`local_world_size` processes each, torchrun's LOCAL_WORLD_SIZE); 1 for DDP and FSDP.
    Checked before the processes meet, so a bad split fails at once in every process."""
    if tcfg.parallel != "hsdp":
        return 1
    replicas = tcfg.hsdp_replicas
    if replicas is None:
        if not local_world_size or world_size % local_world_size:
            raise GPTError(
                "[train] hsdp_replicas is unset and the processes do not form equal nodes "
                f"({world_size} processes, LOCAL_WORLD_SIZE {local_world_size or 'unset'}); set "
                "train.hsdp_replicas to the number of replica groups, such as the node count"
            )
        replicas = world_size // local_world_size
    if world_size % replicas:
        raise GPTError(
            f"[train] hsdp_replicas = {replicas} does not split the {world_size} processes into "
            f"equal replica groups; choose a divisor of {world_size} (one replica per node: the "
            "node count)"
        )
    return replicas


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop finishes its step, saves and exits 130/143.

    Across processes the flag is agreed one step late, so that no step waits for it: the
    all-reduce started after step N is read after step N+1, by when it has arrived, and every
    process stops after that same step. A second signal quits at once (the last checkpoint on
    disk stays intact: saves are atomic), unless both are SIGTERM.
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
        if self.signum is None:
            self.signum = signum
        elif not signum == self.signum == signal.SIGTERM:
            raise SystemExit(EXIT_CODES[signal.Signals(signum)])
        # a SIGTERM repeated is the same request, not an insistence: SLURM signals every
        # process of a job step and torchrun forwards its own, so a worker gets two

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


def shard(model: GPT, device: torch.device, dtype: torch.dtype, replicas: int = 1) -> Any:
    """FSDP2 on each block, then on the root (embeddings, final norm, head), in place: over
    every process, or as HSDP over a 2-D mesh of `replicas` groups (rows of the mesh: replica r
    is ranks r * S to r * S + S - 1) that each shard over their S processes; returns the mesh.

    The model is on the meta device (`Dist.build`): fully_shard splits its parameters' shapes
    and `to_empty` then allocates only this process's rows on `device`. With a compute dtype
    below float32, the weights are gathered in it and the gradients reduced in float32 (a
    MixedPrecisionPolicy, instead of autocast); the sharded weights and the optimizer state
    stay float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    world = dist.get_world_size()
    mesh = (init_device_mesh(device.type, (world,)) if replicas == 1 else
            init_device_mesh(device.type, (replicas, world // replicas),
                             mesh_dim_names=("replicate", "shard")))
    options: dict[str, Any] = {"mesh": mesh}
    if dtype != torch.float32:
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for block in model.transformer.h:
        fully_shard(block, **options)
    fully_shard(model, **options)
    return mesh


def release_groups(mesh: Any) -> None:
    """Make `mesh` let go of its process groups, which it would otherwise keep alive for as
    long as DTensor's caches keep it. Its registry is private: in a torch without one there is
    nothing to release here, and tests/test_parallel.py says so by the threads left running."""
    registry = getattr(mesh, "_pg_registry", None)
    if isinstance(registry, dict):
        registry.clear()


def memory_per_process(
    n_params: int, n_trained: int, optimizer_bytes: int, largest_block: int, tcfg: TrainConfig,
    nproc: int,
) -> dict[str, float]:
    """Bytes each of `nproc` processes holds for weights, gradients (of the `n_trained`
    parameters that train: all, or a LoRA finetune's adapters) and optimizer state (all
    float32; `optimizer_bytes` for the whole model), before activations.

    DDP holds all of it in every process; FSDP 1/N of each, HSDP 1/S (S = N / its replica
    groups, as `replica_groups` counts them on one node), plus `gathered`: two blocks' weights
    whole (the one running and the next, gathered ahead), in float32 (half in bfloat16).
    """
    sharded = tcfg.parallel in SHARDED and nproc > 1  # one process holds the whole model
    shards = nproc // replica_groups(tcfg, nproc, nproc) if sharded else 1
    return {
        "weights": 4 * n_params / shards,
        "gradients": 4 * n_trained / shards,
        "optimizer": optimizer_bytes / shards,
        "gathered": 2 * 4 * largest_block if shards > 1 else 0.0,
    }
