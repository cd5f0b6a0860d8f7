"""Debian tools the tests run for real (installed by .ci/run)."""

from __future__ import annotations

import os

import pytest


def installed(path: str | None, name: str, package: str) -> str:
    """`path` of the `name` executable; without it, skips the test, or fails it on CI
    (.ci/run installs `package`: missing there is a real failure)."""
    if path is None:
        message = f"{name} is not installed (apt-get install {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
