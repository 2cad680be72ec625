"""LoRA: the adapted layer against its base and its merge, what trains, what a LoRA checkpoint
holds and how it resumes and loads, its exports (merged, and PEFT's format), and each refusal."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gpt.checkpoint import Checkpoint
from gpt.cli import app
from gpt.config import ModelConfig, TrainConfig, load_config
from gpt.errors import GPTError
from gpt.lora import (
    LoRA,
    LoRALinear,
    adapter_state,
    add_adapters,
    merge_adapters,
    weights_sha256,
)
from gpt.model import GPT
from gpt.train import train

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = dict(pos_embedding="rope", norm="rmsnorm", mlp="swiglu", bias=False, n_kv_head=2)
VARIANTS = {"gpt2": {}, "llama-gqa": LLAMA}


def lora_of(config: ModelConfig, **keys: object) -> LoRA:
    return LoRA.from_config(TrainConfig(**keys), config)  # type: ignore[arg-type]


def with_random_adapters(model: GPT, **keys: object) -> GPT:
    """`model` with adapters on every layer, B drawn too, so that they change the logits."""
    add_adapters(model, lora_of(model.config, **keys), seed=1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.1)
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_an_adapted_model_starts_as_exactly_its_base(tiny: Callable[..., GPT],
                                                     variant: str) -> None:
    base = tiny(**VARIANTS[variant])
    adapted = tiny(**VARIANTS[variant])
    add_adapters(adapted, lora_of(adapted.config, lora_dropout=0.2), seed=0)
    idx = torch.randint(0, 50, (2, 16))
    assert torch.equal(adapted(idx)[0], base(idx)[0])
    adapted.train()  # dropout on the adapters' input changes nothing while B is zero
    torch.manual_seed(0)
    base_train = base.train()(idx)[0]
    torch.manual_seed(0)
    assert torch.equal(adapted(idx)[0], base_train)


@pytest.mark.parametrize("tie", [True, False])
def test_trained_token_rows_start_as_the_base_train_alone_and_merge(
    tiny: Callable[..., GPT], tie: bool
) -> None:
    """The rows of added tokens (ids 48, 49) train beside the adapters: the adapted model starts
    as exactly its base, only adapters and those rows get gradients, and the merged model (one
    table again when tied) gives the unmerged logits."""
    base = tiny(tie_embeddings=tie)
    model = tiny(tie_embeddings=tie)
    add_adapters(model, LoRA(4, 8.0, 0.0, ("c_attn",), rows=(48, 49)), seed=0)
    idx = torch.tensor([[1, 48, 3, 49, 5, 48]])
    assert torch.equal(model(idx)[0], base(idx)[0])
    model.train()
    model(idx, targets=idx)[1].backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, _ in model.named_parameters() if n.endswith(
        ("lora_A", "lora_B", "added_rows"))}
    assert (model.transformer.wte.added_rows.grad != 0).all(dim=1).all()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("lora_B", "added_rows")):
                param.add_(torch.randn_like(param) * 0.1)
    model.eval()
    unmerged = model(idx)[0]
    merge_adapters(model)
    assert type(model.transformer.wte) is torch.nn.Embedding
    assert (model.lm_head.weight is model.transformer.wte.weight) == tie
    torch.testing.assert_close(model(idx)[0], unmerged, rtol=0, atol=1e-5)
    untouched = [i for i in range(64) if i not in (48, 49)]
    assert torch.equal(model.transformer.wte.weight[untouched],
                       base.transformer.wte.weight[untouched])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_is_the_base_plus_scaled_b_a(tiny: Callable[..., GPT], variant: str) -> None:
    model = with_random_adapters(tiny(**VARIANTS[variant]), lora_rank=4, lora_alpha=6.0)
    idx = torch.randint(0, 50, (2, 16))
    unmerged = model(idx)[0]
    layer = model.transformer.h[0].attn.c_attn
    assert isinstance(layer, LoRALinear) and layer.scale == 1.5
    expected = layer.weight + 1.5 * (layer.lora_B @ layer.lora_A)
    merge_adapters(model)
    assert type(model.transformer.h[0].attn.c_attn) is torch.nn.Linear
    assert torch.equal(model.transformer.h[0].attn.c_attn.weight, expected)
    torch.testing.assert_close(model(idx)[0], unmerged, rtol=0, atol=1e-5)
    assert not any(k.endswith(("lora_A", "lora_B")) for k in model.state_dict())


def test_dropout_acts_in_training_only(tiny: Callable[..., GPT]) -> None:
    model = with_random_adapters(tiny(), lora_dropout=0.5)
    idx = torch.randint(0, 50, (2, 16))
    evaluated = model(idx)[0]
    assert torch.equal(model(idx)[0], evaluated)  # eval mode: no dropout
    assert not torch.equal(model.train()(idx)[0], evaluated)


def test_only_the_adapters_get_gradients(tiny: Callable[..., GPT]) -> None:
    model = with_random_adapters(tiny(**LLAMA)).train()
    idx = torch.randint(0, 50, (2, 16))
    model(idx, idx)[1].backward()
    for name, param in model.named_parameters():
        adapter = name.endswith(("lora_A", "lora_B"))
        assert param.requires_grad == adapter, name
        assert (param.grad is not None) == adapter, name
    keys = adapter_state(model).keys()
    per_block = {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_up", "mlp.c_proj"}
    assert {k.split(".", 3)[3].rsplit(".", 1)[0] for k in keys} == per_block


@pytest.mark.parametrize("mlp, targets", [("standard", ("c_attn", "c_proj", "c_fc")),
                                          ("swiglu", ("c_attn", "c_proj", "c_fc", "c_up"))])
def test_unset_targets_are_every_layer_the_model_has(tiny_config: Callable[..., ModelConfig],
                                                     mlp: str, targets: tuple[str, ...]) -> None:
    assert lora_of(tiny_config(mlp=mlp)).targets == targets
    assert lora_of(tiny_config(mlp=mlp), lora_targets=["c_proj"]).targets == ("c_proj",)


@pytest.mark.parametrize("keys, message", [
    (dict(lora_rank=0), r"\[train\] lora_rank: must be > 0, got 0"),
    (dict(lora_alpha=0.0), r"\[train\] lora_alpha: must be > 0, got 0.0"),
    (dict(lora_dropout=1.0), r"\[train\] lora_dropout: must be in \[0, 1\), got 1.0"),
    (dict(lora_targets=["q_proj"]), r"'q_proj' is not a layer of gpt's blocks \(c_attn holds "
                                    r"q, k and v together\); choose among c_attn, c_proj"),
    (dict(lora_targets=["c_atn"]), r"'c_atn' .* \(did you mean \"c_attn\"\?\)"),
    (dict(lora_targets=["c_fc", "c_fc"]), r"lora_targets: must name each layer once"),
    (dict(lora_targets=[]), r"lora_targets: must name each layer once, and at least one"),
    (dict(finetune="lora"), r"\[train\] finetune: \"lora\" adapts a trained model, but "
                            r"init_from is unset; set train.init_from"),
    (dict(finetune="lora", init_from="base", parallel="fsdp"),
     r"\[train\] parallel: \"fsdp\" does not shard LoRA finetunes.*use parallel = \"ddp\""),
])
def test_bad_lora_keys_are_refused_in_one_line(keys: dict, message: str) -> None:
    with pytest.raises(GPTError, match=message) as raised:
        TrainConfig(**keys)
    assert "\n" not in str(raised.value)


def test_c_up_is_refused_for_a_model_without_it(tiny_config: Callable[..., ModelConfig]) -> None:
    with pytest.raises(GPTError, match=r"lora_targets names 'c_up', which this model's blocks "
                                       r"lack \(mlp = 'standard' has no c_up\)"):
        lora_of(tiny_config(), lora_targets=["c_up"])


# ---------------------------------------------------------------------------------------------
# Runs: a base trained, then finetuned with LoRA

LORA = ["train.init_from=base", "train.finetune=lora", "train.learning_rate=3e-2",
        "train.lora_rank=4", "train.lora_dropout=0.1"]


@pytest.fixture
def base_run(tiny_run: Path) -> Path:
    """The tiny char run trained for 10 iterations into `base`."""
    assert train(load_config("tiny.toml", ["train.out_dir=base", "train.max_iters=10"])) == 0
    return tiny_run


def finetune(*overrides: str) -> int:
    return train(load_config("tiny.toml", [*LORA, "train.out_dir=tuned", *overrides]))


def test_a_lora_checkpoint_holds_the_adapters_and_names_its_base(base_run: Path) -> None:
    assert finetune("train.max_iters=10") == 0
    folder = base_run / "tuned" / "ckpt-0000010"
    weights = load_file(str(folder / "model.safetensors"))
    assert weights and all(k.endswith((".lora_A", ".lora_B")) for k in weights)
    assert weights["transformer.h.0.attn.c_attn.lora_A"].shape == (4, 32)
    assert weights["transformer.h.0.attn.c_attn.lora_B"].shape == (96, 4)
    assert any(w.abs().sum() > 0 for k, w in weights.items() if k.endswith("lora_B"))  # trained
    record = json.loads((folder / "state.json").read_text())["lora"]
    base = Checkpoint.open("base")
    assert record["base"] == "base/ckpt-0000010"
    assert (record["rank"], record["alpha"], record["targets"]) == (4, 16.0,
                                                                    ["c_attn", "c_proj", "c_fc"])
    adapted = base.load_model()
    add_adapters(adapted, LoRA.from_record(record), seed=0)
    assert record["base_sha256"] == weights_sha256(adapted)
    optimizer = torch.load(folder / "optimizer.pt", weights_only=True)
    assert len(optimizer["state"]) == len(weights)  # moments of the adapters alone
    size = (folder / "model.safetensors").stat().st_size
    assert size < (base.path / "model.safetensors").stat().st_size / 2


def test_a_lora_checkpoint_loads_as_its_base_with_the_adapters_merged(base_run: Path) -> None:
    assert finetune("train.max_iters=10") == 0
    tuned = Checkpoint.open("tuned")
    loaded = tuned.load_model()
    assert type(loaded.transformer.h[0].attn.c_attn) is torch.nn.Linear
    expected = Checkpoint.open("base").load_model()
    add_adapters(expected, LoRA.from_record(tuned.lora or {}), seed=0)
    adapters = load_file(str(tuned.path / "model.safetensors"))
    expected.load_state_dict(adapters, strict=False)
    merge_adapters(expected)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(),
                                                 expected.state_dict().values(), strict=True))
    for command in (["sample", "--max-new-tokens", "8", "--no-stream"], ["eval"]):
        result = runner.invoke(app, [command[0], "--checkpoint", "tuned", *command[1:]])
        assert result.exit_code == 0, result.output


def test_lora_resume_is_bitwise_exact(base_run: Path) -> None:
    """20 iterations straight equal 10, a stop, and 10 more, bit for bit (adapter dropout on)."""
    fixed = "train.lr_decay_iters=20"
    assert finetune("train.out_dir=straight", "train.max_iters=20", fixed) == 0
    assert finetune("train.max_iters=10", fixed) == 0
    shutil.rmtree("data")  # resuming prepares it again, as any resume would
    assert finetune("train.max_iters=20", fixed) == 0
    strip = lambda out: [{k: v for k, v in json.loads(line).items()  # noqa: E731
                          if k not in ("elapsed_s", "tok_per_s", "mfu")}
                         for line in (base_run / out / "metrics.jsonl").read_text().splitlines()]
    assert strip("straight") == strip("tuned")
    wa = load_file(str(base_run / "straight" / "ckpt-0000020" / "model.safetensors"))
    wb = load_file(str(base_run / "tuned" / "ckpt-0000020" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_lora_checkpoint_is_refused_once_its_base_changed(base_run: Path) -> None:
    assert finetune("train.max_iters=4", "train.eval_interval=4") == 0
    base = base_run / "base"
    assert train(load_config("tiny.toml", ["train.out_dir=other", "train.max_iters=10",
                                           "train.seed=7"])) == 0
    shutil.copytree(base_run / "other" / "ckpt-0000010", base / "ckpt-0000010",
                    dirs_exist_ok=True)  # another run's weights in its place
    changed = (r"tuned/ckpt-0000004 holds LoRA adapters of base/ckpt-0000010, whose weights have "
               r"changed since \(their sha256 differs\); restore the base")
    with pytest.raises(GPTError, match=changed):
        Checkpoint.open("tuned").load_model()
    with pytest.raises(GPTError, match=changed):
        finetune("train.max_iters=8")
    shutil.rmtree(base)
    with pytest.raises(GPTError, match=r"holds LoRA adapters of base/ckpt-0000010, which cannot "
                                       r"be opened \(.*\); put the base back"):
        Checkpoint.open("tuned").load_model()


def test_the_base_is_found_from_where_training_ran(base_run: Path, monkeypatch) -> None:
    assert finetune("train.max_iters=4", "train.eval_interval=4") == 0
    monkeypatch.chdir(base_run / "tuned")
    assert Checkpoint.open(".").load_model() is not None


def test_a_moved_run_whose_base_is_not_found_names_where_it_looked(
    base_run: Path, monkeypatch
) -> None:
    assert finetune("train.max_iters=4", "train.eval_interval=4") == 0
    shutil.copytree(base_run / "tuned", base_run / "elsewhere" / "copied")
    monkeypatch.chdir(base_run / "elsewhere")
    with pytest.raises(GPTError, match=rf"holds LoRA adapters of base/ckpt-0000010, which cannot "
                                       rf"be opened \(it is not at {base_run / 'elsewhere'}/base/"
                                       rf"ckpt-0000010\); put the base back") as raised:
        Checkpoint.open("copied").load_model()
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("overrides, message", [
    (["train.finetune=full"], r"tuned/ckpt-0000004 was trained with train.finetune = 'lora', "
                              r"the config now says 'full'"),
    (["train.lora_rank=8"], r"was trained with train.lora_rank = 4, the config now says 8"),
    (["train.lora_targets=['c_attn']"], r"was trained with train.lora_targets = \['c_attn', "
                                        r"'c_proj', 'c_fc'\], the config now says \['c_attn'\]"),
])
def test_resuming_with_another_finetune_is_refused(base_run: Path, overrides: list[str],
                                                   message: str) -> None:
    assert finetune("train.max_iters=4", "train.eval_interval=4") == 0
    with pytest.raises(GPTError, match=message):
        finetune("train.max_iters=8", *overrides)
    assert finetune("train.max_iters=8", "train.lora_dropout=0.0") == 0  # dropout may change


def test_a_full_run_is_not_resumed_as_lora(base_run: Path) -> None:
    with pytest.raises(GPTError, match=r"base/ckpt-0000010 was trained with train.finetune = "
                                       r"'full', the config now says 'lora'"):
        train(load_config("tiny.toml", [*LORA, "train.out_dir=base", "train.max_iters=20"]))


def test_a_full_finetune_and_a_lora_of_a_lora_start_from_its_merged_weights(
    base_run: Path,
) -> None:
    assert finetune("train.max_iters=4", "train.eval_interval=4") == 0
    merged = Checkpoint.open("tuned").load_model().state_dict()
    frozen = ["train.max_iters=1", "train.learning_rate=0", "train.min_lr=0",
              "train.init_from=tuned"]
    assert train(load_config("tiny.toml", ["train.out_dir=full", *frozen])) == 0
    full = Checkpoint.open("full").load_model().state_dict()
    assert all(torch.equal(full[k], merged[k]) for k in merged)
    assert finetune("train.out_dir=again", *frozen) == 0
    again = Checkpoint.open("again").load_model().state_dict()
    assert all(torch.equal(again[k], merged[k]) for k in merged)


def test_info_counts_the_adapters_their_gradients_and_moments(base_run: Path) -> None:
    assert finetune("train.max_iters=4", "train.eval_interval=4") == 0
    result = runner.invoke(app, ["info", "--checkpoint", "tuned"])
    assert result.exit_code == 0, result.output
    # 2 blocks: c_attn 4*(32+96), attn c_proj 4*(32+32), c_fc 4*(32+128), mlp c_proj 4*(128+32)
    adapters = 2 * 4 * ((32 + 96) + (32 + 32) + (32 + 128) + (128 + 32))
    base = Checkpoint.open("base").load_model().num_params()
    assert (f"LoRA adapters:     {adapters:,} trained (rank 4 on c_attn, c_proj, c_fc); "
            f"the {base:,} above stay frozen") in result.output
    kib = lambda n: f"{4 * n / 1024:.1f} KiB"  # noqa: E731
    assert (f"(frozen {4 * base / 1024:.0f} KiB + adapters {kib(adapters)}) + gradients "
            f"{kib(adapters)} + AdamW state {kib(2 * adapters)}") in result.output


# ---------------------------------------------------------------------------------------------
# Exports: merged into a plain HF model, or the adapters in PEFT's format

def peft_model() -> type:
    """peft's PeftModel; the test is skipped, saying why, where peft does not import (a release
    that needs a newer transformers than the oldest tested)."""
    try:
        from peft import PeftModel
    except Exception as e:
        pytest.skip(f"peft does not import here: {str(e).splitlines()[0][:200]}")
    return PeftModel


def hf_logits(folder: Path | str, ids: torch.Tensor, adapter: str | None = None) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    if adapter is not None:
        model = peft_model().from_pretrained(model, adapter)
    with torch.no_grad():
        return model.eval()(ids).logits


def export(*args: str) -> None:
    result = runner.invoke(app, ["export", *args])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("shape", [[], ["model.norm=rmsnorm", "model.mlp=swiglu",
                                        "model.pos_embedding=rope", "model.bias=false",
                                        "model.n_kv_head=1"]], ids=["gpt2", "llama-gqa"])
def test_a_lora_run_exports_merged_and_as_peft_with_the_same_logits(
    tiny_run: Path, shape: list[str]
) -> None:
    assert train(load_config("tiny.toml", ["train.out_dir=base", "train.max_iters=10",
                                           "model.dropout=0.0", *shape])) == 0
    assert finetune("train.max_iters=10", "model.dropout=0.0", *shape) == 0
    ours = Checkpoint.open("tuned").load_model()
    ids = torch.randint(0, ours.config.vocab_size, (2, 32))
    with torch.no_grad():
        expected = ours(ids)[0]
    export("--checkpoint", "tuned", "--out", "merged")
    torch.testing.assert_close(hf_logits("merged", ids), expected, rtol=0, atol=1e-5)
    export("--checkpoint", "base", "--out", "base-hf")
    export("--checkpoint", "tuned", "--out", "adapter", "--peft")
    assert sorted(p.name for p in Path("adapter").iterdir()) == ["adapter_config.json",
                                                                 "adapter_model.safetensors"]
    torch.testing.assert_close(hf_logits("base-hf", ids, "adapter"), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_a_lora_of_an_hf_model_exports_as_peft_for_that_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family: str
) -> None:
    transformers = pytest.importorskip("transformers")
    from test_hf_cli import SAVERS, corpus, finetune_toml

    monkeypatch.chdir(tmp_path)
    Path("corpus.txt").write_text(corpus())
    folder = SAVERS[family](tmp_path / f"tiny-{family}")
    toml = finetune_toml(folder)
    lora = ["train.finetune=lora", "train.learning_rate=3e-2", "train.lora_alpha=8"]
    assert train(load_config(toml, lora)) == 0
    ours = Checkpoint.open("tuned").load_model()
    ids = torch.randint(0, 250, (2, 32))
    with torch.no_grad():
        expected = ours(ids)[0]
    export("--checkpoint", "tuned", "--out", "adapter", "--peft")
    config = json.loads(Path("adapter/adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder)
    vocab = transformers.AutoConfig.from_pretrained(folder).vocab_size
    torch.testing.assert_close(hf_logits(folder, ids, "adapter"), expected[..., :vocab],
                               rtol=0, atol=1e-5)
    assert not torch.equal(hf_logits(folder, ids), expected[..., :vocab])  # the adapters count
    if family == "llama":
        assert config["target_modules"] == ["down_proj", "gate_proj", "k_proj", "o_proj",
                                            "q_proj", "up_proj", "v_proj"]


def test_peft_export_of_a_whole_model_is_refused(base_run: Path) -> None:
    result = runner.invoke(app, ["export", "--checkpoint", "base", "--out", "x", "--peft"])
    assert result.exit_code == 2
    assert ("holds a whole model, not LoRA adapters (a run trained with train.finetune = "
            "\"lora\"); export it without --peft") in result.output


def test_a_lora_finetune_on_chat_data_adds_the_chat_tokens_and_resumes_exactly(
    base_run: Path,
) -> None:
    """Chat data with the base's tokenizer plus the chat tokens: the base grows by their two
    rows (the mean of its token rows) the same way on every load, those rows train beside the
    adapters (the checkpoint holds them), and the run resumes bit for bit and loads for
    sampling."""
    corpus = Path("corpus.txt")  # the roles' letters, for the char base to know
    corpus.write_text(corpus.read_text() + "# the user asks, the assistant answers\n" * 20)
    assert train(load_config("tiny.toml", ["train.out_dir=roles", "train.max_iters=10",
                                           "data.data_dir=data/roles"])) == 0
    turn = [{"role": "user", "content": "f(x)"}, {"role": "assistant", "content": "x * 2"}]
    Path("chats.jsonl").write_text((json.dumps({"messages": turn}) + "\n") * 20)
    chat = ["train.init_from=roles", "data.format=chat", "data.source=chats.jsonl",
            "data.data_dir=data/chat", "train.lr_decay_iters=8", "train.eval_interval=4"]
    sets = [f"--set={s}" for s in [*LORA, *chat, "train.out_dir=straight"]]
    info = runner.invoke(app, ["info", "--config", "tiny.toml", *sets])
    assert info.exit_code == 0, info.output
    assert finetune("train.out_dir=straight", "train.max_iters=8", *chat) == 0
    saved = load_file(str(Checkpoint.open("straight").path / "model.safetensors"))
    adapters = sum(tensor.numel() for tensor in saved.values())
    assert f"LoRA adapters:     {adapters:,} trained" in info.output  # rows included
    assert "and the chat tokens' rows" in info.output
    assert finetune("train.max_iters=4", *chat) == 0
    assert finetune("train.max_iters=8", *chat) == 0
    wa = load_file(str(base_run / "straight" / "ckpt-0000008" / "model.safetensors"))
    wb = load_file(str(base_run / "tuned" / "ckpt-0000008" / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    tuned, base = Checkpoint.open("tuned"), Checkpoint.open("roles")
    vocab = base.config.model.vocab_size
    assert tuned.lora is not None and tuned.lora["base"] == "roles/ckpt-0000010"
    assert tuned.state["chat_tokens_added"]["ids"] == [vocab, vocab + 1]
    assert "transformer.wte.added_rows" in wa and wa["transformer.wte.added_rows"].shape[0] == 2
    model = tuned.load_model()
    assert model.config.vocab_size == vocab + 2
    base_rows = base.load_model().transformer.wte.weight[:vocab]
    assert torch.equal(model.transformer.wte.weight[:vocab], base_rows)
    assert torch.equal(model.transformer.wte.weight[vocab:vocab + 2],
                       wa["transformer.wte.added_rows"])  # trained from the mean
    assert not torch.allclose(wa["transformer.wte.added_rows"], base_rows.mean(0).expand(2, -1))
    assert model.lm_head.weight is model.transformer.wte.weight
    result = runner.invoke(app, ["sample", "--checkpoint", "tuned", "--max-new-tokens", "8",
                                 "--no-stream"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["export", "--checkpoint", "tuned", "--out", "x", "--peft"])
    assert result.exit_code == 2 and ("tuned/ckpt-0000008 added the chat tokens to its base's "
                                      "vocabulary, whose new rows PEFT's adapters cannot carry; "
                                      "export it merged, without --peft") in result.output
