"""Training and sampling on a CUDA GPU: bf16 and fp16 autocast, the fused optimizer, compile,
resume, steps that never wait for the device, and sampling. Skipped where there is no GPU."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gpt.checkpoint import Checkpoint
from gpt.cli import app
from gpt.config import load_config
from gpt.errors import GPTError
from gpt.generate import generate
from gpt.optim import skips_on_device
from gpt.parallel import Dist
from gpt.sample import load_for_inference
from gpt.train import setup_run, train, train_step

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

CUDA = ["train.device=cuda"]
runner = CliRunner()


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def losses(out: Path) -> list[tuple[int, float | None, float | None]]:
    return [(r["iter"], r.get("loss"), r.get("val_loss")) for r in metrics(out)]


def snapshot(run) -> list[torch.Tensor]:
    """Copies of the weights and every tensor of the optimizer state (moments, step counts)."""
    state = [v for s in run.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    return [t.detach().clone() for t in [*run.model.parameters(), *state]]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_mixed_precision_training_learns(tiny_run: Path, dtype: str) -> None:
    """bf16 autocast, and fp16 with the gradient scaler on (its state saved for resume)."""
    assert train(load_config("tiny.toml", [*CUDA, f"train.dtype={dtype}"])) == 0
    out = tiny_run / "out"
    records = metrics(out)
    assert all(math.isfinite(r["loss"]) for r in records if "loss" in r)
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert evals[-1] < evals[0] - 0.3
    state = json.loads((out / "ckpt-0000030" / "state.json").read_text())
    assert (state["scaler"] is not None) == (dtype == "float16")
    weights = load_file(str(out / "ckpt-0000030" / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {torch.float32}  # fp32 master weights


def test_cuda_runs_use_fused_adamw_that_skips_on_the_device(tiny_run: Path) -> None:
    run = setup_run(load_config("tiny.toml", CUDA), True, Dist(device=torch.device("cuda")), torch.bfloat16)
    try:
        assert all(group["fused"] for group in run.optimizer.param_groups)
        assert skips_on_device(run.optimizer)
        assert run.samplers["train"].next_batch()[0].is_cuda
    finally:
        run.metrics.close()


def test_a_step_never_waits_for_the_device(tiny_run: Path) -> None:
    """No host sync anywhere in a training step (CUDA raises on one in this mode)."""
    run = setup_run(load_config("tiny.toml", CUDA), True, Dist(device=torch.device("cuda")), torch.bfloat16)
    try:
        train_step(run)  # the first: optimizer state, the fused-AdamW probe
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps = [train_step(run) for _ in range(3)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(loss.is_cuda and loss.dim() == 0 for loss in steps)
        assert all(math.isfinite(loss.item()) for loss in steps)
        run.nonfinite.check(run.last_checkpoint)
    finally:
        run.metrics.close()


@pytest.mark.parametrize(
    ("dtype", "what", "error"),
    [("bfloat16", "loss", True), ("bfloat16", "gradient norm", True),
     ("float16", "loss", True), ("float16", "gradient norm", False)],
)
def test_a_non_finite_step_never_reaches_the_weights(
    tiny_run: Path, poison_forward, dtype: str, what: str, error: bool
) -> None:
    """Skipped on the device (fused AdamW's found_inf, or the fp16 scaler) and reported at the
    next check; with the scaler, inf gradients alone are its business: skipped, no error."""
    torch_dtype = getattr(torch, dtype)
    cfg = load_config("tiny.toml", [*CUDA, f"train.dtype={dtype}", "model.dropout=0.0"])
    run = setup_run(cfg, True, Dist(device=torch.device("cuda")), torch_dtype)
    try:
        assert run.scaler.is_enabled() == (dtype == "float16")
        train_step(run)
        before, scale = snapshot(run), run.scaler.get_scale()
        poison_forward(what, after=0)
        for _ in range(2):
            train_step(run)
        assert all(torch.equal(a, b) for a, b in zip(before, snapshot(run), strict=True))
        if error:
            with pytest.raises(GPTError, match=rf"non-finite {what} at iteration 2; stopped before the optimizer step"):
                run.nonfinite.check(run.last_checkpoint)
        else:
            run.nonfinite.check(run.last_checkpoint)
            assert run.scaler.get_scale() < scale  # the scaler backed off instead
    finally:
        run.metrics.close()


@pytest.mark.slow
def test_compiled_training_on_cuda_matches_eager(tiny_run: Path) -> None:
    settings = [*CUDA, "train.dtype=float32", "train.max_iters=6", "model.dropout=0.0",
                "train.eval_interval=6", "train.checkpoint_interval=6", "train.log_interval=1"]
    assert train(load_config("tiny.toml", [*settings, "train.out_dir=eager"])) == 0
    assert train(load_config("tiny.toml", [*settings, "train.out_dir=compiled", "train.compile=true"])) == 0
    eager, compiled = losses(tiny_run / "eager"), losses(tiny_run / "compiled")
    pairs = [(e[1], c[1]) for e, c in zip(eager, compiled, strict=True) if e[1] is not None]
    assert len(pairs) == 6 and all(c == pytest.approx(e, rel=2e-3) for e, c in pairs)
    assert isinstance(Checkpoint.open(tiny_run / "compiled").load_model(), torch.nn.Module)


def test_resume_on_cuda_continues_the_run(tiny_run: Path) -> None:
    """20 steps, a stop and 10 more give the straight run's losses (CUDA kernels such as
    attention's backward are not bitwise reproducible, so within float tolerance)."""
    fixed = [*CUDA, "train.dtype=bfloat16", "train.lr_decay_iters=30"]
    assert train(load_config("tiny.toml", [*fixed, "train.out_dir=straight"])) == 0
    assert train(load_config("tiny.toml", [*fixed, "train.out_dir=split", "train.max_iters=20"])) == 0
    assert train(load_config("tiny.toml", [*fixed, "train.out_dir=split"])) == 0
    a, b = losses(tiny_run / "straight"), losses(tiny_run / "split")
    assert [r[0] for r in a] == [r[0] for r in b]
    for (_, loss_a, val_a), (_, loss_b, val_b) in zip(a, b, strict=True):
        assert loss_b == pytest.approx(loss_a, rel=1e-3, abs=1e-5)
        assert val_b == pytest.approx(val_a, rel=1e-3, abs=1e-5)


def test_sampling_on_cuda(tiny_run: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy decoding on the GPU repeats itself and follows the CPU's choices, except where
    the CPU's two best tokens tie to rounding; `gpt sample --device cuda` prints text."""
    settings = [*CUDA, "train.dtype=float32", "model.dropout=0.0", "train.max_iters=30"]
    assert train(load_config("tiny.toml", settings)) == 0
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # float32 as on the CPU
    found = Checkpoint.open(tiny_run / "out")
    cpu_model, tokenizer = load_for_inference(found, "cpu", "float32", False)
    gpu_model, _ = load_for_inference(found, "cuda", "float32", False)
    prompt = torch.tensor([tokenizer.encode("def function_1")])  # (1, T0)

    def greedy(model, device: str) -> list[int]:
        steps = generate(model, prompt.to(device), 40, temperature=0.0)
        return [int(ids[0]) for ids in steps]

    on_gpu, on_cpu = greedy(gpu_model, "cuda"), greedy(cpu_model, "cpu")
    assert on_gpu == greedy(gpu_model, "cuda")
    differ = next((i for i, (g, c) in enumerate(zip(on_gpu, on_cpu, strict=True)) if g != c), None)
    if differ is not None:  # only a near-tie may decide differently
        context = torch.cat([prompt, torch.tensor([on_cpu[:differ]], dtype=torch.long)], dim=1)
        with torch.no_grad():
            logits, _ = cpu_model(context)
        top2 = logits[0, -1, : tokenizer.vocab_size].topk(2).values
        assert float(top2[0] - top2[1]) < 1e-3, f"GPU and CPU greedy differ at token {differ}"
    result = runner.invoke(app, ["sample", "--checkpoint", "out", "--device", "cuda",
                                 "--prompt", "def function_1", "--max-new-tokens", "20",
                                 "--temperature", "0", "--no-stream"])
    assert result.exit_code == 0, result.output
    text = result.output.removesuffix("\n")
    assert text.startswith("def function_1") and len(text) == len("def function_1") + 20  # chars


def test_free_memory_of_the_gpu_counts_what_the_allocator_holds_unused() -> None:
    """Free memory, plus what torch's cache holds unused: a tensor freed into the cache is
    still free to a batch."""
    from gpt.device import free_memory

    cuda = torch.device("cuda")
    total = torch.cuda.get_device_properties(cuda).total_memory
    before = free_memory(cuda)
    block = torch.empty(2**28, dtype=torch.uint8, device=cuda)  # 256 MiB, held
    held = free_memory(cuda)
    del block  # back to torch's cache, not to the driver
    assert 0 < held < before <= total
    assert free_memory(cuda) == pytest.approx(before, abs=2**20)


def test_the_engine_on_cuda_gives_each_request_what_it_gives_alone() -> None:
    """A busy batch on the GPU (rows at different positions, chunked prefill, per-request
    generators on the device) against generate running each request by itself there."""
    from gpt.config import ModelConfig
    from gpt.engine import Engine, Request
    from gpt.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=32, vocab_size=50,
                            pos_embedding="rope", n_kv_head=2)).cuda().eval()
    prompts = [torch.randint(0, 50, (n,)).tolist() for n in (1, 5, 9, 32, 3)]
    requests = [Request(p, 20, temperature=0.0 if i % 2 else 0.9, top_k=8, seed=i)
                for i, p in enumerate(prompts)]
    got: dict[int, list[int]] = {}
    for event in Engine(model, max_batch=3, prefill_chunk=4).run(requests):
        if event.token is not None:
            got.setdefault(event.seq, []).append(event.token)
    for i, r in enumerate(requests):
        g = torch.Generator(device="cuda").manual_seed(r.seed)
        steps = generate(model, torch.tensor([r.prompt], device="cuda"), 20, r.temperature,
                         r.top_k, 1.0, g)
        assert got[i] == [int(ids[0]) for ids in steps], f"request {i}"
