"""HF interop through the command line: models from HF folders sampled, evaluated, described and
finetuned; runs exported to folders that transformers loads; each refusal as one line."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
if not transformers.is_torch_available():  # a transformers release needing a newer torch
    pytest.skip(f"transformers {transformers.__version__} does not support torch "
                f"{torch.__version__}", allow_module_level=True)

from safetensors.torch import load_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

from gpt.checkpoint import Checkpoint  # noqa: E402
from gpt.cli import app  # noqa: E402
from gpt.config import load_config  # noqa: E402
from gpt.hf.tokenizers import save_hf_tokenizer  # noqa: E402
from gpt.tokenizer import tokenizer_from_dict  # noqa: E402
from gpt.train import train  # noqa: E402

runner = CliRunner()
PROMPT = "def function_1(x):\n"
LLAMA_RUN = ["model.norm=rmsnorm", "model.mlp=swiglu", "model.pos_embedding=rope",
             "model.bias=false", "model.n_kv_head=1"]
QWEN3_RUN = [*LLAMA_RUN, "model.qk_norm=true", "model.tie_embeddings=false"]


pytestmark = pytest.mark.usefixtures("one_thread")


def corpus() -> str:
    return "".join(f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(400))


def save_gpt2(folder: Path) -> Path:
    """A tiny random GPT2LMHeadModel with GPT-2's tokenizer, as save_pretrained writes them."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2,
                                     n_head=4, bos_token_id=50256, eos_token_id=50256)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    save_hf_tokenizer({"name": "gpt2"}, folder, model_max_length=64)
    return folder


def save_llama(folder: Path) -> Path:
    """A tiny random LlamaForCausalLM (grouped-query, untied head, theta 500000) with a small
    byte-level BPE trained here, which puts <s> before every text as Llama's does. Its embedding
    has a row per token: HF samples padding rows, which gpt never does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus()], trainer)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>"
    ).save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        rope_theta=500000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=bos, eos_token_id=eos,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    return folder


SAVERS = {"gpt2": save_gpt2, "llama": save_llama}


@pytest.fixture(params=sorted(SAVERS))
def hf_folder(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A saved tiny HF model of each family; the test runs in its parent folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.txt").write_text(corpus())
    return SAVERS[request.param](tmp_path / f"tiny-{request.param}")


def hf_greedy(folder: Path, prompt: str, new_tokens: int = 20) -> str:
    """The prompt and HF generate's greedy continuation, decoded by HF's tokenizer."""
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    model.generation_config.eos_token_id = None  # gpt sample runs to --max-new-tokens
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return prompt + tokenizer.decode(out[0, ids.size(1):])


def gpt_greedy(checkpoint: str, prompt: str, new_tokens: int = 20) -> str:
    result = runner.invoke(app, ["sample", "--checkpoint", checkpoint, "--prompt", prompt,
                                 "--temperature", "0", "--max-new-tokens", str(new_tokens),
                                 "--no-stream", "--dtype", "float32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return result.stdout.removesuffix("\n")


def test_sample_from_an_hf_folder_is_hf_generate(hf_folder: Path) -> None:
    assert gpt_greedy(f"hf:{hf_folder}", PROMPT) == hf_greedy(hf_folder, PROMPT)


def test_eval_of_an_hf_folder_is_hf_loss(hf_folder: Path) -> None:
    text = "def function_3(x):\n    return x * 3 + 3\n"
    Path("short.txt").write_text(text)
    result = runner.invoke(app, ["eval", "--checkpoint", f"hf:{hf_folder}", "--data", "short.txt",
                                 "--json", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    ids = transformers.AutoTokenizer.from_pretrained(hf_folder)(text, add_special_tokens=False)
    ids = torch.tensor([ids.input_ids])
    with torch.no_grad():
        expected = model(ids, labels=ids).loss.item()
    assert json.loads(result.stdout)["loss"] == pytest.approx(expected, abs=1e-5)


def test_eval_of_an_hf_folder_without_data_advises_what_works(hf_folder: Path) -> None:
    """An HF model has no run, so no split of its own: the refusal advises --data, or a split
    prepared through a finetune's config (init_from) passed as data.data_dir; both work."""
    model = ["eval", "--checkpoint", f"hf:{hf_folder}", "--device", "cpu"]
    refused = runner.invoke(app, model)
    assert refused.exit_code == 2
    assert "evaluate it on a text with --data FILE" in refused.output
    assert f'init_from = "hf:{hf_folder}"' in refused.output
    assert "--set data.data_dir=FOLDER" in refused.output
    on_text = runner.invoke(app, [*model, "--data", "corpus.txt"])
    assert on_text.exit_code == 0, on_text.output
    prepared = runner.invoke(app, ["prepare", "--config", str(finetune_toml(hf_folder))])
    assert prepared.exit_code == 0, prepared.output
    folder = re.search(r"wrote (\S+): ", prepared.output)[1]
    on_split = runner.invoke(app, [*model, "--set", f"data.data_dir={folder}", "--json"])
    assert on_split.exit_code == 0, on_split.output
    val = json.loads((Path(folder) / "meta.json").read_text())["tokens"]["val"]
    assert json.loads(on_split.stdout)["tokens"] == val - 1


def test_info_of_an_hf_folder_counts_its_parameters(hf_folder: Path) -> None:
    result = runner.invoke(app, ["info", "--checkpoint", f"hf:{hf_folder}"])
    assert result.exit_code == 0, result.output
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder)
    assert f"parameters:        {model.num_parameters():,}" in result.stdout
    assert "[model]" in result.stdout and "[train]" not in result.stdout  # no run to describe


def finetune_toml(folder: Path) -> Path:
    Path("tune.toml").write_text(f"""
[model]
block_size = 32

[data]
source = "corpus.txt"

[train]
init_from = "hf:{folder}"
out_dir = "tuned"
batch_size = 4
max_iters = 6
warmup_iters = 1
lr_decay_iters = 6
learning_rate = 1e-3
eval_interval = 3
eval_iters = 2
log_interval = 1
""")
    return Path("tune.toml")


def metrics(out: Path) -> list[dict]:
    skip = ("elapsed_s", "tok_per_s", "mfu")
    return [{k: v for k, v in json.loads(line).items() if k not in skip}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_finetune_of_an_hf_model_resumes_exactly_without_it(hf_folder: Path) -> None:
    toml = finetune_toml(hf_folder)
    assert train(load_config(toml, ["train.out_dir=straight"])) == 0
    assert train(load_config(toml, ["train.max_iters=3", "train.eval_interval=3"])) == 0
    shutil.move(hf_folder, "moved-away")  # resuming and sampling need only the run
    assert train(load_config(toml)) == 0
    assert metrics(Path("straight")) == metrics(Path("tuned"))
    a = load_file("straight/ckpt-0000006/model.safetensors")
    b = load_file("tuned/ckpt-0000006/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tuned = Checkpoint.open("tuned")
    assert tuned.config.model.block_size == 32  # the context it was finetuned with
    assert tuned.config.model.n_embd == 32  # the base's shape, not the [model] defaults
    gpt_greedy("tuned", PROMPT)


def test_a_finetune_starts_from_the_hf_weights(hf_folder: Path) -> None:
    toml = finetune_toml(hf_folder)
    frozen = ["train.max_iters=1", "train.learning_rate=0", "train.min_lr=0"]  # one step of 0
    assert train(load_config(toml, frozen)) == 0
    saved = load_file("tuned/ckpt-0000001/model.safetensors")
    model = Checkpoint.open("tuned").load_model()
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folder).eval()
    ids = torch.randint(0, 250, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0][..., :hf.config.vocab_size], hf(ids).logits,
                                   rtol=0, atol=1e-5)
    assert saved["transformer.wte.weight"].shape[0] == hf.config.vocab_size


def train_run(*overrides: str) -> Path:
    (Path("corpus.txt")).write_text(corpus())
    cfg = ["model.n_layer=2", "model.n_head=2", "model.n_embd=32", "model.block_size=64",
           "data.source=corpus.txt", "data.tokenizer=char", "train.out_dir=run",
           "train.batch_size=4", "train.max_iters=5", "train.eval_interval=5",
           "train.eval_iters=1", "train.warmup_iters=1", "train.learning_rate=3e-3", *overrides]
    assert train(load_config(None, cfg)) == 0
    return Path("run")


def folder_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


GPT2_BPE_RUN = ["data.tokenizer=gpt2", "model.n_embd=16", "model.n_head=2"]


@pytest.mark.parametrize("shape", [[], LLAMA_RUN, QWEN3_RUN, GPT2_BPE_RUN],
                         ids=["gpt2-shaped", "llama-shaped", "qwen3-shaped", "gpt2-bpe"])
def test_an_exported_run_loads_in_transformers_and_back(
    in_tmp: Path, shape: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    run = train_run(*shape)
    result = runner.invoke(app, ["export", "--checkpoint", "run", "--out", "exported"])
    assert result.exit_code == 0, result.output
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in Path("exported").iterdir()}
    transformers.utils.logging.enable_propagation()  # its records reach caplog only so
    try:
        with caplog.at_level(logging.WARNING, logger="transformers"):
            hf, info = transformers.AutoModelForCausalLM.from_pretrained(
                "exported", output_loading_info=True)
            hf_tokenizer = transformers.AutoTokenizer.from_pretrained("exported")
    finally:
        transformers.utils.logging.disable_propagation()
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("transformers")]
    tokenizer_class = json.loads(Path("exported/tokenizer_config.json").read_text())["tokenizer_class"]
    assert tokenizer_class in ("GPT2Tokenizer", "PreTrainedTokenizerFast")  # 4.x loads them too
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if shape == QWEN3_RUN else
                                 "LlamaForCausalLM" if shape == LLAMA_RUN else "GPT2LMHeadModel")
    found = Checkpoint.open(run)
    ours = found.load_model()
    ids = torch.randint(0, found.config.model.vocab_size, (2, 32))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(ids).logits, ours(ids)[0], rtol=0, atol=1e-5)
    tokenizer = tokenizer_from_dict(found.tokenizer)
    text = corpus()[:500]
    assert hf_tokenizer(text).input_ids == tokenizer.encode(text)
    if shape == GPT2_BPE_RUN:  # HF may draw the 47 padding ids past GPT-2's 50257, gpt never
        return
    expected = gpt_greedy("run", PROMPT)
    assert hf_greedy(Path("exported"), PROMPT) == expected
    assert gpt_greedy("hf:exported", PROMPT) == expected  # gpt -> HF -> gpt


def test_an_hf_model_exports_to_the_same_weights(hf_folder: Path) -> None:
    result = runner.invoke(app, ["export", "--checkpoint", f"hf:{hf_folder}", "--out", "again"])
    assert result.exit_code == 0, result.output
    before = load_file(str(hf_folder / "model.safetensors"))
    after = load_file("again/model.safetensors")
    assert after.keys() <= before.keys()
    assert all(torch.equal(before[k], after[k]) for k in after)
    hf = transformers.AutoModelForCausalLM.from_pretrained("again")
    untied = not hf.config.tie_word_embeddings
    assert set(before) - set(after) == (set() if untied else set(before) & {"lm_head.weight"})
    text = "def f(x):  return x\n"
    old, new = (transformers.AutoTokenizer.from_pretrained(p)(text).input_ids
                for p in (hf_folder, "again"))
    assert old == new


def test_gpt_prepare_tokenizes_a_finetunes_data_as_gpt_train_will(hf_folder: Path) -> None:
    toml = finetune_toml(hf_folder)
    result = runner.invoke(app, ["prepare", "--config", str(toml)])
    assert result.exit_code == 0, result.output
    assert train(load_config(toml, ["train.max_iters=1"])) == 0
    assert "is already prepared from these settings" in capture_train_output(toml)


def test_a_chat_template_changed_after_prepare_keeps_the_data_and_reaches_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A template lays out chats and changes no id: the prepared data stays valid, and the
    finetune's checkpoint carries the model's template, not the one the data was prepared with."""
    monkeypatch.chdir(tmp_path)
    Path("corpus.txt").write_text(corpus())
    folder = save_llama(tmp_path / "tiny-llama")
    toml = finetune_toml(folder)
    assert runner.invoke(app, ["prepare", "--config", str(toml)]).exit_code == 0
    template = "{% for m in messages %}{{ m['content'] }}</s>{% endfor %}"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
    assert train(load_config(toml, ["train.max_iters=1"])) == 0
    assert Checkpoint.open("tuned").tokenizer["config"]["chat_template"] == template
    assert tokenizer_from_dict(Checkpoint.open("tuned").tokenizer).chat_template == template


def capture_train_output(toml: Path) -> str:
    result = runner.invoke(app, ["train", "--config", str(toml), "--set", "train.max_iters=2"])
    assert result.exit_code == 0, result.output
    return result.output


def test_export_never_replaces_the_model_it_reads(in_tmp: Path) -> None:
    train_run()
    before = folder_hashes(next(Path("run").glob("ckpt-*")))
    for out in ("run", "."):
        result = runner.invoke(app, ["export", "--checkpoint", "run", "--out", out, "--force"])
        assert result.exit_code == 2 and "holds the model being exported" in result.output
    assert folder_hashes(next(Path("run").glob("ckpt-*"))) == before


def test_export_refuses_a_tokenizer_hf_has_no_files_for(in_tmp: Path) -> None:
    train_run()
    state_path = next(Path("run").glob("ckpt-*")) / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps({**state, "tokenizer": {"name": "cl100k_base"}}))
    result = runner.invoke(app, ["export", "--checkpoint", "run", "--out", "exported"])
    assert result.exit_code == 2, result.output
    assert "export writes the gpt2, char, bpe and HF tokenizers, not 'cl100k_base'" in result.output
    assert not Path("exported").exists()


def test_export_refuses_a_folder_with_files_unless_forced(in_tmp: Path) -> None:
    train_run()
    Path("exported").mkdir()
    (Path("exported") / "mine.txt").write_text("keep me")
    result = runner.invoke(app, ["export", "--checkpoint", "run", "--out", "exported"])
    assert result.exit_code == 2
    assert "--out exported is not empty; choose a new folder, or pass --force" in result.output
    assert folder_hashes(Path("exported")) == {"mine.txt": hashlib.sha256(b"keep me").hexdigest()}
    result = runner.invoke(app, ["export", "--checkpoint", "run", "--out", "exported", "--force"])
    assert result.exit_code == 0, result.output
    assert "mine.txt" not in folder_hashes(Path("exported"))


@pytest.mark.parametrize("setting, message", [
    ("model.norm_position=post", r"\[model\] norm_position = 'post'"),
    ("model.mlp=geglu", r"\[model\] mlp = 'geglu'"),
    ("model.qk_norm=true", r"\[model\] qk_norm = True: .* \(QK-norm exports as HF Qwen3"),
    ("model.logit_softcap=30", r"\[model\] logit_softcap = 30.0: .* Gemma 2"),
])
def test_export_refuses_what_hf_cannot_hold_before_writing(
    in_tmp: Path, setting: str, message: str
) -> None:
    train_run(setting)
    result = runner.invoke(app, ["export", "--checkpoint", "run", "--out", "exported"])
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1 and "Traceback" not in result.output
    assert re.search(message, result.output), result.output
    assert not Path("exported").exists()


def test_hf_errors_are_one_line(hf_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each: exit 2, one line naming the problem and the fix."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # even with network
    cases = [
        (["sample", "--checkpoint", "hf:nobody-here/no-such-model"], "the hub is unreachable and "
         "HF's cache does not hold it); without network, pass a local folder"),
        (["info", "--checkpoint", "gpt2-xl"], "without network, pass a local folder"),
        (["info", "--checkpoint", "hf:corpus.txt"], "is neither a folder nor a hub name"),
        (["info", "--checkpoint", "hf:two words/x"], "is neither a folder nor a hub name"),
        (["info", "--checkpoint", "hf:" + "x" * 300], "(File name too long)"),
        (["sample", "--checkpoint", f"hf:{hf_folder}", "--which", "best"],
         "--which best picks a checkpoint of a run"),
        (["export", "--checkpoint", f"hf:{hf_folder}", "--out", "corpus.txt"],
         "--out corpus.txt is a file"),
    ]
    empty = Path("empty")
    empty.mkdir()
    cases.append((["info", "--checkpoint", "hf:empty"], "has no config.json"))
    pickled = Path("pickled")
    pickled.mkdir()
    for path in hf_folder.iterdir():  # all but the weights, which come as a pickle
        if path.suffix != ".safetensors":
            shutil.copy(path, pickled)
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    cases.append((["sample", "--checkpoint", "hf:pickled"], "which gpt does not load"))
    for name, config in {
        "neox": {"model_type": "gpt_neox"},  # a family gpt does not convert
        "remote": {"model_type": "my-own", "auto_map": {"AutoConfig": "code.MyConfig"}},
        "scaled": _scaled_rope(hf_folder),
    }.items():
        Path(name).mkdir()
        (Path(name) / "config.json").write_text(json.dumps(config))
        (Path(name) / "code.py").write_text("open('ran', 'w')\n")  # must never be imported
    cases += [
        (["info", "--checkpoint", "hf:neox"], "HF model_type 'gpt_neox' does not convert"),
        (["info", "--checkpoint", "hf:remote"], "cannot be read"),
    ]
    if hf_folder.name.endswith("llama"):
        cases.append((["info", "--checkpoint", "hf:scaled"], "gpt cannot convert this model"))
    for args, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output, (args, result.output)
        assert len(result.output.strip().splitlines()) == 1, result.output
    assert not Path("ran").exists()


def _scaled_rope(folder: Path) -> dict:
    """The folder's config with linear RoPE scaling, as transformers 5 or 4 spells it."""
    config = json.loads((folder / "config.json").read_text())
    if "rope_parameters" in config:
        config["rope_parameters"] = {**config["rope_parameters"], "rope_type": "linear",
                                     "factor": 2.0}
    else:
        config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    return config


def test_a_finetune_refuses_settings_the_hf_model_contradicts(hf_folder: Path) -> None:
    toml = finetune_toml(hf_folder)
    for setting, message in [
        ("model.n_layer=3", "[model] n_layer = 3 does not apply: the model comes from init_from"),
        ("model.block_size=128", "[model] block_size = 128 is longer than the 64 positions"),
        ("data.tokenizer=char", "[data] tokenizer = 'char' does not apply: the data is tokenized "
         "with the tokenizer of init_from"),
    ]:
        result = runner.invoke(app, ["train", "--config", str(toml), "--set", setting])
        assert result.exit_code == 2, result.output
        assert message in result.output, result.output
    assert not Path("tuned").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_an_export_gets_the_permissions_of_other_files(in_tmp: Path, umask: int) -> None:
    """safetensors writes 0o600, which another user (a serving account) cannot read: every file
    of an export gets what open() gives under the umask, as the tokenizer's and config's do."""
    train_run()
    previous = os.umask(umask)
    try:
        result = runner.invoke(app, ["export", "--checkpoint", "run", "--out", "exported"])
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    modes = {p.name: p.stat().st_mode & 0o777 for p in Path("exported").iterdir()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {0o666 & ~umask}, modes
