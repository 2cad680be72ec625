"""Exports that llama.cpp's converter turns into GGUF: tiny GPT-2- and Llama-shaped runs
exported with `gpt export`, converted to F16, BF16 and Q8_0 by `convert_hf_to_gguf.py`, and the
file read back: its metadata against the run's config, every tensor against the run's weights.

The converter is not a dependency: name it with GPT_LLAMA_CPP_CONVERT (the path of
convert_hf_to_gguf.py in a llama.cpp checkout, or in llama-cpp-python's source distribution
under vendor/llama.cpp) and, when this python lacks what it imports, GPT_LLAMA_CPP_PYTHON (a
python that has its requirements). The file is read with the `gguf` package beside it
(gguf-py), or an installed one.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

CONVERT = os.environ.get("GPT_LLAMA_CPP_CONVERT", "")
PYTHON = os.environ.get("GPT_LLAMA_CPP_PYTHON", "") or sys.executable
if not CONVERT:
    pytest.skip("llama.cpp's converter is not named: set GPT_LLAMA_CPP_CONVERT to the path of "
                "convert_hf_to_gguf.py", allow_module_level=True)
if not Path(CONVERT).is_file():
    pytest.skip(f"GPT_LLAMA_CPP_CONVERT={CONVERT} is not a file", allow_module_level=True)
transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from gpt.checkpoint import Checkpoint  # noqa: E402
from gpt.cli import app  # noqa: E402
from gpt.config import ModelConfig, load_config  # noqa: E402
from gpt.tokenizer import GPT2_EOT, gpt2_ranks  # noqa: E402
from gpt.train import train  # noqa: E402

RUN = ["model.n_layer=2", "model.n_head=4", "model.n_embd=32", "model.block_size=48",
       "model.tie_embeddings=false", "data.source=corpus.txt", "data.tokenizer=gpt2",
       "train.out_dir=run", "train.batch_size=2", "train.max_iters=2", "train.eval_interval=2",
       "train.eval_iters=1", "train.warmup_iters=1", "train.learning_rate=3e-3"]
SHAPES = {
    "gpt2": ["model.activation=gelu_tanh", "model.norm_eps=1e-6"],
    "llama": ["model.norm=rmsnorm", "model.mlp=swiglu", "model.pos_embedding=rope",
              "model.bias=false", "model.n_kv_head=2", "model.rope_base=500000",
              "model.norm_eps=1e-6"],
}
OUTTYPES = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}  # LlamaFileType

# our keys under transformer.h.N. -> the GGUF names under blk.N., for each family
GPT2_BLOCK = {"ln_1": "attn_norm", "attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output",
              "ln_2": "ffn_norm", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down"}
LLAMA_BLOCK = {"ln_1": "attn_norm", "attn.c_proj": "attn_output", "ln_2": "ffn_norm",
               "mlp.c_fc": "ffn_gate", "mlp.c_up": "ffn_up", "mlp.c_proj": "ffn_down"}
TOP = {"transformer.wte": "token_embd", "transformer.wpe": "position_embd",
       "transformer.ln_f": "output_norm", "lm_head": "output"}


@pytest.fixture(scope="module")
def gguf() -> Iterator[ModuleType]:
    """gguf-py as it comes beside the converter (the version that wrote the file), else an
    installed `gguf`."""
    with pytest.MonkeyPatch.context() as patch:
        beside = Path(CONVERT).parent / "gguf-py"
        if beside.is_dir():
            patch.syspath_prepend(str(beside))
        try:
            module = importlib.import_module("gguf")
        except ImportError as e:
            pytest.skip(f"no gguf package to read the file back ({e}); pip install gguf")
        yield module


@pytest.fixture(scope="module", params=sorted(SHAPES))
def exported(request: pytest.FixtureRequest,
             tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Checkpoint]:
    """A tiny run of each shape with GPT-2's BPE, trained two steps and exported by
    `gpt export`: (the exported folder, the run's checkpoint)."""
    folder = tmp_path_factory.mktemp(request.param)
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(folder)
        torch.set_num_threads(1)
        try:
            Path("corpus.txt").write_text("".join(
                f"def function_{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(200)))
            assert train(load_config(None, [*RUN, *SHAPES[request.param]])) == 0
        finally:
            torch.set_num_threads(threads)
        result = CliRunner().invoke(app, ["export", "--checkpoint", "run", "--out", "exported"])
        assert result.exit_code == 0, result.output
    return folder / "exported", Checkpoint.open(folder / "run")


def convert(folder: Path, outtype: str, out: Path) -> None:
    """Run llama.cpp's converter as its README says to, failing with its own last words."""
    done = subprocess.run([PYTHON, CONVERT, str(folder), "--outtype", outtype, "--outfile",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"the converter exited {done.returncode}:\n{done.stderr[-3000:]}"


def permuted(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """q or k rows as llama.cpp's rope reads them: each head's (i, i + hs/2) pairs, which HF's
    Llama (and gpt) rotate together, made adjacent rows (2i, 2i + 1)."""
    rows = weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1)  # (nh, 2, hs/2, C)
    return rows.transpose(1, 2).reshape(weight.shape)


def expected_tensors(config: ModelConfig, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The GGUF name and value of every weight of the run, in the (out, in) layout GGUF keeps."""
    llama = config.pos_embedding == "rope"
    block = LLAMA_BLOCK if llama else GPT2_BLOCK
    tensors: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        stem, kind = key.rsplit(".", 1)
        if stem.startswith("transformer.h."):
            _, _, layer, part = stem.split(".", 3)
            if llama and part == "attn.c_attn":  # fused rows: q, then k, then v
                hs = config.head_dim
                q, k, v = value.split([config.n_head * hs, config.kv_heads * hs,
                                       config.kv_heads * hs])
                tensors[f"blk.{layer}.attn_q.{kind}"] = permuted(q, config.n_head)
                tensors[f"blk.{layer}.attn_k.{kind}"] = permuted(k, config.kv_heads)
                tensors[f"blk.{layer}.attn_v.{kind}"] = v
                continue
            tensors[f"blk.{layer}.{block[part]}.{kind}"] = value
        else:
            tensors[f"{TOP[stem]}.{kind}"] = value
    return {name: value.float() for name, value in tensors.items()}


def field(reader: object, key: str) -> object:
    return reader.fields[key].contents()  # type: ignore[attr-defined]


@pytest.mark.parametrize("outtype", sorted(OUTTYPES))
def test_an_export_converts_to_gguf_with_its_config_and_weights(
    exported: tuple[Path, Checkpoint], outtype: str, gguf: ModuleType, tmp_path: Path
) -> None:
    folder, run = exported
    out = tmp_path / f"model-{outtype}.gguf"
    convert(folder, outtype, out)
    reader = gguf.GGUFReader(str(out))
    config = run.config.model
    arch = "llama" if config.pos_embedding == "rope" else "gpt2"
    assert field(reader, "general.architecture") == arch
    assert field(reader, "general.file_type") == gguf.LlamaFileType[OUTTYPES[outtype]].value
    assert field(reader, f"{arch}.context_length") == config.block_size
    assert field(reader, f"{arch}.block_count") == config.n_layer
    assert field(reader, f"{arch}.embedding_length") == config.n_embd
    assert field(reader, f"{arch}.feed_forward_length") == config.hidden_dim
    assert field(reader, f"{arch}.attention.head_count") == config.n_head
    if arch == "llama":
        assert field(reader, "llama.attention.head_count_kv") == config.kv_heads
        assert field(reader, "llama.rope.freq_base") == config.rope_base
        assert field(reader, "llama.rope.dimension_count") == config.head_dim
        eps = field(reader, "llama.attention.layer_norm_rms_epsilon")
    else:
        eps = field(reader, "gpt2.attention.layer_norm_epsilon")
    assert eps == pytest.approx(config.norm_eps, rel=1e-6)  # stored as float32
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"  # GPT-2's pre-tokenizer, recognised
    tokens = field(reader, "tokenizer.ggml.tokens")
    assert len(tokens) == config.padded_vocab_size  # type: ignore[arg-type]
    assert tokens[len(gpt2_ranks())] == GPT2_EOT  # type: ignore[index]
    assert field(reader, "tokenizer.ggml.eos_token_id") == len(gpt2_ranks())

    expected = expected_tensors(config, run.load_model().state_dict())
    found = {t.name: t for t in reader.tensors}
    assert sorted(found) == sorted(expected)
    wanted_type = gguf.GGMLQuantizationType[outtype.upper()]
    assert found["blk.0.attn_output.weight"].tensor_type == wanted_type
    for name, want in expected.items():
        tensor = found[name]
        got = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        assert got.shape == want.shape, name
        kind = tensor.tensor_type.name
        if kind == "Q8_0":  # a scale per 32 values: within a step of the largest
            torch.testing.assert_close(got, want, rtol=0, atol=want.abs().max().item() / 127,
                                       msg=name)
        else:
            exact = {"F32": want, "F16": want.half(), "BF16": want.bfloat16()}[kind].float()
            assert torch.equal(got, exact), name
