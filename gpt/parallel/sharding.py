"""Sharded tensors: which rows of each parameter a process holds under FSDP2 and HSDP, and
the work that needs more than those rows.

FSDP2 splits every parameter by rows (dim 0) over its shard group, as torch.chunk does
(`rows_of`). From the rows alone, this module fills a sharded model (GPT's initialisation,
`init_rows`, or a start's weights read by rows, `fill_rows`), clips the gradients by their norm
over the whole model (`clip_grad_norm`), gathers the weights whole for a checkpoint
(`full_model_state`), hands Muon each whole matrix on one process of the group
(`on_whole_matrices`), and gives the optimizer state as this process's rows, which any layout
reads back (`local_optimizer_state`, `load_local_optimizer_state`).

With the package's face (gpt/parallel/__init__.py), which makes the processes and the
layouts, it is all that touches torch.distributed; every function here takes a plain tensor as
a whole one, so one process calls the same code.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gpt.layout import OptimizerRows, Rows
from gpt.model import GPT


def init_rows(model: GPT) -> None:
    """GPT's initialisation (`GPT.init_steps`) on a sharded model: each step draws its
    parameter whole on the CPU, from the global RNG as one process does, and keeps this
    process's rows; the weights are bitwise GPT(config)'s, and at most one parameter is whole."""
    GPT.draw_as_constructed(model.config)
    for name, init in model.init_steps():
        param = model.get_parameter(name)
        whole = torch.empty(param.shape)  # float32 on the CPU, where GPT(config) draws it
        init(whole)
        fill_rows(param, whole.__getitem__)


def fill_rows(param: torch.Tensor, read: Callable[[slice], torch.Tensor]) -> None:
    """Copy into `param` the rows this process holds (all of a whole parameter), as
    `read(rows)` gives them: a sharded model is filled without reading any weight whole."""
    held = rows_of(param)
    start, stop = held if held is not None else (0, param.shape[0])
    with torch.no_grad():
        local_rows(param).copy_(read(slice(start, stop)))


def clip_grad_norm(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clip the gradients to `max_norm` in total, as torch's clip_grad_norm_ does; the norm
    before clipping, a plain 0-dim float32 tensor, the same in every process.

    The squares are summed in float64, each process over its rows and then across its shard
    group, so the norm rounds to the same float32 in every layout. torch's own sums FSDP's
    shards in another order than one process's whole tensors; the last bit of the clipping
    factor that changes is enough for Muon's bfloat16 Newton-Schulz to move the loss by 1e-4
    within a few steps.
    """
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    squares = torch.zeros((), dtype=torch.float64, device=local_rows(grads[0]).device)
    for grad in grads:
        squares += torch.linalg.vector_norm(local_rows(grad), dtype=torch.float64).square()
    if is_sharded(grads[0]):  # under FSDP2 every parameter is; replicas hold the same rows
        dist.all_reduce(squares, group=_shard_group(grads[0])[0])
    norm = squares.sqrt().float()
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # torch's factor, from our norm
    for grad in grads:
        local_rows(grad).mul_(coef)
    return norm


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
    """The rows of `param` this process holds (`_row_counts`): None for a whole (unsharded)
    parameter."""
    if not is_sharded(param):
        return None
    _, rank, size = _shard_group(param)
    counts = _row_counts(param.shape[0], size)
    start = sum(counts[:rank])
    stop = start + counts[rank]
    held = local_rows(param).shape[0]
    assert stop - start == held, f"{tuple(param.shape)}: rows {start}:{stop}, local {held}"
    return start, stop


def local_rows(tensor: torch.Tensor) -> torch.Tensor:
    """The rows of `tensor` this process holds, as a plain tensor sharing its memory (an
    in-place change changes `tensor`): all of it where it is not sharded."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def on_whole_matrices(
    params: list[torch.Tensor], rows: list[torch.Tensor],
    fn: Callable[[torch.Tensor], torch.Tensor], dtype: torch.dtype,
) -> list[torch.Tensor]:
    """`fn` of each whole matrix whose rows this process holds (`rows[i]`, laid out like
    `params[i]`), and this process's rows of each result, in `dtype`.

    A plain parameter's matrix is whole here. A sharded one's is sent to one process of its
    shard group, its owner, which applies `fn` once; the owners share the work (balanced by
    its cost), and the rows travel in `dtype` both ways, in one all-to-all each way. Under
    HSDP each replica group does the same, over its own shard group.
    """
    done: dict[int, torch.Tensor] = {}
    groups: dict[tuple[Any, int, int], list[int]] = {}  # split ones by shard group (FSDP: one)
    for i, param in enumerate(params):
        split = _shard_group(param) if is_sharded(param) else None
        if split is None or split[2] == 1:  # whole in this process
            done[i] = fn(rows[i]).to(dtype)
        else:
            groups.setdefault(split, []).append(i)
    for (group, rank, size), which in groups.items():
        results = _owned_and_returned([params[i].shape for i in which],
                                      [rows[i] for i in which], fn, dtype, group, rank, size)
        done.update(zip(which, results, strict=True))
    return [done[i] for i in range(len(params))]


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether `tensor` is split across processes (an FSDP parameter, its gradient or state)."""
    return hasattr(tensor, "device_mesh")


def _shard_group(param: torch.Tensor) -> tuple[Any, int, int]:
    """The process group `param`'s rows are split over (the mesh dimension placed Shard(0),
    every other one a replica), this process's rank in it and its size."""
    placements = param.placements  # type: ignore[attr-defined]
    (dim,) = [d for d, placed in enumerate(placements) if placed.is_shard(0)]
    assert all(placed.is_replicate() for d, placed in enumerate(placements) if d != dim)
    mesh = param.device_mesh  # type: ignore[attr-defined]
    return mesh.get_group(dim), mesh.get_local_rank(dim), mesh.size(dim)


def _owned_and_returned(
    shapes: list[torch.Size], rows: list[torch.Tensor], fn: Callable[[torch.Tensor], torch.Tensor],
    dtype: torch.dtype, group: Any, rank: int, size: int,
) -> list[torch.Tensor]:
    """`on_whole_matrices` within one shard group: every process's rows of each matrix to
    its owner, `fn` there, and each process's rows of the result back."""
    held = [_row_counts(shape[0], size) for shape in shapes]  # rows of each matrix, by rank
    width = [shape[1:].numel() for shape in shapes]
    owner = _owners(shapes, size)
    mine = [i for i in range(len(shapes)) if owner[i] == rank]
    # there: to each owner, this process's rows of its matrices; from each process, its rows
    # of this process's matrices
    to_owner = [[rows[i].to(dtype).flatten() for i in range(len(shapes)) if owner[i] == dest]
                for dest in range(size)]
    from_each = [[held[i][src] * width[i] for i in mine] for src in range(size)]
    received = _all_to_all(to_owner, from_each, group, rows[0].new_empty(0, dtype=dtype))
    whole = {i: torch.cat([received[src][k] for src in range(size)]).view(shapes[i])
             for k, i in enumerate(mine)}
    # back: to each process, its rows of the results of this process's matrices
    start = [[sum(counts[:r]) for r in range(size)] for counts in held]
    results = {i: fn(whole[i]).to(dtype) for i in mine}
    to_each = [[results[i][start[i][dest]: start[i][dest] + held[i][dest]].flatten()
                for i in mine] for dest in range(size)]
    from_owner = [[rows[i].numel() for i in range(len(shapes)) if owner[i] == src]
                  for src in range(size)]
    returned = _all_to_all(to_each, from_owner, group, rows[0].new_empty(0, dtype=dtype))
    ordered = iter(piece for src in range(size) for piece in returned[src])
    by_owner = sorted(range(len(shapes)), key=lambda i: owner[i])  # the order they came in
    out: dict[int, torch.Tensor] = {i: next(ordered).view_as(rows[i]) for i in by_owner}
    return [out[i] for i in range(len(shapes))]


def _row_counts(n: int, size: int) -> list[int]:
    """The rows of an n-row parameter each of `size` processes holds: FSDP2 splits dim 0 as
    torch.chunk does, ceil(n / size) a process, the last ones fewer or none."""
    chunk = -(-n // size)
    return [min(n, (r + 1) * chunk) - min(n, r * chunk) for r in range(size)]


def _owners(shapes: list[torch.Size], size: int) -> list[int]:
    """The process that works on each matrix: the largest first, each to the least loaded so
    far, by the cost of a Newton-Schulz step (rows x cols x the smaller of the two)."""
    cost = [shape.numel() * min(shape) for shape in shapes]
    load, owner = [0] * size, [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: -cost[i]):  # stable: the same everywhere
        owner[i] = min(range(size), key=load.__getitem__)
        load[owner[i]] += cost[i]
    return owner


def _all_to_all(
    send: list[list[torch.Tensor]], receive: list[list[int]], group: Any, empty: torch.Tensor
) -> list[list[torch.Tensor]]:
    """Send each process its list of flat tensors (`send[dest]`); the flat tensors each process
    sent here, of `receive[src]` elements each, in one all-to-all (`empty`: their dtype and
    device, for a process that sends nothing)."""
    sent = torch.cat([empty, *(t for pieces in send for t in pieces)])
    counts = [sum(sizes) for sizes in receive]
    got = sent.new_empty(sum(counts))
    dist.all_to_all_single(got, sent, counts, [sum(t.numel() for t in p) for p in send],
                           group=group)
    return [list(part.split(sizes)) for part, sizes in zip(got.split(counts), receive,
                                                         strict=True)]


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters in the order of the optimizer's state dict (its integer keys)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def _named(optimizer: Any) -> dict[str, torch.optim.Optimizer] | None:
    """The optimizers of a combined one (Muon's and AdamW's, whose state dicts are kept under
    their names), or None for one torch optimizer."""
    return None if isinstance(optimizer, torch.optim.Optimizer) else optimizer.optimizers


def optimizer_rows(optimizer: Any) -> OptimizerRows:
    """The rows this process holds of each sharded parameter, {key: (start, stop)} by state key
    (a combined optimizer's by name first), which is what it reads of a saved state."""
    if (named := _named(optimizer)) is not None:
        return {name: optimizer_rows(opt) for name, opt in named.items()}
    return {key: held for key, p in enumerate(optimizer_params(optimizer))
            if (held := rows_of(p))}


def local_optimizer_state(optimizer: Any) -> dict[str, Any]:
    """The optimizer's state dict with this process's rows as plain tensors, and `rows`:
    {key: [start, stop]} for each sharded parameter (a combined optimizer: each one's, by name).
    """
    if (named := _named(optimizer)) is not None:
        return {name: local_optimizer_state(opt) for name, opt in named.items()}
    state = optimizer.state_dict()  # its per-parameter dicts are the optimizer's own: not edited
    rows = {}
    for key, param in enumerate(optimizer_params(optimizer)):
        if (held := rows_of(param)) is not None:
            rows[key] = list(held)
    local = {
        key: {name: local_rows(value) for name, value in entry.items()}
        for key, entry in state["state"].items()
    }
    return {"state": local, "param_groups": state["param_groups"], "rows": rows}


def load_local_optimizer_state(optimizer: Any, state: dict[str, Any]) -> None:
    """Load a state dict whose tensors hold this process's rows (as `rows_of` gives them)."""
    from torch.distributed.tensor import DTensor

    if (named := _named(optimizer)) is not None:
        for name, opt in named.items():
            load_local_optimizer_state(opt, state[name])
        return
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
