"""Playwright driver for the control-plane dashboard (`fedapp serve`, fedapp/api/static).

Not a test module: tests import `check_dashboard` and assert on what it returns.
It drives the system Chromium (``FEDAPP_CHROMIUM``, default /usr/bin/chromium);
`playwright install` is not needed. Waits go through Playwright's own waiting
(`expect`, `wait_for_function`) with deadlines derived from ``timeout_s``.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, ConsoleMessage, Error, Page, Response, expect, sync_playwright

CHROMIUM = os.environ.get("FEDAPP_CHROMIUM", "/usr/bin/chromium")
VIEWPORT = {"width": 1440, "height": 1000}
POLL_MS = 250  # how often the rounds counter is sampled


def css_string(value: str) -> str:
    """`value` as a quoted CSS string, for attribute selectors on API-supplied labels."""
    escaped = "".join(ch if ch not in '"\\\n\r\f' else f"\\{ord(ch):x} " for ch in value)
    return f'"{escaped}"'


def run_row(page: Page, run_id: str):  # noqa: ANN201 - Locator
    return page.locator(f"#runs-table tbody tr[data-run-id={css_string(run_id)}]")


def client_row(page: Page, client: str):  # noqa: ANN201 - Locator
    return page.locator(f"#clients-table tbody tr[data-client={css_string(client)}]")


def launch(playwright: Any) -> Browser:
    return playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])


def watch(page: Page, result: dict[str, Any]) -> None:
    """Collects console errors, uncaught page errors and HTTP >= 500 answers into `result`."""

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            result["console_errors"].append(message.text)

    def on_response(response: Response) -> None:
        if response.status >= 500:
            result["server_errors"].append(f"{response.status} {response.request.method} {response.url}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: result["page_errors"].append(str(error)))
    page.on("response", on_response)


def sign_in(page: Page, base_url: str, token: str, timeout_ms: float) -> None:
    """Opens the dashboard and enters `token`; returns once the API accepted or refused it."""
    page.goto(base_url.rstrip("/") + "/", timeout=timeout_ms)
    page.fill("#token-input", token)
    page.click("#token-apply")
    page.wait_for_function(
        "() => document.querySelector('#whoami').textContent.includes('(')"
        " || !document.querySelector('#auth-message').hidden",
        timeout=timeout_ms,
    )


def open_run(page: Page, run_id: str, timeout_ms: float) -> None:
    row = run_row(page, run_id)
    row.click(timeout=timeout_ms)
    expect(page.locator("#run-title")).to_contain_text(run_id, timeout=timeout_ms)


def rounds_shown(page: Page) -> int:
    text = page.text_content("#rounds-count") or ""
    return int(text) if text.strip().isdigit() else 0


def wait_for_rounds(page: Page, min_rounds: int, deadline: float, seen: list[int]) -> int:
    """Samples #rounds-count until it reaches `min_rounds` or the deadline; records each change."""
    while True:
        count = rounds_shown(page)
        if not seen or seen[-1] != count:
            seen.append(count)
        if count >= min_rounds or time.monotonic() >= deadline:
            return count
        page.wait_for_timeout(POLL_MS)


def block(page: Page, client: str, timeout_ms: float) -> None:
    """Clicks the client's Block button and waits for its status cell to read blocked."""
    row = client_row(page, client)
    row.locator("button[data-action='block']").click(timeout=timeout_ms)
    status = row.locator("td[data-status]")
    expect(status).to_have_attribute("data-status", "blocked", timeout=timeout_ms)
    expect(status).to_have_text("blocked", timeout=timeout_ms)


def client_status(page: Page, client: str) -> str | None:
    cell = client_row(page, client).locator("td[data-status]")
    return cell.get_attribute("data-status") if cell.count() else None


def remaining_ms(deadline: float) -> float:
    return max(1.0, (deadline - time.monotonic()) * 1000)


def check_dashboard(
    base_url: str,
    token: str,
    run_id: str,
    *,
    min_rounds: int,
    block_client: str | None = None,
    timeout_s: float = 60,
    screenshot_path: str | os.PathLike[str] | None = None,
) -> dict[str, Any]:
    """Load the dashboard, enter the token, open run_id; wait until at least min_rounds rounds
    are shown; if block_client is given, click its Block button and wait until its status cell
    reads blocked.

    Returns {"console_errors": [...], "page_errors": [...], "server_errors": [...],
    "rounds_shown": int, "rounds_seen": [counts over time], "client_status": str | None,
    "screenshot": path | None, "error": str | None}. A wait that times out does not raise:
    its message is in "error" and the other values show how far the page got.
    ``server_errors`` lists every HTTP answer >= 500 the page received.
    """
    result: dict[str, Any] = {"console_errors": [], "page_errors": [], "server_errors": [],
                              "rounds_shown": 0, "rounds_seen": [], "client_status": None,
                              "screenshot": None, "error": None}
    deadline = time.monotonic() + timeout_s
    with sync_playwright() as playwright:
        browser = launch(playwright)
        try:
            page = browser.new_page(viewport=VIEWPORT)
            watch(page, result)
            try:
                _drive(page, result, base_url, token, run_id, min_rounds, block_client, deadline)
            except Error as error:  # includes Playwright's TimeoutError and failed expect()s
                result["error"] = f"{type(error).__name__}: {error}".splitlines()[0]
            _final_state(page, result, block_client)
            result["screenshot"] = _screenshot(page, screenshot_path)
        finally:
            browser.close()
    return result


def _drive(page: Page, result: dict[str, Any], base_url: str, token: str, run_id: str,
           min_rounds: int, block_client: str | None, deadline: float) -> None:
    sign_in(page, base_url, token, remaining_ms(deadline))
    open_run(page, run_id, remaining_ms(deadline))
    result["rounds_shown"] = wait_for_rounds(page, min_rounds, deadline, result["rounds_seen"])
    if result["rounds_shown"] < min_rounds:
        result["error"] = f"only {result['rounds_shown']} rounds shown, wanted {min_rounds}"
    if block_client is not None:
        block(page, block_client, remaining_ms(deadline))


def _final_state(page: Page, result: dict[str, Any], block_client: str | None) -> None:
    """What the page shows at the end, also after a wait timed out."""
    try:
        result["rounds_shown"] = rounds_shown(page)
        if block_client is not None:
            result["client_status"] = client_status(page, block_client)
    except Error as error:
        result["error"] = result["error"] or f"page unreadable: {error}".splitlines()[0]


def _screenshot(page: Page, path: str | os.PathLike[str] | None) -> str | None:
    target = Path(path) if path else Path(tempfile.mkdtemp(prefix="fedapp-dashboard-")) / "dashboard.png"
    try:
        page.screenshot(path=str(target), full_page=True)
    except Error:
        return None
    return str(target)
