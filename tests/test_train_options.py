"""The trainer's speed options on the CPU: blocks compiled one by one (one process, DDP, FSDP),
the chunked loss and document masking in a run, and fp8's refusals where it cannot run. Their
speed is measured on a GPU by scripts/bench_gpu.py."""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from gpt import device as gpt_device
from gpt.checkpoint import Checkpoint
from gpt.config import load_config
from gpt.errors import GPTError
from gpt.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
BASE = ["train.max_iters=6", "model.dropout=0.0", "train.eval_interval=6",
        "train.checkpoint_interval=6", "train.log_interval=1"]


def losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["iter"]: r["loss"] for r in records if "loss" in r}


def assert_close_losses(a: dict[int, float], b: dict[int, float], tolerance: float) -> None:
    assert sorted(a) == sorted(b) and len(a) == 6
    worst = max(abs(a[i] - b[i]) for i in a)
    assert worst < tolerance, f"losses differ by up to {worst}"


EVERY_OPTION = [*BASE, "train.loss_chunk=7", "train.document_masking=true",
                "train.activation_checkpointing=true"]


@pytest.mark.slow
def test_every_option_at_once_compiled_whole_or_per_block_trains_as_eager(tiny_run: Path) -> None:
    """The chunked loss, document masking and activation checkpointing together: compiled
    whole, or each block on its own, the eager losses; and checkpoints of plain keys."""
    assert train(load_config("tiny.toml", [*EVERY_OPTION, "train.out_dir=eager"])) == 0
    for scope in ("model", "blocks"):
        assert train(load_config("tiny.toml", [*EVERY_OPTION, f"train.out_dir={scope}",
                                               "train.compile=true",
                                               f"train.compile_scope={scope}"])) == 0
        assert_close_losses(losses(tiny_run / "eager"), losses(tiny_run / scope), 1e-4)
    model = Checkpoint.open(tiny_run / "blocks").load_model()  # plain keys: an uncompiled GPT
    assert isinstance(model, torch.nn.Module)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_every_option_per_block_under_two_processes(
    tiny_run: Path, torchrun: Callable[..., None], parallel: str
) -> None:
    """Blocks compiled before DDP wraps the model or FSDP shards it (as torchtitan does), with
    the chunked loss (whose head FSDP's root holds for the backward pass's second run) and
    document masking: the losses of one eager process with the same global batch."""
    common = [*EVERY_OPTION, "train.grad_accum_steps=2"]
    assert train(load_config("tiny.toml", [*common, "train.out_dir=one"])) == 0
    torchrun(*[f"--set={s}" for s in [*common, f"train.parallel={parallel}", "train.compile=true",
                                      "train.compile_scope=blocks", "train.out_dir=two"]])
    assert_close_losses(losses(tiny_run / "one"), losses(tiny_run / "two"), 1e-4)


def test_the_chunked_loss_trains_as_the_plain_one(tiny_run: Path) -> None:
    """Chunks of 7 tokens (not dividing the 4 x 32 of a batch): the same losses to rounding."""
    assert train(load_config("tiny.toml", [*BASE, "train.out_dir=plain"])) == 0
    assert train(load_config("tiny.toml", [*BASE, "train.out_dir=chunked",
                                           "train.loss_chunk=7"])) == 0
    assert_close_losses(losses(tiny_run / "plain"), losses(tiny_run / "chunked"), 1e-5)


def test_document_masking_trains(tiny_run: Path) -> None:
    """The char tokenizer's end-of-text is the newline: many documents in every row."""
    settings = [*BASE, "train.max_iters=20", "train.document_masking=true"]
    assert train(load_config("tiny.toml", settings)) == 0
    records = [json.loads(line) for line in (tiny_run / "out" / "metrics.jsonl").read_text()
               .splitlines()]
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.3


def test_document_masking_refuses_dropout(tiny_run: Path) -> None:
    with pytest.raises(GPTError, match=r"document_masking = true attends through FlexAttention, "
                                       r"which has no attention dropout; set model.dropout = 0"):
        train(load_config("tiny.toml", ["train.document_masking=true", "model.dropout=0.1"]))


@pytest.fixture
def a_gpu(monkeypatch: pytest.MonkeyPatch) -> Callable[[tuple[int, int], bool], None]:
    """`a_gpu(capability, torchao)`: the CUDA GPU and torchao check_fp8 sees."""

    def fake(capability: tuple[int, int], torchao: bool) -> None:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some GPU")
        found = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: (object() if torchao else None) if name == "torchao"
                            else found(name, *a))

    return fake


@pytest.mark.parametrize(("where", "capability", "torchao", "message"), [
    ("cpu", (0, 0), True, r"needs a CUDA GPU of compute capability 8\.9 or higher, and this run "
                          r"is on cpu; set train\.fp8 = false$"),
    ("cuda", (8, 0), True, r"needs float8 tensor cores \(compute capability 8\.9 or higher\), "
                           r"and Some GPU has 8\.0; set train\.fp8 = false$"),
    ("cuda", (9, 0), False, r"torchao's float8, which is not installed; pip install torchao "
                            r"\(or gpt\[fp8\]\), or set train\.fp8 = false$"),
], ids=["cpu", "ampere", "without-torchao"])
def test_fp8_is_refused_where_it_cannot_run(
    a_gpu: Callable[..., None], where: str, capability: tuple[int, int], torchao: bool,
    message: str
) -> None:
    a_gpu(capability, torchao)
    with pytest.raises(GPTError, match=message):
        gpt_device.check_fp8(torch.device(where))


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0)])
def test_fp8_is_taken_on_ada_hopper_and_later(a_gpu: Callable[..., None],
                                              capability: tuple[int, int]) -> None:
    a_gpu(capability, True)
    gpt_device.check_fp8(torch.device("cuda"))


def test_fp8_converts_the_blocks_linear_layers_only(tiny_config) -> None:
    """torchao's float8 layers in the blocks; embeddings and the LM head untouched."""
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from gpt.model import GPT

    model = GPT(tiny_config(tie_embeddings=False))
    gpt_device.to_float8(model)
    converted = {n for n, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert converted == {f"transformer.h.{i}.{layer}" for i in range(2)
                         for layer in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert type(model.lm_head) is torch.nn.Linear


def test_fp8_trains_near_bf16_and_saves_plain_checkpoints(
    tiny_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchao emulates float8 matmuls on the CPU, so the run itself is checked here (the check
    of the GPU let through): losses near bf16's, and checkpoints whose keys load into a plain
    GPT (Float8Linear keeps Linear's weight and bias)."""
    pytest.importorskip("torchao.float8")
    monkeypatch.setattr("gpt.train.check_fp8", lambda device: None)
    settings = [*BASE, "train.dtype=bfloat16"]
    assert train(load_config("tiny.toml", [*settings, "train.out_dir=bf16"])) == 0
    assert train(load_config("tiny.toml", [*settings, "train.out_dir=fp8", "train.fp8=true"])) == 0
    assert_close_losses(losses(tiny_run / "bf16"), losses(tiny_run / "fp8"), 0.05)
    model = Checkpoint.open(tiny_run / "fp8").load_model()  # every key found, none extra
    assert type(model.transformer.h[0].mlp.c_fc) is torch.nn.Linear


CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
ON_CUDA = [*BASE, "train.device=cuda", "train.dtype=float32"]


@pytest.mark.slow
@pytest.mark.parametrize("scope", [pytest.param("blocks", marks=CUDA)])
def test_blocks_compiled_on_cuda_train_as_eager(tiny_run: Path, scope: str) -> None:
    assert train(load_config("tiny.toml", [*ON_CUDA, "train.out_dir=eager"])) == 0
    assert train(load_config("tiny.toml", [*ON_CUDA, "train.out_dir=compiled", "train.compile=true",
                                           f"train.compile_scope={scope}"])) == 0
    assert_close_losses(losses(tiny_run / "eager"), losses(tiny_run / "compiled"), 2e-3)


@pytest.mark.slow
@pytest.mark.parametrize("compile_", [pytest.param(False, marks=CUDA), pytest.param(True, marks=CUDA)],
                         ids=["eager", "compiled"])
def test_document_masking_trains_on_cuda(tiny_run: Path, compile_: bool) -> None:
    """FlexAttention (compiled on its own, or inside the compiled model) learns the corpus."""
    settings = [*ON_CUDA, "train.max_iters=20", "train.document_masking=true",
                f"train.compile={str(compile_).lower()}"]
    assert train(load_config("tiny.toml", settings)) == 0
    evals = [r["val_loss"] for r in map(json.loads, (tiny_run / "out" / "metrics.jsonl")
                                        .read_text().splitlines()) if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.3


@pytest.mark.parametrize("dtype", [pytest.param("bfloat16", marks=CUDA)])
def test_fp8_trains_on_a_gpu_with_float8(tiny_run: Path, dtype: str) -> None:
    """On a GPU of compute capability 8.9 or higher, with torchao: near bf16's losses."""
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("needs compute capability 8.9 or higher")
    pytest.importorskip("torchao.float8")
    settings = [*BASE, "train.device=cuda", f"train.dtype={dtype}"]
    assert train(load_config("tiny.toml", [*settings, "train.out_dir=bf16"])) == 0
    assert train(load_config("tiny.toml", [*settings, "train.out_dir=fp8", "train.fp8=true"])) == 0
    assert_close_losses(losses(tiny_run / "bf16"), losses(tiny_run / "fp8"), 0.05)
