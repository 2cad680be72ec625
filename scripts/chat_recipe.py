"""The chat recipe end to end on the CPU: the default run, then a full and a LoRA chat finetune.

Runs, in a work folder, exactly what docs/finetuning.md tells a reader to run:

    gpt train -c configs/default.toml        # the base: characters of the stdlib's source
    gpt train -c configs/chat_sft.toml       # every weight, on python-docstrings
    gpt train -c configs/chat_lora.toml      # LoRA adapters, same data

and reports, for each finetune, its wall time, its checkpoint's size and the validation loss on
the assistant's tokens at its first step and its last (the trainer's estimate over eval_iters
batches, the same batches each time); then it asks the base and both finetunes the same
questions through `gpt chat` (greedy), two whose answers are in the chat set and two about
names that are not.

    python scripts/chat_recipe.py [--work DIR] [--write-docs [--docs PATH]]

`--write-docs` writes the chat-recipe block of docs/finetuning.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import doc_tables as docs

ROOT = Path(__file__).resolve().parents[1]
FINETUNES = {"full (chat_sft.toml)": ("chat_sft.toml", "out/chat"),
             "LoRA (chat_lora.toml)": ("chat_lora.toml", "out/chat-lora")}
QUESTIONS = [  # (question, whether the chat set holds it)
    ("What does `json.dumps` do?", True),
    ("What does `shutil.copyfile` do?", True),
    ("What does `torch.compile` do?", False),
    ("What is the `gpt` module for?", False),
]


def gpt(work: Path, *args: str, stdin: str | None = None) -> str:
    """A gpt command in `work`; its standard output, or the whole log on failure."""
    done = subprocess.run([sys.executable, "-m", "gpt", *args], cwd=work, input=stdin,
                          capture_output=True, text=True)
    if done.returncode != 0:
        log = done.stdout[-2000:] + done.stderr[-2000:]
        raise SystemExit(f"gpt {' '.join(args)} failed:\n{log}")
    return done.stdout


def train(work: Path, config: str) -> float:
    """`gpt train -c configs/CONFIG`; its wall time in seconds."""
    start = time.perf_counter()
    gpt(work, "train", "--config", f"configs/{config}")
    return time.perf_counter() - start


def losses(run: Path) -> tuple[float, float, int]:
    """The run's validation loss at its first evaluation and its last, and the last step."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in records if "val_loss" in r]
    return evaluated[0]["val_loss"], evaluated[-1]["val_loss"], evaluated[-1]["iter"]


def checkpoint_bytes(run: Path) -> int:
    latest = run / (run / "latest").read_text().strip()
    return sum(p.stat().st_size for p in latest.iterdir() if p.name != "state.json")


def replies(work: Path, checkpoint: str) -> list[str]:
    """`gpt chat`'s greedy reply to each question, each in a conversation of its own."""
    return [gpt(work, "chat", "--checkpoint", checkpoint, "--temperature", "0",
                "--max-new-tokens", "100", stdin=f"{question}\n/quit\n").strip()
            for question, _ in QUESTIONS]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, help="the folder to run in (default: a temporary one)")
    docs.add_doc_options(parser)
    args = parser.parse_args()
    doc = docs.docs_target(parser, args, "chat-recipe", default=ROOT / "docs" / "finetuning.md")
    load_before = docs.load_average()
    print(f"load average {load_before:.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="chat-recipe-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        shutil.copytree(ROOT / "configs", work / "configs", dirs_exist_ok=True)
        base_time = train(work, "default.toml")
        print(f"base: {base_time:.0f} s", flush=True)
        rows, answers = [], {"base (default.toml, plain layout)": replies(work, "out/default")}
        for name, (config, out) in FINETUNES.items():
            seconds = train(work, config)
            before, after, steps = losses(work / out)
            rows.append([name, f"{steps}", f"{seconds:.0f} s",
                         f"{checkpoint_bytes(work / out) / 2**20:.1f} MiB",
                         f"{before:.3f} → {after:.3f}"])
            print(" | ".join(rows[-1]), flush=True)
            answers[name] = replies(work, out)
    table = docs.markdown_table(
        ["finetune of out/default", "steps", "wall time", "checkpoint (weights + optimizer)",
         "val loss on the assistant's tokens, first step → last"], rows)
    transcript = []
    for (question, in_set), *said in zip(QUESTIONS, *answers.values(), strict=True):
        transcript.append(f"> {question}" + ("" if in_set else "   (not in the chat set)"))
        transcript += [f"  {name.split(' (')[0]:>5}: {reply}" for name, reply
                       in zip(answers, said, strict=True)]
    text = "```text\n" + "\n".join(transcript) + "\n```"
    print(table, text, sep="\n\n")
    notes = [f"the base run (configs/default.toml) took {base_time:.0f} s; replies are greedy "
             "(`gpt chat --temperature 0`), each question in a conversation of its own"]
    docs.publish(doc, "chat-recipe", [table, text], load_before, notes)


if __name__ == "__main__":
    main()
