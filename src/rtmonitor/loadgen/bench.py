"""`rtmonitor bench`: the service under load from separate processes, verified exactly.

For each mode (per-packet StreamPackets, row batches, columnar batches; OTLP/gRPC exports
and HTTP JSON bodies: MODES) it starts a fresh `rtmonitor serve` on free ports (one Redis
for all, each mode with its own key prefix), drives it from load-generator processes,
probes freshness and HTTP latency while the load runs, waits until every acknowledged
packet is visible, checks every device's count, and, for the TelemetryIngest modes,
measures the same transport with the work removed (`serve --noop`) as the ceiling.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.table import Table

from rtmonitor.clients import ClientSecurity
from rtmonitor.config import BenchMode, BenchSettings, SendSettings
from rtmonitor.ingest.rpc import STREAM_PACKETS
from rtmonitor.ingest.v1.telemetry_pb2 import Ack, Packet
from rtmonitor.loadgen.launch import ServeProcess, memory_mb
from rtmonitor.loadgen.sender import run_loop, send
from rtmonitor.runtime import redis_server

console = Console(stderr=True)
PROBE_DEVICE = "bench-probe"


def _sender_main(options: dict[str, Any]) -> dict[str, Any]:
    """One load-generator process: run `send`, report what was acknowledged and when."""
    opts = SendSettings(**options)
    started = time.time()
    report = run_loop(send(opts))
    return {
        "started": started,
        "ended": started + report.elapsed,
        "summary": report.as_dict(),
        "per_device": report.acked_per_device(),
    }


def _start_service(
    redis_url: str,
    prefix: str,
    flush_interval: float,
    noop: bool,
    workers: int = 1,
    streams: int = 2,
    opts: BenchSettings | None = None,
) -> ServeProcess:
    """A fresh `rtmonitor serve` for one measurement; every load generator stream comes
    from this machine's one address, so the per-address stream limit is raised to them."""
    flags = [
        "--key-prefix", prefix,
        "--flush-interval", str(flush_interval), "--log-level", "warning",
        "--max-streams-per-peer", str(max(16, streams + 1)),
    ]  # fmt: skip
    if noop:
        flags.append("--noop")
    if workers > 1:
        flags += ["--workers", str(workers)]
    client = None
    if opts is not None:
        flags += _security_flags(opts)
        client = ClientSecurity.of(opts)
    # By environment, not a flag: the embedded Redis's URL carries its password, and a
    # command line is visible to every local user (ps).
    return ServeProcess(*flags, env={"RTM_REDIS_URL": redis_url}, client=client)


def _security_flags(opts: BenchSettings) -> list[str]:
    """The served side of the client's --token / --tls-ca: --auth-file and TLS."""
    flags = []
    if opts.auth_file is not None:
        flags += ["--auth-file", str(opts.auth_file)]
    if opts.server_tls_cert is not None and opts.server_tls_key is not None:
        flags += ["--tls-cert", str(opts.server_tls_cert), "--tls-key", str(opts.server_tls_key)]
    return flags


def _peak_rss_mb(pid: int) -> float:
    """Peak RSS of the service: its process and (with --workers) every child but Redis."""
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().startswith("redis-server"):
                    continue
            total += memory_mb(p, "VmHWM")
        except (OSError, ValueError):
            continue
    return total


def _service_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of the service so far: its process and (with --workers)
    every child but Redis."""
    total = 0.0
    tick = os.sysconf("SC_CLK_TCK")
    for p in [pid, *_children(pid)]:
        try:
            with open(f"/proc/{p}/comm") as f:
                if f.read().startswith("redis-server"):
                    continue
            with open(f"/proc/{p}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, ValueError, IndexError):
            continue
    return total


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


# Freshness is polled this often (its resolution). A tighter poll loads the HTTP API in
# proportion to how fast it answers, and so takes CPU from the ingest it measures.
_FRESHNESS_POLL_S = 0.01


def _percentile(samples: list[float], q: int) -> float | None:
    if not samples:
        return None
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


async def _probe(
    svc: ServeProcess, until: asyncio.Event, sample_device: str, noop: bool, flush_interval: float
) -> dict[str, list[float]]:
    """While the load runs: freshness (send one packet, poll until GET shows it) and the
    latency of GET /metrics/{id} and GET /metrics.

    Against the no-op ceiling the same requests run at the same pace (nothing ever becomes
    visible there: each freshness sample polls for one flush interval, about what it polls
    against the real service), so that the ratio compares the work, not the probes."""
    fresh: list[float] = []
    device_ms: list[float] = []
    list_ms: list[float] = []
    client = svc.client
    async with (
        client.async_http_client(base_url=svc.http, timeout=10) as http,
        client.channel(svc.target) as channel,
    ):
        method = channel.stream_unary(STREAM_PACKETS, lambda b: b, Ack.FromString)

        def call(requests: Any) -> Any:
            return method(requests, metadata=client.metadata)

        probe = Packet(device_id=PROBE_DEVICE, kind="probe").SerializeToString()

        async def latency() -> None:
            n = 0
            while not until.is_set():
                t = time.perf_counter()
                await http.get(f"/metrics/{sample_device}")
                device_ms.append((time.perf_counter() - t) * 1000)
                if n % 10 == 0:
                    t = time.perf_counter()
                    await http.get("/metrics", params={"limit": 100})
                    list_ms.append((time.perf_counter() - t) * 1000)
                n += 1
                await asyncio.sleep(0.02)

        async def freshness() -> None:
            seen = 0
            while not until.is_set():
                t = time.perf_counter()
                sent = asyncio.ensure_future(call(iter([probe])))
                deadline = t + (flush_interval if noop else 30)
                while time.perf_counter() < deadline:
                    r = await http.get(f"/metrics/{PROBE_DEVICE}")
                    if not noop and r.status_code == 200 and r.json()["packets"] > seen:
                        fresh.append((time.perf_counter() - t) * 1000)
                        seen = r.json()["packets"]
                        break
                    if sent.done() and sent.exception() is not None:
                        raise RuntimeError(f"freshness probe failed: {sent.exception()}")
                    await asyncio.sleep(_FRESHNESS_POLL_S)
                else:
                    if not noop:
                        raise RuntimeError("freshness probe: a packet stayed invisible for 30 s")
                await sent
                await asyncio.sleep(0.2)

        await asyncio.gather(latency(), freshness())
    return {"freshness_ms": fresh, "get_device_ms": device_ms, "get_metrics_ms": list_ms}


@dataclass(frozen=True, slots=True)
class _Mode:
    """How `send` drives one bench mode: its protocol, packets per message, and whether the
    no-op ceiling (`serve --noop`, TelemetryIngest only) applies."""

    protocol: str
    batch: Callable[[BenchSettings], int]
    columnar: bool = False
    ceiling: bool = True


MODES: dict[str, _Mode] = {
    "packets": _Mode("grpc", lambda o: 1),
    "rows": _Mode("grpc", lambda o: o.row_batch),
    "columns": _Mode("grpc", lambda o: o.column_batch, columnar=True),
    "otlp": _Mode("otlp", lambda o: o.otlp_batch, ceiling=False),
    "http": _Mode("http", lambda o: o.http_batch, ceiling=False),
}


def _send_options(
    opts: BenchSettings, mode: BenchMode, svc: ServeProcess, i: int
) -> dict[str, Any]:
    spec = MODES[mode]
    return {
        "protocol": spec.protocol,
        "target": svc.target,
        "http_target": svc.http,
        "devices": opts.devices,
        "duration": opts.duration,
        "batch_size": spec.batch(opts),
        "columnar": spec.columnar,
        "streams": opts.streams,
        "inflight": opts.inflight,
        "device_prefix": f"s{i}-",
        "progress": False,
        "retry_for": 0,
        "token": opts.token,
        "tls_ca": opts.tls_ca,
        "tls_cert": opts.tls_cert,
        "tls_key": opts.tls_key,
    }


def run_mode(
    opts: BenchSettings, mode: BenchMode, redis_url: str, prefix: str, noop: bool
) -> dict[str, Any]:
    """One measurement: a fresh service, the load, the probes, the exact check."""
    label = f"{mode}{' (no-op ceiling)' if noop else ''}"
    console.print(f"[bold]{label}[/bold]: starting the service")
    svc = _start_service(
        redis_url,
        prefix,
        opts.flush_interval,
        noop,
        opts.workers,
        opts.senders * opts.streams,
        opts,
    )
    try:
        svc.wait_ready()
        cpu_at_start = _service_cpu_s(svc.proc.pid)
        console.print(f"  {label}: {opts.senders} load generator(s) for {opts.duration:g}s")
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(opts.senders, mp_context=ctx) as pool:
            futures = [
                pool.submit(_sender_main, _send_options(opts, mode, svc, i))
                for i in range(opts.senders)
            ]

            async def load_and_probe() -> dict[str, list[float]]:
                done = asyncio.Event()
                probing = asyncio.ensure_future(
                    _probe(svc, done, "s0-00001", noop, opts.flush_interval)
                )
                await asyncio.to_thread(lambda: [f.result() for f in futures])
                done.set()
                return await probing

            probes = asyncio.run(load_and_probe())
            senders = [f.result() for f in futures]
        acked = sum(s["summary"]["accepted"] for s in senders)
        errors = [e for s in senders for e in s["summary"]["errors"]]
        first_send = min(s["started"] for s in senders)
        last_ack = max(s["ended"] for s in senders)
        result: dict[str, Any] = {
            "mode": mode,
            "noop": noop,
            "acked": acked,
            "errors": errors,
            "acked_pps": round(acked / (last_ack - first_send)),
        }
        if not noop:
            console.print(f"  {label}: verifying {acked:,} packets device by device")
            result.update(_verify(svc, senders, acked, first_send))
            for key, samples in probes.items():
                result[f"{key}_p50"] = _round(_percentile(samples, 50))
                result[f"{key}_p99"] = _round(_percentile(samples, 99))
                result[f"{key}_samples"] = len(samples)
        result["peak_rss_mb"] = round(_peak_rss_mb(svc.proc.pid), 1)
        # The service's CPU per packet depends far less on what else the shared machine
        # does than its rate: the figure that compares two configurations.
        cpu_s = _service_cpu_s(svc.proc.pid) - cpu_at_start
        if acked:
            result["service_cpu_ns_per_packet"] = round(cpu_s * 1e9 / acked)
        return result
    finally:
        svc.stop()


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _verify(
    svc: ServeProcess, senders: list[dict[str, Any]], acked: int, first_send: float
) -> dict[str, Any]:
    """Wait until Redis shows every acknowledged packet; compare every device."""
    expected: dict[str, int] = {}
    for s in senders:
        for device, n in s["per_device"].items():
            expected[device] = expected.get(device, 0) + n
    deadline = time.monotonic() + 60
    with svc.client.http_client(base_url=svc.http, timeout=30) as http:
        return _verify_with(http, expected, acked, first_send, deadline)


def _verify_with(
    http: httpx.Client, expected: dict[str, int], acked: int, first_send: float, deadline: float
) -> dict[str, Any]:
    while True:
        totals = http.get("/metrics", params={"limit": 1}).json()["totals"]
        committed = totals["packets"] - _probe_packets(http)
        if committed >= acked or time.monotonic() > deadline:
            committed_at = time.time()
            break
        time.sleep(0.01)
    seen: dict[str, int] = {}
    offset = 0
    while True:
        page = http.get("/metrics", params={"offset": offset, "limit": 1000}).json()
        seen.update({d["device_id"]: d["packets"] for d in page["devices"]})
        if len(page["devices"]) < 1000:
            break
        offset += 1000
    seen.pop(PROBE_DEVICE, None)
    return {
        "committed": committed,
        "exact": committed == acked and seen == expected,
        "e2e_pps": round(committed / (committed_at - first_send)),
    }


def _probe_packets(http: httpx.Client) -> int:
    r = http.get(f"/metrics/{PROBE_DEVICE}")
    return int(r.json()["packets"]) if r.status_code == 200 else 0


def run_bench(opts: BenchSettings) -> int:
    """The `bench` command; exit status 1 if any mode was not exact."""
    modes = opts.mode_list
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="rtm-bench-") as tmp:
        with redis_server(opts.redis_url, Path(tmp) / "redis") as redis:
            run_id = f"{int(time.time())}"
            for mode in modes:
                r = run_mode(opts, mode, redis.url, f"bench{run_id}{mode}", noop=False)
                if opts.ceiling and MODES[mode].ceiling:
                    c = run_mode(opts, mode, redis.url, f"bench{run_id}{mode}noop", noop=True)
                    r["ceiling_pps"] = c["acked_pps"]
                    r["ratio_to_ceiling"] = round(r["e2e_pps"] / c["acked_pps"], 3)
                results.append(r)
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    doc = {
        "machine": machine,
        "settings": opts.model_dump(mode="json", exclude={"token"}),
        "results": results,
    }
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(doc, indent=2) + "\n")
    _print_table(results)
    console.print(f"written to {opts.output}")
    return 0 if all(r.get("exact") for r in results) else 1


def _print_table(results: list[dict[str, Any]]) -> None:
    table = Table(title="rtmonitor bench")
    columns = [
        ("mode", "mode"), ("exact", "exact"), ("e2e pkt/s", "e2e_pps"),
        ("acked pkt/s", "acked_pps"), ("no-op pkt/s", "ceiling_pps"),
        ("ratio", "ratio_to_ceiling"), ("fresh p50 ms", "freshness_ms_p50"),
        ("fresh p99 ms", "freshness_ms_p99"), ("GET id p99 ms", "get_device_ms_p99"),
        ("GET list p99 ms", "get_metrics_ms_p99"), ("peak RSS MB", "peak_rss_mb"),
        ("CPU ns/pkt", "service_cpu_ns_per_packet"),
    ]  # fmt: skip
    for title, _ in columns:
        table.add_column(title, justify="right")
    for r in results:
        row = []
        for _, key in columns:
            v = r.get(key)
            row.append(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
        table.add_row(*row)
    Console(width=200).print(table)
