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
import contextlib
import json
import multiprocessing
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import httpx
import redis
from rich.console import Console
from rich.table import Table

from rtmonitor.api.loop import LAG_BUCKETS_MS, lag_ms_quantile
from rtmonitor.clients import ClientSecurity
from rtmonitor.config import BenchMode, BenchSettings, SendSettings, Settings
from rtmonitor.ingest.rpc import STREAM_PACKETS
from rtmonitor.ingest.v1.telemetry_pb2 import Ack, Packet
from rtmonitor.loadgen.broker import Mosquitto, mosquitto_binary
from rtmonitor.loadgen.launch import ServeProcess, memory_mb
from rtmonitor.loadgen.sender import run_loop, send
from rtmonitor.model import FLUSH_STEPS
from rtmonitor.runtime import redis_server

console = Console(stderr=True)
PROBE_DEVICE = "bench-probe"
# Load generators whose streams waited for acks this much of the time measured their own
# window (packets in flight over the ack latency), not the service (RESULTS.md, seventh
# and seventeenth passes): the bench says so under its table.
WINDOW_BOUND_SHARE = 0.5
# Redis's own record of what held it up (its latency monitor), from this many ms: Redis
# runs one thing at a time, so while it is stalled (an AOF write, a rewrite's last diff, a
# fork, a long command) every read and write waits. Stalls from STALL_NOTE_MS are said
# under the table: they are where a read's p99 comes from.
STALL_THRESHOLD_MS = 20
STALL_NOTE_MS = 100
STALL_HISTORY = 160  # (LATENCY HISTORY's length, in seconds)


# In a load-generator process: where it says, the moment its last ack is in, how many
# packets were acknowledged (_watch_commit), before it builds and hands over its per-device
# counts: at a million devices those take the bench ~2 s, which the moment everything was
# committed (e2e) must not include.
_acked_to: Any = None  # a spawn-context multiprocessing Queue
# Seconds _watch_commit waits for a count once every load generator has returned.
_QUIET_S = 5.0


def _init_sender(acked_to: Any) -> None:
    global _acked_to
    _acked_to = acked_to


def _sender_main(options: dict[str, Any]) -> dict[str, Any]:
    """One load-generator process: run `send`, report what was acknowledged and when."""
    opts = SendSettings(**options)
    try:
        report = run_loop(send(opts))
    except BaseException:
        if _acked_to is not None:
            _acked_to.put(None)
        raise
    if _acked_to is not None:
        _acked_to.put(report.accepted)
    # from its first send (its packets built: seconds at a million devices) to its last ack
    started = report.started_at
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
    mqtt_url: str | None = None,
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
    if opts is not None:
        # the fleet and the freshness probe's device: past the default --max-devices (a
        # million), the last new device would be refused (counted, not verified as sent)
        fleet = opts.devices * opts.senders + 1
        if fleet > Settings.model_fields["max_devices"].default:
            flags += ["--max-devices", str(fleet)]
    if workers > 1:
        flags += ["--workers", str(workers)]
    env = {"RTM_REDIS_URL": redis_url}
    if mqtt_url is not None:  # its session ends with it: later runs queue nothing for it
        env.update(RTM_MQTT_URL=mqtt_url, RTM_MQTT_CLIENT_ID=prefix, RTM_MQTT_SESSION_EXPIRY="0")
    client = None
    if opts is not None:
        flags += _security_flags(opts)
        client = ClientSecurity.of(opts)
    # By environment, not a flag: the embedded Redis's URL carries its password, and a
    # command line is visible to every local user (ps).
    return ServeProcess(*flags, env=env, client=client)


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
# The list probe's sorts, in turn: the target holds for any of them, and the
# numeric ones rank a fleet's columns when read (storage/ranking.py), unlike device_id.
_LIST_SORTS = (
    ("device_id", "asc"), ("packets", "desc"), ("bytes", "desc"), ("rate", "desc"),
    ("last_seen", "desc"),
)  # fmt: skip


def _percentile(samples: list[float], q: int) -> float | None:
    if not samples:
        return None
    if len(samples) == 1:
        return samples[0]
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


async def _list_page(http: httpx.AsyncClient, sort: str, order: str) -> float:
    """GET /metrics?limit=100 in this order: how long it took, in ms."""
    t = time.perf_counter()
    r = await http.get("/metrics", params={"limit": 100, "sort": sort, "order": order})
    took = (time.perf_counter() - t) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"list probe (sort={sort}) answered {r.status_code}: {r.text[:200]}")
    return took


async def _probe(
    svc: ServeProcess,
    until: asyncio.Event,
    sample_device: str,
    noop: bool,
    flush_interval: float,
) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """While the load runs: freshness (send one packet, poll until GET shows it) and the
    latency of GET /metrics/{id} and GET /metrics; and the HTTP process's event-loop lag
    over the same time (_loop_lag's figures, none against the no-op ceiling).

    Against the no-op ceiling the same requests run at the same pace (nothing ever becomes
    visible there: each freshness sample polls for one flush interval, about what it polls
    against the real service), so that the ratio compares the work, not the probes."""
    fresh: list[float] = []
    device_ms: list[float] = []
    list_ms: list[float] = []
    by_sort: dict[str, list[float]] = {sort: [] for sort, _ in _LIST_SORTS}
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
                    sort, order = _LIST_SORTS[n // 10 % len(_LIST_SORTS)]
                    took = await _list_page(http, sort, order)
                    list_ms.append(took)
                    by_sort[sort].append(took)
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
                        # Kept as a 30 s sample (a lower bound) rather than ending the run:
                        # a big fleet on a slow machine may get there, and the rest of the
                        # figures still say how far it got.
                        fresh.append(30_000.0)
                await sent
                await asyncio.sleep(0.2)

        loop_lag: dict[str, Any] = {}
        if noop:
            await asyncio.gather(latency(), freshness())
        else:
            loop_lag = await _under_load(http, until, latency(), freshness())
    samples = {"freshness_ms": fresh, "get_device_ms": device_ms, "get_metrics_ms": list_ms}
    samples.update({f"get_metrics_{sort}_ms": ms for sort, ms in by_sort.items()})
    return samples, loop_lag


async def _under_load(
    http: httpx.AsyncClient,
    until: asyncio.Event,
    *probes: Coroutine[Any, Any, None],
) -> dict[str, Any]:
    """Run `probes` from the load's first commit; the loop's lag over their time."""
    await _load_committing(http, until)
    before = await _loop_buckets(http)
    await asyncio.gather(*probes)
    return _loop_lag(before, await _loop_buckets(http))


async def _load_committing(http: httpx.AsyncClient, until: asyncio.Event) -> None:
    """Wait for the load's first commit (or its end): a load generator first builds its
    packets (seconds at a million devices), and samples of an idle service are not the
    figures of one under load."""

    async def committed() -> int:
        totals = (await http.get("/metrics", params={"limit": 1})).json()["totals"]
        return int(totals["packets"])

    first = await committed()
    while not until.is_set() and await committed() == first:
        await asyncio.sleep(0.05)


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
    # its ceiling is the broker's own (broker_ceiling), not serve --noop
    "mqtt": _Mode("mqtt", lambda o: o.mqtt_batch, ceiling=False),
}


def _send_options(
    opts: BenchSettings, mode: BenchMode, target: str, i: int, http_target: str | None = None
) -> dict[str, Any]:
    spec = MODES[mode]
    return {
        "protocol": spec.protocol,
        "target": target,
        **({"http_target": http_target} if http_target is not None else {}),
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


def _sender_pool(opts: BenchSettings, acked_to: Any = None) -> ProcessPoolExecutor:
    """One process per load generator, spawned (no copy of this process's threads); each
    puts its acknowledged packets on `acked_to` (a spawn-context Queue) at its last ack."""
    return ProcessPoolExecutor(
        opts.senders,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_sender,
        initargs=(acked_to,),
    )


def _accepted(senders: list[dict[str, Any]]) -> int:
    """The packets the load generators' reports say were acknowledged."""
    return int(sum(s["summary"]["accepted"] for s in senders))


@dataclass(slots=True)
class _Commit:
    """When every acknowledged packet of the timed load was in Redis (`at`, the clock's
    time), how many were (`packets`), and the readings taken then (`readings`)."""

    at: float
    packets: int
    readings: dict[str, Any]


def _watch_commit(
    svc: ServeProcess,
    acked_to: Any,
    futures: list[Future[dict[str, Any]]],
    before_load: int,
    read: Callable[[int], dict[str, Any]],
) -> _Commit | None:
    """Once each load generator (`futures`) has said how many packets were acknowledged (at
    its last ack), wait until Redis holds them all (_wait_committed) and take `read`'s
    readings (given the acknowledged packets) at that moment. None where a load generator
    failed (its future says why)."""
    acked, said = 0, 0
    quiet_since: float | None = None  # (every future done, nothing on the queue)
    while said < len(futures):
        try:
            n = acked_to.get(timeout=0.1)
        except queue.Empty:
            if any(f.done() and not f.cancelled() and f.exception() for f in futures):
                return None  # (a process that died without a word)
            if all(f.done() for f in futures):
                # (a count still in its process's queue feeder arrives in moments)
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > _QUIET_S:
                    return None
            continue
        if n is None:
            return None
        acked, said = acked + int(n), said + 1
    return _commit_now(svc, acked, before_load, read)


def _commit_now(
    svc: ServeProcess, acked: int, before_load: int, read: Callable[[int], dict[str, Any]]
) -> _Commit:
    """Wait until Redis holds `acked` packets of the load (_wait_committed), then take
    `read`'s readings."""
    with svc.client.http_client(base_url=svc.http, timeout=30) as http:
        committed = _wait_committed(http, acked, before_load)
    return _Commit(time.time(), committed, read(acked))


def _senders_options(
    opts: BenchSettings, mode: BenchMode, target: str, http_target: str | None, **override: Any
) -> list[dict[str, Any]]:
    """Each load generator's `send` options (`override` on top of the mode's)."""
    return [
        _send_options(opts, mode, target, i, http_target) | override for i in range(opts.senders)
    ]


def _redis_work(url: str) -> dict[str, float]:
    """Redis's CPU seconds so far (user + system, every command), memory in use and forks
    (AOF rewrites, snapshots)."""
    with redis.Redis.from_url(url, decode_responses=True) as client:
        cpu = cast(dict[str, Any], client.info("cpu"))
        memory = cast(dict[str, Any], client.info("memory"))
        stats = cast(dict[str, Any], client.info("stats"))
    return {
        "cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
        "memory": float(memory["used_memory"]),
        "forks": float(stats.get("total_forks", 0)),  # (Redis 6.0 and later)
    }


def _thread_sched(pid: int) -> tuple[float, float] | None:
    """Seconds the main thread of process `pid` has run on a CPU and waited in a run queue
    for one, by the scheduler's own count (/proc/<pid>/task/<pid>/schedstat, nanoseconds;
    not sampled at the clock's ticks, as /proc/<pid>/stat is); None where it cannot be read
    (not Linux, or the kernel keeps no such count)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
            ran_ns, waited_ns, _ = f.read().split()
        return int(ran_ns) / 1e9, int(waited_ns) / 1e9
    except (OSError, ValueError):
        return None


class _SchedSampler:
    """Reads the main thread of a Redis on this machine (`pid`, the embedded one) every
    `period` seconds while the load runs (_thread_sched, with the wall clock's time), so
    that its shares are those of the load's own time (shares): from the first send, which
    at a million devices comes seconds after the load generators start (they build their
    packets first), to the commit of the last packet. Does nothing for `pid` None."""

    def __init__(self, pid: int | None, period: float = 0.2) -> None:
        self.pid = pid
        self.period = period
        self.samples: list[tuple[float, float, float]] = []  # (time, ran, waited)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _SchedSampler:
        if self.pid is not None and _thread_sched(self.pid) is not None:
            self._thread = threading.Thread(target=self._run, name="sched-sampler", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        assert self.pid is not None  # (__enter__)
        while True:
            sched = _thread_sched(self.pid)
            if sched is not None:
                self.samples.append((time.time(), *sched))
            if self._stop.wait(self.period):
                return

    def shares(self, start: float, end: float) -> dict[str, Any]:
        """The shares of [start, end] (wall clock) in which the thread was on a CPU and in
        a run queue waiting for one, between the first reading at or after `start` and the
        last at or before `end`; what is left it waited for work (Redis: for commands). On
        a machine Redis shares with the service and the load generator, a Redis that has
        commands queued but runs ~80% of the time was kept off a core the rest."""
        inside = [x for x in self.samples if start <= x[0] <= end]
        if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
            return {}
        (t0, ran0, waited0), (t1, ran1, waited1) = inside[0], inside[-1]
        return {
            "redis_ran_share": round((ran1 - ran0) / (t1 - t0), 2),
            "redis_waited_share": round((waited1 - waited0) / (t1 - t0), 2),
        }


@dataclass(frozen=True, slots=True)
class _Watch:
    """Redis's latency monitor, watched from `since` (Redis's clock, whole seconds) with
    the threshold `had` to put back."""

    since: int
    had: str


def _watch_stalls(url: str) -> _Watch | None:
    """Have Redis's latency monitor record stalls from STALL_THRESHOLD_MS, from now on (its
    history from before is left as it was: it may be an operator's); None where this Redis
    refuses (CONFIG or LATENCY renamed or denied, as some managed ones do)."""
    try:
        with redis.Redis.from_url(url, decode_responses=True) as client:
            had = str(client.config_get("latency-monitor-threshold")["latency-monitor-threshold"])
            since = int(client.time()[0])
            client.config_set("latency-monitor-threshold", STALL_THRESHOLD_MS)
    except (redis.RedisError, KeyError):
        return None
    return _Watch(since, had)


def _stalls(url: str, watch: _Watch | None) -> dict[str, Any]:
    """What stalled Redis since _watch_stalls, by event: the longest, in ms, and the seconds
    with a stall of STALL_THRESHOLD_MS or more (Redis keeps the longest of each second, and
    the last STALL_HISTORY seconds)."""
    if watch is None:
        return {}
    stalls: dict[str, dict[str, int]] = {}
    try:
        with redis.Redis.from_url(url, decode_responses=True) as client:
            for event, *_ in client.latency_latest():  # (Valkey adds fields past the 4th)
                since = [int(ms) for at, ms, *_ in client.latency_history(event)
                         if int(at) >= watch.since]  # fmt: skip
                if since:
                    stalls[str(event)] = {"max_ms": max(since), "seconds": len(since)}
    except (redis.RedisError, ValueError, TypeError):
        return {}
    return {"redis_stalls": stalls}


def _unwatch_stalls(url: str, watch: _Watch | None) -> None:
    """Put Redis's latency threshold back as _watch_stalls found it (however the mode ended)."""
    if watch is not None:
        with contextlib.suppress(redis.RedisError):
            with redis.Redis.from_url(url) as client:
                client.config_set("latency-monitor-threshold", watch.had)


async def _loop_buckets(http: httpx.AsyncClient) -> dict[str, int]:
    """The HTTP process's event-loop lag histogram so far (GET /stats `api.event_loop`;
    empty from a service without it)."""
    event_loop = (await http.get("/stats")).json().get("api", {}).get("event_loop") or {}
    return cast(dict[str, int], event_loop.get("lag_ms_buckets", {}))


def _loop_lag(before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """The loop's lag between two readings: the bounds of the buckets holding its p50 and
    p99 (a string past the last bound); nothing without a probe between them."""
    if not after:
        return {}
    bounds = {q: lag_ms_quantile(before, after, q / 100) for q in (50, 99)}
    return {
        f"loop_lag_ms_p{q}": bound if bound != float("inf") else f">{LAG_BUCKETS_MS[-1]}"
        for q, bound in bounds.items()
        if bound is not None
    }


def _cpu_per_packet(svc: ServeProcess, cpu_at_start: float, acked: int) -> dict[str, Any]:
    """The service's CPU per acknowledged packet so far: it depends far less on what else
    the shared machine does than its rate, so it is the figure that compares two builds."""
    cpu_s = _service_cpu_s(svc.proc.pid) - cpu_at_start
    return {"service_cpu_ns_per_packet": round(cpu_s * 1e9 / acked)} if acked else {}


def _flush_stats(svc: ServeProcess, packets: int) -> dict[str, Any]:
    """The service's flush stats once they count `packets` committed (or after 10 s): a
    flush's packets are in Redis before its stats are (its finalize comes between), and
    with --workers each worker publishes its stats once a second."""
    deadline = time.monotonic() + 10
    with svc.client.http_client(base_url=svc.http, timeout=10) as http:  # token, TLS: as _verify
        while True:
            flush = cast(dict[str, Any], http.get("/stats").json()["flush"])
            if int(flush.get("packets_committed", 0)) >= packets or time.monotonic() > deadline:
                return flush
            time.sleep(0.05)


@dataclass(frozen=True, slots=True)
class _Baseline:
    """What was there before the timed load: the first round's packets (by device) and
    flushes, and the memory Redis used before any device of this mode (--first-round)."""

    memory: float
    packets: int = 0
    per_device: dict[str, int] = field(default_factory=dict)
    merges: int = 0
    flushes: int = 0
    steps: dict[str, float] = field(default_factory=dict)  # flush.*_seconds


def _steps(flush: dict[str, Any]) -> dict[str, float]:
    """The seconds the flushes spent in each step (FlushStats), by step."""
    return {step: float(flush.get(f"{step}_seconds", 0.0)) for step in FLUSH_STEPS}


def _merge_cost(
    before: dict[str, float], after: dict[str, float], flush: dict[str, Any], devices: int,
    baseline: _Baseline,
) -> dict[str, Any]:  # fmt: skip
    """Redis µs per device merge: the Redis CPU spent from the start of the timed load until
    everything was committed (the merges, and the probes' reads, a small part) over the
    device merges the service wrote meanwhile (`flush`, its stats: devices_committed counts
    a device once per flush it is in); and the memory Redis gained over those `devices`
    (from before the first round, if any)."""
    merges = int(flush.get("devices_committed", 0)) - baseline.merges
    cpu_s = after["cpu_s"] - before["cpu_s"]
    steps = _steps(flush)
    return {
        "device_merges": merges,
        "flushes": int(flush.get("flushes", 0)) - baseline.flushes,
        # (of the timed load: where its flushes' time went)
        "flush_step_s": {k: round(v - baseline.steps.get(k, 0.0), 2) for k, v in steps.items()},
        "redis_cpu_s": round(cpu_s, 2),
        "redis_forks": round(after["forks"] - before["forks"]),
        "redis_us_per_merge": round(cpu_s * 1e6 / merges, 2) if merges else None,
        "redis_bytes_per_device": round((after["memory"] - baseline.memory) / devices),
    }


def _first_round(
    opts: BenchSettings, mode: BenchMode, svc: ServeProcess, target: str, memory: float
) -> tuple[_Baseline, dict[str, Any]]:
    """--first-round: every device sends one packet (one stream per load generator, so
    pool entries 0..devices-1: each device once; an MQTT message is one packet here, as it
    carries packets of one device), acknowledged and then committed, before the timed load;
    its own rate is reported apart (first_round_pps)."""
    fleet = opts.devices * opts.senders
    console.print(f"  {mode}: first round, each of {fleet:,} devices once")
    once = {"duration": None, "count": opts.devices, "streams": 1}
    if mode == "mqtt":
        once["batch_size"] = 1
    acked_to = multiprocessing.get_context("spawn").Queue()
    with _sender_pool(opts, acked_to) as pool:
        options = _senders_options(opts, mode, target, svc.http, **once)
        futures = [pool.submit(_sender_main, o) for o in options]
        commit = _watch_commit(svc, acked_to, futures, 0, lambda _: {})
        senders = [f.result() for f in futures]
    acked = _accepted(senders)
    errors = [e for s in senders for e in s["summary"]["errors"]]
    if errors or acked != fleet:
        raise RuntimeError(f"first round: {acked:,} of {fleet:,} acknowledged {errors}")
    commit = commit or _commit_now(svc, acked, 0, lambda _: {})
    if commit.packets != acked:
        raise RuntimeError(f"first round: {commit.packets:,} of {acked:,} packets committed")
    seconds = commit.at - min(s["started"] for s in senders)
    flush = _flush_stats(svc, acked)
    per_device = {d: n for s in senders for d, n in s["per_device"].items()}
    baseline = _Baseline(
        memory, acked, per_device, int(flush["devices_committed"]), int(flush["flushes"]),
        _steps(flush),
    )  # fmt: skip
    return baseline, {"first_round_pps": round(acked / seconds), "first_round_s": round(seconds, 1)}


def run_mode(
    opts: BenchSettings,
    mode: BenchMode,
    redis_url: str,
    prefix: str,
    noop: bool,
    broker: Mosquitto | None = None,
    redis_pid: int | None = None,
) -> dict[str, Any]:
    """One measurement: a fresh service, the load, the probes, the exact check
    (`redis_pid`: the embedded Redis's process, whose main thread's time is reported; the
    no-op ceiling, which writes nothing to Redis, is not given it)."""
    label = f"{mode}{' (no-op ceiling)' if noop else ''}"
    console.print(f"[bold]{label}[/bold]: starting the service")
    mqtt_url = broker.url if broker is not None and mode == "mqtt" else None
    svc = _start_service(
        redis_url,
        prefix,
        opts.flush_interval,
        noop,
        opts.workers,
        opts.senders * opts.streams,
        mqtt_url,
        opts,
    )
    stalls: _Watch | None = None
    try:
        svc.wait_ready()
        target = mqtt_url or svc.target
        baseline = _Baseline(_redis_work(redis_url)["memory"])
        result: dict[str, Any] = {}
        if opts.first_round and not noop:
            baseline, result = _first_round(opts, mode, svc, target, baseline.memory)
        cpu_at_start = _service_cpu_s(svc.proc.pid)
        work_before = _redis_work(redis_url)
        stalls = None if noop else _watch_stalls(redis_url)
        console.print(f"  {label}: {opts.senders} load generator(s) for {opts.duration:g}s")

        def at_commit(acked: int) -> dict[str, Any]:
            # Taken once every packet is in Redis, before the check reads every device
            # back through the service: at a million devices those reads cost the service
            # more CPU than ingesting the packets.
            cpu = _cpu_per_packet(svc, cpu_at_start, acked) | _stalls(redis_url, stalls)
            return {"redis_work": _redis_work(redis_url), "cpu": cpu}

        with _SchedSampler(redis_pid) as sampler:
            senders, probes, loop_lag, commit = _load(
                opts, mode, svc, target, noop, baseline.packets, at_commit
            )
        acked = _accepted(senders)
        errors = [e for s in senders for e in s["summary"]["errors"]]
        first_send = min(s["started"] for s in senders)
        last_ack = max(s["ended"] for s in senders)
        result = (
            {
                "mode": mode,
                "noop": noop,
                "acked": acked,
                "errors": errors,
                "acked_pps": round(acked / (last_ack - first_send)),
            }
            | _window(opts, mode, senders)
            | loop_lag
            | result
        )
        if not noop:
            console.print(f"  {label}: verifying {acked:,} packets device by device")
            assert commit is not None  # (_load watched for it)
            result.update(_check(opts, svc, senders, (work_before, baseline), probes, commit))
            result.update(sampler.shares(first_send, commit.at))
        else:
            result.update(_cpu_per_packet(svc, cpu_at_start, acked))
        result["peak_rss_mb"] = round(_peak_rss_mb(svc.proc.pid), 1)
        return result
    finally:
        _unwatch_stalls(redis_url, stalls)
        svc.stop()


def _load(
    opts: BenchSettings,
    mode: BenchMode,
    svc: ServeProcess,
    target: str,
    noop: bool,
    before_load: int,
    at_commit: Callable[[int], dict[str, Any]],
) -> tuple[list[dict[str, Any]], dict[str, list[float]], dict[str, Any], _Commit | None]:
    """The timed load: the load generators' results, the probes' samples and the loop's
    lag meanwhile, and when Redis held every acknowledged packet (_watch_commit, or after
    the fact where a count never came; None against the no-op ceiling, where nothing is
    committed)."""
    acked_to = multiprocessing.get_context("spawn").Queue()
    commit: _Commit | None = None
    with _sender_pool(opts, acked_to) as pool:
        futures = [
            pool.submit(_sender_main, options)
            for options in _senders_options(opts, mode, target, svc.http)
        ]

        async def load_and_probe() -> tuple[dict[str, list[float]], dict[str, Any]]:
            nonlocal commit
            done = asyncio.Event()
            probing = asyncio.ensure_future(
                _probe(svc, done, "s0-00001", noop, opts.flush_interval)
            )
            if not noop:  # (the probes go on meanwhile: their packets are told apart)
                commit = await asyncio.to_thread(
                    _watch_commit, svc, acked_to, futures, before_load, at_commit
                )
            await asyncio.to_thread(lambda: [f.result() for f in futures])
            done.set()
            return await probing

        probes, loop_lag = asyncio.run(load_and_probe())
        senders = [f.result() for f in futures]
    if commit is None and not noop:
        commit = _commit_now(svc, _accepted(senders), before_load, at_commit)
    return senders, probes, loop_lag, commit


def _window(opts: BenchSettings, mode: BenchMode, senders: list[dict[str, Any]]) -> dict[str, Any]:
    """How the load generators' window held them back (StreamBatches modes): the packets it
    holds, the share of the time their streams waited for an ack, the mean ack latency."""
    spec = MODES[mode]
    if spec.protocol != "grpc" or spec.batch(opts) == 1:  # (StreamPackets has no window)
        return {}
    summaries = [s["summary"] for s in senders]
    latencies = [s["ack_latency_ms"] for s in summaries if s["ack_latency_ms"] is not None]
    return {
        "window_packets": opts.senders * opts.streams * opts.inflight * spec.batch(opts),
        "window_wait_share": round(statistics.mean(s["window_wait_share"] for s in summaries), 3),
        "ack_latency_ms": round(statistics.mean(latencies), 1) if latencies else None,
    }


def _check(
    opts: BenchSettings,
    svc: ServeProcess,
    senders: list[dict[str, Any]],
    work: tuple[dict[str, float], _Baseline],
    probes: dict[str, list[float]],
    commit: _Commit,
) -> dict[str, Any]:
    """The exact check, Redis's and the service's work (`commit`: when everything
    acknowledged was in Redis, and the readings then), and the probes' percentiles."""
    work_before, baseline = work
    acked = _accepted(senders)
    first_send = min(s["started"] for s in senders)
    result = _verify(svc, senders, acked, commit.packets, commit.at - first_send, baseline)
    result.update(commit.readings["cpu"])
    fleet = opts.devices * opts.senders
    flush = _flush_stats(svc, baseline.packets + acked)
    result.update(_merge_cost(work_before, commit.readings["redis_work"], flush, fleet, baseline))
    for key, samples in probes.items():
        result[f"{key}_p50"] = _round(_percentile(samples, 50))
        result[f"{key}_p99"] = _round(_percentile(samples, 99))
        result[f"{key}_samples"] = len(samples)
    return result


def broker_ceiling(opts: BenchSettings, broker: Mosquitto) -> dict[str, Any]:
    """The broker's own ceiling: the same publishers, every message delivered (QoS 1) to
    one mosquitto_sub (a C client that acknowledges at once) instead of the service."""
    console.print("[bold]mqtt (broker ceiling)[/bold]: mosquitto_sub as the only subscriber")
    sub_binary, pub_binary = mosquitto_binary("mosquitto_sub"), mosquitto_binary("mosquitto_pub")
    if sub_binary is None or pub_binary is None:
        raise RuntimeError(
            "mosquitto_sub/mosquitto_pub are needed (apt-get install mosquitto-clients)"
        )
    port = str(broker.port)
    sub = subprocess.Popen(
        [sub_binary, "-p", port, "-q", "1", "-t", "ceiling/+/telemetry", "-F", "%t"],
        stdout=subprocess.PIPE,
    )
    seen = [0, 0.0]  # messages delivered, when the last one was

    def read() -> None:
        assert sub.stdout is not None
        for _ in sub.stdout:
            seen[0] += 1
            seen[1] = time.time()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while seen[0] == 0:  # subscribed once a probe comes through
            subprocess.run([pub_binary, "-p", port, "-t", "ceiling/probe/telemetry", "-m", "."])
            time.sleep(0.1)
        time.sleep(0.2)
        probes = seen[0]
        with _sender_pool(opts) as pool:
            options = _senders_options(
                opts, "mqtt", broker.url, None, mqtt_topic="ceiling/{device}/telemetry"
            )
            senders = list(pool.map(_sender_main, options))
        acked = _accepted(senders)  # packets
        messages = acked // opts.mqtt_batch
        deadline = time.monotonic() + 60
        while seen[0] - probes < messages and time.monotonic() < deadline:
            time.sleep(0.01)
        first_send = min(s["started"] for s in senders)
        delivered = (seen[0] - probes) * opts.mqtt_batch  # in packets, like the service's
        return {
            "acked": acked,
            "delivered": delivered,
            "acked_pps": round(delivered / (seen[1] - first_send)) if delivered else 0,
        }
    finally:
        sub.terminate()
        sub.wait(10)


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 2)


def _verify(
    svc: ServeProcess,
    senders: list[dict[str, Any]],
    acked: int,
    committed: int,
    seconds: float,
    baseline: _Baseline,
) -> dict[str, Any]:
    """Compare every device (with the first round's packets) with what the load generators
    had acknowledged; `committed` packets were in Redis `seconds` after the first send."""
    expected = dict(baseline.per_device)
    for s in senders:
        for device, n in s["per_device"].items():
            expected[device] = expected.get(device, 0) + n
    with svc.client.http_client(base_url=svc.http, timeout=30) as http:
        return _verify_with(http, expected, acked, committed, seconds)


def _wait_committed(http: httpx.Client, acked: int, before_load: int) -> int:
    """Packets committed since the load began (totals less the probe's and `before_load`),
    once they reach `acked` or stop growing for 60 s. (MQTT's broker may hold a backlog
    that takes longer than that to drain, all of it counted in the figure.)"""
    deadline = time.monotonic() + 60
    before = -1
    while True:
        totals = http.get("/metrics", params={"limit": 1}).json()["totals"]
        committed = int(totals["packets"]) - _probe_packets(http) - before_load
        if committed >= acked or time.monotonic() > deadline:
            return committed
        if committed > before:
            before, deadline = committed, time.monotonic() + 60
        time.sleep(0.01)


def _verify_with(
    http: httpx.Client, expected: dict[str, int], acked: int, committed: int, seconds: float
) -> dict[str, Any]:
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
        "e2e_pps": round(committed / seconds),
    }


def _probe_packets(http: httpx.Client) -> int:
    r = http.get(f"/metrics/{PROBE_DEVICE}")
    return int(r.json()["packets"]) if r.status_code == 200 else 0


def run_bench(opts: BenchSettings) -> int:
    """The `bench` command; exit status 1 if any mode was not exact."""
    modes = opts.mode_list
    results: list[dict[str, Any]] = []
    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="rtm-bench-")))
        redis = stack.enter_context(
            redis_server(opts.redis_url, tmp / "redis", allocator=opts.redis_allocator)
        )
        # what the embedded Redis really runs on (its memory maps), for the results
        allocator = redis.embedded.allocator if redis.embedded is not None else None
        pid = redis.embedded.pid if redis.embedded is not None else None
        # MQTT goes through a real broker, started here
        broker = stack.enter_context(Mosquitto(tmp / "mqtt")) if "mqtt" in modes else None
        run_id = f"{int(time.time())}"
        for mode in modes:
            r = run_mode(opts, mode, redis.url, f"bench{run_id}{mode}", False, broker, pid)
            if opts.ceiling and (mode == "mqtt" or MODES[mode].ceiling):
                if broker is not None and mode == "mqtt":
                    c = broker_ceiling(opts, broker)
                else:
                    c = run_mode(opts, mode, redis.url, f"bench{run_id}{mode}noop", noop=True)
                r["ceiling_pps"] = c["acked_pps"]
                r["ratio_to_ceiling"] = round(r["e2e_pps"] / c["acked_pps"], 3)
            results.append(r)
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0]}
    if allocator is not None:
        machine["redis_allocator"] = allocator
    doc = {
        "machine": machine,
        "settings": opts.model_dump(mode="json", exclude={"token"}),
        "results": results,
    }
    opts.output.parent.mkdir(parents=True, exist_ok=True)
    opts.output.write_text(json.dumps(doc, indent=2) + "\n")
    _print_table(results)
    for r in results:
        _note_window(r)
        _note_stalls(r)
    console.print(f"written to {opts.output}")
    return 0 if all(r.get("exact") for r in results) else 1


def _note_window(r: dict[str, Any]) -> None:
    """Say under the table where the load generators' window, not the service, bounded a
    mode's rate (they waited for acks WINDOW_BOUND_SHARE of their time or more)."""
    bound = r.get("window_wait_share", 0.0) >= WINDOW_BOUND_SHARE
    if bound and r.get("ack_latency_ms") is not None:  # (None: no ack at all)
        console.print(
            f"[yellow]{r['mode']}[/yellow]: the load generators waited for acks "
            f"{r['window_wait_share']:.0%} of the time, with {r['window_packets']:,} "
            f"packets in flight (--senders x --streams x --inflight x the batch size), "
            f"each batch acknowledged {r['ack_latency_ms']:,.0f} ms after it was sent "
            "(once committed): this rate is about that window over that latency, a "
            "bound of the load generators. More --streams (or --inflight, or bigger "
            "batches) measure the service."
        )


def _note_stalls(result: dict[str, Any]) -> None:
    """Say under the table where Redis stalled for STALL_NOTE_MS or more during a mode."""
    stalls = result.get("redis_stalls", {}).items()
    long = sorted((s["max_ms"], e, s["seconds"]) for e, s in stalls if s["max_ms"] >= STALL_NOTE_MS)
    if long:
        said = ", ".join(
            f"{event} up to {ms:,} ms ({seconds}{'+' if seconds >= STALL_HISTORY else ''} s "
            f"with one of {STALL_THRESHOLD_MS} ms or more)"
            for ms, event, seconds in reversed(long)
        )
        console.print(
            f"[yellow]{result['mode']}[/yellow]: Redis stalled during the load: {said}; "
            f"{result.get('redis_forks', 0)} fork(s) (AOF rewrites, snapshots). Every read "
            "and write waited meanwhile (Redis's LATENCY events)."
        )


def _print_table(results: list[dict[str, Any]]) -> None:
    table = Table(title="rtmonitor bench")
    columns = [
        ("mode", "mode"), ("exact", "exact"), ("e2e pkt/s", "e2e_pps"),
        ("acked pkt/s", "acked_pps"), ("no-op pkt/s", "ceiling_pps"),
        ("ratio", "ratio_to_ceiling"), ("fresh p50 ms", "freshness_ms_p50"),
        ("fresh p99 ms", "freshness_ms_p99"), ("GET id p99 ms", "get_device_ms_p99"),
        ("GET list p99 ms", "get_metrics_ms_p99"), ("loop lag p99 ms", "loop_lag_ms_p99"),
        ("peak RSS MB", "peak_rss_mb"),
        ("CPU ns/pkt", "service_cpu_ns_per_packet"),
        ("merges", "device_merges"), ("flushes", "flushes"),
        ("Redis µs/merge", "redis_us_per_merge"), ("Redis ran", "redis_ran_share"),
        ("Redis waited", "redis_waited_share"), ("Redis B/device", "redis_bytes_per_device"),
    ]  # fmt: skip
    if any("first_round_pps" in r for r in results):
        columns.insert(3, ("1st round pkt/s", "first_round_pps"))
    for title, _ in columns:
        table.add_column(title, justify="right")
    for r in results:
        row = []
        for _, key in columns:
            v = r.get(key)
            row.append(f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v))
        table.add_row(*row)
    Console(width=200).print(table)
