"""`gpt eval --tasks`: EleutherAI's lm-evaluation-harness (HellaSwag, ARC, ...) on any gpt model.

`GPTLM` is the harness's model interface over a gpt model and its tokenizer, registered with
the harness as "gpt" when this module is imported. It is the only module importing lm_eval.

- Log-likelihoods: requests are grouped by their context and sorted by length; each batch runs
  its contexts once into a KV cache, copies each into the rows of its continuations, and scores
  all continuations in one more pass (a multiple-choice question costs its context once, not
  once per choice). Inputs longer than block_size lose their oldest tokens, as the harness's
  `hf` backend cuts them, and are counted.
- Generation runs on the engine (gpt/engine.py), greedy unless the task samples, until the
  task's stop strings ("until", and the end-of-text text) or max_gen_toks.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from tqdm import tqdm

from gpt.checkpoint import Checkpoint
from gpt.engine import Engine, Request
from gpt.errors import GPTError, first_line
from gpt.evaluate import LOGITS_BYTES
from gpt.fileio import write_atomic
from gpt.hf.pretrained import Pretrained, open_model
from gpt.kvcache import KVCache
from gpt.model import GPT
from gpt.sample import TextStream, load_for_inference, stop_ids
from gpt.tokenizer import Tokenizer

try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import (
        get_rolling_token_windows,
        handle_non_serializable,
        make_disjoint_window,
        make_table,
        simple_parse_args_string,
    )
except ImportError:
    raise GPTError(
        "gpt eval --tasks runs EleutherAI's lm-evaluation-harness, which is not installed; "
        "pip install 'gpt[eval]'"
    ) from None

DEFAULT_BATCH_SIZE = 16  # continuations scored, or sequences decoded, at once
MAX_GEN_TOKS = 256  # generated when a task sets no max_gen_toks (the harness's default)
Scored = tuple[list[int], list[int]]  # a request's context and continuation ids, as fed


@register_model("gpt")
class GPTLM(TemplateLM):
    """The harness's model interface (loglikelihood, loglikelihood_rolling, generate_until)
    on a gpt model in eval mode and its tokenizer."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = DEFAULT_BATCH_SIZE):
        super().__init__()
        if batch_size < 1:
            raise GPTError(f"--batch-size must be at least 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.truncated = 0  # requests cut from the left to fit block_size
        self.requests = 0
        self._device = next(model.parameters()).device

    @classmethod
    def load(
        cls, checkpoint: str | Checkpoint | Pretrained, which: str = "latest",
        device: str = "auto", batch_size: int = DEFAULT_BATCH_SIZE, quantize: str | None = None,
    ) -> GPTLM:
        """A run's checkpoint (LoRA merged) or an HF model (hf:...), in float32 on `device`;
        `quantize="int8"` as `gpt sample --quantize int8` runs it."""
        found = open_model(checkpoint, which) if isinstance(checkpoint, str) else checkpoint
        model, tokenizer = load_for_inference(found, device, "float32", False, quantize)
        return cls(model, tokenizer, batch_size)

    @classmethod
    def create_from_arg_string(
        cls, arg_string: str, additional_config: dict | None = None
    ) -> GPTLM:
        """`model_args="checkpoint=out/default,which=best,batch_size=8,quantize=int8"`, as the
        harness passes them for `simple_evaluate(model="gpt", ...)`."""
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(
        cls, arg_dict: dict[str, Any], additional_config: dict | None = None
    ) -> GPTLM:
        given = {k: v for k, v in (additional_config or {}).items() if v is not None}
        args = {**arg_dict, **given}
        args.pop("max_batch_size", None)  # the harness's search for a batch size: not used
        unknown = sorted(set(args) - {"checkpoint", "which", "device", "batch_size", "quantize"})
        if unknown or "checkpoint" not in args:
            raise GPTError(
                f"the gpt model takes checkpoint=RUN|hf:..., and optionally which, device, "
                f"batch_size and quantize; got {', '.join(unknown) or 'no checkpoint'}"
            )
        batch = str(args.get("batch_size", DEFAULT_BATCH_SIZE))
        quantize = args.get("quantize")
        return cls.load(str(args["checkpoint"]), str(args.get("which", "latest")),
                        str(args.get("device") or "auto"),
                        int(batch) if batch.isdigit() else DEFAULT_BATCH_SIZE,  # "auto"
                        None if quantize is None else str(quantize))

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eot_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context and each rolling text start from: the beginning-of-text id,
        else the end-of-text id (as the harness's `hf` backend chooses)."""
        bos = self.tokenizer.bos_id
        return self.tokenizer.eot_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self.model.config.block_size

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        """Ids of `string`, after the beginning-of-text id of a tokenizer that has one (unless
        `add_special_tokens` is False), as HF's tokenizer encodes a context."""
        try:
            ids = self.tokenizer.encode(string)
        except GPTError as e:
            raise GPTError(
                f"a task's text cannot be encoded with the model's {self.tokenizer.name} "
                f"tokenizer ({str(e).split(';')[0]}); evaluate it on tasks its vocabulary "
                "covers, or evaluate a model whose tokenizer covers this one"
            ) from None
        bos = self.tokenizer.bos_id
        return ids if bos is None or add_special_tokens is False else [bos, *ids]

    def _fit(self, context: list[int], continuation: list[int]) -> Scored:
        """The context cut from the left so that both fit block_size, as the harness's `hf`
        backend cuts them (counted in `truncated`)."""
        T = self.max_length
        if len(continuation) > T:
            raise GPTError(
                f"a task's answer is {len(continuation):,} tokens, more than the model's "
                f"block_size of {T:,}; it cannot be scored"
            )
        self.requests += 1
        keep = T + 1 - len(continuation)
        if len(context) > keep:
            self.truncated += 1
            context = context[-keep:]
        return context, continuation

    def _loglikelihood_tokens(
        self, requests: Sequence[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(log-probability, is-greedy) of each continuation after its context."""
        scored = [self._fit(list(context), list(cont)) for _, context, cont in requests]
        results: list[tuple[float, bool]] = [(0.0, False)] * len(scored)
        batches = list(_batches(scored, self.batch_size, self._rows_fitting(scored)))
        bar = tqdm(total=len(scored), disable=disable_tqdm, desc="loglikelihood", unit="req")
        for batch in batches:
            for i, result in self._score(batch, scored):
                results[i] = result
            bar.update(sum(len(rows) for _, rows in batch))
        bar.close()
        return results

    def _rows_fitting(self, scored: list[Scored]) -> int:
        """Rows per batch whose logits stay within LOGITS_BYTES (long rolling windows)."""
        longest = max((len(cont) for _, cont in scored), default=1)
        return max(1, LOGITS_BYTES // (longest * self.model.config.padded_vocab_size * 4))

    @torch.inference_mode()
    def _score(
        self, batch: list[tuple[tuple[int, ...], list[int]]], scored: list[Scored]
    ) -> list[tuple[int, tuple[float, bool]]]:
        """One batch: its contexts in one pass, into the cache rows after the continuations',
        each copied into the rows of its continuations, then every continuation but its last
        token in a second pass; (request index, result) of each. Rows are sorted by length and
        split into groups of similar lengths, so that little of a pass is padding."""
        contexts = sorted(range(len(batch)), key=lambda c: -len(batch[c][0]))
        slots = sorted(((i, c) for c, (_, members) in enumerate(batch) for i in members),
                       key=lambda slot: -len(scored[slot[0]][1]))  # (request, context)
        R = len(slots)
        cache = self.model.new_cache(R + len(batch), max(
            len(batch[c][0]) + len(scored[i][1]) - 1 for i, c in slots))
        last, _ = self._pass(cache, R, [list(batch[c][0]) for c in contexts], last_only=True)
        context_row = {c: R + k for k, c in enumerate(contexts)}
        for row, (_, c) in enumerate(slots):
            cache.move(context_row[c], row)
        conts = [scored[i][1] for i, _ in slots]
        rest, starts = self._pass(cache, 0, [cont[:-1] for cont in conts], last_only=False)
        # each scored token: the logits row predicting it (its context's last, or its own
        # row's previous position), its id, and its continuation's row
        first = [context_row[c] - R for _, c in slots]
        rest_at = [p for row, cont in enumerate(conts)
                   for p in range(starts[row], starts[row] + len(cont) - 1)]
        picked, missed = self._token_scores(last, first, [cont[0] for cont in conts])
        if rest_at:
            rest_picked, rest_missed = self._token_scores(rest, rest_at,
                                                          [t for c in conts for t in c[1:]])
            owners = torch.tensor([r for r, c in enumerate(conts) for _ in c[1:]],
                                  device=picked.device)
            picked = picked.index_add(0, owners, rest_picked)
            missed = missed.index_add(0, owners, rest_missed)
        return [(i, (lp, misses == 0)) for (i, _), lp, misses
                in zip(slots, picked.tolist(), missed.tolist(), strict=True)]

    def _token_scores(
        self, logits: Tensor, at: list[int], targets: list[int]
    ) -> tuple[Tensor, Tensor]:
        """Log-probability of each target id under the logits row `at` names (the vocabulary's
        ids only, not the padding's), and 1 where it is not that row's most likely id."""
        rows = logits[at, :self.model.config.vocab_size].float()  # (n, V)
        ids = torch.tensor(targets, device=rows.device)
        picked = rows.gather(-1, ids[:, None]).squeeze(-1) - rows.logsumexp(-1)  # (n,)
        return picked, (rows.argmax(-1) != ids).float()

    def _pass(
        self, cache: KVCache, first_row: int, sequences: list[list[int]], last_only: bool
    ) -> tuple[Tensor, list[int]]:
        """Feed `sequences` (longest first) to the cache rows from `first_row` on, in groups
        whose rows are at least 3/4 as long as their first. The logits (M, V): each row's last
        position's with `last_only` (M = rows), else every position's; and where each row's
        begin among them."""
        groups: list[tuple[slice, list[int]]] = []
        for row, seq in enumerate(sequences, first_row):
            if seq and groups and len(seq) * 4 >= groups[-1][1][0] * 3:
                rows, fed = groups[-1]
                groups[-1] = (slice(rows.start, row + 1), [*fed, len(seq)])
            elif seq:
                groups.append((slice(row, row + 1), [len(seq)]))
        if not groups:  # one-token continuations alone: nothing to feed
            return torch.empty(0, self.model.config.padded_vocab_size), [0] * len(sequences)
        ids: list[int] = []
        for rows, fed in groups:  # each row padded to its group's longest, with id 0
            for seq in sequences[rows.start - first_row:rows.stop - first_row]:
                ids += [*seq, *[0] * (fed[0] - len(seq))]
        cache.plan(groups)
        logits, _ = self.model(torch.tensor([ids], device=self._device), cache=cache,
                               last_only=last_only)
        flat = logits.reshape(-1, logits.size(-1))  # (M, V) in the pass's order
        if last_only:
            return flat, list(range(len(sequences)))
        starts, at = [], 0
        for _, fed in groups:
            for _ in fed:
                starts.append(at)
                at += fed[0]
        return flat, starts + [at] * (len(sequences) - len(starts))  # empty ones come last

    def loglikelihood_rolling(
        self, requests: list[Any], disable_tqdm: bool = False
    ) -> list[float]:
        """Log-probability of each whole text, in windows of block_size that predict each of its
        tokens once, the first from the prefix id (the harness's rolling windows)."""
        windows, owners = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            ids = self.tok_encode(text, add_special_tokens=False)
            for context, cont in map(make_disjoint_window, get_rolling_token_windows(
                    ids, self.prefix_token_id, self.max_length, 1)):
                windows.append((None, context, cont))
                owners.append(n)
        totals = [0.0] * len(requests)
        for n, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows, disable_tqdm),
                                   strict=True):
            totals[n] += logprob
        return totals

    @property
    def max_gen_toks(self) -> int:
        return MAX_GEN_TOKS

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Each context's continuation, decoded together on the engine up to the first of its
        stop strings (not included), its end-of-text id or its max_gen_toks."""
        streams, jobs = [], []
        eos = self.tokenizer.decode([self.tokenizer.eot_id])
        for n, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            new_tokens = int(kwargs.pop("max_gen_toks"))
            prompt = self._generation_prompt(context, new_tokens)
            sampled = bool(kwargs.get("do_sample"))
            jobs.append(Request(
                prompt, new_tokens, float(kwargs.get("temperature", 0.0)) if sampled else 0.0,
                kwargs.get("top_k"), float(kwargs.get("top_p", 1.0)), seed=n,
                stop_ids=stop_ids(self.tokenizer, ignore_eos=False),
            ))
            streams.append(TextStream(self.tokenizer, [s for s in until if s]))
        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i].prompt))
        engine = Engine(self.model, max_batch=self.batch_size)
        bar = tqdm(total=len(jobs), disable=disable_tqdm, desc="generate_until", unit="req")
        for i in order:
            engine.submit(jobs[i], seq=i)
        while engine.busy:
            for event in engine.step():
                stream = streams[event.seq]
                if event.token is not None and event.finish != "stop" and \
                        event.token != self.tokenizer.bos_id:  # HF decodes without specials
                    stream.add(event.token)
                    if stream.stopped:
                        engine.cancel(event.seq)
                if event.finish is not None:
                    bar.update(1)
        bar.close()
        return [stream.text for stream in streams]

    def _generation_prompt(self, context: str, new_tokens: int) -> list[int]:
        """The context's ids, cut from the left to leave room for `new_tokens` as the harness's
        `hf` backend cuts them (counted); where max_gen_toks fills the block, the last half of
        it is kept and the window slides as generation goes on."""
        ids = self.tok_encode(context) or [self.tokenizer.eot_id]
        keep = max(self.max_length - new_tokens, self.max_length // 2, 1)
        self.requests += 1
        if len(ids) > keep:
            self.truncated += 1
            ids = ids[-keep:]
        return ids


def _batches(
    scored: list[Scored], batch_size: int, rows_fitting: int
) -> Iterator[list[tuple[tuple[int, ...], list[int]]]]:
    """Requests grouped by context, longest first, in batches of at most `batch_size` (and
    `rows_fitting`) continuations: each item is a context and the requests scored after it.
    A context with more continuations than a batch holds is run once per batch."""
    by_context: dict[tuple[int, ...], list[int]] = {}
    for i, (context, _) in enumerate(scored):
        by_context.setdefault(tuple(context), []).append(i)
    size = max(1, min(batch_size, rows_fitting))
    units = [(context, members[k:k + size]) for context, members in by_context.items()
             for k in range(0, len(members), size)]
    units.sort(key=lambda u: -(len(u[0]) + max(len(scored[i][1]) for i in u[1])))
    batch: list[tuple[tuple[int, ...], list[int]]] = []
    rows = 0
    for unit in units:
        if batch and rows + len(unit[1]) > size:
            yield batch
            batch, rows = [], 0
        batch.append(unit)
        rows += len(unit[1])
    if batch:
        yield batch



@dataclass(frozen=True)
class TaskOptions:
    """What `gpt eval --tasks` runs, as its options give it."""

    tasks: list[str]  # names, globs (arc_*) or YAML files
    num_fewshot: int | None = None
    limit: float | None = None  # items per task; below 1, a fraction of them
    batch_size: int = DEFAULT_BATCH_SIZE
    include_path: Path | None = None  # a folder (or YAML file) of the user's own tasks
    output: Path | None = None  # where the harness's results are written as JSON


def parse_tasks(tasks: str) -> list[str]:
    """--tasks' comma-separated names, none empty."""
    names = [name.strip() for name in tasks.split(",")]
    if not all(names):
        raise GPTError(f"--tasks {tasks!r} holds an empty name; give names separated by commas, "
                       "such as --tasks hellaswag,arc_easy")
    return names


def task_manager(names: list[str], include_path: Path | None) -> TaskManager:
    """The harness's index of tasks that knows every name: only --include-path's when it
    holds them all (the harness's own index takes seconds to build), else the harness's too.
    An unknown name is refused with the closest known ones."""
    if include_path is not None and not include_path.exists():
        raise GPTError(f"--include-path {include_path} does not exist; give a folder of task "
                       "YAML files")
    include = None if include_path is None else str(include_path)
    if include is not None:
        local = TaskManager(include_path=include, include_defaults=False)
        if all(_is_yaml(name) or local.match_tasks([name]) for name in names):
            return local
    manager = TaskManager(include_path=include)
    unknown = [n for n in names if not _is_yaml(n) and not manager.match_tasks([n])]
    if unknown:
        close = difflib.get_close_matches(unknown[0], manager.all_tasks, n=3, cutoff=0.7)
        hint = f"did you mean {', '.join(close)}? " if close else ""
        where = "lm-evaluation-harness" + ("" if include is None else f" or of {include}")
        raise GPTError(
            f"--tasks {unknown[0]!r} is not a task of {where}; {hint}see lm-eval ls tasks, or "
            "give a folder of task YAML files with --include-path"
        )
    return manager


def _is_yaml(name: str) -> bool:
    return name.endswith((".yaml", ".yml")) and os.path.isfile(name)


def run_tasks(lm: GPTLM, options: TaskOptions, manager: TaskManager) -> dict[str, Any]:
    """The harness's results of the tasks on `lm`, written to options.output when given."""
    try:
        results = lm_eval.simple_evaluate(
            model=lm, tasks=options.tasks, num_fewshot=options.num_fewshot,
            limit=options.limit, task_manager=manager, log_samples=False,
        )
    except ConnectionError as e:
        raise GPTError(
            f"--tasks {','.join(options.tasks)} needs a data set that is not in the HF cache "
            f"and cannot be downloaded ({first_line(e)}); run the same command once with "
            "network access (HF_DATASETS_OFFLINE unset) to cache it, then it runs offline"
        ) from None
    except FileNotFoundError as e:
        raise GPTError(f"a task's data files are missing ({first_line(e)}); fix the task's "
                       "dataset_kwargs (data_files) to name files that exist") from None
    assert results is not None  # one process: rank 0
    if options.output is not None:
        text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
        try:
            write_atomic(options.output, text + "\n")
        except OSError as e:
            raise GPTError(f"cannot write --output {options.output} ({e.strerror}); choose a "
                           "file in a folder that exists and is writable") from None
    return results


def report(results: dict[str, Any], lm: GPTLM) -> str:
    """The harness's tables (tasks, then groups), and how many inputs were cut to fit."""
    tables = [make_table(results)]
    if results.get("groups"):
        tables.append(make_table(results, "groups"))
    if lm.truncated:
        tables.append(
            f"{lm.truncated:,} of {lm.requests:,} requests were longer than the model's "
            f"block_size of {lm.max_length:,} and lost their oldest tokens (as the harness's "
            "hf backend cuts them)\n"
        )
    return "\n".join(tables)


def evaluate_tasks(
    found: Checkpoint | Pretrained, options: TaskOptions, device: str, quantize: str | None = None
) -> str:
    """`gpt eval --tasks`: the tasks found (before the model loads), run, and their tables; the
    model quantized as `quantize` says (`--quantize int8`)."""
    if options.output is not None and not options.output.parent.is_dir():
        raise GPTError(f"--output {options.output}: its folder does not exist; create it or "
                       "choose another file")
    manager = task_manager(options.tasks, options.include_path)
    lm = GPTLM.load(found, device=device, batch_size=options.batch_size, quantize=quantize)
    return report(run_tasks(lm, options, manager), lm)
