"""Run under torchrun by tests/test_parallel.py: `Muon` on matrices split by rows over a device
mesh, stepped with given gradients; rank 0 saves the whole weights and momentum buffers of
each layout to the file named on the command line, for the test to hold against
torch.optim.Muon on whole tensors."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from gpt.optim import Muon

# uneven rows (ceil(n / N) a process, the last fewer), a matrix with fewer rows than processes
SHAPES = [(7, 5), (5, 7), (1, 4), (4, 9), (12, 3)]
STEPS = 3


def inputs() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """The initial weights and each step's gradients, the same in every process and the test."""
    torch.manual_seed(0)
    weights = [torch.randn(shape) for shape in SHAPES]
    return weights, [[torch.randn(shape) for shape in SHAPES] for _ in range(STEPS)]


def make(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Two groups, to step both of torch's momentum kinds, with weight decay."""
    return (Muon if params and hasattr(params[0], "device_mesh") else torch.optim.Muon)(
        [{"params": params[:3]}, {"params": params[3:], "nesterov": False}],
        lr=0.02, weight_decay=0.1,
    )


def main(out: str) -> None:
    dist.init_process_group("gloo")
    world = dist.get_world_size()
    layouts = {  # FSDP's mesh, and HSDP's 2-D one (replicas, shards) both ways round
        "fsdp": (init_device_mesh("cpu", (world,)), [Shard(0)]),
        "hsdp-shards": (init_device_mesh("cpu", (1, world)), [Replicate(), Shard(0)]),
        "hsdp-replicas": (init_device_mesh("cpu", (world, 1)), [Replicate(), Shard(0)]),
    }
    weights, grads = inputs()
    saved = {}
    for name, (mesh, placements) in layouts.items():
        params = [torch.nn.Parameter(distribute_tensor(w, mesh, placements)) for w in weights]
        optimizer = make(params)
        for step in grads:
            for param, grad in zip(params, step, strict=True):
                param.grad = distribute_tensor(grad, mesh, placements)
            optimizer.step()
        saved[name] = {
            "weights": [p.full_tensor() for p in params],
            "momentum": [optimizer.state[p]["momentum_buffer"].full_tensor() for p in params],
        }
    if dist.get_rank() == 0:
        torch.save(saved, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
