"""Run under torchrun by tests/test_parallel.py: `Muon` on matrices split by rows over a device
mesh, and torch.optim.Muon on the whole matrices, stepped with the same gradients; rank 0
saves the whole weights and momentum buffers of each to the file named on the command line."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from gpt.optim import Muon

# uneven rows (ceil(n / N) a process, the last fewer), a matrix with fewer rows than processes
SHAPES = [(7, 5), (5, 7), (1, 4), (4, 9), (12, 3)]
STEPS = 3


def stepped(
    optimizer_class: type[torch.optim.Optimizer], params: list[torch.nn.Parameter],
    grads: list[list[torch.Tensor]], place: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, list[torch.Tensor]]:
    """The whole weights and momentum buffers after a step with each of `grads` (placed like
    the weights); two groups, to step both of torch's momentum kinds, with weight decay."""
    groups = [{"params": params[:3]}, {"params": params[3:], "nesterov": False}]
    optimizer = optimizer_class(groups, lr=0.02, weight_decay=0.1)
    for step in grads:
        for param, grad in zip(params, step, strict=True):
            param.grad = place(grad)
        optimizer.step()
    whole = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t  # noqa: E731
    return {"weights": [whole(p.detach()) for p in params],
            "momentum": [whole(optimizer.state[p]["momentum_buffer"]) for p in params]}


def main(out: str) -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    layouts = {  # FSDP's mesh, and HSDP's 2-D one (replicas, shards) both ways round
        "fsdp": (init_device_mesh("cpu", (world,)), [Shard(0)]),
        "hsdp-shards": (init_device_mesh("cpu", (1, world)), [Replicate(), Shard(0)]),
        "hsdp-replicas": (init_device_mesh("cpu", (world, 1)), [Replicate(), Shard(0)]),
    }
    torch.manual_seed(0)  # the same in every process
    weights = [torch.randn(shape) for shape in SHAPES]
    grads = [[torch.randn(shape) for shape in SHAPES] for _ in range(STEPS)]
    saved = {"torch": stepped(torch.optim.Muon, [torch.nn.Parameter(w.clone()) for w in weights],
                              grads, torch.clone)}
    for name, (mesh, placements) in layouts.items():
        place = functools.partial(distribute_tensor, device_mesh=mesh, placements=placements)
        saved[name] = stepped(Muon, [torch.nn.Parameter(place(w)) for w in weights], grads, place)
    if dist.get_rank() == 0:
        torch.save(saved, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
