"""What `gpt info` says of a run or a model: its config, parameter count, FLOPs per token, the
memory training holds, and the peak FLOP/s of the device it trains on (MFU's denominator)."""

from __future__ import annotations

import torch

from gpt.config import RunConfig, TrainConfig, fit_vocabulary, to_toml
from gpt.errors import GPTError
from gpt.lora import LoRA, add_adapters
from gpt.model import GPT
from gpt.plan import Plan


def describe(planned: Plan, sections: tuple[str, ...], nproc: int = 1) -> str:
    """The planned run's `sections` of config, then its model's size, FLOPs and memory (also
    per process of `nproc`, when more than one), and the device's peak."""
    cfg = planned.cfg
    model_cfg = cfg.model
    note = ""
    if model_cfg.vocab_size is None:  # what training will take from the tokenizer
        model_cfg = fit_vocabulary(model_cfg, planned.tokenizer_vocab())
        note = (f" (vocab_size {model_cfg.vocab_size} from the {cfg.data.tokenizer} tokenizer, "
                f"padded to {model_cfg.padded_vocab_size})")
    with torch.device("meta"):  # shapes only: no memory, instant even for large models
        model = GPT(model_cfg)
    n_params = model.num_params()
    lines = [
        to_toml(cfg, sections).rstrip(),
        "",
        f"parameters:        {n_params:,}{note}",
        f"  non-embedding:   {model.num_params(exclude_embeddings=True):,}",
        f"FLOPs per token:   {model.flops_per_token():,} (training, at block_size)",
    ]
    if cfg.train.finetune == "lora":
        lora = LoRA.from_config(cfg.train, model_cfg, rows=planned.chat_token_ids)
        adapters = add_adapters(model, lora, cfg.train.seed)  # on the meta device too
        rows = " and the chat tokens' rows" if lora.rows else ""
        lines.append(f"LoRA adapters:     {adapters:,} trained (rank {lora.rank} on "
                     f"{', '.join(lora.targets)}{rows}); the {n_params:,} above stay frozen")
    lines.append(f"memory (float32):  {_memory(model, cfg.train, 1)}")
    if nproc > 1:
        lines.append(f"per process ({_layout(cfg.train, nproc)}): "
                     f"{_memory(model, cfg.train, nproc)}")
    lines.append(f"device peak:       {_peak(cfg)}")
    return "\n".join(lines)


def _layout(tcfg: TrainConfig, nproc: int) -> str:
    """How `nproc` processes share the model: `8 processes, parallel = "hsdp", 2 replicas of 4`
    (HSDP's groups as training counts them, all on one node when hsdp_replicas is unset)."""
    from gpt.parallel import replica_groups

    layout = f"{nproc} processes, parallel = \"{tcfg.parallel}\""
    if tcfg.parallel != "hsdp":
        return layout
    replicas = replica_groups(tcfg, nproc, nproc)
    return f"{layout}, {replicas} replica{'s' if replicas > 1 else ''} of {nproc // replicas}"


def _memory(model: GPT, tcfg: TrainConfig, nproc: int) -> str:
    """What each of `nproc` processes holds under train.parallel (one: the whole model), the
    optimizer named and sized as [train] optimizer builds it; both memory lines come from here,
    so they agree. A LoRA finetune's gradients and optimizer state are its adapters' alone."""
    from gpt.optim import optimizer_state
    from gpt.parallel import memory_per_process

    name, optimizer_bytes = optimizer_state(model, tcfg)
    largest_block = max(sum(p.numel() for p in b.parameters()) for b in model.transformer.h)
    n_params = model.num_params()
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    memory = memory_per_process(n_params, trained, optimizer_bytes, largest_block, tcfg, nproc)
    total = memory["weights"] + memory["gradients"] + memory["optimizer"]
    weights = format_bytes(memory["weights"])
    if trained < n_params:
        weights += (f" (frozen {format_bytes(4 * (n_params - trained))} + adapters "
                    f"{format_bytes(4 * trained)})")
    line = (f"weights {weights} + gradients "
            f"{format_bytes(memory['gradients'])} + {name} state "
            f"{format_bytes(memory['optimizer'])} = {format_bytes(total)}")
    if memory["gathered"]:
        line += (f", plus {format_bytes(memory['gathered'])} for two blocks gathered whole "
                 "while they run (half that in bfloat16)")
    return line + ", before activations"


def format_bytes(n: float) -> str:
    """A byte count in binary units: a tiny model's weights read "59.9 KiB", not "0.00 GiB"."""
    return _in_units(n, (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)), "B")


def format_flop_rate(n: float) -> str:
    """FLOP/s in decimal units: "150 GFLOP/s", "989 TFLOP/s"."""
    units = (("PFLOP/s", 1e15), ("TFLOP/s", 1e12), ("GFLOP/s", 1e9), ("MFLOP/s", 1e6))
    return _in_units(n, units, "FLOP/s")


def _in_units(n: float, units: tuple[tuple[str, float], ...], base: str) -> str:
    """`n` in the largest of `units` (largest first) that keeps it at 1 or more, else in `base`,
    to about three figures."""
    unit, scale = next(((u, s) for u, s in units if n >= s), (base, 1))
    value = n / scale
    return f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f} {unit}"


def _peak(cfg: RunConfig) -> str:
    """The peak FLOP/s that training's MFU divides by, on [train] device in [train] dtype: a
    CPU's is measured once and cached (gpt/peak.py), a GPU's comes from a table."""
    from gpt.device import resolve_device, resolve_dtype
    from gpt.metrics import describe_peak

    if cfg.train.peak_flops is None:
        try:
            device = resolve_device(cfg.train.device, "[train] device")
            dtype = resolve_dtype(cfg.train.dtype, device, "[train] dtype")
        except GPTError as e:
            return f"unknown here ({e})"
        flops, source = describe_peak(cfg.train, device, dtype)
    else:
        flops, source = cfg.train.peak_flops, "[train] peak_flops"
    return f"{format_flop_rate(flops)} ({source})" if flops else f"unknown ({source})"
