"""The MQTT bridge alone: how fast it drains messages a broker queued for it.

Starts mosquitto and the service (the bridge subscribes, creating its session), stops the
service, queues N messages for the session with `mosquitto_pub -l` (C publishers, 10
devices), starts the service again and times it until Redis holds all N, exactly. No
publisher competes for the CPU while it drains.

    .venv/bin/python benchmarks/mqtt_drain.py [N]
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from rtmonitor.loadgen.broker import Mosquitto, mosquitto_binary
from rtmonitor.loadgen.launch import ServeProcess

DEVICES = 10


def _queue(broker: Mosquitto, n: int) -> None:
    pub = mosquitto_binary("mosquitto_pub")
    assert pub is not None, "needs mosquitto_pub (apt-get install mosquitto-clients)"
    lines = "".join(f'{{"kind":"r","values":{{"t":{i}}}}}\n' for i in range(n // DEVICES))
    procs = [
        subprocess.Popen(
            [pub, "-p", str(broker.port), "-q", "1", "-t", f"rtm/d{j}/telemetry", "-l"],
            stdin=subprocess.PIPE,
        )
        for j in range(DEVICES)
    ]
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(lines.encode())
        p.stdin.close()
    for p in procs:
        p.wait()


def main(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp, Mosquitto(Path(tmp) / "broker") as broker:
        env = {"RTM_MQTT_URL": broker.url, "RTM_MQTT_CLIENT_ID": "drain"}
        args = ("--data-dir", f"{tmp}/data", "--log-level", "warning")
        svc = ServeProcess(*args, env=env)
        svc.wait_ready()
        svc.stop()  # the session, and its subscription, stay on the broker
        _queue(broker, n)
        svc = ServeProcess(*args, env=env, grpc_port=svc.grpc_port, http_port=svc.http_port)
        try:
            svc.wait_ready()
            started = time.monotonic()
            packets = 0
            while packets < n and time.monotonic() - started < 300:
                r = httpx.get(f"{svc.http}/metrics", params={"limit": 1}, timeout=10)
                packets = int(r.json()["totals"]["packets"])
                time.sleep(0.02)
            elapsed = time.monotonic() - started
            print(f"{packets:,} of {n:,} packets in {elapsed:.2f} s: {packets / elapsed:,.0f}/s")
            if packets != n:
                sys.exit("not exact")
        finally:
            svc.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
