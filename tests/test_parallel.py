"""FSDP2 and HSDP across processes, activation checkpointing in training, and checkpoints that
move between layouts (one process, DDP, FSDP, HSDP). The multi-process tests run 2 gloo
processes on the CPU through torchrun, 4 for HSDP (2 replicas of 2)."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gpt import checkpoint as ckpt
from gpt import layout, parallel
from gpt.cli import app
from gpt.config import load_config
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.parallel import sharding
from gpt.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# the same global batch in every layout: 2 micro-batches a step, one per process under torchrun
STEPS = ["--set", "train.grad_accum_steps=2", "--set", "train.log_interval=1"]
STEPS4 = ["--set", "train.grad_accum_steps=4", "--set", "train.log_interval=1"]  # 4 processes
HSDP = ["--set", "train.parallel=hsdp", "--set", "train.hsdp_replicas=2"]
NO_DROPOUT = ["--set", "model.dropout=0.0"]


def one_process(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "gpt", "train", "--config", "tiny.toml", *args],
                   check=True, timeout=300, capture_output=True, env=ENV)


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


def assert_close_losses(a: dict[int, float], b: dict[int, float], within: float = 1e-5) -> None:
    assert sorted(a) == sorted(b)
    worst = max(abs(a[i] - b[i]) for i in a)
    assert worst < within, f"losses differ by up to {worst}"


def sample(checkpoint: Path) -> str:
    result = runner.invoke(app, ["sample", "--checkpoint", str(checkpoint), "--prompt", "def ",
                                 "--max-new-tokens", "40", "--seed", "3"])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.slow
@pytest.mark.parametrize("layout", [
    ["--set", "train.parallel=fsdp"],
    ["--set", "train.parallel=fsdp", "--set", "train.activation_checkpointing=true"],
    ["--set", "train.parallel=ddp", "--set", "train.activation_checkpointing=true"],
], ids=["fsdp", "fsdp-activation-checkpointing", "ddp-activation-checkpointing"])
def test_two_processes_give_the_losses_of_one(
    tiny_run: Path, torchrun: Callable[..., None], layout: list[str]
) -> None:
    """Two processes with the same global batch as one (which accumulates two micro-batches):
    the same loss curve, to float rounding, whichever way the processes share the work."""
    common = [*STEPS, *NO_DROPOUT, "--set", "train.max_iters=12"]
    one_process(*common, "--set", "train.out_dir=one")
    torchrun(*common, *layout, "--set", "train.out_dir=two")
    assert_close_losses(losses(tiny_run / "one"), losses(tiny_run / "two"))
    assert len(losses(tiny_run / "one")) == 12


MUON = ["--set", "train.optimizer=muon"]


@pytest.mark.slow
@pytest.mark.parametrize("layout, nproc", [
    (["--set", "train.parallel=fsdp"], 2),
    (HSDP, 4),
], ids=["fsdp", "hsdp"])
def test_muon_sharded_gives_the_losses_of_one_process(
    tiny_run: Path, torchrun: Callable[..., None], layout: list[str], nproc: int
) -> None:
    """Muon for the blocks' matrices and AdamW for the rest, with gradient clipping, under FSDP
    in two processes and HSDP in two replicas of two, against one process accumulating the
    same micro-batches: the same loss curve.

    Two processes sum two micro-batches' gradients as one process does, so the curves agree to
    1e-5 (in fact bit for bit). Four sum four in another order (within a replica, then across),
    a rounding of the gradients that Muon's bfloat16 Newton-Schulz lifts to about 1.5e-5 in 12
    steps (AdamW's stays below 1e-5)."""
    steps = STEPS if nproc == 2 else STEPS4
    common = [*steps, *NO_DROPOUT, *MUON, "--set", "train.max_iters=12"]
    one_process(*common, "--set", "train.out_dir=one")
    torchrun(*common, *layout, "--set", "train.out_dir=two", nproc=nproc)
    within = 1e-5 if nproc == 2 else 5e-5
    assert_close_losses(losses(tiny_run / "one"), losses(tiny_run / "two"), within)
    assert len(losses(tiny_run / "one")) == 12


def test_activation_checkpointing_trains_bit_for_bit_the_same(tiny_run: Path) -> None:
    """In one process, with dropout: recomputing the blocks replays their dropout masks."""
    base = ["train.max_iters=6", "train.log_interval=1", "train.eval_interval=6"]
    assert train(load_config("tiny.toml", [*base, "train.out_dir=plain"])) == 0
    assert train(load_config("tiny.toml", [*base, "train.out_dir=recomputed",
                                           "train.activation_checkpointing=true"])) == 0
    assert losses(tiny_run / "plain") == losses(tiny_run / "recomputed")


@pytest.mark.slow
def test_an_fsdp_run_stopped_and_resumed_is_bitwise_the_uninterrupted_one(
    tiny_run: Path, torchrun: Callable[..., None]
) -> None:
    """With dropout (each rank its own masks), through checkpoints whose optimizer state is
    split into one file per process."""
    common = [*STEPS, "--set", "train.parallel=fsdp", "--set", "train.lr_decay_iters=8",
              "--set", "train.eval_interval=4"]
    torchrun(*common, "--set", "train.max_iters=8", "--set", "train.out_dir=straight")
    torchrun(*common, "--set", "train.max_iters=4", "--set", "train.out_dir=split")
    torchrun(*common, "--set", "train.max_iters=8", "--set", "train.out_dir=split")
    curve = lambda out: [  # noqa: E731  (everything but the wall times)
        (r["iter"], r.get("loss"), r.get("train_loss"), r.get("val_loss"))
        for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
    ]
    assert len(curve(tiny_run / "straight")) == 8 + 3
    assert curve(tiny_run / "split") == curve(tiny_run / "straight")

    saved = tiny_run / "split" / "ckpt-0000008"
    shards = ["optimizer-00000-of-00002.pt", "optimizer-00001-of-00002.pt"]
    assert sorted(p.name for p in saved.iterdir()) == sorted(
        ["model.safetensors", "state.json", *shards])
    found = ckpt.Checkpoint.open(saved)
    assert found.optimizer_files == shards and found.has_optimizer
    weights = found.load_model().state_dict()
    assert weights["transformer.wte.weight"].shape[0] == found.config.model.padded_vocab_size

    (saved / shards[1]).unlink()  # one process's rows lost: the checkpoint is incomplete
    with pytest.raises(GPTError, match=rf"{shards[1]} is missing: the checkpoint is incomplete"):
        ckpt.Checkpoint.open(saved)
    (saved / shards[0]).unlink()  # all of them: a weights-only checkpoint, for inference
    assert not ckpt.Checkpoint.open(saved).has_optimizer
    assert sample(saved)


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_every_rank_and_the_run_resumes_exactly(
    tiny_run: Path, torchrun: Callable[..., None]
) -> None:
    """SIGTERM to the torchrun agent (as SLURM and Kubernetes send it), which forwards it to
    its workers: they agree on one step, save a complete FSDP checkpoint (every process's
    optimizer rows), exit 143, and the run resumes to the uninterrupted losses."""
    common = [*STEPS, "--set", "train.parallel=fsdp", "--set", "train.max_iters=60",
              "--set", "train.lr_decay_iters=60", "--set", "train.eval_interval=1000",
              "--set", "train.checkpoint_interval=1000"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node=2", "-m", "gpt", "train", "--config", "tiny.toml", *common,
               "--set", "train.out_dir=split"]
    agent = subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    log = tiny_run / "split" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and agent.poll() is None and len(losses_so_far(log)) < 3:
        time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)
    stdout, stderr = agent.communicate(timeout=120)
    # the agent itself ends with torchrun's SignalException; its workers stopped in time
    assert "Received 15 death signal" in stderr and "SIGKILL" not in stderr, stderr[-3000:]
    saved = ckpt.Checkpoint.open(tiny_run / "split")  # complete, or it is refused
    stopped = saved.state["iter"]
    assert f"stopped by signal after iteration {stopped}; saved split/ckpt-" in stdout
    assert 3 <= stopped < 60 and saved.optimizer_files == [
        "optimizer-00000-of-00002.pt", "optimizer-00001-of-00002.pt"]

    torchrun(*common, "--set", "train.out_dir=split")
    torchrun(*common, "--set", "train.out_dir=straight")
    assert losses(tiny_run / "split") == losses(tiny_run / "straight")


def losses_so_far(log: Path) -> list[str]:
    """The complete lines of a metrics log being written."""
    return [line for line in log.read_text().splitlines() if line.endswith("}")] \
        if log.exists() else []


@pytest.mark.slow
def test_lora_under_ddp_gives_the_losses_of_one_process_and_resumes_in_one(
    tiny_run: Path, torchrun: Callable[..., None]
) -> None:
    """A LoRA finetune in two DDP processes: one process's loss curve, checkpoints of the
    adapters alone, and a resume in one process."""
    one_process("--set", "train.out_dir=base", "--set", "train.max_iters=10")
    lora = ["--set", "train.init_from=base", "--set", "train.finetune=lora",
            "--set", "train.learning_rate=3e-2", "--set", "train.lr_decay_iters=12"]
    common = [*STEPS, *NO_DROPOUT, *lora]
    one_process(*common, "--set", "train.max_iters=12", "--set", "train.out_dir=one")
    torchrun(*common, "--set", "train.max_iters=8", "--set", "train.out_dir=two")
    one_process(*common, "--set", "train.max_iters=12", "--set", "train.out_dir=two")
    assert_close_losses(losses(tiny_run / "one"), losses(tiny_run / "two"))
    saved = ckpt.Checkpoint.open(tiny_run / "two")
    assert saved.lora is not None and saved.lora["base"] == "base/ckpt-0000010"
    assert all(k.endswith((".lora_A", ".lora_B"))
               for k in load_file(str(saved.path / layout.WEIGHTS)))
    assert sample(saved.path)


def moments(state: dict) -> dict[tuple, torch.Tensor]:
    """Every tensor of a saved optimizer state by its path (Muon's and AdamW's by name first)."""
    if "state" not in state:
        return {(name, *path): v for name, part in state.items()
                for path, v in moments(part).items()}
    return {(key, name): v for key, entry in state["state"].items() for name, v in entry.items()}


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_checkpoints_move_between_one_process_fsdp_and_ddp(
    tiny_run: Path, torchrun: Callable[..., None], optimizer: str
) -> None:
    """One process to 4 steps, FSDP to 8, one process to 10, DDP to 12: the loss curve, the
    weights and the optimizer state (AdamW's moments; Muon's momentum buffers and AdamW's) of
    a run that never changed layout, to float rounding. Had a move lost the optimizer state,
    the next steps' losses would differ far more."""
    common = [*STEPS, *NO_DROPOUT, "--set", "train.lr_decay_iters=12",
              "--set", "train.checkpoint_interval=2", "--set", "train.keep_last=10",
              *(MUON if optimizer == "muon" else [])]
    one_process(*common, "--set", "train.max_iters=12", "--set", "train.out_dir=ref")
    one_process(*common, "--set", "train.max_iters=4", "--set", "train.out_dir=moved")
    torchrun(*common, "--set", "train.parallel=fsdp", "--set", "train.max_iters=8",
             "--set", "train.out_dir=moved")
    one_process(*common, "--set", "train.max_iters=10", "--set", "train.out_dir=moved")
    torchrun(*common, "--set", "train.max_iters=12", "--set", "train.out_dir=moved")
    assert_close_losses(losses(tiny_run / "ref"), losses(tiny_run / "moved"))

    ref, fsdp = ckpt.Checkpoint.open(tiny_run / "ref" / "ckpt-0000008"), ckpt.Checkpoint.open(
        tiny_run / "moved" / "ckpt-0000008")
    assert fsdp.optimizer_files == ["optimizer-00000-of-00002.pt", "optimizer-00001-of-00002.pt"]
    assert_same_state(ref, fsdp)
    has_momentum = any("momentum_buffer" in path for path in moments(ref.optimizer_state()))
    assert has_momentum == (optimizer == "muon")
    # the weights gathered from the shards sample in one process as the unsharded run's do
    assert sample(fsdp.path) == sample(ref.path)


def assert_same_state(ref: ckpt.Checkpoint, moved: ckpt.Checkpoint) -> None:
    """The weights and the optimizer's moments (whole, from any layout's files) of two
    checkpoints, to float rounding."""
    ref_weights, moved_weights = ref.load_model().state_dict(), moved.load_model().state_dict()
    for name, tensor in ref_weights.items():
        torch.testing.assert_close(moved_weights[name], tensor, rtol=0, atol=1e-5)
    ref_state = moments(ref.optimizer_state())
    moved_state = moments(moved.optimizer_state())  # whole, from any layout's files
    assert sorted(ref_state) == sorted(moved_state)
    for path, value in ref_state.items():
        torch.testing.assert_close(moved_state[path], value, rtol=1e-4, atol=1e-7)


@pytest.mark.slow
def test_checkpoints_move_between_hsdp_and_the_other_layouts(
    tiny_run: Path, torchrun: Callable[..., None]
) -> None:
    """One process to 2 steps, HSDP (4 processes: 2 replicas of 2) to 4, FSDP over 4 to 6,
    HSDP to 8, DDP over 2 to 10, one process to 12: the loss curve of a run that never moved.
    Each move reads optimizer rows another shard count wrote; HSDP's first replica writes its
    2 processes' rows, and the other replica's identical rows are not written."""
    common = [*STEPS4, *NO_DROPOUT, "--set", "train.lr_decay_iters=12",
              "--set", "train.checkpoint_interval=2", "--set", "train.keep_last=10"]
    moved = [*common, "--set", "train.out_dir=moved"]
    one_process(*common, "--set", "train.max_iters=12", "--set", "train.out_dir=ref")
    one_process(*moved, "--set", "train.max_iters=2")
    torchrun(*moved, *HSDP, "--set", "train.max_iters=4", nproc=4)
    torchrun(*moved, "--set", "train.parallel=fsdp", "--set", "train.max_iters=6", nproc=4)
    torchrun(*moved, *HSDP, "--set", "train.max_iters=8", nproc=4)
    torchrun(*moved, "--set", "train.max_iters=10")
    one_process(*moved, "--set", "train.max_iters=12")
    assert_close_losses(losses(tiny_run / "ref"), losses(tiny_run / "moved"))

    for step, files in (("0000004", 2), ("0000006", 4), ("0000008", 2)):
        saved = ckpt.Checkpoint.open(tiny_run / "moved" / f"ckpt-{step}")
        assert saved.optimizer_files == [layout.optimizer_file(i, files) for i in range(files)]
        assert_same_state(ckpt.Checkpoint.open(tiny_run / "ref" / f"ckpt-{step}"), saved)


def shard_of(whole: dict, rank: int, world: int) -> dict:
    """A process's rows of a whole optimizer state, as FSDP splits them, in the file it writes
    (Muon's and AdamW's by name)."""
    if "state" not in whole:
        return {name: shard_of(part, rank, world) for name, part in whole.items()}
    state, rows = {}, {}
    for key, moments in whole["state"].items():
        n = next(v for v in moments.values() if v.dim()).shape[0]
        chunk = -(-n // world)
        start, stop = min(rank * chunk, n), min((rank + 1) * chunk, n)
        rows[key] = [start, stop]
        state[key] = {name: v if v.dim() == 0 else v[start:stop].clone()
                      for name, v in moments.items()}
    return {"state": state, "param_groups": whole["param_groups"], "rows": rows}


def write_shards(folder: Path, whole: dict, world: int) -> list[str]:
    """`whole`'s moments split by rows as FSDP splits them, one file per process."""
    names = [layout.optimizer_file(rank, world) for rank in range(world)]
    for rank, name in enumerate(names):
        ckpt.write_optimizer(folder, name, shard_of(whole, rank, world))
    return names


@pytest.mark.parametrize("world", [2, 3, 5])
def test_any_rows_of_a_sharded_or_whole_optimizer_state(tmp_path: Path, world: int) -> None:
    """Rows [start, stop) of each moment, from files written by any number of processes
    (uneven and empty shards included) or from one whole file: what a process of any layout
    reads on resume."""
    torch.manual_seed(0)
    shapes = {0: (7, 3), 1: (4,), 2: (1, 5)}
    whole = {
        "state": {key: {"step": torch.tensor(3.0), "exp_avg": torch.randn(shape),
                        "exp_avg_sq": torch.rand(shape)} for key, shape in shapes.items()},
        "param_groups": [{"lr": 0.1, "params": [0, 1, 2]}],
    }
    sharded, single = tmp_path / "sharded", tmp_path / "whole"
    sharded.mkdir(), single.mkdir()
    names = write_shards(sharded, whole, world)
    ckpt.write_optimizer(single, layout.OPTIMIZER, whole)
    for folder, files in ((sharded, names), (single, [layout.OPTIMIZER])):
        every = ckpt.load_optimizer_state(folder, files)
        assert every["param_groups"] == whole["param_groups"]
        for key, moments in whole["state"].items():
            for name, value in moments.items():
                assert torch.equal(every["state"][key][name], value)
        for wanted in ((0, 0), (0, 1), (1, 4), (3, 7)):
            rows = {key: (min(wanted[0], s[0]), min(wanted[1], s[0]))
                    for key, s in shapes.items()}
            part = ckpt.load_optimizer_state(folder, files, rows)
            for key, (start, stop) in rows.items():
                assert torch.equal(part["state"][key]["exp_avg"],
                                   whole["state"][key]["exp_avg"][start:stop])
                assert part["state"][key]["step"].item() == 3.0


@pytest.mark.parametrize("world", [2, 3])
def test_rows_of_muon_and_adamw_states_by_name(tmp_path: Path, world: int) -> None:
    """Muon's momentum buffers and AdamW's moments, saved by name: whole, or the rows of each
    that a process of another layout holds, from a sharded run's files or one whole file."""
    torch.manual_seed(0)
    whole = {
        "muon": {"state": {0: {"momentum_buffer": torch.randn(7, 3)},
                           1: {"momentum_buffer": torch.randn(1, 5)}},
                 "param_groups": [{"lr": 0.02, "params": [0, 1]}]},
        "adamw": {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.randn(4),
                                "exp_avg_sq": torch.rand(4)}},
                  "param_groups": [{"lr": 0.1, "params": [0]}]},
    }
    sharded, single = tmp_path / "sharded", tmp_path / "whole"
    sharded.mkdir(), single.mkdir()
    names = write_shards(sharded, whole, world)
    ckpt.write_optimizer(single, layout.OPTIMIZER, whole)
    rows = {"muon": {0: (2, 6), 1: (1, 1)}, "adamw": {0: (1, 3)}}
    for folder, files in ((sharded, names), (single, [layout.OPTIMIZER])):
        every = ckpt.load_optimizer_state(folder, files)
        assert [every[name]["param_groups"] for name in whole] == [
            whole[name]["param_groups"] for name in whole]
        assert moments(every).keys() == moments(whole).keys()
        assert all(torch.equal(v, moments(whole)[path]) for path, v in moments(every).items())
        part = moments(ckpt.load_optimizer_state(folder, files, rows))
        for (name, key, moment), value in moments(whole).items():
            start, stop = rows[name][key]
            assert torch.equal(part[name, key, moment], value if value.dim() == 0 else
                               value[start:stop])


def test_a_hostile_optimizer_shard_is_refused_without_running(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    whole = {"state": {0: {"exp_avg": torch.ones(4, 2)}}, "param_groups": [{"params": [0]}]}
    names = write_shards(tmp_path, whole, 2)
    torch.save({"state": Exploit()}, tmp_path / names[1])
    with pytest.raises(GPTError, match=rf"{names[1]} would call \S*system when unpickled.*"
                                       "nothing in it ran"):
        ckpt.load_optimizer_state(tmp_path, names, {0: (2, 4)})
    assert not marker.exists()


@pytest.mark.parametrize("settings, world, per_node, replicas", [
    (["train.parallel=hsdp", "train.hsdp_replicas=2"], 4, 4, 2),
    (["train.parallel=hsdp", "train.hsdp_replicas=4"], 4, 4, 4),  # DDP's layout, in FSDP2
    (["train.parallel=hsdp"], 16, 8, 2),  # unset: one replica per node
    (["train.parallel=hsdp"], 8, 8, 1),  # one node: FSDP
    (["train.parallel=fsdp", "train.hsdp_replicas=3"], 4, 4, 1),  # only hsdp reads it
    (["train.parallel=ddp"], 6, None, 1),
])
def test_hsdp_forms_replica_groups_of_the_processes(
    settings: list[str], world: int, per_node: int | None, replicas: int
) -> None:
    tcfg = load_config(None, settings).train
    assert parallel.replica_groups(tcfg, world, per_node) == replicas


@pytest.mark.parametrize("settings, world, per_node, message", [
    (["train.hsdp_replicas=3"], 4, 4, r"hsdp_replicas = 3 does not split the 4 processes"),
    (["train.hsdp_replicas=8"], 4, 4, r"hsdp_replicas = 8 does not split the 4 processes"),
    ([], 6, 4, r"hsdp_replicas is unset and the processes do not form equal nodes \(6 "
               r"processes, LOCAL_WORLD_SIZE 4\)"),
    ([], 4, None, r"\(4 processes, LOCAL_WORLD_SIZE unset\); set train\.hsdp_replicas"),
])
def test_hsdp_refuses_unequal_replica_groups(
    settings: list[str], world: int, per_node: int | None, message: str
) -> None:
    tcfg = load_config(None, ["train.parallel=hsdp", *settings]).train
    with pytest.raises(GPTError, match=message):
        parallel.replica_groups(tcfg, world, per_node)


def test_rows_of_hsdp_are_the_rows_within_a_replica() -> None:
    """Each of 4 processes in 2 replicas of 2, in turn, on torch's fake process group (no
    communication): a parameter's rows are those an FSDP process of 2 holds (uneven and empty
    shards included), and only the first replica's processes write optimizer rows, named as
    FSDP's of 2."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard
    from torch.testing._internal.distributed.fake_pg import FakeStore

    for rank in range(4):
        dist.init_process_group("fake", rank=rank, world_size=4, store=FakeStore())
        try:
            mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
            for shape in ((7, 3), (4,), (1, 5)):
                whole = torch.randn(shape)
                chunk = -(-shape[0] // 2)
                start, stop = min(rank % 2 * chunk, shape[0]), min((rank % 2 + 1) * chunk, shape[0])
                param = DTensor.from_local(whole[start:stop], mesh, [Replicate(), Shard(0)],
                                           run_check=False, shape=whole.shape,
                                           stride=whole.stride())
                assert sharding.rows_of(param) == (start, stop)
            world = parallel.Dist(rank=rank, world_size=4, sharded=True, replicas=2)
            written = world.optimizer_state(torch.optim.AdamW([torch.nn.Parameter(whole)]))
            assert (written[0] if written else None) == (
                layout.optimizer_file(rank, 2) if rank < 2 else None)  # replica 1: the same rows
        finally:
            dist.destroy_process_group()


@pytest.mark.slow
def test_muon_on_rows_across_processes_is_torchs_muon_on_whole_matrices(
    tmp_path: Path, torchrun: Callable[..., None]
) -> None:
    """Matrices split by rows over 2 processes (FSDP's mesh, and HSDP's 2-D mesh both ways
    round), uneven and empty shards included, stepped 3 times with and without Nesterov: the
    weights and momentum buffers of torch.optim.Muon on the whole matrices, bit for bit."""
    torchrun(str(tmp_path / "steps.pt"), script=Path(__file__).parent / "muon_worker.py")
    saved = torch.load(tmp_path / "steps.pt")
    whole = saved.pop("torch")
    assert sorted(saved) == ["fsdp", "hsdp-replicas", "hsdp-shards"]
    for got in saved.values():
        for key in ("weights", "momentum"):
            pairs = zip(got[key], whole[key], strict=True)
            assert all(torch.equal(ours, theirs) for ours, theirs in pairs), key


def test_info_shows_the_memory_of_each_process() -> None:
    shape = ["--set", "model.n_layer=4", "--set", "model.n_embd=256", "--set", "model.n_head=4",
             "--set", "model.vocab_size=1024", "--set", "model.block_size=64"]

    def per_process(*args: str) -> str:
        result = runner.invoke(app, ["info", *shape, *args])
        assert result.exit_code == 0, result.output
        lines = [line for line in result.stdout.splitlines() if line.startswith("per process")]
        return lines[0] if lines else ""

    assert per_process() == ""  # one process: the whole-model line says it all
    model = GPT(load_config(None, [a for a in shape if a != "--set"]).model)
    params = sum(p.numel() for p in model.parameters())
    ddp = per_process("--nproc", "4", "--set", "train.parallel=ddp")
    fsdp = per_process("--nproc", "4", "--set", "train.parallel=fsdp")
    mib = lambda n: f"{n / 2**20:.3g} MiB"  # noqa: E731  (three figures, as gpt info)
    assert f"weights {mib(4 * params)} + gradients {mib(4 * params)}" in ddp
    assert "gathered" not in ddp
    assert f"weights {mib(params)} + gradients {mib(params)}" in fsdp
    assert f"AdamW state {mib(2 * params)}" in fsdp
    assert "two blocks gathered whole" in fsdp
    hsdp = per_process("--nproc", "4", "--set", "train.parallel=hsdp",
                       "--set", "train.hsdp_replicas=2")  # each replica shards over 2
    assert hsdp.startswith('per process (4 processes, parallel = "hsdp", 2 replicas of 2)')
    assert f"weights {mib(2 * params)} + gradients {mib(2 * params)}" in hsdp
    bad = runner.invoke(app, ["info", "--nproc", "0"])
    assert bad.exit_code == 2 and "--nproc" in bad.output


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_fsdp_in_bfloat16_on_two_gpus_follows_ddp(
    tiny_run: Path, torchrun: Callable[..., None]
) -> None:
    """NCCL, bf16 weights gathered and fp32 gradients reduced (FSDP's mixed precision) against
    DDP's autocast: the same curve to bf16's precision."""
    common = [*STEPS, *NO_DROPOUT, "--set", "train.max_iters=20", "--set", "train.device=cuda",
              "--set", "train.dtype=bfloat16"]
    torchrun(*common, "--set", "train.parallel=ddp", "--set", "train.out_dir=ddp")
    torchrun(*common, "--set", "train.parallel=fsdp", "--set", "train.out_dir=fsdp")
    ddp, fsdp = losses(tiny_run / "ddp"), losses(tiny_run / "fsdp")
    assert all(math.isclose(ddp[i], fsdp[i], rel_tol=2e-2) for i in ddp)
    assert fsdp[20] < fsdp[1] - 0.5


CLOSED = """
import json, os, sys
from gpt import parallel
from gpt.config import load_config
from gpt.train import train

close = parallel.Dist.close

def close_and_list_threads(world):
    close(world)
    names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
    with open(f"threads-{world.rank}.json", "w") as file:  # not stdout: ranks' lines interleave
        json.dump(sorted(names), file)

parallel.Dist.close = close_and_list_threads
sys.exit(train(load_config("tiny.toml", sys.argv[1:])))
"""


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="lists threads through /proc")
@pytest.mark.parametrize("layout", [["train.parallel=fsdp"], ["train.parallel=ddp"],
                                    ["train.parallel=hsdp", "train.hsdp_replicas=2"]],
                         ids=["fsdp", "ddp", "hsdp"])
def test_closing_ends_the_process_group_and_its_threads(
    tiny_run: Path, layout: list[str]
) -> None:
    """After `Dist.close` no gloo thread runs (its two workers, `pt_gloo_runloop`, and its
    transport loop, `gloo_tcp_loop`): a group still referenced after destroy_process_group kept
    them running into the process's exit, where FSDP launches now and then aborted."""
    (tiny_run / "closed.py").write_text(CLOSED)
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "closed.py", *layout, "train.max_iters=2", "train.grad_accum_steps=2"],
        capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    left = {rank: json.loads((tiny_run / f"threads-{rank}.json").read_text()) for rank in (0, 1)}
    assert not any("gloo" in name for names in left.values() for name in names), left


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("per_node, parallel, files", [(1, "fsdp", 2), (2, "hsdp", 2)],
                         ids=["fsdp", "hsdp-one-replica-per-node"])
def test_two_machines_joined_by_rendezvous_train_as_one(
    tiny_run: Path, per_node: int, parallel: str, files: int
) -> None:
    """The multi-node launch of docs/training.md, as two nodes on this machine: two torchrun
    agents meet at a c10d rendezvous endpoint, and the run they make gives the losses of one
    process. FSDP with one process a node; HSDP with two, and hsdp_replicas unset: one replica
    per node, so its checkpoint holds the rows of one node's 2 processes."""
    steps = ["--set", f"train.grad_accum_steps={2 * per_node}", "--set", "train.log_interval=1"]
    common = [*steps, *NO_DROPOUT, "--set", "train.max_iters=6",
              "--set", f"train.parallel={parallel}"]
    one_process(*common, "--set", "train.out_dir=one")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2",
               f"--nproc-per-node={per_node}",
               "--rdzv-id=test", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
               "-m", "gpt", "train", "--config", "tiny.toml", *common, "--set", "train.out_dir=two"]
    nodes = [subprocess.Popen(command, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], outputs[0][1][-3000:]
    assert_close_losses(losses(tiny_run / "one"), losses(tiny_run / "two"))
    saved = ckpt.Checkpoint.open(tiny_run / "two")
    assert saved.optimizer_files == [layout.optimizer_file(i, files) for i in range(files)]


def test_the_slurm_script_starts_one_torchrun_per_node_at_the_first_node(tmp_path: Path) -> None:
    """scripts/slurm_train.sh with stand-ins for SLURM's srun and scontrol: the torchrun line
    it runs on every node."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-a17\\ngpu-a18\\ngpu-a19\\n'\n")
    (bin_dir / "srun").write_text('#!/bin/sh\necho "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST":
           "gpu-a[17-19]", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_ID": "4242",
           "SLURM_GPUS_ON_NODE": "8"}
    script = Path(__file__).parents[1] / "scripts" / "slurm_train.sh"
    done = subprocess.run(["bash", str(script), "configs/gpt2_124m.toml", "--set",
                           "train.parallel=hsdp"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # 8 processes a node (torchrun's LOCAL_WORLD_SIZE): HSDP's one replica per node
    assert done.stdout.split() == [
        "torchrun", "--nnodes=3", "--nproc-per-node=8", "--rdzv-id=4242", "--rdzv-backend=c10d",
        "--rdzv-endpoint=gpu-a17:29500", "-m", "gpt", "train", "--config",
        "configs/gpt2_124m.toml", "--set", "train.parallel=hsdp",
    ]
    no_config = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True)
    assert no_config.returncode != 0 and "usage: sbatch" in no_config.stderr
