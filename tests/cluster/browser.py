"""Drive fleetlm's web chat page in Debian's headless Chromium through Playwright.

Shared by the page test against a fake server and the end-to-end test against the real app:

    reason = ensure_chromium()          # None when the browser is ready
    with chromium_page(tmp_path) as page:
        open_chat(page, base_url)
        watch_replies(page)
        send_message(page, "Hello")
        reply = wait_for_reply(page, 0)

Playwright never downloads a browser here: it launches /usr/bin/chromium (installed by
scripts/install-browser.sh) with the flags that keep Chromium off the network it cannot reach.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
INSTALL_SCRIPT = REPO_ROOT / "scripts" / "install-browser.sh"
CHROMIUM_PATH = Path(os.environ.get("FLEETLM_CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps trying to reach Google's services.
CHROMIUM_ARGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
VIEWPORT = {"width": 1100, "height": 720}
INSTALL_TIMEOUT_S = 900
PAGE_TIMEOUT_MS = 15_000
REPLY_TIMEOUT_MS = 60_000
_FINAL_STATES = re.compile(r"^(done|error|stopped)$")
_STATS = re.compile(r"TTFT (\d+) ms(?: · ([\d.]+) tokens/s)? · (\d+) tokens?")

# Records every distinct text each assistant message shows, so a test can tell a streamed
# reply (many updates) from one that arrived in a single piece.
_WATCH_SCRIPT = """() => {
  const updates = window.__fleetlmReplyUpdates = [];
  const thread = document.getElementById("thread");
  new MutationObserver(() => {
    thread.querySelectorAll(".msg.assistant .content").forEach((el, index) => {
      const seen = updates[index] || (updates[index] = []);
      if (seen[seen.length - 1] !== el.textContent) seen.push(el.textContent);
    });
  }).observe(thread, { childList: true, subtree: true, characterData: true });
}"""


@dataclass(frozen=True)
class Reply:
    """One assistant message as the page shows it once it stopped changing."""

    text: str
    state: str  # "done" | "error" | "stopped"
    stats: str  # e.g. "TTFT 212 ms · 24.3 tokens/s · 8 tokens"
    error: str  # the inline error text, empty unless state == "error"

    @property
    def ttft_ms(self) -> int | None:
        match = _STATS.search(self.stats)
        return int(match.group(1)) if match else None

    @property
    def tokens_per_s(self) -> float | None:
        match = _STATS.search(self.stats)
        return float(match.group(2)) if match and match.group(2) else None

    @property
    def num_tokens(self) -> int | None:
        match = _STATS.search(self.stats)
        return int(match.group(3)) if match else None


def ensure_chromium() -> str | None:
    """Install Debian's chromium when missing; None when ready, else why it cannot be used."""
    if CHROMIUM_PATH.exists():
        return None
    result = subprocess.run(
        ["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT_S
    )
    if result.returncode != 0 or not CHROMIUM_PATH.exists():
        tail = (result.stderr or result.stdout).strip()[-500:]
        return f"chromium could not be installed by {INSTALL_SCRIPT.name}: {tail}"
    return None


@contextmanager
def chromium_context(user_data_dir: Path) -> Iterator:
    """A Playwright `BrowserContext`: headless Chromium with a fresh profile at `user_data_dir`.

    Open pages with `context.new_page()`; each is a separate tab with its own page state.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir),
            executable_path=str(CHROMIUM_PATH),
            headless=True,
            args=list(CHROMIUM_ARGS),
            viewport=VIEWPORT,
        )
        try:
            context.set_default_timeout(PAGE_TIMEOUT_MS)
            yield context
        finally:
            context.close()


@contextmanager
def chromium_page(user_data_dir: Path) -> Iterator:
    """One Playwright `Page` in a fresh headless Chromium (see `chromium_context`)."""
    with chromium_context(user_data_dir) as context:
        yield context.pages[0] if context.pages else context.new_page()


def open_chat(page, base_url: str) -> str:
    """Load the page and wait until it asked the server for its model; returns the shown name."""
    page.goto(base_url.rstrip("/") + "/")
    page.wait_for_selector("#model-name[data-state]")
    return page.locator("#model-name").inner_text()


def watch_replies(page) -> None:
    """Start recording the assistant messages' text updates (see `reply_updates`)."""
    page.evaluate(_WATCH_SCRIPT)


def reply_updates(page, index: int) -> list[str]:
    """The distinct texts assistant message `index` went through, in order."""
    return page.evaluate(f"(window.__fleetlmReplyUpdates || [])[{index}] || []")


def set_settings(
    page,
    system_prompt: str | None = None,
    temperature: float | None = None,
    api_key: str | None = None,
    max_tokens: int | None = None,
) -> None:
    """Fill the sidebar fields that are given; others keep their values."""
    if system_prompt is not None:
        page.fill("#system-prompt", system_prompt)
    if temperature is not None:
        page.fill("#temperature", str(temperature))
    if api_key is not None:
        page.fill("#api-key", api_key)
        page.dispatch_event("#api-key", "change")
    if max_tokens is not None:
        page.fill("#max-tokens", str(max_tokens))


def send_message(page, text: str) -> None:
    """Type `text` into the message box and press Enter, as a user would."""
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def new_chat(page) -> None:
    """Press "New chat" and wait until the conversation view is empty."""
    from playwright.sync_api import expect

    page.click("#new-chat")
    expect(page.locator("#thread .msg")).to_have_count(0)


def wait_for_reply(page, index: int, timeout_ms: int = REPLY_TIMEOUT_MS) -> Reply:
    """Wait until assistant message `index` (0-based) is done, failed or stopped."""
    from playwright.sync_api import expect

    message = page.locator("#thread .msg.assistant").nth(index)
    expect(message).to_have_attribute("data-state", _FINAL_STATES, timeout=timeout_ms)
    return Reply(
        text=message.locator(".content").inner_text(),
        state=message.get_attribute("data-state"),
        stats=message.locator(".stats").inner_text(),
        error=message.locator(".error").inner_text(),
    )
