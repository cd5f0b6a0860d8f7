"""Debian's chromium for the browser tests (installed by .ci/run; no browser download)."""

from __future__ import annotations

import shutil

from helpers.tools import installed

CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def chromium() -> str:
    """The chromium executable; skips the test without it, fails it on CI."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    return installed(path, "chromium", "chromium")
