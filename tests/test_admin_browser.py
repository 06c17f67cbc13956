"""The admin page in a real headless Chromium (Debian's, installed by .ci/run):
log in, see the failed events, replay one, then a selection."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from service import auth
from service.app import create_app
from service.config import Settings
from service.store.database import Database
from tests.conftest import PASSWORD
from tests.fakes.inngest import POISON_ERROR, StandIn
from tests.support.service import poll_until
from tests.test_delivery import states
from tests.test_operations import fail_for_good

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# The flags that keep Chromium off the network it cannot reach here, and out of
# a sandbox it cannot have as root.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

if not Path(CHROMIUM).exists():
    if os.environ.get("CI"):
        raise RuntimeError(f"CI must run the browser test: {CHROMIUM} is missing")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest_asyncio.fixture
async def browser(tmp_path: Path) -> AsyncIterator[object]:
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(
            executable_path=shutil.which(CHROMIUM) or CHROMIUM, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
async def test_log_in_list_and_replay(
    aiohttp_server,
    browser,  # type: ignore[no-untyped-def]
    db: Database,
    delivery_settings: Settings,
    http,  # type: ignore[no-untyped-def]
    inngest: StandIn,
) -> None:
    await auth.create_user(db, "root", PASSWORD, is_admin=True)
    failed = await fail_for_good(db, delivery_settings, http, inngest, 3)
    server = await aiohttp_server(create_app(delivery_settings.replace(run_worker=True)))
    base = f"http://127.0.0.1:{server.port}"

    page = await browser.new_page()  # type: ignore[attr-defined]
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # Chromium reports the deliberate wrong login's 401 on the console; nothing else.
    page.on(
        "console",
        lambda m: errors.append(m.text) if m.type == "error" and "401" not in m.text else None,
    )
    await page.goto(f"{base}/admin")
    await page.fill("#username", "root")
    await page.fill("#password", "wrong password")
    await page.click("button[type=submit]")
    await page.wait_for_selector("#message:has-text('Login failed')")
    await page.fill("#password", PASSWORD)
    await page.click("button[type=submit]")

    # The list: every failed event, with its last error.
    await page.wait_for_selector("#failed")
    for event_id in failed:
        row = page.locator(f'tr[data-id="{event_id}"]')
        assert POISON_ERROR in await row.inner_text()
    assert await page.locator('#stats tr[data-stat="failed"] td').inner_text() == "3"
    assert await page.locator("#chart polyline").count() == 3

    # Replay one.
    await page.click(f'button.replay-one[data-id="{failed[0]}"]')
    await page.wait_for_selector("#message:has-text('Replayed 1 of 1.')")
    async with asyncio.timeout(10):
        await inngest.wait_until(lambda s: failed[0] in s.accepted_ids)

    # The page reloads itself; then replay a selection.
    await page.wait_for_selector(f'tr[data-id="{failed[0]}"]', state="detached")
    for event_id in failed[1:]:
        await page.check(f'input.pick[value="{event_id}"]')
    await page.click("#replay-selected")
    await page.wait_for_selector("#message:has-text('Replayed 2 of 2.')")
    async with asyncio.timeout(10):
        await inngest.wait_until(lambda s: set(failed) <= set(s.accepted_ids))
    await page.wait_for_selector("#failed td:has-text('No failed events.')")

    async def all_delivered() -> bool:
        return {row.status for row in (await states(db.engine)).values()} == {"delivered"}

    await poll_until(all_delivered, wait_seconds=10)

    # Log out: the page sends the JSON body every state-changing route needs.
    await page.click("#logout")
    await page.wait_for_selector("#login")
    assert await page.context.cookies() == []
    assert errors == []
