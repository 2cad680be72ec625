"""The page of gpt serve in a real browser: Debian's chromium, headless, driven by playwright
(pointed at that chromium: no browser is downloaded). A person types, the reply streams in, a
bad setting shows the server's error. Skipped, with the reason, where either is missing."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"needs Debian's chromium at {CHROMIUM} (apt-get install chromium)",
                allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="needs playwright (pip install playwright)")
pytest.importorskip("fastapi", reason="needs the serve extra: pip install 'gpt[serve]'")
pytest.importorskip("openai", reason="needs the openai client: pip install openai")

from test_serve import (  # noqa: E402
    CHARS,
    WAIT,
    Served,
    reference,
    serving,
    slow,
    tiny_model,
)

from gpt.sample import prompt_ids  # noqa: E402
from gpt.tokenizer import CharTokenizer  # noqa: E402

LAUNCH_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--disable-sync", "--no-first-run",
               "--disable-dev-shm-usage"]

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


@pytest.fixture(scope="module")
def tokenizer() -> CharTokenizer:
    return CharTokenizer(CHARS)


@pytest.fixture(scope="module")
def served(tokenizer: CharTokenizer) -> Iterator[tuple[Served, object]]:
    """A server whose model takes 20 ms a step, so a reply visibly streams in."""
    model = tiny_model(tokenizer)
    with serving(model, tokenizer) as s, slow(model, 0.02):
        yield s, model


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=LAUNCH_ARGS,
                                             timeout=WAIT * 1000)
        yield browser
        browser.close()


@pytest.fixture
def page(browser: object, served: tuple[Served, object]) -> Iterator[object]:
    page = browser.new_page()  # type: ignore[attr-defined]
    page.set_default_timeout(WAIT * 1000)
    outside: list[str] = []  # the page must not reach past the server
    page.on("request", lambda r: None if r.url.startswith(served[0].url) else outside.append(
        r.url))
    page.goto(served[0].url + "/")
    yield page
    page.close()
    assert outside == []


def lengths_while(page: object, selector: str, done: str) -> list[int]:
    """The text lengths of `selector` seen until `done` (a status text) appears."""
    seen, deadline = [], time.monotonic() + WAIT
    while done not in page.inner_text("#status"):  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the reply did not finish"
        seen.append(len(page.inner_text(selector)))  # type: ignore[attr-defined]
        time.sleep(0.01)
    return seen


def test_completion_streams_the_greedy_text(page: object, served: tuple[Served, object],
                                            tokenizer: CharTokenizer) -> None:
    server, model = served
    page.click("#tab-completion")  # type: ignore[attr-defined]
    page.fill("#temperature", "0")  # type: ignore[attr-defined]
    page.fill("#max-tokens", "30")  # type: ignore[attr-defined]
    page.fill("#prompt", "Once upon")  # type: ignore[attr-defined]
    page.click("#complete")  # type: ignore[attr-defined]
    seen = lengths_while(page, "#generated", "finished")
    assert any(0 < n < 30 for n in seen), seen  # part of the text was shown before the end
    expected = tokenizer.decode(reference(model, prompt_ids(tokenizer, "Once upon"), 30))
    assert page.inner_text("#generated") == expected  # type: ignore[attr-defined]
    assert "30 tokens" in page.inner_text("#status")  # type: ignore[attr-defined]
    assert "tiny" in page.inner_text("#model")  # type: ignore[attr-defined]


def test_chat_reply_streams_in(page: object) -> None:
    page.fill("#max-tokens", "25")  # type: ignore[attr-defined]
    page.fill("#chat-input", "Hello, who are you?")  # type: ignore[attr-defined]
    page.press("#chat-input", "Enter")  # type: ignore[attr-defined]
    seen = lengths_while(page, ".message.assistant", "finished")
    assert any(0 < n for n in seen[:-1]), seen
    assert page.inner_text(".message.user") == "Hello, who are you?"  # type: ignore
    assert page.inner_text(".message.assistant").strip()  # type: ignore[attr-defined]
    assert page.is_hidden("#error")  # type: ignore[attr-defined]


def test_a_long_chat_drops_its_oldest_exchanges(page: object) -> None:
    """The context is 64 tokens: the second message and the first exchange do not fit, so the
    page drops that exchange and asks again, saying so, as gpt chat does."""
    page.fill("#max-tokens", "10")  # type: ignore[attr-defined]
    for message in ["first message, quite long", "second one, long too"]:
        page.fill("#chat-input", message)  # type: ignore[attr-defined]
        page.press("#chat-input", "Enter")  # type: ignore[attr-defined]
        lengths_while(page, ".message.assistant >> nth=-1", "finished")
    assert page.is_hidden("#error"), page.inner_text("#error")  # type: ignore[attr-defined]
    assert "(dropped the oldest exchange to fit the model's context)" in page.inner_text(
        "#status")  # type: ignore[attr-defined]
    assert page.locator(".message.user").count() == 2  # type: ignore[attr-defined]


def test_a_bad_setting_shows_the_servers_error(page: object) -> None:
    page.click("#tab-completion")  # type: ignore[attr-defined]
    page.fill("#temperature", "5")  # type: ignore[attr-defined]
    page.fill("#max-tokens", "10")  # type: ignore[attr-defined]
    page.fill("#prompt", "abc")  # type: ignore[attr-defined]
    page.click("#complete")  # type: ignore[attr-defined]
    page.wait_for_selector("#error:not([hidden])")  # type: ignore[attr-defined]
    error = page.inner_text("#error")  # type: ignore[attr-defined]
    assert "'temperature' is 5, outside [0, 2]" in error
    page.fill("#temperature", "warm")  # type: ignore[attr-defined]
    page.click("#complete")  # type: ignore[attr-defined]
    page.wait_for_selector("#error:has-text('\"warm\"')")  # type: ignore[attr-defined]
