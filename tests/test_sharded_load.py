"""Sharded initialisation and loading under FSDP: a model built on the meta device, sharded,
then filled row by row, holds bitwise the weights of a model built whole (GPT(config)) and
loaded whole. Three gloo processes (so that rows split unevenly and across Llama's fused
q, k, v) run every case once; each test compares one case with its whole reference."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import transformers
from safetensors.torch import save_file
from test_parallel import NO_DROPOUT, STEPS, assert_close_losses, losses, one_process

from gpt.checkpoint import Checkpoint, load_weights
from gpt.config import ModelConfig
from gpt.errors import GPTError
from gpt.hf.convert import from_hf, model_config_from_hf
from gpt.hf.pretrained import Pretrained
from gpt.layout import WEIGHTS
from gpt.model import GPT
from gpt.parallel import Dist
from gpt.parallel.sharding import full_model_state
from gpt.tokenizer import CHAT_TOKENS
from gpt.weights import load_with_chat_tokens

PROCESSES = 3
SEED = 7
SHAPE = dict(vocab_size=50, block_size=15, n_layer=2, n_head=4, n_embd=48)
FRESH = {
    "learned-tied": {},
    "rope-untied-manual": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                               tie_embeddings=False, attention="manual", n_kv_head=1),
    "zero_init_proj-cross": dict(zero_init_proj=True, cross_attention=True),
    "post-norm-gqa": dict(norm_position="post", n_kv_head=2),
}
SAVED = {  # checkpoints: learned positions or rotary, tied head or not
    "learned-tied": {},
    "learned-untied": dict(tie_embeddings=False),
    "rope-tied": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False),
    "rope-untied": dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False,
                        tie_embeddings=False, n_kv_head=1),
}
HF = {  # HF models: GPT-2's transposed Conv1D, Llama's and Qwen3's q, k, v split in three
    "gpt2-tied": lambda: transformers.GPT2Config(n_positions=16, n_embd=48, n_layer=2, n_head=4),
    "gpt2-untied": lambda: transformers.GPT2Config(n_positions=16, n_embd=48, n_layer=2,
                                                   n_head=4, tie_word_embeddings=False),
    "llama-gqa-untied": lambda: transformers.LlamaConfig(
        max_position_embeddings=16, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, head_dim=12, tie_word_embeddings=False),
}
if hasattr(transformers, "Qwen3Config"):  # transformers 4.51 or later
    HF["qwen3-tied"] = lambda: transformers.Qwen3Config(
        max_position_embeddings=16, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=12, tie_word_embeddings=True)
CHARS = "\n" + "".join(chr(ord("!") + i) for i in range(62))  # 63 ids: chat tokens 63, 64


def config(**overrides: Any) -> ModelConfig:
    return ModelConfig(**{**SHAPE, **overrides})  # type: ignore[arg-type]


def perturbed(cfg: ModelConfig) -> GPT:
    """A model whose every weight is off its initial value."""
    torch.manual_seed(1)
    model = GPT(cfg)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param))
    return model


def saved_state(model: GPT) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: every weight, a tied head once (as the embedding)."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        del state["lm_head.weight"]
    return state


def save_checkpoint(folder: Path, model: GPT) -> Path:
    folder.mkdir(parents=True)
    save_file(saved_state(model), str(folder / WEIGHTS))
    return folder


def hf_model(name: str) -> transformers.PreTrainedModel:
    hf_config = HF[name]()
    hf_config.vocab_size = 64
    torch.manual_seed(2)
    model = transformers.AutoModelForCausalLM.from_config(hf_config)
    with torch.no_grad():
        for key, param in model.named_parameters():
            if not key.endswith(("q_norm.weight", "k_norm.weight")):  # gains must stay one
                param.add_(torch.randn_like(param) * 0.1)
    return model.to(torch.bfloat16)  # stored below float32: read by slices, then converted


def pretrained(folder: Path, hf: transformers.PreTrainedModel) -> Pretrained:
    hf.save_pretrained(folder)
    return Pretrained(path=f"hf:{folder.name}", folder=folder,
                      model=model_config_from_hf(hf.config), tokenizer={})


# ---------------------------------------------------------------------------------------------
# The cases: (config, how its weights are filled); each is built whole and sharded


Load = Callable[[GPT], None] | None


def _load_checkpoint(folder: Path, model: GPT) -> None:
    load_weights(folder, model)


def _load_chat_tokens(folder: Path, model: GPT) -> None:
    record = {"name": "char", "chars": CHARS}
    load_with_chat_tokens(Checkpoint(folder, {"tokenizer": record}), model)


def _load_pretrained(start: Pretrained, model: GPT) -> None:
    start.load_into(model)


def cases(root: Path) -> dict[str, tuple[ModelConfig, Load]]:
    found: dict[str, tuple[ModelConfig, Load]] = {}
    for name, overrides in FRESH.items():
        found[f"fresh-{name}"] = (config(**overrides), None)
    for name, overrides in SAVED.items():
        cfg = config(**overrides)
        folder = save_checkpoint(root / name, perturbed(cfg))
        found[f"checkpoint-{name}"] = (cfg, functools.partial(_load_checkpoint, folder))
    for tied in (True, False):  # 63 ids in 64 rows; 65 ids in 128 rows with the chat tokens
        base = config(vocab_size=len(CHARS), padded_vocab_size=64, tie_embeddings=tied)
        folder = save_checkpoint(root / f"chat-{tied}", perturbed(base))
        grown = config(vocab_size=len(CHARS) + 2, padded_vocab_size=128, tie_embeddings=tied)
        found[f"chat-tokens-{'tied' if tied else 'untied'}"] = (
            grown, functools.partial(_load_chat_tokens, folder))
    for name in HF:
        start = pretrained(root / name, hf_model(name))
        found[f"hf-{name}"] = (start.model, functools.partial(_load_pretrained, start))
    gpt2 = pretrained(root / "gpt2-shorter", hf_model("gpt2-untied"))  # 16 positions read, 15 kept
    shorter = ModelConfig(**{**vars(gpt2.model), "block_size": 15})
    found["hf-gpt2-shorter-context"] = (shorter, functools.partial(_load_pretrained, gpt2))
    return found


def whole(cfg: ModelConfig, load: Load) -> dict[str, torch.Tensor]:
    """Today's one-process path: GPT(config) drawn from the seeded RNG, then loaded."""
    torch.manual_seed(SEED)
    model = GPT(cfg)
    if load is not None:
        load(model)
    return described(saved_state(model), model, drawn=load is None)


def described(state: dict[str, torch.Tensor], model: GPT, drawn: bool) -> dict[str, torch.Tensor]:
    """The weights, the buffers and, for a fresh model, the RNG's next draw (under FSDP each
    process reseeds after loading, so only a drawn model's stream matters)."""
    draw = {"next draw": torch.randn(4)} if drawn else {}
    return {**state, **draw, **{f"buffer {k}": v for k, v in model.named_buffers()}}


def _sharded_rank(rank: int, init: str, todo: dict[str, tuple[ModelConfig, Load]],
                  out: str) -> None:
    """One process of the sharded path: every case built on the meta device, sharded, filled;
    its weights gathered (and rank 0's RNG and buffers) into `out` by rank 0."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=PROCESSES)
    world = Dist(rank, rank, PROCESSES, torch.device("cpu"), sharded=True)
    results = {}
    for name, (cfg, load) in todo.items():
        torch.manual_seed(SEED)
        model = world.build(cfg, torch.float32, draw=load is None)
        if load is not None:
            load(model)
        state = full_model_state(model)
        results[name] = described(state, model, drawn=load is None)
    if rank == 0:
        torch.save(results, out)
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, dict]]:
    """{case: (whole state, sharded state)} for every case, the sharded ones from one launch."""
    root = tmp_path_factory.mktemp("sharded")
    todo = cases(root)
    out = root / "sharded.pt"
    mp.spawn(_sharded_rank, args=(f"file://{root / 'rendezvous'}", todo, str(out)),
             nprocs=PROCESSES)
    sharded = torch.load(out)
    return {name: (whole(cfg, load), sharded[name]) for name, (cfg, load) in todo.items()}


@pytest.mark.parametrize("case", [
    *(f"fresh-{n}" for n in FRESH), *(f"checkpoint-{n}" for n in SAVED),
    "chat-tokens-tied", "chat-tokens-untied", *(f"hf-{n}" for n in HF), "hf-gpt2-shorter-context",
])
def test_a_sharded_model_holds_bitwise_the_weights_built_whole(
    built: dict[str, tuple[dict, dict]], case: str
) -> None:
    reference, sharded = built[case]
    assert reference.keys() == sharded.keys()
    for key in reference:
        assert torch.equal(reference[key], sharded[key]), key


# ---------------------------------------------------------------------------------------------
# Independent references for the whole path the sharded one is compared with


def test_init_steps_draw_as_gpt2s_apply_and_residual_rescale(
    tiny_config: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The scheme as nanoGPT writes it (apply, then the c_proj rescale), after the layers'
    constructors: the same draws."""
    cfg = tiny_config(tie_embeddings=True, cross_attention=True)
    torch.manual_seed(SEED)
    ours = GPT(cfg)

    def init(module: torch.nn.Module) -> None:
        if isinstance(module, torch.nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, torch.nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    monkeypatch.setattr(GPT, "init_weights", lambda self: None)  # the constructors' draws only
    torch.manual_seed(SEED)
    theirs = GPT(cfg)
    theirs.apply(init)
    for name, param in theirs.named_parameters():
        if name.endswith("c_proj.weight"):
            torch.nn.init.normal_(param, mean=0.0, std=0.02 / (2 * cfg.n_layer) ** 0.5)
    for key, value in ours.state_dict().items():
        assert torch.equal(value, theirs.state_dict()[key]), key


def test_hf_weights_read_by_slices_are_the_whole_conversions(tmp_path: Path) -> None:
    for name in HF:
        hf = hf_model(name)
        start = pretrained(tmp_path / name, hf)
        reference = from_hf(hf.float()).state_dict()
        model = GPT(start.model)
        start.load_into(model)
        for key, value in model.state_dict().items():
            assert torch.equal(value, reference[key]), (name, key)


def test_chat_token_rows_are_the_mean_of_the_token_rows(tmp_path: Path) -> None:
    base = perturbed(config(vocab_size=len(CHARS), padded_vocab_size=64))
    folder = save_checkpoint(tmp_path / "base", base)
    model = GPT(config(vocab_size=len(CHARS) + 2, padded_vocab_size=128))
    _load_chat_tokens(folder, model)
    rows = base.transformer.wte.weight.detach()
    grown = model.transformer.wte.weight.detach()
    tokens = len(CHARS)
    assert torch.equal(grown[:tokens], rows[:tokens])
    assert torch.equal(grown[tokens], rows[:tokens].mean(dim=0))
    assert torch.equal(grown[tokens + len(CHAT_TOKENS) - 1], rows[:tokens].mean(dim=0))
    assert not grown[tokens + len(CHAT_TOKENS):].any()


def test_a_checkpoint_of_another_shape_is_named_in_one_message(tmp_path: Path) -> None:
    folder = save_checkpoint(tmp_path / "ckpt", perturbed(config()))
    with pytest.raises(GPTError, match=r"model\.safetensors does not fit the model that .*"
                       r"state\.json describes \(\S+: \([\d, ]+\) saved, \([\d, ]+\) expected\)"):
        load_weights(folder, GPT(config(n_embd=32)))
    with pytest.raises(GPTError, match=r"describes \(missing \['transformer\.wpe\.weight'\], "
                       r"unexpected \[\]\)"):
        untied = config(pos_embedding="rope", tie_embeddings=False)
        save_checkpoint(tmp_path / "rope", perturbed(untied))
        load_weights(tmp_path / "rope", GPT(config(tie_embeddings=False)))


@pytest.mark.slow
def test_an_fsdp_finetune_of_a_checkpoint_gives_the_losses_of_one_process(
    tiny_run: Path, torchrun: Callable[..., None]
) -> None:
    """`gpt train` end to end: init_from a checkpoint, read by slices under FSDP, trains as the
    same finetune in one process, to float rounding."""
    common = [*STEPS, *NO_DROPOUT]
    one_process(*common, "--set", "train.max_iters=2", "--set", "train.out_dir=base")
    finetune = [*common, "--set", "train.max_iters=4", "--set", "train.init_from=base"]
    one_process(*finetune, "--set", "train.out_dir=one")
    torchrun(*finetune, "--set", "train.parallel=fsdp", "--set", "train.out_dir=two")
    assert_close_losses(losses(tiny_run / "one"), losses(tiny_run / "two"))


@pytest.mark.slow
@pytest.mark.parametrize("data", ["text", "chat"])
def test_a_finetune_of_a_lora_checkpoint_under_fsdp_gives_the_losses_of_one_process(
    tiny_run: Path, torchrun: Callable[..., None], data: str
) -> None:
    """init_from a LoRA finetune, whose adapters merge into its base on a whole model: under
    FSDP each process takes its rows of the merged weights, and trains as one process; on chat
    data the merged rows grow by the chat tokens' in both."""
    corpus = Path("corpus.txt")  # the roles' letters, for the chat set's char vocabulary
    corpus.write_text(corpus.read_text() + "# the user asks, the assistant answers\n" * 20)
    common = [*STEPS, *NO_DROPOUT]
    one_process(*common, "--set", "train.max_iters=2", "--set", "train.out_dir=base")
    one_process(*common, "--set", "train.max_iters=2", "--set", "train.init_from=base",
                "--set", "train.finetune=lora", "--set", "train.out_dir=lora")
    finetune = [*common, "--set", "train.max_iters=4", "--set", "train.init_from=lora"]
    if data == "chat":
        turn = [{"role": "user", "content": "f(x)"}, {"role": "assistant", "content": "x * 2"}]
        Path("chats.jsonl").write_text((json.dumps({"messages": turn}) + "\n") * 20)
        finetune += ["--set", "data.format=chat", "--set", "data.source=chats.jsonl",
                     "--set", "data.data_dir=data/chat"]
    one_process(*finetune, "--set", "train.out_dir=one")
    torchrun(*finetune, "--set", "train.parallel=fsdp", "--set", "train.out_dir=two")
    assert_close_losses(losses(tiny_run / "one"), losses(tiny_run / "two"))
    assert ("chat_tokens_added" in Checkpoint.open(tiny_run / "two").state) == (data == "chat")
