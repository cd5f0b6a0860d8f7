"""A real Prometheus (Debian's package, installed by .ci/run) scrapes the service with a
default-style scrape config, and a device's counter is read back through its query API."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import httpx
from helpers import ServiceProcess, packet, run, stream_packets
from helpers.prometheus import binary, prometheus


def test_promtool_accepts_the_exposition(service: ServiceProcess) -> None:
    promtool = binary("promtool")
    run(stream_packets(service.target, [packet("prom-a", payload=b"xy", t=1.5), packet("")]))
    for accept, content_type in (
        ("text/plain;version=0.0.4", "text/plain; version=0.0.4"),
        ("application/openmetrics-text;version=1.0.0", "application/openmetrics-text"),
    ):
        r = httpx.get(f"{service.http}/metrics", headers={"Accept": accept})
        assert r.status_code == 200 and r.headers["content-type"].startswith(content_type)
        assert 'rtm_device_packets_total{device="prom-a"} 1' in r.text
        assert "# TYPE rtm_event_loop_lag_seconds histogram" in r.text
        assert 'rtm_event_loop_lag_seconds_bucket{le="0.001"}' in r.text
        if content_type.startswith("text/plain"):
            check = subprocess.run(
                [promtool, "check", "metrics"], input=r.text, capture_output=True, text=True
            )
            assert check.returncode == 0, check.stdout + check.stderr
    # everyone else still gets JSON from the same path
    assert httpx.get(f"{service.http}/metrics").json()["totals"]["packets"] == 1


def test_real_prometheus_scrapes_a_device_counter(service: ServiceProcess, tmp_path: Path) -> None:
    run(stream_packets(service.target, [packet("prom-1", payload=b"abc")] * 7))
    # the defaults: metrics_path /metrics, scheme http
    job = {
        "job_name": "rtmonitor",
        "static_configs": [{"targets": [f"127.0.0.1:{service.http_port}"]}],
    }
    with prometheus(tmp_path, [job]) as base:
        query = 'rtm_device_packets_total{device="prom-1"}'
        deadline = time.monotonic() + 60
        value = None
        while time.monotonic() < deadline:
            try:
                r = httpx.get(f"{base}/api/v1/query", params={"query": query}, timeout=2)
                result = r.json()["data"]["result"]
                if result:
                    value = result[0]["value"][1]
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(0.5)
        assert value == "7", f"Prometheus never saw the counter (last: {value})"
        targets = httpx.get(f"{base}/api/v1/targets").json()["data"]
        assert targets["activeTargets"][0]["health"] == "up"
