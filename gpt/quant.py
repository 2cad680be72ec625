"""int8 inference (`--quantize int8`): the Linear layers' weights in int8, quantized at load.

Decoding a token reads every weight once, so at batch 1 it runs at the speed of memory, and
int8 weights are half of bfloat16's bytes. The checkpoint is never changed: each Linear weight
is quantized when the model loads (a fraction of a second for 124M parameters), one scale per
output channel, W ~ w_int8 * scale with scale = max|W_row| / 127.

The matmul is gpt/kernels/int8_linear.c, built once per host with its C compiler and loaded
through ctypes. It quantizes each activation row (each token) to int8 as well and sums the
products in integers with the CPU's VNNI instruction (AVX512-VNNI or AVX-VNNI). torch's own
int8 weight-only kernel converts every weight back to a float first, which measured at 0.6x
this kernel's speed on two cores (docs/performance.md's ablation). Where the kernel cannot be
built or run (another CPU, no C compiler, a GPU), `--quantize int8` is refused in one line
instead of falling back to something slow.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gpt.errors import GPTError
from gpt.fileio import cache_folder

if TYPE_CHECKING:
    from gpt.model import GPT

METHODS = ("int8",)
PAD = 64  # weight rows are zero-padded to a multiple of the widest vector the kernel loads
MANY_ROWS = 32  # rows from which torch's int8 matrix product beats the kernel (measured)
# no fused multiply-adds: the kernel's arithmetic must be Int8Linear._many_rows', bit for bit
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-shared", "-fPIC")


def check_method(method: str | None, compiled: bool = False) -> None:
    """Refuse a --quantize value that is not a method, or one given with --compile (`compiled`:
    torch.compile cannot trace into the ctypes kernel), before anything loads."""
    if method is not None and method not in METHODS:
        raise GPTError(f"--quantize {method!r} is not a quantization; use --quantize int8 or "
                       "leave it out")
    if method is not None and compiled:
        raise GPTError(f"--compile cannot compile --quantize {method}'s kernel; give one of "
                       "them, not both")


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags (Linux's /proc/cpuinfo), or None where they cannot be read."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return set(line.partition(":")[2].split()) or None


def _kernel_cache() -> Path:
    """Where built kernels are kept: `kernels` in gpt's cache folder (~/.cache/gpt by default)."""
    folder = cache_folder()
    if folder is None:
        raise GPTError("--quantize int8 keeps the kernel it builds in a cache folder, and there "
                       "is no home folder for one; set GPT_CACHE_DIR to a writable folder")
    return folder / "kernels"


def _compiler() -> str:
    """The C compiler: $CC (a command, flags allowed), else cc, else gcc."""
    given = os.environ.get("CC", "").strip()
    if given:
        try:
            program = shlex.split(given)[0]
        except ValueError:  # an unclosed quote
            program = ""
        if not program or shutil.which(program) is None:
            raise GPTError(f"--quantize int8 builds its kernel with $CC, {given!r}, which is not "
                           "a program here; set CC to a C compiler (such as gcc), or unset it")
        return given
    found = shutil.which("cc") or shutil.which("gcc")
    if found is None:
        raise GPTError("--quantize int8 builds its kernel with a C compiler, and none was found "
                       "(cc, gcc or $CC); install one (such as gcc) or run without --quantize")
    return found


def build(compiler: str, source: Path, folder: Path, name: str,
          extra: tuple[str, ...] = ()) -> Path:
    """Build the shared library into `folder` as `name-DIGEST.so`, DIGEST its bytes' (see
    `_intact`), through a temporary file, so that a process reading the cache never finds half
    a library. `compiler` is a command (flags allowed); `extra` flags come last (the tests build
    the AVX-VNNI variant on an AVX-512 host with -mno-avx512f)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            built = Path(tmp) / f"{name}.so"
            _compile(compiler, [*shlex.split(compiler), *FLAGS, str(source), "-o", str(built),
                                *extra], built)
            target = folder / f"{name}-{_digest(built.read_bytes())}.so"
            os.replace(built, target)
    except OSError as e:
        raise GPTError(f"--quantize int8 cannot write its kernel into {folder} "
                       f"({e.strerror}); set GPT_CACHE_DIR to a writable folder") from None
    return target


def _compile(compiler: str, command: list[str], output: Path) -> None:
    """Run `command`, which writes `output`; where it fails, its first error line (or why it
    could not run) in one GPTError."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    except OSError as e:
        reason = e.strerror or str(e)
    except subprocess.TimeoutExpired:
        reason = "it ran for 300 seconds"
    else:
        if result.returncode == 0 and output.is_file():
            return
        errors = [ln for ln in result.stderr.splitlines() if "error" in ln]
        reason = (errors[0].split("error:", 1)[-1].strip() if errors
                  else "it wrote no library" if result.returncode == 0 else "it failed")
    raise GPTError(f"--quantize int8: building its kernel with {compiler} failed ({reason}); "
                   "run without --quantize")


def _digest(data: bytes) -> str:
    """16 hex digits of data's SHA-256: short enough for a file name, enough to tell a change."""
    return hashlib.sha256(data).hexdigest()[:16]


def _intact(folder: Path, name: str) -> Path | None:
    """A library `build` left in `folder` as `name`, whose bytes still match the digest in its
    file name: one cut short (a full disk, a crash before the data reached it) or otherwise
    damaged is built again, since loading it would kill the process (SIGBUS) rather than
    raise."""
    for path in folder.glob(f"{name}-*.so"):
        try:
            if path.stem.removeprefix(f"{name}-") == _digest(path.read_bytes()):
                return path
        except OSError:
            continue
    return None


@functools.cache
def _library() -> ctypes.CDLL:
    """The int8 kernel, built for this host on first use and kept in the cache."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise GPTError(f"--quantize int8 needs an x86-64 CPU with VNNI; this is "
                       f"{platform.machine()}; run without --quantize")
    flags = _cpu_flags()
    if flags is not None and not ({"avx512_vnni", "avx512bw"} <= flags or "avx_vnni" in flags):
        raise GPTError("--quantize int8 needs a CPU with AVX512-VNNI or AVX-VNNI, which this one "
                       "lacks; run without --quantize")
    compiler = _compiler()
    source = resources.files("gpt") / "kernels" / "int8_linear.c"
    with resources.as_file(source) as path:
        code = path.read_bytes()
        # -march=native: a library is only valid on the CPU it was built for
        host = " ".join(sorted(flags or ())) + platform.processor()
        name = f"int8_linear-{_digest(code + ' '.join([host, compiler, *FLAGS]).encode())}"
        folder = _kernel_cache()
        target = _intact(folder, name) or build(compiler, path, folder, name)
    return load(target)


def load(target: Path) -> ctypes.CDLL:
    """The built kernel, its function's argument types declared."""
    try:
        library = ctypes.CDLL(str(target))
        fn = library.int8_linear
    except (OSError, AttributeError) as e:  # not a shared library, or C++'s mangled name
        raise GPTError(f"--quantize int8 cannot load the kernel it built ({e}); set CC to a C "
                       "compiler (such as gcc), or unset it") from None
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, *[ctypes.c_void_p] * 4,
                   *[ctypes.c_int64] * 4, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int]
    return library


def quantize_weight(weight: Tensor) -> tuple[Tensor, Tensor]:
    """int8 rows (N, K) and their scales (N,) float32: weight ~ rows * scales[:, None]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


class Int8Linear(nn.Module):
    """A Linear layer whose weight is int8 with one scale per output channel (inference only).

    Its buffers are not part of the state dict: what a checkpoint holds stays the float weights.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        rows, scale = quantize_weight(linear.weight)  # (N, K), (N,)
        padded = -(-self.in_features // PAD) * PAD
        self.register_buffer("weight_int8", F.pad(rows, (0, padded - self.in_features)),
                             persistent=False)  # (N, Kp)
        self.register_buffer("weight_scale", scale, persistent=False)
        self.register_buffer("weight_sum", rows.sum(dim=1, dtype=torch.int32), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().float()
        self.register_buffer("bias", bias, persistent=False)
        self._point_at_buffers()

    def _point_at_buffers(self) -> None:
        """The kernel's weight arguments, taken once: a decode step calls every layer, and what
        each call spends in Python beside the kernel is a share of the step int8 made short."""
        self._weights = (self.weight_int8.data_ptr(), self.weight_scale.data_ptr(),
                         self.weight_sum.data_ptr(),
                         None if self.bias is None else self.bias.data_ptr())
        self._cpu = self.weight_int8.device.type == "cpu"

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        """`.to()` and the like: the scales and bias stay float32 (the kernel reads float32),
        and the kernel's pointers follow the buffers wherever they went."""
        scale, bias = self.weight_scale, self.bias
        super()._apply(fn, recurse)
        device = self.weight_int8.device
        self.weight_scale = scale.to(device)
        self.bias = None if bias is None else bias.to(device)
        self._point_at_buffers()
        return self

    def forward(self, x: Tensor) -> Tensor:
        on_cpu = self._cpu and x.device.type == "cpu"  # the kernel reads host memory only
        if x.dtype not in (torch.float32, torch.bfloat16) or not on_cpu:
            raise GPTError(f"int8 layers compute on the CPU in float32 or bfloat16, not "
                           f"{x.dtype} on {x.device}")
        K, N = self.in_features, self.out_features
        rows = x.reshape(-1, K)  # (M, K)
        if not rows.is_contiguous():
            rows = rows.contiguous()
        M, Kp = rows.size(0), self.weight_int8.size(1)
        if M >= MANY_ROWS:
            return self._many_rows(rows).view(*x.shape[:-1], N)
        out = torch.empty(M, N, dtype=x.dtype)  # (M, N)
        scratch = torch.empty(M * (Kp + 4), dtype=torch.uint8)  # quantized rows, then scales
        _library().int8_linear(
            rows.data_ptr(), out.data_ptr(), x.dtype == torch.bfloat16, *self._weights,
            M, N, K, Kp, scratch.data_ptr(), scratch.data_ptr() + M * Kp,
            torch.get_num_threads(),
        )
        return out.view(*x.shape[:-1], N)

    def _many_rows(self, rows: Tensor) -> Tensor:
        """The kernel's arithmetic for many rows (a prompt, an evaluation batch) on torch's int8
        matrix product, which keeps the CPU's matrix units busy where the kernel, made for one
        row at a time, would not. Every step is the kernel's, in its order, so a row gives
        bitwise the same values by either path (whichever its batch takes)."""
        x = rows.float()  # (M, K)
        amax = x.abs().amax(dim=1, keepdim=True)  # (M, 1)
        # full tensors, not Python numbers: torch turns `127 / t` into 127 * (1 / t), two
        # roundings where the kernel has one
        limit = torch.full_like(amax, 127.0)
        inverse = torch.where(amax > 0, limit / amax, torch.zeros_like(amax))
        quantized = torch.round(x * inverse).to(torch.int8)  # (M, K)
        weight = self.weight_int8[:, : self.in_features].t()  # (K, N)
        dots = torch._int_mm(quantized, weight)  # (M, N) int32, exact
        y = (amax / limit * self.weight_scale) * dots.float()
        if self.bias is not None:
            y = y + self.bias
        return y.to(rows.dtype)


def check_runs_here(method: str, device: torch.device, dtype: torch.dtype) -> None:
    """Refuse `method` for a model on `device` in `dtype` where its kernel cannot run (see the
    module's docstring), building the kernel if this host has none yet: before a checkpoint
    loads, and again before a model is touched."""
    check_method(method)
    if device.type != "cpu":
        raise GPTError(f"--quantize {method} runs on the CPU, not {device.type}; give "
                       "--device cpu or run without --quantize")
    if dtype not in (torch.float32, torch.bfloat16):
        name = str(dtype).removeprefix("torch.")
        raise GPTError(f"--quantize {method} computes in float32 or bfloat16, not {name}; "
                       "give --dtype bfloat16 or --dtype float32")
    _library()


def quantize(model: GPT, method: str) -> GPT:
    """Swap, in place, the model's Linear layers (the LM head included) for int8 ones.

    Cross-attention keeps its Linear: it splits the fused weight at run time. The token
    embedding stays as it is: a lookup reads one row per token. Raises GPTError where no kernel
    runs here (check_runs_here).
    """
    weight = model.transformer.wte.weight
    check_runs_here(method, weight.device, weight.dtype)
    model.replace_linears(Int8Linear)
    return model
