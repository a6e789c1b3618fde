"""The web chat page in real headless Chromium, against a fake OpenAI server with known tokens.

The fake server streams a fixed reply with a small per-token delay (its "decode time"), so the
browser sees separate chunks; the tests wait with Playwright's waiting APIs, never with sleeps.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

try:  # run as part of the `tests` package (rootdir on sys.path) or as a loose test module
    from tests.cluster import browser
except ImportError:
    import browser

INDEX_HTML = Path(__file__).resolve().parents[2] / "fleetlm" / "cluster" / "static" / "index.html"
SCREENSHOT = Path("/tmp/fleetlm-chat.png")
FAKE_MODEL = "fake-smollm"
REPLY_TOKENS = ("The", " quick", " brown", " fox", " jumps", " over", " the", " dog", ".")
FIRST_TOKEN_DELAY_S = 0.2
TOKEN_DELAY_S = 0.03
FAIL_PROMPT = "please fail"
FAIL_MESSAGE = "temperature must be between 0 and 2 (fake error)"
SLOW_PROMPT = "never stop"
NUM_SLOW_TOKENS = 10_000
SHUTDOWN_TIMEOUT_S = 10


def _reply_tokens(turn: int) -> list[str]:
    """The fixed reply plus the turn number, so a test can tell the turns apart."""
    return [*REPLY_TOKENS, f" #{turn}"]


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def _chunk(delta: dict, finish_reason: str | None = None) -> dict:
    choice = {"index": 0, "delta": delta, "finish_reason": finish_reason}
    return {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "model": FAKE_MODEL,
            "created": 0, "choices": [choice]}  # fmt: skip


@dataclass
class FakeOpenAI:
    """Records what the page sends; answers like a streaming OpenAI chat endpoint."""

    requests: list[dict] = field(default_factory=list)  # {"body": ..., "authorization": ...}
    disconnected: threading.Event = field(default_factory=threading.Event)

    def app(self) -> FastAPI:
        app = FastAPI()
        app.get("/")(lambda: FileResponse(INDEX_HTML))
        app.get("/v1/models")(lambda: {"object": "list", "data": [{"id": FAKE_MODEL}]})
        app.post("/v1/chat/completions")(self.chat)
        return app

    async def chat(self, request: Request):
        body = await request.json()
        self.requests.append({"body": body, "authorization": request.headers.get("authorization")})
        last = body["messages"][-1]["content"]
        if last == FAIL_PROMPT:
            error = {"message": FAIL_MESSAGE, "type": "BadRequestError", "code": 400}
            return JSONResponse({"error": error}, status_code=400)
        num_turns = sum(m["role"] == "user" for m in body["messages"])
        tokens = [" tick"] * NUM_SLOW_TOKENS if last == SLOW_PROMPT else _reply_tokens(num_turns)
        return StreamingResponse(self.stream(tokens), media_type="text/event-stream")

    async def stream(self, tokens: list[str]) -> AsyncIterator[str]:
        is_complete = False
        try:
            yield _sse(_chunk({"role": "assistant", "content": ""}))
            await asyncio.sleep(FIRST_TOKEN_DELAY_S)
            for i, token in enumerate(tokens):
                if i:
                    await asyncio.sleep(TOKEN_DELAY_S)
                yield _sse(_chunk({"content": token}))
            yield _sse(_chunk({}, finish_reason="stop"))
            usage = {"prompt_tokens": 5, "completion_tokens": len(tokens)}
            yield _sse({"id": "chatcmpl-fake", "choices": [], "usage": usage})
            yield _sse("[DONE]")
            is_complete = True
        finally:
            if not is_complete:
                self.disconnected.set()


@pytest.fixture(scope="module")
def fake() -> Iterator[tuple[FakeOpenAI, str]]:
    """The fake server on 127.0.0.1 at a free port; yields it and its base URL."""
    fake = FakeOpenAI()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()  # connections queue from here on, so no wait for uvicorn's start-up
    config = uvicorn.Config(fake.app(), log_level="warning", timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    yield fake, f"http://127.0.0.1:{sock.getsockname()[1]}"
    server.should_exit = True
    thread.join(SHUTDOWN_TIMEOUT_S)
    sock.close()


@pytest.fixture(scope="module")
def browser_context(tmp_path_factory) -> Iterator:
    reason = browser.ensure_chromium()
    if reason is not None:
        pytest.skip(reason)
    with browser.chromium_context(tmp_path_factory.mktemp("chromium-profile")) as context:
        yield context


@pytest.fixture
def chat(fake, browser_context):
    """A fresh tab on the chat page, with reply updates being recorded."""
    server, base_url = fake
    server.requests.clear()
    page = browser_context.new_page()
    assert browser.open_chat(page, base_url) == FAKE_MODEL
    browser.watch_replies(page)
    yield page, server
    page.close()


def test_streams_a_reply_with_timings(chat):
    page, server = chat
    browser.set_settings(page, system_prompt="Be brief.", temperature=0.3)
    browser.send_message(page, "Hello there")
    reply = browser.wait_for_reply(page, 0)

    expected = "".join(_reply_tokens(1))
    assert (reply.state, reply.text, reply.error) == ("done", expected, "")
    updates = browser.reply_updates(page, 0)
    assert len(updates) >= 4, f"expected a streamed reply, saw updates {updates}"
    assert updates[-1] == expected
    assert all(expected.startswith(text) for text in updates)
    assert reply.ttft_ms >= FIRST_TOKEN_DELAY_S * 1000 - 1
    assert reply.tokens_per_s > 0
    assert reply.num_tokens == len(REPLY_TOKENS) + 1  # from usage.completion_tokens

    [request] = server.requests
    assert request["body"] == {
        "model": FAKE_MODEL,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
        ],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.3,
    }
    assert request["authorization"] is None


def test_second_turn_sends_the_history(chat):
    page, server = chat
    browser.set_settings(page, system_prompt="You are terse.", temperature=1.25, max_tokens=64)
    browser.send_message(page, "First question")
    first = browser.wait_for_reply(page, 0)
    browser.send_message(page, "Second question")
    second = browser.wait_for_reply(page, 1)

    assert first.text == "".join(_reply_tokens(1))
    assert second.text == "".join(_reply_tokens(2))
    body = server.requests[1]["body"]
    assert body["messages"] == [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "First question"},
        {"role": "assistant", "content": first.text},
        {"role": "user", "content": "Second question"},
    ]
    assert (body["temperature"], body["max_tokens"]) == (1.25, 64)
    page.screenshot(path=str(SCREENSHOT))

    browser.new_chat(page)
    browser.send_message(page, "Fresh start")
    assert browser.wait_for_reply(page, 0).text == "".join(_reply_tokens(1))
    assert server.requests[2]["body"]["messages"][1:] == [
        {"role": "user", "content": "Fresh start"}
    ]


def test_error_is_shown_inline_and_left_out_of_the_history(chat):
    page, server = chat
    browser.send_message(page, FAIL_PROMPT)
    failed = browser.wait_for_reply(page, 0)
    assert (failed.state, failed.text, failed.error) == ("error", "", FAIL_MESSAGE)

    browser.send_message(page, "Try again")
    assert browser.wait_for_reply(page, 1).state == "done"
    assert server.requests[1]["body"]["messages"] == [{"role": "user", "content": "Try again"}]


def test_stop_aborts_the_stream(chat):
    from playwright.sync_api import expect

    page, server = chat
    server.disconnected.clear()
    browser.send_message(page, SLOW_PROMPT)
    content = page.locator("#thread .msg.assistant .content").first
    expect(content).to_contain_text("tick tick")
    page.click("#stop")
    stopped = browser.wait_for_reply(page, 0)

    assert stopped.state == "stopped"
    assert stopped.stats.endswith("stopped")
    assert server.disconnected.wait(SHUTDOWN_TIMEOUT_S), "the server never saw the disconnect"
    expect(page.locator("#send")).to_be_visible()


def test_api_key_is_sent_as_bearer_token(chat):
    page, server = chat
    browser.set_settings(page, api_key="sk-fleetlm-test")
    browser.send_message(page, "Authorised?")
    assert browser.wait_for_reply(page, 0).state == "done"
    assert server.requests[-1]["authorization"] == "Bearer sk-fleetlm-test"
