"""The chat page of `edgellm serve` (runtime/web) in a real browser: Python playwright driving
Debian's chromium (`executable_path`, nothing downloaded) against a live server on qwen 0.5B.
The page's replies equal the library's, turns carry the conversation, Stop ends a reply and
frees the server, the API key is asked for, and text is never parsed as HTML. A screenshot of a
conversation is left in tests/artifacts/chat-page.png (EDGELLM_TEST_ARTIFACTS moves it)."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import edgellm  # noqa: E402
from edgellm.runtime import server  # noqa: E402

from conftest import model_file  # noqa: E402

MODEL = "qwen2.5-coder-0.5b"
KEY = "sk-web-0123456789"
ARTIFACTS = Path(os.environ.get("EDGELLM_TEST_ARTIFACTS", Path(__file__).parent / "artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def site():
    model_file(MODEL)
    llm = edgellm.load(MODEL, ctx=1024, threads=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(server.create_app(llm, MODEL, api_key=KEY, queue=2), host="127.0.0.1",
                                        port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    while not srv.started:
        time.sleep(0.05)
    with sync_api.sync_playwright() as pw:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # chromium refuses root without it
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=args)
        yield f"http://127.0.0.1:{port}", llm, browser
        browser.close()
    srv.should_exit = True
    t.join(10)
    llm.close()


def open_page(browser, base, key=KEY):
    page = browser.new_page()
    page.goto(base + "/")
    page.locator("summary").click()
    if key:
        page.fill("#api_key", key)
        page.dispatch_event("#api_key", "change")
    page.fill("#temperature", "0")
    return page


def ask(page, text, max_tokens=24):
    n = page.locator(".assistant[data-done='1']").count()
    page.fill("#max_tokens", str(max_tokens))
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    page.locator(".assistant[data-done='1']").nth(n).wait_for(timeout=120_000)
    return page.locator(".assistant").nth(n).text_content()


def test_replies_equal_the_library_and_carry_the_conversation(site):
    base, llm, browser = site
    page = open_page(browser, base)
    page.locator("#model", has_text=MODEL).wait_for()
    q1, q2 = "What is 2 + 2? Answer with one number.", "And times 3?"
    a1 = ask(page, q1)
    want1 = llm.create_chat_completion([{"role": "user", "content": q1}], temperature=0, max_tokens=24)
    assert a1 == want1["choices"][0]["message"]["content"] and a1
    a2 = ask(page, q2)
    msgs = [{"role": "user", "content": q1}, {"role": "assistant", "content": a1}, {"role": "user", "content": q2}]
    assert a2 == llm.create_chat_completion(msgs, temperature=0, max_tokens=24)["choices"][0]["message"]["content"]
    assert "stop" in page.text_content("#status") or "length" in page.text_content("#status")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "chat-page.png"), full_page=True)  # for a person to look at
    page.close()


def test_stop_ends_the_reply_and_frees_the_server(site):
    base, llm, browser = site
    page = open_page(browser, base)
    page.fill("#max_tokens", "600")
    page.fill("#prompt", "Write a long essay about the history of computing.")
    page.click("#send")
    page.locator(".assistant").first.wait_for()
    deadline = time.monotonic() + 120  # polled from here: the page's CSP forbids evaluated strings
    while len(page.locator(".assistant").first.text_content()) <= 20 and time.monotonic() < deadline:
        time.sleep(0.05)
    page.click("#stop")
    page.locator("#status", has_text="stopped").wait_for()
    assert page.is_enabled("#send") and page.is_disabled("#stop")
    shown = page.locator(".assistant").first.text_content()
    assert 20 < len(shown) < 1500
    assert ask(page, "Say OK.", max_tokens=4)  # the server took the next request
    page.close()


def test_the_key_is_asked_for_and_text_is_never_html(site):
    base, _, browser = site
    r = httpx.get(base + "/")
    assert r.status_code == 200 and "default-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(base + "/app.js").status_code == 200
    page = open_page(browser, base, key=None)
    page.locator("#model", has_text="API key").wait_for()  # /v1/models answered 401
    page.fill("#prompt", "<img src=x onerror=alert(1)>")
    page.press("#prompt", "Enter")
    page.locator(".error").wait_for()
    assert "API key" in page.text_content(".error")
    user = page.locator(".user").first
    assert user.text_content() == "<img src=x onerror=alert(1)>"
    assert page.locator(".user img").count() == 0
    page.close()
