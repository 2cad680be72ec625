"""`gpt eval --tasks` against lm-evaluation-harness's own `hf` backend: time per task, and the
same answers, on the CPU.

The task is HellaSwag's format built offline: each item is the opening words of a docstring of
the standard library, and four endings, the docstring's own next words and three taken from
other docstrings (acc and acc_norm, as HellaSwag scores them). The model is GPT-2-124M's shape
with random weights, saved with transformers as an HF folder with GPT-2's tokenizer (no
download); gpt loads that folder as hf:FOLDER, the harness as pretrained=FOLDER, all in float32:
gpt and the harness at the same --batch-size, and the harness at its own default (1). The
backends alternate, `--repeats` times each; a row gives the median seconds of a whole task and
the accuracies; the max log-likelihood difference is over every item and ending of every run.

Context sharing bounds the gain: the harness's backend runs context and ending for each of the
four endings, with the LM head at every position; gpt runs the context once without the head
and each ending with it, so the FLOPs fall by 4(c + e)(L + H) / (c L + 4 e (L + H)) for c
context and e ending tokens, L the layers' and H the head's FLOPs per token (the head is a
third of GPT-2-124M's); the script prints that bound for the task it built.

    python scripts/bench_tasks.py [--items 300|small] [--batch-size 16] [--repeats 3]
        [--write-docs [--docs PATH]]

`--write-docs` writes the bench-tasks block of docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import random
import statistics
import sysconfig
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import doc_tables as docs

if TYPE_CHECKING:
    from gpt.harness import GPTLM

ROOT = Path(__file__).resolve().parents[1]
CONTEXT_WORDS, ENDING_WORDS = 24, 12
TASK_YAML = """task: stdlib_hellaswag
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
  cache_dir: {cache}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def docstring_words(limit: int) -> list[list[str]]:
    """Words of the standard library's docstrings long enough for a context and an ending,
    in a fixed order."""
    found = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                words = (ast.get_docstring(node) or "").split()
                if len(words) >= CONTEXT_WORDS + ENDING_WORDS:
                    found.append(words)
                    if len(found) == limit:
                        return found
    return found


def write_task(folder: Path, items: int) -> Path:
    """The task's YAML and data in `folder`: `items` contexts with four endings each."""
    rng = random.Random(0)
    texts = docstring_words(items * 2)
    rows = []
    for i, words in enumerate(texts[:items]):
        others = rng.sample([t for j, t in enumerate(texts) if j != i], 3)
        endings = [" ".join(t[CONTEXT_WORDS:CONTEXT_WORDS + ENDING_WORDS]) for t in others]
        label = rng.randrange(4)
        endings.insert(label, " ".join(words[CONTEXT_WORDS:CONTEXT_WORDS + ENDING_WORDS]))
        rows.append({"query": " ".join(words[:CONTEXT_WORDS]),
                     "choices": [" " + e for e in endings], "label": label})
    data = folder / "stdlib_hellaswag.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "stdlib_hellaswag.yaml").write_text(
        TASK_YAML.format(data=data, cache=folder / "cache"))
    return folder


def save_gpt2_124m(folder: Path) -> Path:
    """GPT-2-124M's shape with random weights and GPT-2's tokenizer, as an HF folder."""
    import torch
    import transformers

    from gpt.hf.tokenizers import save_hf_tokenizer

    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(transformers.GPT2Config()).save_pretrained(folder)
    save_hf_tokenizer({"name": "gpt2"}, folder, model_max_length=1024)
    return folder


def run(lm: object, tasks: Path) -> tuple[float, dict]:
    """Seconds of one whole task on `lm`, and the harness's results with their samples."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(tasks), include_defaults=False)
    start = time.perf_counter()
    results = lm_eval.simple_evaluate(model=lm, tasks=["stdlib_hellaswag"], task_manager=manager,
                                      log_samples=True)
    return time.perf_counter() - start, results


def task_shape(lm: GPTLM, tasks: Path) -> str:
    """The mean context and ending lengths in tokens, and the bound they set on the gain of
    sharing contexts (see the module's docstring)."""
    rows = [json.loads(line) for line in (tasks / "stdlib_hellaswag.jsonl").open()]
    c = statistics.mean(len(lm.tok_encode(r["query"])) for r in rows)
    e = statistics.mean(len(lm.tok_encode(ending, add_special_tokens=False))
                        for r in rows for ending in r["choices"])
    cfg = lm.model.config
    layers, head = 12 * cfg.n_layer * cfg.n_embd**2, cfg.padded_vocab_size * cfg.n_embd
    bound = 4 * (c + e) * (layers + head) / (c * layers + 4 * e * (layers + head))
    return (f"contexts {c:.0f} tokens and endings {e:.0f} on average: sharing contexts cuts "
            f"the FLOPs by {bound:.2f}x")


def loglikelihoods(results: dict) -> list[float]:
    return [r[0][0] for s in results["samples"]["stdlib_hellaswag"] for r in s["resps"]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", default="300", help="items in the task, or small (40)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    docs.add_doc_options(parser)
    args = parser.parse_args()
    items = 40 if args.items == "small" else int(args.items)
    doc = docs.docs_target(parser, args, "bench-tasks", default=ROOT / "docs" / "evaluation.md")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from lm_eval.models.huggingface import HFLM

    from gpt.harness import GPTLM

    load_before = docs.load_average()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"load average {load_before:.2f}, {cores} cores, {torch.get_num_threads()} torch "
          "threads", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-tasks-") as tmp:
        folder = save_gpt2_124m(Path(tmp) / "gpt2-124m")
        tasks = write_task(Path(tmp), items)
        same = f"batch size {args.batch_size}"
        backends = {
            f"gpt eval --tasks, {same}": GPTLM.load(f"hf:{folder}", device="cpu",
                                                    batch_size=args.batch_size),
            f"lm-eval hf backend, {same}": HFLM(pretrained=str(folder), dtype="float32",
                                                device="cpu", batch_size=args.batch_size),
            "lm-eval hf backend, batch size 1 (its default)": HFLM(
                pretrained=str(folder), dtype="float32", device="cpu", batch_size=1),
        }
        shape = task_shape(backends[f"gpt eval --tasks, {same}"], tasks)
        seconds: dict[str, list[float]] = {name: [] for name in backends}
        scores: dict[str, dict] = {}
        worst = 0.0
        for repeat in range(args.repeats):
            names = list(backends) if repeat % 2 == 0 else list(reversed(backends))
            for name in names:
                took, results = run(backends[name], tasks)
                seconds[name].append(took)
                scores[name] = results
                print(f"{name}: {took:.1f} s", flush=True)
            ours, *theirs = (loglikelihoods(scores[n]) for n in backends)
            worst = max(worst, *(abs(a - b) for other in theirs
                                 for a, b in zip(ours, other, strict=True)))
    rows, medians = [], {name: statistics.median(s) for name, s in seconds.items()}
    ours_name = next(iter(backends))
    for name in backends:
        result = scores[name]["results"]["stdlib_hellaswag"]
        rows.append([name, f"{medians[name]:.1f}", f"{items / medians[name]:.1f}",
                     f"{medians[name] / medians[ours_name]:.2f}x",
                     f"{result['acc,none']:.4f}", f"{result['acc_norm,none']:.4f}"])
    table = docs.markdown_table(["backend", "seconds per task (median)", "items/s",
                                 "time vs gpt", "acc", "acc_norm"], rows)
    summary = (f"largest log-likelihood difference {worst:.2e} over {items * 4} endings x "
               f"{args.repeats} runs; {shape}")
    print(table, summary, sep="\n")
    if doc is not None:
        notes = [f"{items} items x 4 endings, GPT-2-124M shape (random weights), float32, "
                 f"{args.repeats} alternating runs each", summary]
        docs.write_block(doc, "bench-tasks", f"{table}\n\n{docs.host_markdown(load_before, notes)}")
        print(f"wrote the bench-tasks block of {doc}")


if __name__ == "__main__":
    main()
