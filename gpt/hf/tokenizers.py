"""Tokenizers between HF model folders and `gpt`'s tokenizer records.

Import: `tokenizer_record_from_folder` reads a folder's tokenizer as transformers loads it (so
the ids, and the bos token HF puts before a prompt, are HF's own) and gives the record that
`gpt.tokenizer.tokenizer_from_dict` rebuilds. GPT-2's own BPE and our char vocabularies are
recognised and given their own records, so data prepared with those stays compatible.

Export: `save_hf_tokenizer` writes tokenizer files that `AutoTokenizer.from_pretrained` loads
into a tokenizer giving the ids ours gives: GPT-2's BPE derived from the bundled ranks (no
download), a char vocabulary as a one-character-per-token WordLevel, a learned BPE as its own
tokenizer.json, or an HF record written back. A tokenizer with the chat tokens gets them as
special added tokens at their ids and the built-in layout as its chat template, so HF's
`apply_chat_template` gives the ids `gpt.template` gives; every chat template is written into
tokenizer_config.json, which every transformers release reads.
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
from pathlib import Path
from typing import Any

from gpt.errors import GPTError, first_line
from gpt.fileio import MiB, read_text_bounded
from gpt.tokenizer import (
    CHAT_TOKENS,
    CHATML_TEMPLATE,
    GPT2_EOT,
    HF_SPECIAL_TOKENS,
    BPETokenizer,
    CharTokenizer,
    ChatTokenizer,
    HFTokenizer,
    byte_chars,
    gpt2_ranks,
    tokenizer_from_dict,
)

# files that hold a vocabulary: tokenizer.json, or what a slow tokenizer is converted from
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "tekken.json", "vocab.txt")
# tokenizer_config.json keys worth carrying to an export; the rest is class wiring or defaults
CONFIG_KEYS = (
    "add_bos_token",
    "add_eos_token",
    "clean_up_tokenization_spaces",
    "model_max_length",
    "padding_side",
    "truncation_side",
    "split_special_tokens",
    "extra_special_tokens",
)
UNSET_LENGTH = 10**20  # transformers' "no limit" is 1e30
CHAR_PATTERN = r"[\s\S]"  # any one character, newlines included
TEMPLATE_LIMIT = 512 * MiB  # bytes of a chat_template.jinja, as for the other tokenizer files

# what a slow tokenizer file needs to be read: module -> pip name
SLOW_NEEDS = {"tokenizer.model": {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf"}}
PIP_NAMES = {"google": "protobuf"}  # where a missing module's package is named otherwise


def tokenizer_record_from_folder(folder: Path, label: str) -> dict[str, Any] | None:
    """The tokenizer record of an HF model folder (`save_pretrained`'s files); None when the
    folder holds no tokenizer. `{"name": "gpt2"}` when it is exactly GPT-2's BPE, so the bundled
    tiktoken encoding does the work and gpt2-prepared data fits."""
    folder = Path(folder)
    if not any((folder / name).is_file() for name in VOCABULARY_FILES):
        return None
    hf = _load(folder)
    special_tokens = {key: _text(getattr(hf, key, None)) for key in HF_SPECIAL_TOKENS}
    config = _config(hf)
    template_file = folder / "chat_template.jinja"
    if "chat_template" not in config and template_file.is_file():  # transformers < 4.50
        config["chat_template"] = read_text_bounded(template_file, TEMPLATE_LIMIT,
                                                    "a chat template")
    tokenizer = HFTokenizer(hf.backend_tokenizer.to_str(), special_tokens, config, label)
    pipeline = json.loads(tokenizer.tokenizer_json)
    if _is_gpt2(tokenizer, pipeline):
        return {"name": "gpt2"}
    if (chars := _char_vocabulary(tokenizer, pipeline)) is not None:
        return CharTokenizer(chars).to_dict()
    return tokenizer.to_dict()


def save_hf_tokenizer(
    record: dict[str, Any], out_dir: Path, model_max_length: int
) -> dict[str, int | None]:
    """Write the tokenizer of `record` into `out_dir` as transformers saves one, and return the
    special ids that config.json and generation_config.json carry."""
    check_exportable_tokenizer(record)
    tokenizer = tokenizer_from_dict(record)  # checks the record
    plain = {k: v for k, v in record.items() if k != "chat_tokens"}
    name = record["name"]
    if name == "gpt2":
        hf = _gpt2_hf(model_max_length)
    elif name == CharTokenizer.name:
        hf = _char_hf(plain, model_max_length)
    elif name == BPETokenizer.name:
        hf = _bpe_hf(plain, model_max_length)
    else:
        hf = _hf_hf(plain, model_max_length)
    if isinstance(tokenizer, ChatTokenizer):
        _add_chat_tokens(hf, tokenizer.chat_ids)
    hf.save_pretrained(str(out_dir), save_jinja_files=False)  # the template in the config
    _portable_class(out_dir)
    return {
        "bos_token_id": hf.bos_token_id,
        "eos_token_id": hf.eos_token_id,
        "pad_token_id": hf.pad_token_id,
    }


def _add_chat_tokens(hf: Any, ids: tuple[int, int]) -> None:
    """Give `hf` the chat tokens as special added tokens at `ids`, ours, and the built-in
    layout as its chat template."""
    from tokenizers import AddedToken

    hf.add_tokens([AddedToken(token, special=True, normalized=False) for token in CHAT_TOKENS],
                  special_tokens=True)
    given = tuple(hf.convert_tokens_to_ids(list(CHAT_TOKENS)))
    if given != ids:
        raise GPTError(
            f"the exported tokenizer would give the chat tokens ids {given}, not the model's "
            f"{ids}; export a model whose tokenizer has no gaps in its ids"
        )
    hf.chat_template = CHATML_TEMPLATE


def check_exportable_tokenizer(record: dict[str, Any]) -> None:
    """Raise unless `save_hf_tokenizer` writes this tokenizer: GPT-2's BPE, a char vocabulary,
    a learned BPE or an HF tokenizer (other tiktoken encodings are not written out)."""
    name = record.get("name") if isinstance(record, dict) else None
    if name not in ("gpt2", CharTokenizer.name, BPETokenizer.name, HFTokenizer.name):
        raise GPTError(
            f"export writes the gpt2, char, bpe and HF tokenizers, not {name!r}; train with one "
            "of those to export"
        )


def _portable_class(out_dir: Path) -> None:
    """Name the generic fast tokenizer as every transformers release knows it: 5.x writes
    TokenizersBackend, which 4.x (still what many serving tools pin) cannot load, while both read
    PreTrainedTokenizerFast into the same tokenizer."""
    path = out_dir / "tokenizer_config.json"
    config = json.loads(path.read_text())
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config.pop("backend", None)  # 5.x's own marker for the same choice
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def _load(folder: Path) -> Any:
    """The folder's tokenizer as `AutoTokenizer` gives it: the backend HF's own tokenizer(...)
    runs, its post-processor set up from tokenizer_config.json (add_bos_token)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging

    # without what a slow file needs, transformers warns at length before failing: one line here
    quiet = bool(_missing_packages(folder, None))
    verbosity = logging.get_verbosity()
    if quiet:
        logging.set_verbosity_error()
    try:
        hf = AutoTokenizer.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False
        )
    except Exception as e:
        missing = _missing_packages(folder, e)
        if missing:
            raise GPTError(
                f"{folder}: reading its tokenizer needs {' and '.join(missing)}: "
                f"pip install {' '.join(missing)}"
            ) from None
        raise GPTError(
            f"{folder}: transformers could not load its tokenizer ({first_line(e)}); check its "
            "tokenizer files (tokenizer.json, tokenizer_config.json)"
        ) from None
    finally:
        logging.set_verbosity(verbosity)
    if not getattr(hf, "is_fast", False):
        raise GPTError(
            f"{folder}: its tokenizer ({type(hf).__name__}) has no fast version to read; save "
            "one with tokenizer.json into the folder"
        )
    return hf


def _missing_packages(folder: Path, error: Exception | None) -> list[str]:
    """The pip names of optional packages a load lacks: the one its ImportError names, or those
    a slow tokenizer file in the folder needs."""
    if isinstance(error, ImportError) and error.name:
        module = error.name.split(".")[0]
        return [PIP_NAMES.get(module, module)]
    if (folder / "tokenizer.json").is_file():
        return []
    return [
        pip
        for file, needs in SLOW_NEEDS.items() if (folder / file).is_file()
        for module, pip in needs.items() if not _installed(module)
    ]


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # its parent package is missing
        return False


def _text(token: Any) -> str | None:
    return None if token is None else str(token)


def _config(hf: Any) -> dict[str, Any]:
    """The keys of the folder's tokenizer_config.json worth writing back, and its chat template
    (which may live in chat_template.jinja)."""
    config: dict[str, Any] = {}
    for key in CONFIG_KEYS:
        value = hf.init_kwargs.get(key)
        if value is None or (key == "model_max_length" and value >= UNSET_LENGTH):
            continue
        if key == "model_max_length":
            value = int(value)
        if key == "extra_special_tokens":
            if not value:
                continue
            value = ({k: str(v) for k, v in value.items()} if isinstance(value, dict)
                     else [str(v) for v in value])
        config[key] = value
    if getattr(hf, "chat_template", None):
        config["chat_template"] = hf.chat_template
    return config


def _adds_nothing(tokenizer: HFTokenizer) -> bool:
    """Whether the post-processor leaves a text's ids alone when asked for special tokens."""
    processor = tokenizer.backend.post_processor
    return processor is None or processor.num_special_tokens_to_add(False) == 0


def _only_specials(tokenizer: HFTokenizer, pipeline: dict[str, Any], token: str) -> bool:
    """Whether `token` is the one added token, and the eos (maybe also bos, unk and pad), with
    no chat template or extra special tokens that our own record would lose."""
    added = [entry["content"] for entry in pipeline.get("added_tokens", [])]
    specials = tokenizer.special_tokens
    return (
        added in ([], [token])
        and specials["eos_token"] == token
        and all(specials[key] in (None, token) for key in HF_SPECIAL_TOKENS)
        and not {"chat_template", "extra_special_tokens"} & tokenizer.config.keys()
        and _adds_nothing(tokenizer)
    )


def _is_gpt2(tokenizer: HFTokenizer, pipeline: dict[str, Any]) -> bool:
    """Whether the tokenizer is GPT-2's: its vocabulary and merges, byte-level pre-tokenizer
    without a prefix space, no normaliser, and <|endoftext|> as its only special token."""
    model = pipeline["model"]
    if model.get("type") != "BPE" or tokenizer.vocab_size != len(_gpt2_vocab()):
        return False
    pre = pipeline.get("pre_tokenizer") or {}
    byte_level = (
        pre.get("type") == "ByteLevel" and not pre.get("add_prefix_space")
        and pre.get("use_regex", True)
        and (pipeline.get("decoder") or {}).get("type") == "ByteLevel"
    )
    plain_bpe = (
        pipeline.get("normalizer") is None and model.get("dropout") is None
        and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
        and not model.get("byte_fallback")
    )
    if not (byte_level and plain_bpe and _only_specials(tokenizer, pipeline, GPT2_EOT)):
        return False
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = tokenizer.backend.get_vocab(with_added_tokens=True)
    return merges == _gpt2_merges() and vocab == _gpt2_vocab()


def _char_vocabulary(tokenizer: HFTokenizer, pipeline: dict[str, Any]) -> str | None:
    """The characters of a tokenizer that is one of our char vocabularies (as `_char_hf`
    writes it), else None."""
    model = pipeline["model"]
    pre = pipeline.get("pre_tokenizer") or {}
    if (
        model.get("type") != "WordLevel"
        or pipeline.get("normalizer") is not None
        or pre.get("type") != "Split" or pre.get("pattern") != {"Regex": CHAR_PATTERN}
        or pre.get("behavior") != "Isolated" or pre.get("invert")
        or (pipeline.get("decoder") or {}).get("type") != "Fuse"
        or not _only_specials(tokenizer, pipeline, "\n")
    ):
        return None
    chars = sorted(model["vocab"], key=model["vocab"].get)
    if any(len(c) != 1 for c in chars) or chars != sorted(chars) or "\n" not in chars:
        return None
    return "".join(chars)


def _as_chars(token: bytes, stand_ins: list[str]) -> str:
    return "".join(stand_ins[b] for b in token)


@functools.cache
def _gpt2_vocab() -> dict[str, int]:
    """GPT-2's vocabulary as HF spells it (bytes as printable stand-ins), <|endoftext|> last."""
    stand_ins = byte_chars()
    ranks = gpt2_ranks()
    return {**{_as_chars(t, stand_ins): r for t, r in ranks.items()}, GPT2_EOT: len(ranks)}


def _bpe_parts(token: bytes, ranks: dict[bytes, int], below: int) -> list[bytes]:
    """`token`'s bytes merged by BPE with only the merges ranked below `below`."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pairs = [(ranks.get(a + b), i) for i, (a, b) in enumerate(itertools.pairwise(parts))]
        ranked = [(rank, i) for rank, i in pairs if rank is not None and rank < below]
        if not ranked:
            break
        _, i = min(ranked)
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


@functools.cache
def _gpt2_merges() -> list[tuple[str, str]]:
    """GPT-2's merges recovered from its ranks: each token of two or more bytes, in rank order,
    is the merge of the two lower-ranked tokens that BPE stops at just before it."""
    stand_ins = byte_chars()
    ranks = gpt2_ranks()
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) < 2:
            continue
        parts = _bpe_parts(token, ranks, rank)
        if len(parts) != 2:
            raise GPTError("the bundled gpt2 ranks are not a BPE merge order; reinstall gpt")
        merges.append((_as_chars(parts[0], stand_ins), _as_chars(parts[1], stand_ins)))
    return merges


def _gpt2_hf(model_max_length: int) -> Any:
    """GPT-2's tokenizer as HF's own gpt2 folder holds it, built from the bundled ranks."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import GPT2TokenizerFast

    backend = Tokenizer(models.BPE(vocab=_gpt2_vocab(), merges=_gpt2_merges()))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)  # GPT-2's split
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    backend.add_special_tokens([AddedToken(GPT2_EOT, special=True, normalized=False)])
    return GPT2TokenizerFast(
        tokenizer_object=backend,
        bos_token=GPT2_EOT,
        eos_token=GPT2_EOT,
        unk_token=GPT2_EOT,
        add_prefix_space=False,
        clean_up_tokenization_spaces=False,  # decode gives the text back: " 's" stays as is
        model_max_length=model_max_length,
    )


def _char_hf(record: dict[str, Any], model_max_length: int) -> Any:
    """One token per character, whitespace included, decoded by plain concatenation; the
    newline (our end of text) is the eos."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = CharTokenizer(record.get("chars", "")).chars
    backend = Tokenizer(models.WordLevel({c: i for i, c in enumerate(chars)}))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(CHAR_PATTERN), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="\n",
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def _bpe_hf(record: dict[str, Any], model_max_length: int) -> Any:
    """A learned BPE as GPT-2's is written: its own tokenizer.json, <|endoftext|> as bos, eos
    and unk, and decoding that gives the text back unchanged."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tokenizer = BPETokenizer.from_dict(record)  # checks the record and its hash
    backend = Tokenizer.from_str(tokenizer.tokenizer_json)
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no ids
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=GPT2_EOT,
        eos_token=GPT2_EOT,
        unk_token=GPT2_EOT,
        clean_up_tokenization_spaces=False,
        model_max_length=model_max_length,
    )


def _hf_hf(record: dict[str, Any], model_max_length: int) -> Any:
    """An imported HF tokenizer written back: its pipeline, special tokens and settings."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tokenizer = HFTokenizer.from_dict(record)  # checks the record
    specials = {k: v for k, v in tokenizer.special_tokens.items() if v is not None}
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(tokenizer.tokenizer_json),
        **specials,
        **{**tokenizer.config, "model_max_length": model_max_length},
    )
