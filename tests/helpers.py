"""Shared test helpers: real service processes, gRPC senders and HTTP readers."""

from __future__ import annotations

import asyncio
import resource
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import httpx

from rtmonitor.ingest.v1.telemetry_pb2 import Ack, Batch, BatchAck, Packet
from rtmonitor.loadgen.bench import child_env, wait_until_ready
from rtmonitor.storage.embedded import free_port

STREAM_PACKETS = "/rtmonitor.v1.TelemetryIngest/StreamPackets"
STREAM_BATCHES = "/rtmonitor.v1.TelemetryIngest/StreamBatches"


class ServiceProcess:
    """A real `rtmonitor serve` process on free ports (never 50051/8000)."""

    def __init__(
        self,
        redis_url: str | None,
        log_path: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
        limits: dict[int, tuple[int, int]] | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.limits = limits
        self.extra = extra
        self.env = env
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self.log_path = log_path
        args = [
            sys.executable,
            "-m",
            "rtmonitor",
            "serve",
            "--host",
            "127.0.0.1",
            "--grpc-port",
            str(self.grpc_port),
            "--http-port",
            str(self.http_port),
            "--flush-interval",
            "0.05",
            *extra,
        ]
        if redis_url is not None:
            args += ["--redis-url", redis_url]
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            args,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=child_env(env),
            preexec_fn=_set_limits(limits) if limits else None,
        )

    def restarted(self, log_path: Path) -> ServiceProcess:
        """A new process with the same options on the same ports (after this one ended)."""
        return ServiceProcess(
            self.redis_url,
            log_path,
            *self.extra,
            env=self.env,
            grpc_port=self.grpc_port,
            http_port=self.http_port,
            limits=self.limits,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30.0) -> ServiceProcess:
        wait_until_ready(self.proc, self.http, timeout, self.log)
        return self

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the clean stop."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._log.close()


def _set_limits(limits: dict[int, tuple[int, int]]) -> Callable[[], None]:
    """A preexec_fn that sets resource limits (RLIMIT_*: (soft, hard)) in the child only."""

    def apply() -> None:
        for which, (soft, hard) in limits.items():
            resource.setrlimit(which, (soft, hard))

    return apply


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def packet(device_id: str, kind: str = "reading", payload: bytes = b"", **values: float) -> Packet:
    p = Packet(device_id=device_id, kind=kind, payload=payload)
    for name, value in values.items():
        p.values[name] = value
    return p


async def stream_packets(target: str, packets: Iterable[Packet | bytes]) -> Ack:
    """StreamPackets over a real channel; bytes are sent as they are (to send garbage)."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_unary(STREAM_PACKETS, lambda b: b, Ack.FromString)

        async def gen() -> AsyncIterator[bytes]:
            for p in packets:
                yield p if isinstance(p, bytes) else p.SerializeToString()

        ack: Ack = await call(gen())
        return ack


async def stream_batches(
    target: str, batches: Iterable[Batch | bytes], acks: list[BatchAck] | None = None
) -> list[BatchAck]:
    """StreamBatches over a real channel; returns every ack (raises on a status, after
    appending the acks read before it to `acks`)."""
    acks = [] if acks is None else acks
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(STREAM_BATCHES, lambda b: b, BatchAck.FromString)

        async def gen() -> AsyncIterator[bytes]:
            for b in batches:
                yield b if isinstance(b, bytes) else b.SerializeToString()

        async for ack in call(gen()):
            acks.append(ack)
        return acks


def get_json(base: str, path: str, **params: Any) -> Any:
    r = httpx.get(f"{base}{path}", params=params, timeout=10.0)
    r.raise_for_status()
    return r.json()


def self_metrics(base: str) -> dict[str, float]:
    """The unlabelled rtm_ samples of a Prometheus scrape (name -> value)."""
    r = httpx.get(f"{base}/metrics", params={"format": "prometheus"}, timeout=10.0)
    r.raise_for_status()
    samples = {}
    for line in r.text.splitlines():
        if line.startswith("rtm_") and "{" not in line:
            name, value = line.split(" ")
            samples[name] = float(value)
    return samples


def wait_for_committed(base: str, packets: int, timeout: float = 15.0) -> dict[str, Any]:
    """GET /stats once its pipeline sections show `packets` committed (the ingest processes
    publish their figures every second or so); the last answer if they never do."""
    deadline = time.monotonic() + timeout
    while True:
        stats: dict[str, Any] = get_json(base, "/stats")
        if stats["flush"]["packets_committed"] >= packets or time.monotonic() > deadline:
            return stats
        time.sleep(0.1)
