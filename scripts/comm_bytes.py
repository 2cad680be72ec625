"""Bytes each process sends per training step under FSDP, by collective: FSDP's own (weights
all-gathered for the forward and again for the backward, gradients reduce-scattered) and, with
Muon, its two all-to-alls (each matrix's rows to the process that orthogonalises it, and the
result's rows back).

N gloo processes on the CPU (torchrun) train a GPT-2-124M-shaped model (configs/gpt2_124m.toml)
for `--steps` steps on random tokens, once with AdamW and once with Muon plus AdamW, through
gpt's own sharding, clipping and optimizers; every call to torch.distributed's collectives is
counted with the size of its tensors. Byte counts do not depend on the machine's speed or load.

    python scripts/comm_bytes.py [--nproc 2] [--steps 2] [--dtype float32] [--write-docs]

"Sent" is what one process puts on the wire with the usual algorithms: an all-gather of an
S-byte result sends (N-1)/N x S, a reduce-scatter of S bytes (N-1)/N x S, an all-reduce
2 (N-1)/N x S, an all-to-all everything but the process's own part (counted exactly).
`--write-docs` writes the comm-bytes block of docs/training.md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import doc_tables as docs

ROOT = Path(__file__).resolve().parents[1]
COLLECTIVES = ("all_gather_single", "all_gather_into_tensor", "reduce_scatter_single",
               "reduce_scatter_tensor", "all_reduce", "all_to_all_single")
TOKENS = 64  # per process and step: the bytes moved do not depend on it


def sent_bytes(name: str, call: inspect.BoundArguments, size: int) -> tuple[int, int]:
    """(the whole tensor's bytes, the bytes this process sends) of one collective call."""
    args = call.arguments
    if name.startswith("all_gather"):
        whole = args["output_tensor"].nbytes
        return whole, whole * (size - 1) // size
    if name.startswith("reduce_scatter"):
        whole = args.get("input", args.get("input_tensor")).nbytes
        return whole, whole * (size - 1) // size
    if name == "all_reduce":
        whole = args["tensor"].nbytes
        return whole, 2 * whole * (size - 1) // size
    sent = args["input"]  # all_to_all_single: all but this process's own split
    splits = args.get("input_split_sizes") or [sent.numel() // size] * size
    rank = dist_rank(args.get("group"))
    return sent.nbytes, (sent.numel() - splits[rank]) * sent.element_size()


def dist_rank(group: Any) -> int:
    import torch.distributed as dist

    return dist.get_rank(group)


def group_size(group: Any) -> int:
    """The processes in a collective's group: a process group, or a DTensor's (mesh, dim)."""
    import torch.distributed as dist

    if isinstance(group, tuple):
        mesh, dim = group
        return mesh.size(dim)
    return dist.get_world_size(group)


class Counter:
    """Every collective call made through torch.distributed, by phase and name: calls, whole
    bytes and bytes sent."""

    def __init__(self) -> None:
        self.phase = "forward and backward"
        self.seen: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])

    def install(self) -> None:
        """Count torch.distributed's collectives (FSDP's, Muon's) and the functional all-reduce
        a DTensor's partial sums take (the clipping norm's)."""
        import torch.distributed as dist
        import torch.distributed._functional_collectives as funcol

        for name in COLLECTIVES:
            setattr(dist, name, self._counted(name, getattr(dist, name)))
        funcol.all_reduce = self._counted("all_reduce", funcol.all_reduce)

    def _counted(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        signature = inspect.signature(original)

        def counted(*args: Any, **kwargs: Any) -> Any:
            call = signature.bind(*args, **kwargs)
            if "self" in call.arguments:  # the functional all-reduce
                call.arguments["tensor"] = call.arguments["self"]
            whole, sent = sent_bytes(name, call, group_size(call.arguments.get("group")))
            entry = self.seen[self.phase, name]
            entry[0], entry[1], entry[2] = entry[0] + 1, entry[1] + whole, entry[2] + sent
            return original(*args, **kwargs)

        return counted

    @contextmanager
    def during(self, phase: str) -> Iterator[None]:
        before, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = before


def worker(args: argparse.Namespace) -> None:
    """One process of the run: `--steps` steps, then rank 0 writes the counts as JSON."""
    import torch
    import torch.distributed as dist

    from gpt import parallel
    from gpt.config import load_config
    from gpt.model import GPT
    from gpt.optim import make_optimizer
    from gpt.parallel import sharding

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    cfg = load_config(ROOT / "configs" / "gpt2_124m.toml",
                      ["model.vocab_size=50257", f"train.optimizer={args.optimizer}"])
    torch.manual_seed(0)
    model = GPT(cfg.model)
    parallel.shard(model, torch.device("cpu"), getattr(torch, args.dtype))
    optimizer = make_optimizer(model, cfg.train, torch.device("cpu"))
    counter = Counter()
    counter.install()
    for _ in range(args.steps):
        tokens = torch.randint(0, cfg.model.vocab_size, (1, TOKENS + 1))
        _, loss = model(tokens[:, :-1], tokens[:, 1:])
        loss.backward()
        with counter.during("clipping"):
            sharding.clip_grad_norm(model, cfg.train.grad_clip)
        with counter.during("optimizer step"):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if dist.get_rank() == 0:
        rows = [{"phase": phase, "collective": name, "calls": c / args.steps,
                 "whole": w / args.steps, "sent": s / args.steps}
                for (phase, name), (c, w, s) in counter.seen.items()]
        params = sum(p.numel() for p in model.parameters())
        muon = sum(p.numel() for g in optimizer.param_groups if "ns_steps" in g
                   for p in g["params"])
        Path(args.out).write_text(json.dumps({"rows": rows, "params": params, "muon": muon,
                                              "tied": cfg.model.tie_embeddings}))
    dist.barrier()
    dist.destroy_process_group()


def run(optimizer: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The counts of one torchrun of `worker` with `optimizer`."""
    out = work / f"{optimizer}.json"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.nproc}", __file__, "--worker", "--optimizer", optimizer,
               "--steps", str(args.steps), "--dtype", args.dtype, "--out", str(out)]
    done = subprocess.run(command, cwd=work, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise SystemExit(f"the {optimizer} run failed:\n{done.stderr[-3000:]}")
    return json.loads(out.read_text())


def mib(n: float) -> str:
    return f"{n / 2**20:,.1f} MiB" if n >= 2**20 else f"{n / 2**10:,.1f} KiB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nproc", type=int, default=2, help="gloo processes")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="FSDP's compute dtype: the weights are gathered in it")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--optimizer", default="muon", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    docs.add_doc_options(parser)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    doc = docs.docs_target(parser, args, "comm-bytes", default=ROOT / "docs" / "training.md")
    load_before = docs.load_average()
    rows, totals = [], {}
    with tempfile.TemporaryDirectory(prefix="comm-bytes-") as tmp:
        for optimizer in ("adamw", "muon"):
            result = run(optimizer, args, Path(tmp))
            totals[optimizer] = result
            for r in sorted(result["rows"], key=lambda r: (r["phase"], r["collective"])):
                rows.append([optimizer, r["phase"], r["collective"], f"{r['calls']:g}",
                             mib(r["whole"]), mib(r["sent"])])
                print(" | ".join(rows[-1]), flush=True)
    table = docs.markdown_table(
        ["optimizer", "when", "collective", "calls", "whole tensors", "sent by each process"],
        rows)
    sent = {name: sum(r["sent"] for r in t["rows"]) for name, t in totals.items()}
    muon_sent = sum(r["sent"] for r in totals["muon"]["rows"] if r["phase"] == "optimizer step")
    summary = (f"Per step and process: {mib(sent['adamw'])} with AdamW, {mib(sent['muon'])} "
               f"with Muon, of which Muon's all-to-alls {mib(muon_sent)} "
               f"({100 * muon_sent / sent['adamw']:.1f}% of FSDP's own traffic).")
    print(table, summary, sep="\n\n")
    params, muon = totals["muon"]["params"], totals["muon"]["muon"]
    head = "tied" if totals["muon"]["tied"] else "untied"
    notes = [f"{args.nproc} gloo processes, {params / 1e6:.1f}M parameters (GPT-2-124M's shape, "
             f"GPT-2's padded vocabulary, {head} head), {muon / 1e6:.1f}M of them Muon's; FSDP "
             f"computes in {args.dtype}; {TOKENS} tokens a process a step, averaged over "
             f"{args.steps} steps"]
    docs.publish(doc, "comm-bytes", [table, summary], load_before, notes)


if __name__ == "__main__":
    main()
