"""Optimizers, the learning-rate schedule and the non-finite step policy.

`make_optimizer` builds AdamW (nanoGPT's groups) or Muon for the hidden matrices plus AdamW for
the rest, stepped as one `CombinedOptimizer` (`Muon` is torch's, also on FSDP's sharded rows);
`lr_at` is every group's rate at a step, which a `Schedule` sets once per step; a step whose
loss or gradient norm is not finite is kept from the weights (`step_unless`) and noted on the
device (`NonFiniteSteps`), so that watching for one costs no host sync.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import torch

from gpt.config import TrainConfig
from gpt.errors import GPTError
from gpt.model import GPT
from gpt.parallel.sharding import is_sharded, local_rows, on_whole_matrices


def lr_at(iteration: int, cfg: TrainConfig, peak: float | None = None) -> float:
    """The learning rate of step `iteration` (from 0): linear warmup to learning_rate, then
    cosine or WSD decay (`lr_schedule`) to min_lr at lr_decay_iters; constant without decay_lr.

    A parameter group with its own peak (Muon's `muon_lr`) follows the same curve scaled by
    peak / learning_rate; at learning_rate's peak the curve is returned as is, unrounded.
    """
    lr = _lr_curve(iteration, cfg)
    if peak is None or peak == cfg.learning_rate:
        return lr
    return peak * (lr / cfg.learning_rate)


def _lr_curve(iteration: int, cfg: TrainConfig) -> float:
    if not cfg.decay_lr:
        return cfg.learning_rate
    if iteration < cfg.warmup_iters:
        return cfg.learning_rate * (iteration + 1) / (cfg.warmup_iters + 1)
    decay_iters = cfg.decay_iters
    if iteration >= decay_iters:
        return cfg.min_lr
    if cfg.lr_schedule == "wsd":
        cooldown = cfg.cooldown_fraction * decay_iters  # the last steps before decay_iters
        if decay_iters - iteration >= cooldown:
            return cfg.learning_rate  # stable
        coeff = (decay_iters - iteration) / cooldown  # 1 -> 0, linear
    else:
        progress = (iteration - cfg.warmup_iters) / max(1, decay_iters - cfg.warmup_iters)
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_lr + coeff * (cfg.learning_rate - cfg.min_lr)


class Schedule:
    """Sets every parameter group's rate for a step from its own peak (`initial_lr`), once a
    step; `rates` reads back the rates last set, for the metrics."""

    def __init__(self, optimizer: Optimizer, cfg: TrainConfig) -> None:
        self.optimizer, self.cfg = optimizer, cfg

    def apply(self, iteration: int) -> None:
        """The rates of step `iteration` (from 0), set in every group."""
        for group in self.optimizer.param_groups:  # each group's own peak, on one curve
            group["lr"] = lr_at(iteration, self.cfg, group["initial_lr"])

    def rates(self) -> dict[str, float]:
        """The rates last set: AdamW's as `lr` and, with Muon, Muon's as `muon_lr`."""
        if isinstance(self.optimizer, CombinedOptimizer):
            named = self.optimizer.optimizers
            return {"lr": named["adamw"].param_groups[0]["lr"],
                    "muon_lr": named["muon"].param_groups[0]["lr"]}
        return {"lr": self.optimizer.param_groups[0]["lr"]}


@contextlib.contextmanager
def config_peaks(optimizer: Optimizer) -> Iterator[None]:
    """Keep the groups' peak rates (`initial_lr`, the config's) across loading a saved state,
    which holds the peaks it was trained with: a resumed run with new rates uses the new ones."""
    peaks = [group["initial_lr"] for group in optimizer.param_groups]
    yield
    for group, peak in zip(optimizer.param_groups, peaks, strict=True):
        group["initial_lr"] = peak


def make_optimizer(model: GPT, cfg: TrainConfig, device: torch.device) -> Optimizer:
    """AdamW decaying matrices (weights, embeddings) but not biases and norm gains (nanoGPT).

    With optimizer = "muon", Muon takes the weight matrices inside the blocks (it orthogonalises
    2-D updates; embeddings and the head are lookups and a classifier, not hidden layers) and
    AdamW the rest, the two stepped as one `CombinedOptimizer`. Each group's `initial_lr` is
    its peak rate, which train_step's schedule scales.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    hidden = muon_matrices(model) if cfg.optimizer == "muon" else []
    in_muon = {id(p) for p in hidden}
    rest = [p for p in params if id(p) not in in_muon]
    adamw = _adamw(rest, cfg, device)
    if not hidden:
        return adamw
    # momentum 0.95 with Nesterov, 5 Newton-Schulz steps: torch's defaults, Keller Jordan's Muon
    muon = muon_class()(hidden, lr=cfg.muon_lr, weight_decay=0.0)
    muon.param_groups[0]["initial_lr"] = cfg.muon_lr
    return CombinedOptimizer({"muon": muon, "adamw": adamw})


def _adamw(
    params: list[torch.nn.Parameter], cfg: TrainConfig, device: torch.device
) -> torch.optim.AdamW:
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # one kernel per step instead of a dozen foreach passes; CPU kernels exist since torch 2.4
    fused = {"fused": True} if device.type in ("cuda", "cpu") else {}
    optimizer = torch.optim.AdamW(
        groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), **fused
    )
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.learning_rate
    return optimizer


def muon_matrices(model: GPT) -> list[torch.nn.Parameter]:
    """The hidden weight matrices Muon updates: every 2-D parameter inside the blocks."""
    return [p for p in model.transformer.h.parameters() if p.dim() == 2 and p.requires_grad]


def optimizer_state(model: GPT, cfg: TrainConfig) -> tuple[str, int]:
    """The name of the optimizer `make_optimizer` builds for `cfg` and the float32 bytes of its
    state for the whole model, so that sizing (`gpt info`) counts what training allocates:
    AdamW keeps two moments a parameter, Muon one momentum buffer."""
    in_muon = sum(p.numel() for p in muon_matrices(model)) if cfg.optimizer == "muon" else 0
    rest = sum(p.numel() for p in model.parameters() if p.requires_grad) - in_muon
    return ("Muon + AdamW" if in_muon else "AdamW"), 8 * rest + 4 * in_muon


def muon_class() -> type[torch.optim.Optimizer]:
    """`Muon` (torch.optim.Muon's), or a one-line error naming the fix on a torch without it."""
    if getattr(torch.optim, "Muon", None) is None:
        raise GPTError(
            f"[train] optimizer = \"muon\" needs torch.optim.Muon (torch >= 2.9; this is torch "
            f"{torch.__version__}); upgrade torch, or set train.optimizer = \"adamw\""
        )
    return Muon


class Muon(getattr(torch.optim, "Muon", torch.optim.Optimizer)):  # type: ignore[misc]
    """torch.optim.Muon, also for weights FSDP splits by rows across processes, with the same
    result whatever the layout: its state dict is torch's (a `momentum_buffer` a matrix, shaped
    and sharded like it), so checkpoints move between layouts and from before.

    Plain tensors take torch's own step. Sharded ones (DTensors) update the momentum on each
    process's rows; each whole update is orthogonalised once, by the process that owns the
    matrix (`on_whole_matrices`), with torch's Newton-Schulz; each process applies its rows.
    """

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        if not any(is_sharded(p) for group in self.param_groups for p in group["params"]):
            return super().step(closure)
        assert closure is None, "a sharded Muon step takes no closure"
        for group in self.param_groups:
            self._step_by_rows(group)
        return None

    def _step_by_rows(self, group: dict[str, Any]) -> None:
        """torch's step for one group (`_single_tensor_muon`), on the rows each process holds."""
        lr, momentum = group["lr"], group["momentum"]
        params = [p for p in group["params"] if p.grad is not None]
        updates = []
        for param in params:
            state = self.state[param]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(param.grad)
            grad, buf = local_rows(param.grad), local_rows(state["momentum_buffer"])
            buf.lerp_(grad, 1 - momentum)
            updates.append(grad.lerp(buf, momentum) if group["nesterov"] else buf)
        fns = muon_math()

        def orthogonalise(update: torch.Tensor) -> torch.Tensor:
            return fns.zeropower(update, group["ns_coefficients"], group["ns_steps"],
                                   group["eps"])

        for param, update in zip(params, on_whole_matrices(params, updates, orthogonalise,
                                                           torch.bfloat16), strict=True):
            rows = local_rows(param)
            rows.mul_(1 - lr * group["weight_decay"])
            rows.add_(update, alpha=-fns.adjust_lr(lr, group["adjust_lr_fn"], param.shape))


class MuonMath(NamedTuple):
    """Newton-Schulz orthogonalisation, computed in bfloat16 (so an update may travel in it),
    and the learning-rate scaling by a matrix's shape: Muon's two functions."""

    zeropower: Callable[[torch.Tensor, tuple[float, float, float], int, float], torch.Tensor]
    adjust_lr: Callable[[float, str | None, torch.Size], float]


@functools.cache
def muon_math() -> MuonMath:
    """torch's own functions, which its Muon steps a whole matrix with, so that a sharded
    matrix gets the same numbers; our copy where a torch no longer has them as they were
    (private names): an upgrade then costs sameness with one process, never a working step.

    torch's Newton-Schulz must compute in bfloat16, as ours does: the same result from the
    update in float32 and in bfloat16.
    """
    try:
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        probe = torch.randn(3, 2, generator=torch.Generator().manual_seed(0))
        coefficients = (3.4445, -4.7750, 2.0315)
        out = _zeropower_via_newtonschulz(probe, coefficients, 2, 1e-7)
        same = _zeropower_via_newtonschulz(probe.bfloat16(), coefficients, 2, 1e-7)
        if out.dtype == torch.bfloat16 and torch.equal(out, same):
            _adjust_lr(0.1, None, probe.shape)
            return MuonMath(_zeropower_via_newtonschulz, _adjust_lr)
    except Exception:  # moved, renamed or changed
        pass
    return MuonMath(zeropower_via_newtonschulz, adjust_lr)


def zeropower_via_newtonschulz(
    grad: torch.Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> torch.Tensor:
    """The nearest semi-orthogonal matrix to `grad`, roughly (singular values near 1), by a
    quintic Newton-Schulz iteration in bfloat16: torch 2.9's (Keller Jordan's Muon)."""
    a, b, c = ns_coefficients
    ortho = grad.bfloat16()
    if grad.size(0) > grad.size(1):
        ortho = ortho.T
    ortho.div_(ortho.norm().clamp(min=eps))  # spectral norm at most 1
    for _ in range(ns_steps):
        gram = ortho @ ortho.T
        ortho = torch.addmm(ortho, torch.addmm(gram, gram, gram, beta=b, alpha=c), ortho, beta=a)
    return ortho.T if grad.size(0) > grad.size(1) else ortho


def adjust_lr(lr: float, adjust_lr_fn: str | None, shape: torch.Size) -> float:
    """A matrix's learning rate: scaled by sqrt(max(1, rows / cols)) (Keller Jordan's, torch's
    default) or by 0.2 sqrt(max(rows, cols)) ("match_rms_adamw", Moonshot's): torch 2.9's."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        return lr * math.sqrt(max(1, rows / cols))
    if adjust_lr_fn == "match_rms_adamw":
        return lr * 0.2 * math.sqrt(max(rows, cols))
    return lr


class CombinedOptimizer:
    """Optimizers over disjoint parameters, seen as one: the trainer, the GradScaler and
    checkpoints use `param_groups`, `step`, `zero_grad` and the state dicts, nothing else.

    The state dict holds each optimizer's under its name, plain tensors and numbers, so the
    checkpoint still loads with `torch.load(weights_only=True)`.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """Every optimizer's groups (the dicts themselves: setting a group's lr sets it)."""
        return [group for opt in self.optimizers.values() for group in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if sorted(state) != sorted(self.optimizers):
            raise GPTError(
                f"the saved optimizer state holds {sorted(state)}, this run uses "
                f"{sorted(self.optimizers)}; resume with the train.optimizer it was trained with"
            )
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


Optimizer = torch.optim.Optimizer | CombinedOptimizer


# ---------------------------------------------------------------------------------------------
# The non-finite step policy


class NonFiniteSteps:
    """The first step whose loss or gradient norm was not finite, noted on the device, so that
    watching every step costs no host sync; `check` reads it (one sync) and stops the run."""

    WHAT = {1: "loss", 2: "gradient norm"}

    def __init__(self, device: torch.device) -> None:
        self.first = torch.zeros(2, dtype=torch.int64, device=device)  # [iteration, what]; 0: none

    def note(self, iteration: int, bad_loss: torch.Tensor, bad_norm: torch.Tensor) -> None:
        """Remember `iteration` if it is the first bad one (bad_loss, bad_norm: 0-dim bool)."""
        what = torch.where(bad_loss, 1, torch.where(bad_norm, 2, 0))
        seen = torch.stack((what.clamp(max=1) * iteration, what))  # [0, 0] for a good step
        self.first = torch.where(self.first[1] == 0, seen, self.first)

    def check(self, last_checkpoint: Path | None) -> None:
        """Raise if any step so far was bad; its update never reached the weights."""
        iteration, what = self.first.tolist()
        if what:
            raise GPTError(
                f"non-finite {self.WHAT[what]} at iteration {iteration}; stopped before the "
                f"optimizer step; last good checkpoint: {last_checkpoint or 'none yet'}; lower "
                "train.learning_rate or check the data"
            )


@functools.cache
def found_inf_skips(device: torch.device) -> bool:
    """Whether fused AdamW on `device` honours a `found_inf` flag as GradScaler sets it for fused
    optimizers: a flagged step leaves the weights, moments and step count as they were.

    One probe per device, run once: an optimizer that ignored the flag would apply a bad step, so
    a torch (or device) that fails it gets the host check of `step_unless` instead.
    """
    try:
        weight = torch.nn.Parameter(torch.ones(4, device=device))
        weight.grad = torch.ones_like(weight)
        optimizer = torch.optim.AdamW([weight], lr=0.5, fused=True)
        optimizer.found_inf = torch.ones((), device=device)  # type: ignore[attr-defined]
        optimizer.step()
        state = optimizer.state[weight]
        skipped = bool((weight == 1).all()) and state["step"].item() == 0
        skipped = skipped and not state["exp_avg"].any()
        optimizer.found_inf = torch.zeros((), device=device)  # type: ignore[attr-defined]
        optimizer.step()
        stepped = bool((weight < 1).all()) and state["step"].item() == 1
        return skipped and stepped
    except Exception:  # no fused AdamW on this device or in this torch
        return False


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `step_unless` can skip this optimizer's step without reading the flag on the host:
    fused AdamW (what `make_optimizer` builds on CUDA) where the probe passes."""
    groups = optimizer.param_groups
    return (
        isinstance(optimizer, torch.optim.AdamW)
        and all(group.get("fused") for group in groups)
        and found_inf_skips(groups[0]["params"][0].device)
    )


def step_unless(optimizer: torch.optim.Optimizer, bad: torch.Tensor) -> None:
    """`optimizer.step()`, unless the 0-dim bool `bad` on the device is set.

    Fused AdamW reads the flag inside its kernel, so nothing waits for the device. Any other
    optimizer is told nothing of it, so the flag is read on the host: exact, at the cost of one
    sync per step (nothing on the CPU, where nothing runs ahead of the host). Masking the update
    with torch.where instead would need a copy of the weights and moments every step.
    """
    if skips_on_device(optimizer):
        optimizer.found_inf = bad.float()  # type: ignore[attr-defined]
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf  # type: ignore[attr-defined]
    elif not bad.item():
        optimizer.step()
