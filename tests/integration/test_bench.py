"""`rtmonitor bench` end to end (short): it runs, verifies exactly, reports every figure."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_bench_runs_and_verifies_exactly(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable, "-m", "rtmonitor", "bench", "--duration", "1",
            "--modes", "packets,columns", "--devices", "20", "--output", str(out),
        ],
        check=True,
        timeout=180,
        capture_output=True,
    )  # fmt: skip
    doc = json.loads(out.read_text())
    results = {r["mode"]: r for r in doc["results"]}
    assert set(results) == {"packets", "columns"}
    for r in results.values():
        assert r["exact"] is True and r["errors"] == []
        assert r["acked"] > 0 and r["committed"] == r["acked"]
        assert r["e2e_pps"] > 0 and r["ceiling_pps"] > 0 and 0 < r["ratio_to_ceiling"]
        assert r["freshness_ms_samples"] > 0 and r["freshness_ms_p99"] >= r["freshness_ms_p50"]
        assert r["get_device_ms_samples"] > 0 and r["peak_rss_mb"] > 0
