"""int8 inference (gpt/quant.py, `--quantize int8`): the kernel against an independent reference
of the same arithmetic, a quantized model's logits and greedy text against the float model's,
batching under the engine, the commands end to end, and the refusals (one line each)."""

from __future__ import annotations

import copy
import json
import platform
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_engine import alone, mixed_requests, tokens_by_request
from test_sample_cli import CORPUS, SAMPLE, invoke, train_run
from torch import Tensor, nn

from gpt import quant
from gpt.checkpoint import Checkpoint
from gpt.engine import Engine
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.quant import Int8Linear, check_method, quantize
from gpt.sample import load_for_inference

pytestmark = pytest.mark.usefixtures("one_thread")

X86 = platform.machine().lower() in ("x86_64", "amd64")
SOURCE = Path(quant.__file__).parent / "kernels" / "int8_linear.c"
needs_kernel = pytest.mark.usefixtures("int8_kernel")  # skipped, saying why, where none runs


# ---------------------------------------------------------------------------------------------
# The layer against an independent reference


def reference(x: Tensor, linear: nn.Linear) -> tuple[Tensor, Tensor]:
    """The int8 arithmetic written out in float64: weight rows and activation rows each divided
    by their absmax / 127 and rounded, the integer dot products (exact in float64), scaled back,
    plus the bias.

    Also each output's slack: a value whose quotient lies within 1e-4 of a half (bfloat16
    inputs hit exact halves often) may round either way in the kernel's float32
    (x * (127 / absmax)), moving the dot product by what it multiplies."""
    weight = linear.weight.detach().double()  # (N, K)
    w_scale = weight.abs().amax(dim=1) / 127  # (N,)
    w_quotient = weight / w_scale[:, None]
    rows = x.detach().double().reshape(-1, linear.in_features)  # (M, K)
    x_scale = rows.abs().amax(dim=1) / 127  # (M,)
    x_quotient = rows / torch.where(x_scale > 0, x_scale, 1.0)[:, None]
    w_int, x_int = torch.round(w_quotient), torch.round(x_quotient)
    scales = x_scale[:, None] * w_scale  # (M, N)
    y = (x_int @ w_int.T) * scales
    if linear.bias is not None:
        y = y + linear.bias.detach().double()
    w_tie, x_tie = (near_half(q).double() for q in (w_quotient, x_quotient))
    slack = (x_tie @ w_int.abs().T + x_int.abs() @ w_tie.T) * scales  # (M, N)
    return y, slack


def near_half(q: Tensor) -> Tensor:
    return ((q - q.floor()) - 0.5).abs() <= 1e-4


def assert_matches_reference(y: Tensor, x: Tensor, linear: nn.Linear) -> None:
    """Every output within its rounding (float32's, or bfloat16's for a bfloat16 output) plus
    the slack of its values at a half."""
    expected, slack = reference(x, linear)
    rel = 2.0**-8 if y.dtype == torch.bfloat16 else 1e-5
    bound = expected.abs() * rel + 1e-6 + slack
    err = (y.double().reshape(expected.shape) - expected).abs()
    assert (err <= bound).all(), f"worst excess {(err - bound).max():.3g}"


SHAPES = [(100, 30, 5), (64, 7, 1), (130, 9, 17), (300, 65, 3)]  # (K, N, M): K % 64, N % 4


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize(("K", "N", "M"), SHAPES)
def test_int8_linear_is_the_reference_arithmetic(
    K: int, N: int, M: int, bias: bool, dtype: torch.dtype
) -> None:
    torch.manual_seed(K + N + M)
    linear = nn.Linear(K, N, bias=bias)
    x = torch.randn(M, K).to(dtype)
    y = Int8Linear(linear)(x)
    assert y.dtype == dtype and y.shape == (M, N)
    assert_matches_reference(y, x, linear)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_linear_is_near_the_float_layer(dtype: torch.dtype) -> None:
    """Within 2% of F.linear in norm: rounding to 255 levels per row costs about 0.5-1% on
    Gaussian weights and inputs."""
    torch.manual_seed(0)
    linear = nn.Linear(200, 50)
    x = torch.randn(4, 3, 200).to(dtype)  # any leading shape
    y = Int8Linear(linear)(x).float()
    expected = F.linear(x.float(), linear.weight, linear.bias)
    assert y.shape == (4, 3, 50)
    assert (y - expected).norm() / expected.norm() < 0.02


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("rows", [9, quant.MANY_ROWS + 3], ids=["kernel", "many-rows"])
def test_each_row_gives_what_it_gives_alone(dtype: torch.dtype, rows: int) -> None:
    """Every row is quantized on its own: a batch changes no row by a bit (the engine's
    promise that a request decodes the same alone or among others), also where many rows take
    torch's int8 matrix product instead of the kernel."""
    torch.manual_seed(0)
    layer = Int8Linear(nn.Linear(130, 30))
    x = (torch.randn(rows, 130) * torch.logspace(-3, 3, rows)[:, None]).to(dtype)
    x[3] = 0  # an all-zero row: scale 0, output the bias
    together = layer(x)
    for i in range(len(x)):
        assert torch.equal(together[i], layer(x[i:i + 1])[0]), f"row {i}"
    assert torch.equal(together[3], layer.bias.to(dtype))


@pytest.mark.skipif(not X86 or "avx_vnni" not in (quant._cpu_flags() or ()),
                    reason="needs a CPU with AVX-VNNI (avx_vnni in /proc/cpuinfo)")
def test_the_avx_vnni_variant_is_the_reference_arithmetic(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The 256-bit kernel that CPUs with AVX-VNNI but no AVX-512 run, built here with AVX-512
    turned off."""
    target = quant.build(quant._compiler(), SOURCE, tmp_path, "int8_linear-avx",
                         extra=("-mno-avx512f",))
    library = quant.load(target)
    assert library.int8_linear_vector_bytes() == 32
    monkeypatch.setattr(quant, "_library", lambda: library)
    for K, N, M in SHAPES:
        for dtype in (torch.float32, torch.bfloat16):
            torch.manual_seed(K)
            linear = nn.Linear(K, N)
            x = torch.randn(M, K).to(dtype)
            assert_matches_reference(Int8Linear(linear)(x), x, linear)


# ---------------------------------------------------------------------------------------------
# Whole models


RECIPES = {
    "gpt2": {},
    "modern": dict(norm="rmsnorm", pos_embedding="rope", mlp="swiglu", bias=False, n_kv_head=2,
                   qk_norm=True, logit_softcap=15.0, tie_embeddings=False),
}


@needs_kernel
@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_every_linear_becomes_int8_and_the_state_dict_stays(
    recipe: dict, tiny: Callable[..., GPT]
) -> None:
    model = tiny(**recipe)
    keys = set(model.state_dict())
    quantized = quantize(copy.deepcopy(model), "int8")
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    int8 = [m for m in quantized.modules() if isinstance(m, Int8Linear)]
    assert len(int8) == len(linears) and not any(
        isinstance(m, nn.Linear) for m in quantized.modules())
    assert set(quantized.state_dict()) <= keys  # no int8 buffer joins a checkpoint


def logits_agree(model: GPT, quantized: GPT, idx: Tensor) -> tuple[float, float]:
    """(relative error of the int8 logits in norm, share of positions with the same argmax)."""
    with torch.no_grad():
        expected, _ = model(idx)
        got, _ = quantized(idx)
    V = model.config.vocab_size
    expected, got = expected[..., :V].float(), got[..., :V].float()
    error = ((got - expected).norm() / expected.norm()).item()
    same = (got.argmax(-1) == expected.argmax(-1)).float().mean().item()
    return error, same


@needs_kernel
@pytest.mark.parametrize("recipe", RECIPES.values(), ids=RECIPES.keys())
def test_int8_logits_are_the_float_logits_within_a_few_percent(
    recipe: dict, tiny: Callable[..., GPT]
) -> None:
    """A random tiny model in float32: each Linear's rounding costs about 1% (see above), and
    they add up over two blocks and the head (measured: 1.5% and 1.7%; 5% leaves room). Its
    logits are nearly flat, so near ties are common (measured: 98% of positions keep their
    argmax; 90% asked)."""
    model = tiny(**recipe)
    idx = torch.randint(0, 50, (4, 16), generator=torch.Generator().manual_seed(0))
    error, same = logits_agree(model, quantize(copy.deepcopy(model), "int8"), idx)
    assert error < 0.05 and same >= 0.9, (error, same)


# ---------------------------------------------------------------------------------------------
# The trained run of tests/test_sample_cli.py, through the commands


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, write_tiny_run: Callable[..., Path]) -> Path:
    return train_run(write_tiny_run(tmp_path_factory.mktemp("run"), CORPUS, SAMPLE))


def gpt(run: Path, *args: str) -> tuple[int, str, str]:
    """The command in the run's folder: its exit code, stdout and stderr."""
    result = invoke(run, *args)
    return result.exit_code, result.stdout, result.stderr


@needs_kernel
def test_trained_int8_logits_are_the_float_logits(run: Path) -> None:
    """Trained, the logits are peaked: within 2% in norm, the same argmax at 95% of positions
    (measured: 0.3% and 99.6%)."""
    found = Checkpoint.open(run / "out")
    model, tokenizer = load_for_inference(found, "cpu", "float32", False)
    quantized, _ = load_for_inference(found, "cpu", "float32", False, "int8")
    idx = torch.tensor([tokenizer.encode(CORPUS[i:i + 32]) for i in range(0, 800, 100)])
    error, same = logits_agree(model, quantized, idx)
    assert error < 0.02 and same >= 0.95, (error, same)


# measured on this run: each prompt below gives the float text for all of 300 tokens, in
# float32 and in bfloat16 (the prompt "x" does not: its first token is a near tie)
GREEDY_TOKENS = 100


@needs_kernel
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("prompt", ["def f1", "def f2", "    return", "\n"])
def test_greedy_int8_text_is_the_float_text(run: Path, prompt: str, dtype: str) -> None:
    """`gpt sample --quantize int8` greedy gives the text of the same dtype unquantized for
    GREEDY_TOKENS tokens: a trained model's greedy choice is rarely a near tie, but it can be,
    and then the texts part (docs/sampling.md gives the figures of the quick start's run)."""
    args = ["sample", "--checkpoint", "out", "--prompt", prompt, "--dtype", dtype,
            "--max-new-tokens", str(GREEDY_TOKENS), "--temperature", "0", "--no-stream"]
    code, text, _ = gpt(run, *args)
    int8_code, int8_text, stderr = gpt(run, *args, "--quantize", "int8")
    assert code == int8_code == 0, stderr
    assert int8_text == text and len(text) == len(prompt) + GREEDY_TOKENS + 1


@needs_kernel
def test_sampled_int8_text_is_seeded(run: Path) -> None:
    args = ["sample", "--checkpoint", "out", "--prompt", "def", "--temperature", "1.0",
            "--num-samples", "2", "--no-stream", "--quantize", "int8"]
    one, same, other = (gpt(run, *args, "--seed", seed) for seed in ("3", "3", "4"))
    assert one[0] == 0 and one[1] == same[1] != other[1]


@needs_kernel
def test_eval_int8_loss_is_the_float_loss_within_a_percent(run: Path) -> None:
    code, plain, _ = gpt(run, "eval", "--checkpoint", "out", "--json")
    int8_code, int8, stderr = gpt(run, "eval", "--checkpoint", "out", "--json", "--quantize", "int8")
    assert code == int8_code == 0, stderr
    expected, got = json.loads(plain), json.loads(int8)
    assert got["tokens"] == expected["tokens"]
    assert got["loss"] == pytest.approx(expected["loss"], rel=0.01)
    assert got["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=0.01)


@needs_kernel
@pytest.mark.parametrize("command", [
    ["sample", "--max-new-tokens", "2", "--no-stream"], ["chat", "--max-new-tokens", "2"],
    ["serve", "--port", "0"], ["eval", "--json"],
], ids=lambda command: command[0])
def test_every_command_quantizes_the_model_it_runs(
    run: Path, command: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """--quantize int8 reaches the model of each command (a tiny model's int8 text is often the
    float text, so the text alone would not tell). gpt serve loads its model as the server
    would, then returns instead of serving; gpt chat reads an empty stdin and ends."""
    if command[0] == "serve":
        server = pytest.importorskip("gpt.serve.server", exc_type=ImportError)
        monkeypatch.setattr(server, "serve", lambda load, *rest: load())
    methods = []
    real = quant.quantize

    def spy(model: GPT, method: str) -> GPT:
        methods.append(method)
        return real(model, method)

    monkeypatch.setattr(quant, "quantize", spy)
    code, _, stderr = gpt(run, command[0], "--checkpoint", "out", *command[1:],
                          "--quantize", "int8")
    assert code == 0, stderr
    assert methods == ["int8"]


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_a_request_in_a_busy_int8_batch_gives_what_it_gives_alone(
    dtype: torch.dtype, tiny: Callable[..., GPT]
) -> None:
    """As for the float model (tests/test_engine.py): greedy and seeded sampled requests,
    prompts prefilled in chunks, rows joining and leaving, a window sliding."""
    model = quantize(tiny(pos_embedding="rope").to(dtype), "int8")
    requests = mixed_requests(8, model.config.block_size)
    got = tokens_by_request(list(Engine(model, max_batch=3, prefill_chunk=4).run(requests)))
    for seq, request in enumerate(requests):
        assert got[seq] == alone(model, request), f"request {seq}"


# ---------------------------------------------------------------------------------------------
# Refusals: one GPTError line each (through the command line: tests/test_errors.py)


@pytest.fixture
def fresh_library() -> Iterator[None]:
    """The kernel looked for afresh, before and after the test (it is cached per process)."""
    quant._library.cache_clear()
    yield
    quant._library.cache_clear()


def refusal(call: Callable[[], object]) -> str:
    with pytest.raises(GPTError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.mark.skipif(not X86, reason="on another CPU the refusal names the CPU instead")
def test_a_cpu_without_vnni_is_refused(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch, tiny: Callable[..., GPT]
) -> None:
    monkeypatch.setattr(quant, "_cpu_flags", lambda: {"avx2"})
    assert refusal(lambda: quantize(tiny(), "int8")) == (
        "--quantize int8 needs a CPU with AVX512-VNNI or AVX-VNNI, which this one lacks; run "
        "without --quantize")


@pytest.mark.skipif(not X86, reason="on another CPU the refusal names the CPU instead")
def test_no_c_compiler_is_refused(
    fresh_library: None, monkeypatch: pytest.MonkeyPatch, tiny: Callable[..., GPT]
) -> None:
    monkeypatch.setattr(quant, "_cpu_flags", lambda: {"avx_vnni"})
    monkeypatch.setattr(shutil, "which", lambda name, *args, **kwargs: None)
    monkeypatch.delenv("CC", raising=False)
    assert refusal(lambda: quantize(tiny(), "int8")) == (
        "--quantize int8 builds its kernel with a C compiler, and none was found (cc, gcc or "
        "$CC); install one (such as gcc) or run without --quantize")
    for given in ("/nowhere/cc -O2", '"cc -O2'):  # the second: an unclosed quote
        monkeypatch.setenv("CC", given)
        assert refusal(lambda: quantize(tiny(), "int8")) == (
            f"--quantize int8 builds its kernel with $CC, {given!r}, which is not a program "
            "here; set CC to a C compiler (such as gcc), or unset it")


def test_a_compiler_that_fails_is_one_line(tmp_path: Path) -> None:
    broken = tmp_path / "broken.c"
    broken.write_text("int f(void) { return missing; }\n")
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("needs a C compiler")
    message = refusal(lambda: quant.build(compiler, broken, tmp_path / "k", "broken"))
    assert message.startswith(f"--quantize int8: building its kernel with {compiler} failed (")
    assert "missing" in message and message.endswith("); run without --quantize")
    assert list((tmp_path / "k").iterdir()) == []


def test_a_compiler_that_writes_nothing_is_one_line(tmp_path: Path) -> None:
    """A $CC that succeeds without writing the library (true, a wrapper that forgot -o)."""
    assert refusal(lambda: quant.build("true", SOURCE, tmp_path, "k")) == (
        "--quantize int8: building its kernel with true failed (it wrote no library); run "
        "without --quantize")
    assert list(tmp_path.iterdir()) == []


def test_a_library_that_does_not_load_is_one_line(tmp_path: Path) -> None:
    """What a C++ compiler (a mangled name) or `cc -c` (an object file) would build."""
    target = tmp_path / "k.so"
    target.write_bytes(b"\x7fELF, or not")
    message = refusal(lambda: quant.load(target))
    assert message.startswith(f"--quantize int8 cannot load the kernel it built ({target}: ")
    assert message.endswith("); set CC to a C compiler (such as gcc), or unset it")


@needs_kernel
@pytest.mark.parametrize("damage", [
    lambda whole: whole[:4096], lambda whole: b"",
    lambda whole: whole[:5000] + bytes([whole[5000] ^ 1]) + whole[5001:],
], ids=["cut-short", "empty", "a-bit-flipped"])
def test_a_damaged_kernel_in_the_cache_is_built_again(
    damage: Callable[[bytes], bytes], fresh_library: None, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A library cut short by a full disk or a crash would kill the process loading it (SIGBUS),
    so one whose bytes no longer match the digest in its name is built again instead."""
    monkeypatch.setenv("GPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(quant, "load", lambda target: target)  # the path it would load
    built = quant._library()
    whole = built.read_bytes()
    built.write_bytes(damage(whole))
    quant._library.cache_clear()
    rebuilt = quant._library()
    assert rebuilt.stem.rpartition("-")[2] == quant._digest(rebuilt.read_bytes())  # whole


def test_a_cache_folder_that_cannot_be_written_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    message = refusal(lambda: quant.build("cc", SOURCE, tmp_path / "file" / "kernels", "k"))
    assert message == (f"--quantize int8 cannot write its kernel into {tmp_path}/file/kernels "
                       "(Not a directory); set GPT_CACHE_DIR to a writable folder")


def test_no_cache_folder_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """No $GPT_CACHE_DIR, no $XDG_CACHE_HOME and no home folder: nowhere to keep the kernel."""
    monkeypatch.delenv("GPT_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)

    def no_home() -> Path:
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", no_home)
    assert refusal(quant._kernel_cache) == (
        "--quantize int8 keeps the kernel it builds in a cache folder, and there is no home "
        "folder for one; set GPT_CACHE_DIR to a writable folder")


def test_a_gpu_and_float16_are_refused(tiny: Callable[..., GPT]) -> None:
    """A model on another device (the meta device stands in for a GPU: nothing is computed),
    and one in float16, which the kernel does not read."""
    assert refusal(lambda: quantize(tiny().to("meta"), "int8")) == (
        "--quantize int8 runs on the CPU, not meta; give --device cpu or run without --quantize")
    assert refusal(lambda: quantize(tiny().half(), "int8")) == (
        "--quantize int8 computes in float32 or bfloat16, not float16; give --dtype bfloat16 or "
        "--dtype float32")


def test_an_unknown_method_and_compile_are_refused() -> None:
    assert refusal(lambda: check_method("int4")) == (
        "--quantize 'int4' is not a quantization; use --quantize int8 or leave it out")
    assert refusal(lambda: check_method("int8", compiled=True)) == (
        "--compile cannot compile --quantize int8's kernel; give one of them, not both")
    check_method(None, compiled=True)
    check_method("int8")
