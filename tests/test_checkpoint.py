"""Checkpoints: layout, pointers, pruning, crash safety, damage reports, no pickle execution."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from gpt import checkpoint as ckpt
from gpt import layout
from gpt.config import ModelConfig, RunConfig, TrainConfig, load_config, to_dict
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.parallel import Dist, unwrap

CONFIG = RunConfig(model=ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=8, vocab_size=64))
TOKENIZER = {"name": "char", "chars": "abc\n"}


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(CONFIG.model)


def save(out: Path, iteration: int, model: torch.nn.Module, keep_last: int = 2,
         is_best: bool = False, damaged: set[str] | frozenset[str] = frozenset()) -> Path:
    """A checkpoint written as training writes one: through a Checkpointer."""
    optimizer = torch.optim.AdamW(unwrap(model).parameters(), lr=1e-3)
    state = {"tokens": iteration * 10, "best_val_loss": None, "wandb_id": None,
             "config": to_dict(CONFIG), "tokenizer": TOKENIZER}
    saver = ckpt.Checkpointer(out, Dist(), model, optimizer, fixed=state, keep_last=keep_last,
                              damaged=damaged)
    written = saver.save(iteration, is_best=is_best)
    assert written is not None
    return written


def same_weights(a: GPT, b: GPT) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(),
                                                 strict=True))


def test_save_then_load_model_gives_the_same_weights(tmp_path: Path) -> None:
    model = tiny_model()
    folder = save(tmp_path, 7, model)
    assert folder.name == "ckpt-0000007"
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.pt",
                                                        "state.json"]
    assert (tmp_path / "latest").read_text().strip() == "ckpt-0000007"
    found = ckpt.Checkpoint.open(tmp_path)
    loaded = found.load_model()
    assert found.config == CONFIG and found.tokenizer == TOKENIZER and not loaded.training
    assert same_weights(model, loaded)
    assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied after loading
    assert ckpt.find_checkpoint(folder) == folder  # a checkpoint folder is accepted as it is


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_checkpoint_files_get_the_permissions_of_other_files(tmp_path: Path, umask: int) -> None:
    """safetensors writes 0o600; every file of a checkpoint gets what open() gives (the umask)."""
    previous = os.umask(umask)
    try:
        folder = save(tmp_path, 1, tiny_model())
    finally:
        os.umask(previous)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (*folder.iterdir(), tmp_path / "latest")}
    assert modes == dict.fromkeys(
        ["model.safetensors", "optimizer.pt", "state.json", "latest"], 0o666 & ~umask
    )


def test_compile_wrapper_prefix_never_reaches_the_file(tmp_path: Path) -> None:
    model = tiny_model()
    save(tmp_path, 1, torch.compile(model))  # lazy: nothing is compiled until called
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "ckpt-0000001" / "model.safetensors"))
    assert keys and not any(k.startswith("_orig_mod.") for k in keys)
    assert "lm_head.weight" not in keys  # a tied head is stored once
    assert same_weights(model, ckpt.Checkpoint.open(tmp_path).load_model())


def test_keep_last_prunes_old_checkpoints_but_keeps_best(tmp_path: Path) -> None:
    model = tiny_model()
    for it in (10, 20, 30, 40):
        save(tmp_path, it, model, keep_last=2, is_best=it == 10)
    assert [p.name for p in layout.list_checkpoints(tmp_path)] == [
        "ckpt-0000040", "ckpt-0000030", "ckpt-0000010"]
    assert ckpt.find_checkpoint(tmp_path, "best").name == "ckpt-0000010"
    assert ckpt.find_checkpoint(tmp_path, "latest").name == "ckpt-0000040"


def names(out: Path) -> list[str]:
    return [p.name.removeprefix("ckpt-").lstrip("0") for p in layout.list_checkpoints(out)]


def test_pruning_leaves_newer_checkpoints_and_never_keeps_damaged_ones(tmp_path: Path) -> None:
    """After a fallback the run saves below checkpoints from a damaged future: those neither
    count nor go, and the ones resume skipped as damaged never take a good one's place."""
    model = tiny_model()
    for it in (10, 20, 30):
        save(tmp_path, it, model, keep_last=3)
    save(tmp_path, 15, model, keep_last=2)  # resumed from 10; 20 and 30 are newer
    assert names(tmp_path) == ["30", "20", "15", "10"]
    damaged = {"ckpt-0000020", "ckpt-0000030"}
    save(tmp_path, 25, model, keep_last=2, damaged=damaged)
    assert names(tmp_path) == ["30", "25", "15"]  # 20 is older than 25 and damaged: it goes
    save(tmp_path, 30, model, keep_last=2, damaged=damaged)  # rewritten: good
    assert names(tmp_path) == ["30", "25"]


def test_pruning_never_deletes_the_best_even_damaged(tmp_path: Path) -> None:
    model = tiny_model()
    save(tmp_path, 10, model, keep_last=2, is_best=True)
    save(tmp_path, 20, model, keep_last=2)
    save(tmp_path, 30, model, keep_last=1, damaged={"ckpt-0000010"})
    assert names(tmp_path) == ["30", "10"]


@pytest.mark.parametrize("failing", ["torch.save", "os.rename", "pointer"])
def test_a_crash_while_saving_leaves_the_previous_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    first = tiny_model(0)
    save(tmp_path, 10, first)

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("simulated crash")

    if failing == "torch.save":  # while the files are written
        monkeypatch.setattr(ckpt.torch, "save", crash)
    elif failing == "os.rename":  # just before the folder is moved into place
        monkeypatch.setattr(ckpt.os, "rename", crash)
    else:  # the folder is in place, the `latest` pointer not yet moved
        monkeypatch.setattr(layout, "write_atomic", crash)
    with pytest.raises(GPTError, match=r"cannot write the checkpoint of iteration 20 .*\(simulated crash\)"):
        save(tmp_path, 20, tiny_model(1))
    monkeypatch.undo()
    assert (tmp_path / "latest").read_text().strip() == "ckpt-0000010"
    if failing != "pointer":
        assert [p.name for p in layout.list_checkpoints(tmp_path)] == ["ckpt-0000010"]
    assert same_weights(first, ckpt.Checkpoint.open(tmp_path).load_model())
    save(tmp_path, 30, first)  # the next save clears what the crash left behind
    assert not list(tmp_path.glob(".tmp-*"))


def test_find_checkpoint_errors_name_the_path_and_the_fix(tmp_path: Path) -> None:
    with pytest.raises(GPTError, match=r"does not exist; pass a run's out_dir"):
        ckpt.find_checkpoint(tmp_path / "nowhere")
    with pytest.raises(GPTError, match=r"no latest checkpoint in .*; train first"):
        ckpt.find_checkpoint(tmp_path)
    save(tmp_path, 5, tiny_model())
    with pytest.raises(GPTError, match=r"no best checkpoint"):
        ckpt.find_checkpoint(tmp_path, "best")
    with pytest.raises(GPTError, match=r"unknown checkpoint choice 'newest'"):
        ckpt.find_checkpoint(tmp_path, "newest")


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate-weights", r"model\.safetensors is damaged"),
        ("flip-optimizer", r"optimizer\.pt is damaged"),
        ("garble-state", r"state\.json is damaged"),
        ("remove-weights", r"model\.safetensors is missing"),
        ("remove-state", r"state\.json is missing"),
    ],
)
def test_damaged_checkpoint_is_an_error_naming_the_file(
    tmp_path: Path, damage: str, message: str
) -> None:
    folder = save(tmp_path, 3, tiny_model())
    if damage == "truncate-weights":
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:-50])
    elif damage == "flip-optimizer":
        path = folder / "optimizer.pt"
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "garble-state":
        (folder / "state.json").write_text('{"iter": 3, "sha')
    elif damage == "remove-weights":
        (folder / "model.safetensors").unlink()
    else:
        (folder / "state.json").unlink()
    with pytest.raises(GPTError, match=message):
        ckpt.Checkpoint.open(tmp_path).load_model()


def test_a_weights_only_checkpoint_loads_for_inference(tmp_path: Path) -> None:
    """Users delete optimizer.pt to save space: the weights still load, checked as before."""
    model = tiny_model()
    folder = save(tmp_path, 3, model)
    assert ckpt.Checkpoint.open(folder).has_optimizer
    (folder / "optimizer.pt").unlink()
    found = ckpt.Checkpoint.open(tmp_path)
    assert not found.has_optimizer
    assert same_weights(model, found.load_model())
    with pytest.raises(GPTError, match=r"optimizer\.pt is missing: the checkpoint holds weights"):
        ckpt.load_optimizer_state(folder, ["optimizer.pt"])
    weights = folder / "model.safetensors"  # the files still there are still checked
    weights.write_bytes(weights.read_bytes()[:-50])
    with pytest.raises(GPTError, match=r"model\.safetensors is damaged"):
        ckpt.Checkpoint.open(tmp_path)


def test_loading_never_executes_pickled_code(tmp_path: Path) -> None:
    folder = save(tmp_path, 1, tiny_model())
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, (f"touch {marker}",))

    torch.save({"state": Exploit()}, folder / "optimizer.pt")  # a hostile optimizer file
    with pytest.raises(GPTError, match=r"optimizer\.pt would call \S*system when unpickled.*nothing in it ran"):
        ckpt.load_optimizer_state(folder, ["optimizer.pt"])
    assert not marker.exists()


def test_pointer_to_a_missing_folder_falls_back_to_the_newest(tmp_path: Path) -> None:
    save(tmp_path, 4, tiny_model())
    (tmp_path / "latest").write_text("ckpt-0000099\n")
    assert ckpt.find_checkpoint(tmp_path).name == "ckpt-0000004"
    state = json.loads((tmp_path / "ckpt-0000004" / "state.json").read_text())
    assert state["iter"] == 4 and set(state["sha256"]) == {"model.safetensors", "optimizer.pt"}


def test_a_checkpoint_from_before_padded_vocab_size_reads_both_sizes(tmp_path: Path) -> None:
    """Older checkpoints saved the padded size as vocab_size; the tokenizer gives the real one."""
    model = tiny_model()
    folder = save(tmp_path, 3, model)
    state = json.loads((folder / "state.json").read_text())
    state["config"]["model"].pop("padded_vocab_size")  # as written before the split
    (folder / "state.json").write_text(json.dumps(state))
    found = ckpt.Checkpoint.open(tmp_path)
    assert (found.config.model.vocab_size, found.config.model.padded_vocab_size) == (4, 64)
    assert same_weights(model, found.load_model())  # "abc\n": 4 ids in 64 rows


@pytest.mark.parametrize("pointer", [b"\xff\xfe\x00ckpt", b"elsewhere\n", b"ckpt-0000001\n" * 1000])
def test_a_pointer_that_names_no_checkpoint_falls_back_for_latest_and_is_refused_for_best(
    tmp_path: Path, pointer: bytes
) -> None:
    """Binary bytes, a path out of the run, a file past POINTER_LIMIT: never followed."""
    folder = save(tmp_path, 1, tiny_model())
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "state.json").write_text("{}")
    for name in ("latest", "best"):
        (tmp_path / name).write_bytes(pointer)
    assert ckpt.find_checkpoint(tmp_path, "latest") == folder
    with pytest.raises(GPTError, match=r"best names no checkpoint folder of .*; pass a ckpt-\* "
                                       r"folder, or --which latest"):
        ckpt.find_checkpoint(tmp_path, "best")


@pytest.mark.parametrize(
    ("out_dir", "checkpoint", "trained_in"),
    [("out/default", "/proj/out/default/ckpt-0000010", "/proj"),
     ("out", "/proj/out/../out/ckpt-0000010", "/proj"),
     (".", "/proj/ckpt-0000010", "/proj"),
     ("out", "/proj/renamed/ckpt-0000010", None),  # the run folder is not where it was
     ("/runs/out", "/runs/out/ckpt-0000010", None),  # absolute: nothing says where it ran
     ("../out", "/out/ckpt-0000010", None)],
)
def test_a_checkpoint_knows_the_folder_training_ran_in(
    out_dir: str, checkpoint: str, trained_in: str | None
) -> None:
    """Its relative out_dir, taken off the run folder's path: where the config's other relative
    paths start."""
    config = RunConfig(model=CONFIG.model, train=TrainConfig(out_dir=out_dir))
    found = ckpt.Checkpoint(Path(checkpoint), {"config": to_dict(config)})
    assert found.trained_in == (None if trained_in is None else Path(trained_in))


def test_a_relative_checkpoint_path_starts_in_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    config = RunConfig(model=CONFIG.model, train=TrainConfig(out_dir="runs/a"))
    found = ckpt.Checkpoint(Path("runs/a/ckpt-0000010"), {"config": to_dict(config)})
    assert found.trained_in == tmp_path


ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_quote_the_folders_the_default_run_leaves() -> None:
    """README.md's quick start and docs/training.md's and observing.md's pictures of the
    default run name what configs/default.toml makes: its steps, data folder, out_dir and the
    last checkpoint, the one written at max_iters."""
    cfg = load_config(ROOT / "configs" / "default.toml")
    last = layout.checkpoint_name(cfg.train.max_iters)
    readme = (ROOT / "README.md").read_text()
    assert f"After {cfg.train.max_iters} steps" in readme
    assert f"`{cfg.data.resolved_data_dir}/` (the tokenized corpus" in readme
    assert f"`{cfg.train.out_dir}/`, the run" in readme
    training = (ROOT / "docs" / "training.md").read_text()
    assert f"```text\n{cfg.train.out_dir}/\n  {last}/\n" in training
    for text in (readme, training):
        assert set(re.findall(r"ckpt-\d+", text)) == {last}
    row = next(line for line in (ROOT / "docs" / "observing.md").read_text().splitlines()
               if line.startswith(f"{cfg.train.out_dir} "))
    assert f" {cfg.train.max_iters}/{cfg.train.max_iters} " in row and f" {last} " in row
    assert (layout.temporary_folder(Path("out"), cfg.train.max_iters).name
            == f".tmp-{last}")  # the name a save gives its folder
