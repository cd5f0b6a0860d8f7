"""`send --protocol otlp|http` and `bench --modes otlp,http` end to end (short): every
acknowledged packet is counted, device by device."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
from helpers import ServiceProcess, run

from rtmonitor.config import SendSettings
from rtmonitor.loadgen.sender import send


def test_send_protocols_count_exactly_per_device(service: ServiceProcess) -> None:
    for protocol in ("otlp", "http"):
        settings = SendSettings(  # type: ignore[call-arg]  # pydantic fills in the rest
            protocol=protocol,
            target=service.target,
            http_target=service.http,
            devices=13,
            count=5_003,  # the last body is short
            batch_size=500,
            streams=2,
            inflight=4,
            device_prefix=f"{protocol}-",
            progress=False,
        )
        report = run(send(settings))
        assert report.errors == [] and report.accepted == 5_003
        expected = report.acked_per_device()
        page = httpx.get(
            f"{service.http}/metrics", params={"prefix": f"{protocol}-", "limit": 100}
        ).json()
        assert {d["device_id"]: d["packets"] for d in page["devices"]} == expected


def test_bench_otlp_and_http_modes(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable, "-m", "rtmonitor", "bench", "--duration", "1",
            "--modes", "otlp,http", "--devices", "20", "--output", str(out),
        ],
        check=True,
        timeout=180,
        capture_output=True,
    )  # fmt: skip
    results = {r["mode"]: r for r in json.loads(out.read_text())["results"]}
    assert set(results) == {"otlp", "http"}
    for r in results.values():
        assert r["exact"] is True and r["errors"] == []
        assert r["acked"] > 0 and r["committed"] == r["acked"]
        assert "ceiling_pps" not in r  # the no-op ceiling is TelemetryIngest's only
