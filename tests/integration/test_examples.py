"""examples/ never rot: send_once.py against the real service, and the minimal version
(examples/minimal/server.py) on its own embedded Redis driven by send_once.py and
`rtmonitor send`, with exact counts; ruff keeps them clean."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import ServiceProcess, get_json

from rtmonitor.loadgen.launch import child_env
from rtmonitor.storage.embedded import free_port

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def send_once(target: str, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "send_once.py"), "--target", target, *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout


def rtmonitor_send(target: str, *args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "rtmonitor", "send", "--target", target, "--no-progress", *args],
        stdout=subprocess.DEVNULL,
        env=child_env(),
        timeout=60,
        check=True,
    )


def test_send_once_against_the_service(service: ServiceProcess) -> None:
    out = send_once(service.target, "--device-id", "learner-1", "--count", "5")
    assert out.strip() == "accepted=5 rejected=0 {}"
    # the service acknowledges after the commit: the counts are there already
    assert get_json(service.http, "/metrics/learner-1")["packets"] == 5
    # a bad device id is rejected and counted by reason, not an error
    out = send_once(service.target, "--device-id", "has space", "--count", "2")
    assert out.strip() == "accepted=0 rejected=2 {'invalid_device_id': 2}"


def resend_batch(target: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "resend_batch.py"), "--target", target],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return done.stdout.splitlines()


def test_a_resent_batch_counts_once_in_the_service(service: ServiceProcess) -> None:
    assert resend_batch(service.target) == [
        "batch_id=1 accepted=10 duplicate=False",
        "batch_id=1 accepted=10 duplicate=True",
    ]
    assert get_json(service.http, "/metrics/resend-1")["packets"] == 10


@pytest.fixture
def minimal(tmp_path: Path) -> Any:
    """examples/minimal/server.py as a learner runs it (its own embedded Redis), on free
    ports; yields (gRPC target, HTTP base) and checks that Ctrl+C stops it."""
    grpc_port, http_port = free_port(), free_port()
    log = open(tmp_path / "minimal.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "minimal" / "server.py"),
         "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
        stdout=log, stderr=subprocess.STDOUT, env=child_env(),
    )  # fmt: skip
    http = f"http://127.0.0.1:{http_port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert proc.poll() is None, (tmp_path / "minimal.log").read_text()
            try:
                httpx.get(f"{http}/metrics", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, (tmp_path / "minimal.log").read_text()
                time.sleep(0.1)
        yield f"127.0.0.1:{grpc_port}", http
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def wait_total(http: str, expected: int, timeout: float = 15.0) -> dict[str, Any]:
    """The minimal version acknowledges before its aggregator writes to Redis: poll."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = get_json(http, "/metrics")
        if body["total"] >= expected or time.monotonic() > deadline:
            return body
        time.sleep(0.05)


def test_minimal_version_counts_exactly(minimal: tuple[str, str]) -> None:
    target, http = minimal
    assert send_once(target).strip() == "accepted=3 rejected=0 {}"
    rtmonitor_send(target, "--devices", "10", "--count", "1000")
    rtmonitor_send(target, "--devices", "10", "--count", "1000", "--batch-size", "100")
    body = wait_total(http, 2003)
    time.sleep(0.3)  # nothing more may arrive: exact, not at least
    assert get_json(http, "/metrics") == body
    assert body["total"] == 2003
    expected = {f"dev-{i:05d}": 200 for i in range(10)} | {"demo-1": 3}
    assert body["devices"] == expected
    assert get_json(http, "/metrics/demo-1") == {"device_id": "demo-1", "packets": 3}
    assert httpx.get(f"{http}/metrics/nobody", timeout=5).status_code == 404
    # the guide's chapter 5: the minimal version counts a resent batch twice
    assert resend_batch(target) == ["batch_id=1 accepted=10 duplicate=False"] * 2
    assert wait_total(http, 2023)["devices"]["resend-1"] == 20


def test_examples_pass_ruff() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    for args in (["check"], ["format", "--check"]):
        done = subprocess.run(
            [str(ruff), *args, str(EXAMPLES)], capture_output=True, text=True, cwd=ROOT
        )
        assert done.returncode == 0, done.stdout + done.stderr
