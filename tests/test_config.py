"""The config system: precedence, validation messages, round trips, and every shipped config."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import get_args, get_type_hints

import pytest

from gpt.config import (
    SECTIONS,
    ModelConfig,
    RunConfig,
    TrainConfig,
    fit_vocabulary,
    from_dict,
    load_config,
    reference_markdown,
    to_json,
    to_toml,
)
from gpt.errors import GPTError
from gpt.hf.convert import check_hf_compatible

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.toml"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_defaults_without_a_file() -> None:
    cfg = load_config()
    assert cfg == RunConfig()
    assert cfg.model.n_layer == 12 and cfg.train.learning_rate == 6e-4


def test_precedence_defaults_file_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "[model]\nn_layer = 3\nn_head = 2\n[train]\nlearning_rate = 1e-3\n")
    cfg = load_config(path, ["model.n_layer=5", "train.compile=true"])
    assert cfg.model.n_layer == 5  # --set beats the file
    assert cfg.model.n_head == 2  # the file beats the default
    assert cfg.model.n_embd == 768  # the default where neither says
    assert cfg.train.learning_rate == 1e-3 and cfg.train.compile is True
    last_wins = load_config(path, ["model.n_layer=5", "model.n_layer=6"])
    assert last_wins.model.n_layer == 6


def test_override_values_parse_as_toml_then_string() -> None:
    cfg = load_config(
        None, ["data.source=notes/my file.txt", "train.out_dir=out", 'sample.stop=["\\n\\n", "END"]']
    )
    assert cfg.data.source == "notes/my file.txt"
    assert cfg.train.out_dir == "out"
    assert cfg.sample.stop == ["\n\n", "END"]
    assert load_config(None, ["train.learning_rate=3"]).train.learning_rate == 3.0  # int widens


@pytest.mark.parametrize(
    "toml, overrides, message",
    [
        ("[modle]\nn_layer = 2\n", [], r'unknown section \[modle\] \(did you mean "model"\?\)'),
        ("[model]\nn_layers = 2\n", [], r"unknown key 'n_layers' in \[model\] \(did you mean \"n_layer\"\?\)"),
        ("n_layer = 2\n", [], r"outside any section; put it under one of \[model\]"),
        ("[model]\nn_layer = \"four\"\n", [], r"\[model\] n_layer must be an integer, got 'four'"),
        ("[model]\nbias = 1\n", [], r"\[model\] bias must be true or false"),
        ("[train]\nlearning_rate = \"fast\"\n", [], r"learning_rate must be a number"),
        ("[model]\nnorm = \"batchnorm\"\n", [], r'choose one of "layernorm", "rmsnorm"'),
        ("[model]\nmlp = \"swiglu2\"\n", [], r'"standard", "swiglu", "geglu" \(did you mean "swiglu"\?\)'),
        ("[model]\nactivation = \"elu\"\n", [], r'"gelu", "gelu_tanh", "relu", "relu2", "leaky_relu", "silu", "sigmoid", "tanh"'),
        ("[model]\nn_embd = 100\nn_head = 12\n", [], r"n_embd: 100 is not divisible by n_head = 12"),
        ("[model]\nn_head = 12\nn_kv_head = 5\n", [], r"n_head = 12 is not divisible by n_kv_head = 5"),
        ("[model]\nn_embd = 36\nn_head = 12\npos_embedding = \"rope\"\n", [], r"rope needs an even head size.*= 3"),
        ("[model]\ndropout = 1.5\n", [], r"dropout: must be in \[0, 1\)"),
        ("[model]\nn_layer = 0\n", [], r"n_layer: must be > 0"),
        ("", ["model.logit_softcap=0"], r"\[model\] logit_softcap: must be > 0, got 0.0"),
        ("", ["model.logit_softcap=-30"], r"\[model\] logit_softcap: must be > 0, got -30.0"),
        ("", ["model.qk_norm=1"], r"\[model\] qk_norm must be true or false, got 1"),
        ("", ["model.zero_init_proj=yes"], r"\[model\] zero_init_proj must be true or false, got 'yes'"),
        ("", ["model.activation=relu_2"], r'activation: .relu_2. is not allowed; .* \(did you mean "relu2"\?\)'),
        ("", ["train.cooldown_fraction=0"], r"\[train\] cooldown_fraction: must be in \(0, 1\], got 0.0"),
        ("", ["train.cooldown_fraction=1.5"], r"cooldown_fraction: must be in \(0, 1\], got 1.5"),
        ("", ["train.optimizer=sgd"], r'\[train\] optimizer: .sgd. is not allowed; choose one of "adamw", "muon"'),
        ("", ["train.muon_lr=0"], r"\[train\] muon_lr: must be > 0, got 0.0"),
        ("", ["train.optimizer=muon", "train.learning_rate=0"], r'learning_rate: must be > 0 with optimizer = "muon"'),
        ("", ["train.lr_schedule=linear"], r'\[train\] lr_schedule: .linear. is not allowed; choose one of "cosine", "wsd"'),
        ("[model]\nn_layer = [1\n", [], r"run.toml: malformed TOML: Unclosed array"),
        ("[model]\nn_layer = 1\nn_layer = 2\n", [], r"malformed TOML: .*\(at line 3, column"),
        ("", ["model.n_layer"], r"expected section.key=value"),
        ("", ["model.nlayer=3"], r"--set model.nlayer=3: unknown key 'nlayer'"),
        ("", ["train.device=gpu"], r"unknown device 'gpu'; use auto, cpu, cuda, cuda:N or mps"),
        ("", ["sample.top_p=0"], r"top_p: must be in \(0, 1\]"),
        ("", ["sample.stop=['']"], r"a stop string is empty"),
        ("", ["data.val_fraction=1.0"], r"val_fraction: must be in \(0, 1\)"),
    ],
)
def test_config_errors_name_the_key_and_the_fix(
    tmp_path: Path, toml: str, overrides: list[str], message: str
) -> None:
    path = write(tmp_path, toml)
    with pytest.raises(GPTError, match=message) as info:
        load_config(path, overrides)
    assert "\n" not in str(info.value)


INTEGER_KEYS = [f"{name}.{key}" for name, cls in SECTIONS.items()
                for key, tp in get_type_hints(cls).items() if int in (tp, *get_args(tp))]


@pytest.mark.parametrize("key", INTEGER_KEYS)
@pytest.mark.parametrize("value", [2**63, -(2**63) - 1, 10**20])
def test_every_integer_key_holds_64_bits(key: str, value: int) -> None:
    """Seeds, sizes, intervals: one message with the range, from --set, a file or a flag (which
    replaces a key of its section), before torch or numpy meets the value."""
    section, name = key.split(".")
    message = rf"\[{section}\] {name}: must be in \[-2\*\*63, 2\*\*63 - 1\] \(a 64-bit integer\), got {value}$"
    with pytest.raises(GPTError, match=message):
        load_config(None, [f"{key}={value}"])
    with pytest.raises(GPTError, match=message):
        dataclasses.replace(SECTIONS[section](), **{name: value})


@pytest.mark.parametrize("key", ["sample.seed", "train.seed", "data.seed"])
def test_seeds_take_every_64_bit_integer(key: str) -> None:
    section, name = key.split(".")
    for value in (2**63 - 1, -(2**63), 0):
        assert getattr(getattr(load_config(None, [f"{key}={value}"]), section), name) == value


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(GPTError, match=r"config file .*nope.toml not found"):
        load_config(tmp_path / "nope.toml")


def test_round_trip_json_and_toml(tmp_path: Path) -> None:
    cfg = load_config(
        None,
        ["model.norm=rmsnorm", "model.n_kv_head=4", "sample.stop=['\\n\\ndef', 'é\"q']",
         "train.min_lr=6e-05", "data.source=a b/c.txt", "sample.prompt='tab\\tand\\u007f'"],
    )
    assert from_dict(json.loads(to_json(cfg))) == cfg
    path = tmp_path / "resolved.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg


def test_derived_values() -> None:
    cfg = ModelConfig(n_embd=96, n_head=6, mlp="swiglu")
    assert cfg.head_dim == 16 and cfg.kv_heads == 6 and cfg.hidden_dim == 256
    assert dataclasses.replace(cfg, n_kv_head=2).kv_heads == 2


@pytest.mark.parametrize(("settings", "folder"), [
    (["data.source=corpus/notes.txt"], "data/notes-gpt2"),
    (["data.source=corpus/notes.txt", "data.tokenizer=char"], "data/notes-char"),
    (["data.source=python-stdlib", "data.tokenizer=char"], "data/python-stdlib-char"),
    (["data.source=hf:someone/stories:small", "data.tokenizer=cl100k_base"], "data/stories_small-cl100k_base"),
    (["data.source=corpus/notes.txt", "data.data_dir=mine"], "mine"),
])
def test_default_data_dir_names_source_and_tokenizer(settings: list[str], folder: str) -> None:
    """Two tokenizers on one source get two folders, so comparing them needs no --force."""
    assert load_config(None, settings).data.resolved_data_dir == Path(folder)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_loads(path: Path) -> None:
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)


# The speed recipe uses variants HF's GPT-2 cannot hold (QK-norm, no biases); every other
# shipped config trains a model that HF transformers can load.
NOT_HF = {"fast_char.toml"}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_but_the_speed_recipe_trains_a_model_that_exports(
    path: Path,
) -> None:
    model = load_config(path).model
    if path.name in NOT_HF:
        with pytest.raises(GPTError, match=r"\[model\] .*HF GPT-2, .* needs"):
            check_hf_compatible(model)
    else:
        check_hf_compatible(model)


def test_shipped_configs_exist() -> None:
    assert any(p.name == "default.toml" for p in CONFIGS)


def test_every_config_the_docs_quote_is_shipped() -> None:
    """README.md and docs/ name only configs that exist, and README.md names every one."""
    shipped, quoted = {p.name for p in CONFIGS}, set()
    for doc in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))):
        quoted |= set(re.findall(r"configs/([\w.-]+\.toml)", doc.read_text()))
    assert quoted <= shipped
    readme = (ROOT / "README.md").read_text()
    assert all(f"`{name}`" in readme or f"configs/{name}" in readme for name in shipped)


def test_the_readme_stays_a_front_door() -> None:
    """README.md holds the quick start, the commands and a file map; depth goes in docs/."""
    assert len((ROOT / "README.md").read_bytes()) <= 16_000


def test_unset_train_keys_mean_their_documented_defaults() -> None:
    """"Unset means X" is derived in one place, the config."""
    unset = TrainConfig(max_iters=500, eval_interval=50)
    assert (unset.decay_iters, unset.save_interval) == (500, 50)
    given = TrainConfig(max_iters=500, lr_decay_iters=400, eval_interval=50, checkpoint_interval=100)
    assert (given.decay_iters, given.save_interval) == (400, 100)


def test_config_reference_documents_every_key() -> None:
    """docs/config.md holds the generated table (scripts/config_reference.py), so no key goes
    undocumented."""
    doc = (ROOT / "docs" / "config.md").read_text()
    assert reference_markdown() in doc
    for name, cls in SECTIONS.items():
        for f in dataclasses.fields(cls):
            assert f"`{name}.{f.name}`" in doc


def test_the_vocabulary_is_fitted_to_the_tokenizer() -> None:
    """Unset: the tokenizer's, padded; set: kept, never below the tokenizer's; an HF model's
    vocab_size, which counts its embedding rows: the tokenizer's, within them."""
    fitted = fit_vocabulary(ModelConfig(), 50257)
    assert (fitted.vocab_size, fitted.padded_vocab_size) == (50257, 50304)
    assert fit_vocabulary(ModelConfig(vocab_size=60000), 50257).vocab_size == 60000
    with pytest.raises(GPTError, match=r"^\[model\] vocab_size = 100 is smaller than the "
                       r"tokenizer's 256; raise it or leave it unset$"):
        fit_vocabulary(ModelConfig(vocab_size=100), 256)
    rows = ModelConfig(vocab_size=320, padded_vocab_size=320)
    fitted = fit_vocabulary(rows, 300, pretrained="hf:x")
    assert (fitted.vocab_size, fitted.padded_vocab_size) == (300, 320)
    with pytest.raises(GPTError, match=r"^hf:x: its config.json's vocab_size = 320 is smaller "
                       r"than the tokenizer's 321; the folder's tokenizer is not the model's$"):
        fit_vocabulary(rows, 321, pretrained="hf:x")
