"""What the tests share: real service processes, gRPC senders, HTTP readers, the fault
suite's load and exactness check, columnar batches (helpers.columns) and a real Redis
Cluster (helpers.cluster).

`tests/` is on sys.path through pytest's `pythonpath` setting (pyproject.toml), so a test
imports these as `from helpers import ...`."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import httpx

from helpers.cluster import RedisClusterFixture
from helpers.columns import encode_columns
from rtmonitor.clients import ClientSecurity
from rtmonitor.config import SendSettings
from rtmonitor.ingest.rpc import STREAM_BATCHES, STREAM_PACKETS
from rtmonitor.ingest.v1.telemetry_pb2 import Ack, Batch, BatchAck, Packet
from rtmonitor.loadgen.launch import ServeProcess
from rtmonitor.loadgen.sender import SendReport
from rtmonitor.storage.store import RedisStore

# gRPC call metadata: a token's (ClientSecurity.metadata), or none.
Metadata = tuple[tuple[str, str], ...] | None

__all__ = [
    "STREAM_BATCHES",
    "STREAM_PACKETS",
    "RedisClusterFixture",
    "ServiceProcess",
    "assert_exact",
    "encode_columns",
    "get_json",
    "load",
    "packet",
    "redis_counts",
    "refused_at_admission",
    "run",
    "stream_batches",
    "stream_packets",
]


class ServiceProcess(ServeProcess):
    """A real `rtmonitor serve` process on free ports (never 50051/8000), its output in
    `log_path`, with `--flush-interval 0.05` and optional resource limits."""

    def __init__(
        self,
        redis_url: str | None,
        log_path: Path,
        *extra: str,
        env: dict[str, str] | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
        limits: dict[int, tuple[int, int]] | None = None,
        client: ClientSecurity | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.limits = limits
        self.extra = extra
        self.env = env
        self.log_path = log_path
        flags = ["--flush-interval", "0.05", *extra]
        # By environment, as bench does: a command line is visible to every local user (ps),
        # and the embedded Redis's URL carries its password.
        child = dict(env or {})
        if redis_url is not None:
            child.setdefault("RTM_REDIS_URL", redis_url)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in terminate() and kill()
        super().__init__(
            *flags,
            env=child,
            grpc_port=grpc_port,
            http_port=http_port,
            output=self._log,
            preexec_fn=_set_limits(limits) if limits else None,
            client=client,
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
            client=self.client,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the clean stop."""
        code = super().terminate(timeout)
        self._log.close()
        return code

    def kill(self) -> None:
        super().kill()
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


async def stream_packets(
    target: str, packets: Iterable[Packet | bytes], metadata: Metadata = None
) -> Ack:
    """StreamPackets over a real channel; bytes are sent as they are (to send garbage)."""
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_unary(STREAM_PACKETS, lambda b: b, Ack.FromString)

        async def gen() -> AsyncIterator[bytes]:
            for p in packets:
                yield p if isinstance(p, bytes) else p.SerializeToString()

        ack: Ack = await call(gen(), metadata=metadata)
        return ack


async def stream_batches(
    target: str,
    batches: Iterable[Batch | bytes],
    acks: list[BatchAck] | None = None,
    metadata: Metadata = None,
) -> list[BatchAck]:
    """StreamBatches over a real channel; returns every ack (raises on a status, after
    appending the acks read before it to `acks`)."""
    acks = [] if acks is None else acks
    async with grpc.aio.insecure_channel(target) as channel:
        call = channel.stream_stream(STREAM_BATCHES, lambda b: b, BatchAck.FromString)

        async def gen() -> AsyncIterator[bytes]:
            for b in batches:
                yield b if isinstance(b, bytes) else b.SerializeToString()

        async for ack in call(gen(), metadata=metadata):
            acks.append(ack)
        return acks


async def refused_at_admission(
    target: str, method: str, metadata: Metadata = None, timeout: float = 10.0
) -> tuple[grpc.StatusCode, str]:
    """Open a call to `method` and send nothing: the status and details the server ends it
    with when it refuses the call itself (a stream slot, a token). Nothing is written on
    purpose: a client write racing the server's close makes grpcio report INTERNAL
    'Failed "execute_batch"' in place of the server's status."""
    async with grpc.aio.insecure_channel(target) as channel:
        call: Any
        if method == STREAM_PACKETS:
            call = channel.stream_unary(method, lambda b: b, Ack.FromString)(metadata=metadata)
        else:
            call = channel.stream_stream(method, lambda b: b, BatchAck.FromString)(
                metadata=metadata
            )
        try:
            code = await asyncio.wait_for(call.code(), timeout)
        except TimeoutError:
            call.cancel()
            raise AssertionError(f"{method} was not refused within {timeout:g}s") from None
        return code, await call.details()


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


# --- the fault suite's load and its exactness check ----------------------------------------


def load(target: str, **kw: object) -> SendSettings:
    """The fault suite's load: 40 devices, batches of 250 over 3 streams at 60,000 pkt/s."""
    base: dict[str, object] = {
        "target": target,
        "devices": 40,
        "batch_size": 250,
        "streams": 3,
        "inflight": 8,
        "rate": 60_000,
        "progress": False,
    }
    base.update(kw)
    return SendSettings(**base)  # type: ignore[arg-type]


async def redis_counts(url: str) -> tuple[int, dict[str, int]]:
    async with RedisStore.from_url(url) as store:
        totals = await store.totals()
        _, devices = await store.list_devices(limit=1000)
        return totals.packets, {d.device_id: d.packets for d in devices}


def assert_exact(report: SendReport, redis_url: str) -> None:
    """Redis holds exactly what the load generator generated, device by device."""
    assert report.errors == [], report.errors
    assert report.accepted == report.sent, "every generated batch was acknowledged in the end"
    total, per_device = run(redis_counts(redis_url))
    assert total == report.sent
    assert per_device == report.acked_per_device()


@contextlib.asynccontextmanager
async def held_streams(target: str, n: int) -> AsyncIterator[list[asyncio.Future[Ack]]]:
    """`n` StreamPackets calls that each send one packet and stay open until the block
    ends; yields the calls (each resolves to its Ack after the block)."""
    async with grpc.aio.insecure_channel(target) as channel:
        gate = asyncio.Event()

        async def held() -> AsyncIterator[bytes]:
            yield packet("held").SerializeToString()
            await gate.wait()

        method = channel.stream_unary(STREAM_PACKETS, lambda b: b, Ack.FromString)
        calls = [asyncio.ensure_future(method(held())) for _ in range(n)]
        await asyncio.sleep(0.5)  # the streams are open and counted
        try:
            yield calls
        finally:
            gate.set()
            await asyncio.gather(*calls, return_exceptions=True)


def healthz_seconds(base: str) -> float:
    """Seconds a fresh connection takes to get 200 from /healthz (fails past 5 s)."""
    t0 = time.monotonic()
    with httpx.Client(timeout=5.0) as client:
        assert client.get(f"{base}/healthz").status_code == 200
    return time.monotonic() - t0
