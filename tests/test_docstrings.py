"""The python-docstrings chat set: built offline from the interpreter's standard library, in a
fixed order, one question and its library-written answer per documented public name."""

from __future__ import annotations

import itertools

import pytest

from gpt.data.docstrings import MAX_CONVERSATION, conversations, summary


@pytest.mark.parametrize(
    ("docstring", "expected"),
    [
        ("Serialize ``obj`` to a JSON formatted ``str``.\n\nMore.", "Serialize ``obj`` to a JSON formatted ``str``."),
        ("\n    Return the number\n    of items.\n\n    Details.", "Return the number of items."),
        ("split(sep=None) -> list of strings.", None),  # a signature line, not a sentence
        ("S.split(sep) returns a list.", None),
        ("Constructor.", None),  # too short to say anything
        ("return the thing.", None),  # not a sentence
        ("Return the thing", None),
        ("A " + "very " * 40 + "long summary.", None),
    ],
)
def test_summary_keeps_one_sentence_openings(docstring: str, expected: str | None) -> None:
    assert summary(docstring) == expected


def test_conversations_are_questions_with_the_library_answer() -> None:
    rows = list(conversations())
    assert len(rows) > 500
    assert rows == list(conversations())  # the same set every time
    for row in rows:
        user, assistant = row["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        assert "`" in user["content"] and user["content"].endswith(("?", "."))
        assert len(user["content"]) + len(assistant["content"]) <= MAX_CONVERSATION
    dumps = [r for r in rows if "`json.dumps`" in r["messages"][0]["content"]]
    assert [r["messages"][1]["content"] for r in dumps] == [
        "Serialize ``obj`` to a JSON formatted ``str``."
    ]
    names = [r["messages"][0]["content"].split("`")[1] for r in rows]
    assert not any(part.startswith("_") for name in names for part in name.split("."))
    assert len(set(names)) == len(names)
    assert list(itertools.islice(conversations(), 1)) == rows[:1]
