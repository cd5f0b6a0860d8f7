"""Debian's Prometheus for the scrape tests (installed by .ci/run): find it, start it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from helpers.tools import installed
from rtmonitor.storage.embedded import free_port


def binary(name: str) -> str:
    """The `name` executable of the prometheus package; skips the test without it, fails
    it on CI."""
    return installed(shutil.which(name), name, "prometheus")


@contextmanager
def prometheus(tmp_path: Path, scrape_configs: list[dict[str, Any]]) -> Iterator[str]:
    """A real Prometheus scraping every second with `scrape_configs`; yields its base URL."""
    config = tmp_path / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": scrape_configs,
            }
        )
    )
    port = free_port()
    proc = subprocess.Popen(
        [
            binary("prometheus"),
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(30)
