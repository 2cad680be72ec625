"""`python-docstrings`: a chat set every machine can build offline, from the standard library.

Each public module, class, function and method of the running interpreter's standard library
whose docstring opens with a one-line summary (PEP 257) becomes one question and its answer:

    user:      What does `json.dumps` do?
    assistant: Serialize ``obj`` to a JSON formatted ``str``.

The answers are the library authors' own words, so a model finetuned on them learns the shape
of a short answer to a question about Python, and some of the facts; it is a small, honest set
for trying chat finetuning end to end, not a source of knowledge. The set is read in a fixed
order, so one interpreter gives the same conversations every time (another Python version gives
a slightly different set, as `python-stdlib` does).
"""

from __future__ import annotations

import ast
import inspect
import sysconfig
import zlib
from collections.abc import Iterator
from pathlib import Path

from gpt.data.sources import stdlib_files

MIN_ANSWER = 16  # characters: shorter summaries ("Constructor.") say nothing
MAX_ANSWER = 160  # characters: longer ones are rarely a one-line summary
MAX_CONVERSATION = 104  # characters of question and answer: with the chat layout's 21 tokens
# around them, a conversation fits the 128-character context of the default run
QUESTIONS = {  # what kind of thing -> ways to ask about it; one is chosen by the name's hash
    "module": ["What is the `{}` module for?", "What does the `{}` module provide?"],
    "class": ["What is `{}`?", "What does the class `{}` represent?"],
    "function": ["What does `{}` do?", "Explain `{}` in one sentence.", "What is `{}` for?"],
}


def conversations() -> Iterator[dict[str, list[dict[str, str]]]]:
    """One `{"messages": [user, assistant]}` row per documented public name, in a fixed order
    (a name defined twice, such as a property and its setter, once: its first definition)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    seen: set[str] = set()
    for path in sorted(stdlib_files(), key=lambda p: p.relative_to(root).as_posix()):
        module = _module_name(path.relative_to(root))
        if module is None:
            continue
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except (SyntaxError, ValueError, OSError):  # a file this interpreter cannot parse
            continue
        for kind, name, docstring in _documented(tree, module):
            if name in seen:
                continue
            seen.add(name)
            question, answer = _question(kind, name), summary(docstring)
            if answer is not None and len(question) + len(answer) <= MAX_CONVERSATION:
                yield {"messages": [
                    {"role": "user", "content": question},
                    {"role": "assistant", "content": answer},
                ]}


def summary(docstring: str) -> str | None:
    """The docstring's opening paragraph on one line, when it reads as a sentence of summary;
    None for a signature line ("split(sep) -> list"), a fragment, or a long paragraph."""
    paragraph = inspect.cleandoc(docstring).split("\n\n", 1)[0]
    text = " ".join(paragraph.split())
    if not MIN_ANSWER <= len(text) <= MAX_ANSWER or "->" in text or "(" in text.split(" ", 1)[0]:
        return None
    if not text[0].isupper() or not text.endswith("."):
        return None
    return text


def _module_name(relative: Path) -> str | None:
    """The dotted module name of a stdlib file; None for private modules and scripts."""
    parts = list(relative.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    if not parts or any(part.startswith("_") or "-" in part for part in parts):
        return None
    return ".".join(parts)


def _documented(tree: ast.Module, module: str) -> Iterator[tuple[str, str, str]]:
    """(kind, dotted name, docstring) of the module, its public classes and functions, and the
    public methods of its public classes."""
    if (doc := ast.get_docstring(tree, clean=False)) is not None:
        yield "module", module, doc
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            if (doc := ast.get_docstring(node, clean=False)) is not None:
                yield "class", f"{module}.{node.name}", doc
            for method in node.body:
                if _is_public_function(method):
                    if (doc := ast.get_docstring(method, clean=False)) is not None:
                        yield "function", f"{module}.{node.name}.{method.name}", doc
        elif _is_public_function(node):
            if (doc := ast.get_docstring(node, clean=False)) is not None:
                yield "function", f"{module}.{node.name}", doc


def _is_public_function(node: ast.AST) -> bool:
    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    return isinstance(node, functions) and not node.name.startswith("_")


def _question(kind: str, name: str) -> str:
    """A question about `name`, its wording picked by a stable hash of the name."""
    forms = QUESTIONS[kind]
    return forms[zlib.crc32(name.encode()) % len(forms)].format(name)
