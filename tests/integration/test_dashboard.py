"""The dashboard in a real headless Chromium (Debian's, installed by .ci/run), driven by
Playwright while packets are being sent: the table shows the devices, a counter rises live
(through /stream: the table itself reloads only every 10 s), the device view opens, the
filter works. Screenshots go to test-artifacts/."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from pathlib import Path

from helpers import ServiceProcess
from helpers.browser import CHROMIUM_ARGS, chromium

from rtmonitor.config import SendSettings
from rtmonitor.loadgen.sender import send

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


def test_dashboard_shows_devices_and_updates_live(service: ServiceProcess) -> None:
    browser_path = chromium()
    from playwright.sync_api import sync_playwright

    opts = SendSettings(
        target=service.target, devices=12, duration=25, batch_size=20, rate=600,
        device_prefix="web-", progress=False,
    )  # fmt: skip
    # The load runs in its own thread and loop, and is stopped and joined at the end: a load
    # outliving its test would keep reconnecting (and working) during the tests after it.
    loop = asyncio.new_event_loop()
    load = loop.create_task(send(opts))

    def run_load() -> None:
        with contextlib.suppress(asyncio.CancelledError):
            loop.run_until_complete(load)
        loop.close()

    loader = threading.Thread(target=run_load, daemon=True)
    loader.start()
    ARTIFACTS.mkdir(exist_ok=True)
    row = 'tr[data-device="web-00000"]'
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{service.http}/")
            page.wait_for_selector(row, timeout=20_000)
            page.wait_for_function(
                "document.getElementById('live').textContent === 'live'", timeout=10_000
            )
            assert page.locator("#devices tbody tr").count() == 12
            first = int(page.locator(f"{row} td.packets").inner_text().replace(",", ""))
            page.wait_for_function(
                """([sel, first]) => parseInt(document.querySelector(sel + ' td.packets')
                       .textContent.replace(/,/g, '')) > first""",
                arg=[row, first],
                timeout=8_000,  # < the 10 s table reload: this rise came through /stream
            )
            assert int(page.locator("#t-packets").inner_text().replace(",", "")) > 0
            page.click(row)
            page.wait_for_selector("#detail:not([hidden])")
            assert page.locator("#d-title").inner_text() == "web-00000"
            assert "reading" in page.locator("#d-kinds").inner_text()
            assert "temperature" in page.locator("#d-values").inner_text()
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            page.fill("#filter", "web-0001")
            page.wait_for_function("document.querySelectorAll('#devices tbody tr').length === 2")
            page.click('th[data-sort="device_id"]')
            page.wait_for_selector('th.sorted[data-sort="device_id"]')
            phone = browser.new_page(viewport={"width": 390, "height": 844}, is_mobile=True)
            phone.goto(f"{service.http}/")
            phone.wait_for_selector(row, timeout=20_000)
            width = phone.evaluate("document.documentElement.scrollWidth")
            assert width <= 400, f"the page overflows a phone screen ({width}px)"
            phone.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)
            assert errors == [], errors
        finally:
            browser.close()
            # (on a slow run the 25 s load may have ended, and closed its loop, already)
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(load.cancel)
            loader.join(30)
            assert not loader.is_alive(), "the background load did not stop"
