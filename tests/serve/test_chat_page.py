"""The chat page at / in headless Chromium (Debian's /usr/bin/chromium driven by Playwright, no
browser download): type a message, the answer streams in, settings are applied, the stop button
cuts a long answer, the history is sent back; a screenshot is kept."""

from __future__ import annotations

import os
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.serve.conftest import CHAT_A, CHAT_Q, make_app, serving

CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def browser():
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is absent (apt-get install -y chromium)")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True,
                              args=["--disable-background-networking", "--disable-component-update", "--no-sandbox"])
        yield b
        b.close()


def _artifact(path: Path) -> Path:
    """Keep a screenshot: copied to $LMFORGE_TEST_ARTIFACTS when set (CI collects that folder), else left
    in the pytest tmp dir; the path is printed either way."""
    dest = os.environ.get("LMFORGE_TEST_ARTIFACTS")
    if dest:
        Path(dest).mkdir(parents=True, exist_ok=True)
        path = Path(shutil.copy(path, Path(dest) / path.name))
    print(f"screenshot: {path}")
    return path


def test_chat_page_streams_applies_settings_and_stops(ckpt, browser, tmp_path):
    gate = threading.Event()
    gate.set()
    app, engine, _ = make_app(ckpt[0], slow=0.0, gate=gate)
    with serving(app) as url:
        page = browser.new_page()
        errors = []
        page.on("pageerror", lambda e: errors.append(str(e)))
        requests = []
        page.on("request", lambda r: requests.append(r.url))
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('status').textContent === 'ready'")
        assert "tiny" in page.text_content("#model")
        # settings: greedy, at most 40 tokens
        page.fill("#temperature", "0")
        page.fill("#max_tokens", "40")
        page.fill("#input", CHAT_Q)
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=30000)
        answer = page.locator(".msg.assistant .text").last.text_content()
        assert answer == CHAT_A
        meta = page.locator(".msg.assistant .meta").last.text_content()
        assert "finish: stop" in meta
        body = page.evaluate("window.lmforge.requests[0]")
        assert body["temperature"] == 0 and body["max_tokens"] == 40 and body["stream"] is True
        assert page.evaluate("window.lmforge.chunks") > 3  # the answer arrived in pieces
        shot = tmp_path / "chat_page.png"
        page.screenshot(path=str(shot), full_page=True)
        _artifact(shot)

        # an answer stopped while it is being generated (the engine is held so it cannot finish first):
        # the stop button aborts the request and the server cancels it in the engine
        page.fill("#temperature", "1")
        page.fill("#max_tokens", "50")
        page.fill("#input", "Tell me more")
        gate.clear()
        page.click("#send")
        page.wait_for_function("!document.getElementById('stop').disabled")
        t0 = time.time()
        while not engine.stats()["running"]:
            assert time.time() - t0 < 5
            time.sleep(0.02)
        page.click("#stop")
        page.wait_for_function("document.getElementById('status').textContent === 'stopped'")
        gate.set()
        assert "stopped" in page.locator(".msg.assistant .meta").last.text_content()
        t0 = time.time()
        while engine.stats()["running"]:
            assert time.time() - t0 < 5
            time.sleep(0.05)
        assert engine.stats()["requests_cancelled"] == 1
        # the history goes back with the next request: user, assistant, user, (partial) assistant, user
        page.fill("#max_tokens", "5")
        page.fill("#input", "and?")
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent === 'ready'")
        roles = [m["role"] for m in page.evaluate("window.lmforge.requests[2].messages")]
        assert roles == ["user", "assistant", "user", "assistant", "user"]
        import re

        meta = page.locator(".msg.assistant .meta").last.text_content()
        assert 0 <= int(re.search(r"(\d+) tokens", meta).group(1)) <= 5, meta  # max_tokens applied
        # a new conversation clears it; the page reloads its history from localStorage
        page.reload()
        page.wait_for_function("document.querySelectorAll('.msg').length === 6")
        page.click("#new")
        assert page.locator(".msg").count() == 0
        assert all(u.startswith(url) for u in requests)  # no external assets
        assert not errors
