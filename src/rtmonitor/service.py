"""Composes the stages (ingest -> pipeline -> storage -> api) and owns startup and shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import resource
import signal
import socket
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal

import grpc
import uvicorn
from fastapi import FastAPI
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]

from rtmonitor.api.app import create_app
from rtmonitor.api.connections import ConnectionGuard
from rtmonitor.config import Settings
from rtmonitor.ingest.columnar import C_ROWS
from rtmonitor.ingest.server import build_server
from rtmonitor.ingest.servicer import SERVICE_NAME, IngestServicer
from rtmonitor.ingest.validation import Limits, Validator
from rtmonitor.logs import redact_url
from rtmonitor.pipeline.aggregator import Aggregator
from rtmonitor.pipeline.flusher import Flusher
from rtmonitor.pipeline.queue import PacketQueue
from rtmonitor.pipeline.recovery import Recovery
from rtmonitor.pipeline.work import Work
from rtmonitor.storage.committer import RedisCommitter
from rtmonitor.storage.embedded import EmbeddedRedis, EmbeddedRedisError
from rtmonitor.storage.store import RedisStore

logger = logging.getLogger(__name__)

STARTUP_BACKOFF_MAX_S = 5.0
Role = Literal["all", "ingest", "api"]


class StartupError(RuntimeError):
    """The service cannot start; the message says what to change."""


class _HttpServer(uvicorn.Server):
    """uvicorn inside our event loop; the Service, not uvicorn, owns the signals."""

    def __init__(self, config: uvicorn.Config, guard: ConnectionGuard) -> None:
        super().__init__(config)
        self.guard = guard

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0:  # uvicorn ticks every 0.1 s
            self.guard.sweep()
        return await super().on_tick(counter)


class Service:
    """The whole process: embedded or external Redis, pipeline, gRPC and HTTP servers."""

    def __init__(
        self,
        settings: Settings,
        *,
        role: Role = "all",
        redis_url: str | None = None,
        worker_check: Callable[[], list[str]] | None = None,
        on_ready: Callable[[], None] | None = None,
        embedded: EmbeddedRedis | None = None,
    ) -> None:
        self.settings = settings
        # "all": one process does everything. With --workers: "ingest" processes (gRPC on a
        # shared port, no HTTP) and one "api" process (HTTP, embedded Redis, supervision).
        self.role = role
        self._redis_url_given = redis_url
        self._worker_check = worker_check
        self._on_ready = on_ready
        self.should_exit = asyncio.Event()
        self.grpc_port: int | None = None
        self.http_port: int | None = None
        self.redis_url: str | None = None
        self._signals = 0
        self._started = time.monotonic()
        self._stopping = False
        self._serving = False
        # Started here, or by the supervisor of --workers (then passed in): supervised and
        # stopped last by this process either way.
        self._embedded = embedded
        self.store: RedisStore | None = None
        self.queue: PacketQueue[Work] = PacketQueue(settings.queue_max_packets)
        self.aggregator = Aggregator()
        self.validator = Validator(
            Limits(
                max_payload_bytes=settings.max_payload_bytes,
                max_values_per_packet=settings.max_values_per_packet,
                max_kinds_per_device=settings.max_kinds_per_device,
                max_value_names_per_device=settings.max_value_names_per_device,
                max_devices=settings.max_devices,
            )
        )
        self.servicer = IngestServicer(
            self.validator,
            self.queue,
            self.aggregator,
            max_batch_packets=settings.max_batch_packets,
            max_inflight_batches=settings.max_inflight_batches,
            max_streams=settings.max_streams,
            max_streams_per_peer=settings.max_streams_per_peer,
            max_inflight_message_bytes=settings.max_inflight_message_bytes,
            idle_timeout=settings.stream_idle_timeout,
        )
        self.health = health_aio.HealthServicer()
        self.flusher: Flusher | None = None
        self.recovery: Recovery | None = None
        self._grpc: grpc.aio.Server | None = None
        self._http: _HttpServer | None = None
        self._app: FastAPI | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}

    # --- signals ---------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        # An ingest worker takes its orders from the supervisor (SIGTERM) only: a Ctrl-C
        # reaches the whole process group, and a second signal would force an exit.
        signals = (signal.SIGTERM,) if self.role == "ingest" else (signal.SIGINT, signal.SIGTERM)
        if self.role == "ingest":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig in signals:
            loop.add_signal_handler(sig, self.handle_exit, sig)

    def handle_exit(self, sig: int) -> None:
        """First signal: shut down in order. Second: exit now."""
        self._signals += 1
        if self._signals == 1:
            logger.info(
                "%s received: shutting down (send it again to force)", signal.Signals(sig).name
            )
            self.should_exit.set()
            return
        logger.warning("second signal: forcing exit; unacknowledged packets are not committed")
        os._exit(1)

    # --- lifecycle -------------------------------------------------------------------------

    async def serve(self) -> None:
        """Start, run until a signal (or should_exit), then shut down."""
        self.install_signal_handlers()
        try:
            await self.startup()
            if not self.should_exit.is_set():
                await self.should_exit.wait()
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        s = self.settings
        # 1. Redis: external if configured, else the embedded one (a child process).
        url = self._redis_url_given or s.external_redis_url
        if url is None:
            self._embedded = start_embedded_redis(s)
            url = self._embedded.url
        self.redis_url = url
        self.store = RedisStore.from_url(
            url, s.key_prefix, cluster=s.redis_cluster, retention_s=s.retention
        )
        if self._embedded is not None:
            self._tasks["embedded-redis"] = asyncio.create_task(
                self._embedded.supervise(), name="embedded-redis"
            )
        await self._wait_for_redis()
        if self.should_exit.is_set():
            return
        if self.role != "api":
            await self._start_ingest()
        if self.role != "ingest":
            await self._start_http()
        logger.info(
            "rtmonitor %sready: gRPC %s:%s, HTTP %s, Redis %s%s",
            "" if self.role == "all" else f"{self.role} process {os.getpid()} ",
            s.host,
            self.grpc_port if self.grpc_port is not None else s.grpc_port,
            f"http://{s.host}:{self.http_port} (docs /docs)" if self.http_port else "-",
            redact_url(url),
            " (embedded)" if self._embedded else "",
        )
        _tune_gc()
        if self._on_ready is not None:
            self._on_ready()

    async def _start_ingest(self) -> None:
        s = self.settings
        assert self.store is not None
        if not C_ROWS:
            logger.warning(
                "the compiled row-batch reader (rtmonitor/ingest/_rows.c) is not built: row "
                "batches are parsed by protobuf, several times slower. Reinstall with a C "
                "compiler and Python's headers (e.g. apt-get install gcc python3-dev)"
            )
        # 2. The pipeline: aggregator draining the queue, flusher committing to Redis, and
        #    recovery (heartbeat first: no journal of ours may look orphaned).
        committer = RedisCommitter(self.store)
        self.flusher = flusher = Flusher(
            self.aggregator, committer, s.flush_interval, dedupe_window_s=s.dedupe_window
        )
        self.recovery = Recovery(committer, flusher.instance_id, s.dedupe_window)
        await self.recovery.heartbeat()
        self._tasks["recovery"] = asyncio.create_task(self.recovery.run(), name="recovery")

        agg = self.aggregator

        def over_budget() -> bool:
            # Memory grows with packets (rows) and with per-device deltas (batches spread
            # over many devices): either bound pushes receivers back.
            return (
                agg.pending_packets + flusher.inflight_packets >= s.max_pending_packets
                or agg.pending_entries + flusher.inflight_entries >= s.max_pending_devices
            )

        self._tasks["aggregator"] = asyncio.create_task(
            self.aggregator.consume(
                self.queue,
                s.flush_max_packets,
                s.max_pending_devices // 2,
                # A sender waits for acks with at most --max-inflight-batches batches out
                # per stream: holding half of that before flushing keeps a stream's window
                # ahead of the ack latency, whatever the batch size (small row batches
                # would otherwise wait for the timer, and throughput = window / latency).
                s.max_inflight_batches // 2,
                flusher.request_flush,
                over_budget,
            ),
            name="aggregator",
        )
        self._tasks["flusher"] = asyncio.create_task(flusher.run(), name="flusher")
        # 3. gRPC: ingest + health + reflection.
        self._grpc = build_server(
            self.servicer,
            self.health,
            max_message_bytes=s.max_message_bytes,
            noop=s.noop,
            reuse_port=self.role == "ingest",  # the workers share one port
        )
        try:
            self.grpc_port = self._grpc.add_insecure_port(f"{s.host}:{s.grpc_port}")
        except RuntimeError as exc:
            raise StartupError(
                f"cannot listen for gRPC on {s.host}:{s.grpc_port} ({exc}): the port is in use "
                "or the address is wrong; choose another with --grpc-port / RTM_GRPC_PORT"
            ) from None
        await self._grpc.start()
        self._tasks["idle"] = asyncio.create_task(self.servicer.watch_idle(), name="idle-watch")
        if s.retention > 0:
            self._tasks["device-slots"] = asyncio.create_task(
                self._rotate_devices(s.retention), name="device-slots"
            )
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self._serving = True

    async def _start_http(self) -> None:
        assert self.store is not None
        # 4. HTTP API.
        sock = self._bind_http()
        self.http_port = int(sock.getsockname()[1])
        app = create_app(
            self.store,
            self.readiness,
            self.stats,
            offline_after_s=self.settings.offline_after,
            prometheus_max_devices=self.settings.prometheus_max_devices,
            prometheus_max_series=self.settings.prometheus_max_series,
            prefix_sort_max_devices=self.settings.prefix_sort_max_devices,
            stream_interval_s=self.settings.flush_interval,
            max_stream_subscribers=self.settings.max_stream_subscribers,
            max_concurrent_pages=self.settings.max_concurrent_pages,
            stream_send_timeout_s=self.settings.stream_send_timeout,
        )
        self._app = app
        s = self.settings
        # Every connection holds a file descriptor: leave most of the open-file limit to
        # gRPC streams, Redis and files. The listen backlog is also how many connections
        # asyncio accepts in one go, before the guard sees any of them.
        max_connections = max(1, min(s.http_max_connections, _fd_limit() // 8))
        if max_connections < s.http_max_connections:
            logger.info(
                "at most %d HTTP connections: 1/8 of the open-file limit %d, below "
                "--http-max-connections %d",
                max_connections,
                _fd_limit(),
                s.http_max_connections,
            )
        guard = ConnectionGuard(max_connections, s.http_idle_timeout)
        config = uvicorn.Config(
            app,
            http=guard.protocol_class(),
            log_config=None,
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=max(1, round(s.http_idle_timeout)),
            backlog=min(2048, max(16, max_connections)),
        )
        self._http = _HttpServer(config, guard)
        self._tasks["http"] = asyncio.create_task(self._http.serve(sockets=[sock]), name="http")
        while not self._http.started:
            if self._tasks["http"].done():
                self._tasks["http"].result()
                raise StartupError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)

    async def _rotate_devices(self, period_s: float) -> None:
        """Free the --max-devices slots of devices silent past the retention (on a timer,
        so slots come back even when no packet arrives)."""
        while True:
            await asyncio.sleep(period_s)
            if freed := self.validator.rotate():
                logger.info("%d devices silent for the retention freed their slots", freed)

    def _bind_http(self) -> socket.socket:
        s = self.settings
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by every accepted connection: without it a small response written in
        # two parts waits for the client's delayed ACK (~40 ms per request, measured).
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((s.host, s.http_port))
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"cannot listen for HTTP on {s.host}:{s.http_port} ({exc.strerror}); "
                "choose another port with --http-port / RTM_HTTP_PORT"
            ) from None
        sock.set_inheritable(True)
        return sock

    async def _wait_for_redis(self) -> None:
        """Retry PING with capped backoff until Redis answers (or we are told to exit)."""
        assert self.store is not None
        url = self.redis_url or ""
        delay = 0.1
        attempts = 0
        while (error := await self.store.ping(timeout=3.0)) is not None:
            attempts += 1
            if attempts == 1 or attempts % 10 == 0:
                logger.warning(
                    "Redis at %s is unreachable (%s); retrying every %.1fs at most",
                    redact_url(url),
                    redact_url(error),
                    STARTUP_BACKOFF_MAX_S,
                )
            try:
                await asyncio.wait_for(self.should_exit.wait(), delay)
                return
            except TimeoutError:
                delay = min(delay * 2, STARTUP_BACKOFF_MAX_S)
        if attempts:
            logger.info("Redis at %s is reachable", redact_url(url))

    async def readiness(self) -> list[str]:
        """Why the service cannot take traffic now (empty: ready)."""
        reasons = []
        if self._stopping:
            reasons.append("shutting down")
        elif self._worker_check is not None:
            reasons += self._worker_check()
        elif not self._serving:
            reasons.append("gRPC ingest is not serving yet")
        if self._embedded is not None:
            reasons += self._embedded.not_ready()
        if self.store is None:
            reasons.append("Redis is not connected yet")
        elif (error := await self.store.ping()) is not None:
            reasons.append(f"Redis is unreachable: {redact_url(error)}")
        elif self.flusher is not None and (error := self.flusher.stats.redis_error):
            # Up but failing commits, e.g. full (OOM): acks wait, receivers are pushed back.
            reasons.append(f"commits to Redis fail: {redact_url(error)}")
        return reasons

    async def stats(self) -> dict[str, Any]:
        """Self-metrics of this process (GET /stats)."""
        reasons = await self.readiness()
        flusher, recovery = self.flusher, self.recovery
        return {
            "instance_id": flusher.instance_id if flusher else None,
            "uptime_s": round(time.monotonic() - self._started, 3),
            "ready": not reasons,
            "not_ready_reasons": reasons,
            "ingest": {
                "active_streams": self.servicer.active_streams,
                "streams_refused": self.servicer.streams_refused,
                "streams_refused_by_reason": dict(self.servicer.streams_refused_by_reason),
                "messages_refused_by_reason": dict(self.servicer.messages_refused_by_reason),
                "inflight_message_bytes": self.servicer.budget.used,
                "streams_waiting_for_bytes": self.servicer.budget.waiting,
                "inflight_message_waits": self.servicer.budget.waits,
                "streams_idle_closed": self.servicer.streams_idle_closed,
                "devices_known": self.validator.device_count,
                "rejected_by_reason": dict(sorted(self.aggregator.rejected_total.items())),
            },
            "queue": {
                "packets": self.queue.packets,
                "items": len(self.queue),
                "max_packets": self.settings.queue_max_packets,
            },
            "pending": {
                "packets": self.aggregator.pending_packets,
                "devices": self.aggregator.pending_devices,
                "batches": self.aggregator.pending_batches,
                "inflight_packets": flusher.inflight_packets if flusher else 0,
                "device_entries": self.aggregator.pending_entries,
                "inflight_device_entries": flusher.inflight_entries if flusher else 0,
                "max_device_entries": self.settings.max_pending_devices,
                "max_pending_packets": self.settings.max_pending_packets,
            },
            "http": self._http.guard.stats() if self._http else None,
            "flush": dataclasses.asdict(flusher.stats) if flusher else None,
            "recovery": dataclasses.asdict(recovery.stats) if recovery else None,
            "embedded_redis": self._embedded.stats() if self._embedded else None,
        }

    async def shutdown(self) -> None:
        """Stop in order, losing no acknowledged packet. Calling it twice is harmless."""
        if self._stopping:
            return
        self._stopping = True
        s = self.settings
        logger.info("shutting down")
        # 1. Tell load balancers and health watchers to go elsewhere.
        await self.health.enter_graceful_shutdown()
        # 2. Stop accepting streams; open ones stop reading but still send the acks of what
        #    they read, within the grace period (the pipeline keeps committing meanwhile).
        #    关闭顺序的关键：先停止读，再等已读数据的确认发出，最后才排空队列、最终刷新。
        self.servicer.stop_reading()
        if self._grpc is not None:
            await self._grpc.stop(s.grace_period)
        for name in ("idle", "device-slots"):
            if (task := self._tasks.get(name)) is not None:
                task.cancel()
        self._serving = False
        # 3. Drain the queue into the aggregator.
        self.queue.close()
        if (task := self._tasks.get("aggregator")) is not None:
            await task
        # 4. Final flush (retried up to the deadline if Redis is away).
        if self.flusher is not None:
            self.flusher.stop(s.shutdown_flush_timeout)
            await self._tasks["flusher"]
        if self.recovery is not None:
            self.recovery.stop()
            await self._tasks["recovery"]
        # 5. HTTP last: readiness answers 503 "shutting down" until here.
        if self._app is not None:
            await self._app.state.feed.close()
        if self._http is not None:
            self._http.should_exit = True
            await self._tasks["http"]
        # 6. Close the Redis client, then stop the embedded Redis (it saves on SIGTERM).
        if self.store is not None:
            await self.store.aclose()
        if (supervise := self._tasks.get("embedded-redis")) is not None:
            supervise.cancel()
        if self._embedded is not None:
            self._embedded.stop()
        logger.info("stopped")


def start_embedded_redis(settings: Settings) -> EmbeddedRedis:
    """The embedded Redis of these settings, started (on the calling, main thread)."""
    return EmbeddedRedis(
        settings.data_dir,
        settings.embedded_redis_port,
        maxmemory_mb=settings.embedded_redis_maxmemory,
    ).start()


def _tune_gc() -> None:
    """Once started: move everything alive into the permanent generation, and collect the
    young generation less often.

    Messages allocate objects at a high rate (one protobuf object and one row per packet on
    StreamPackets; per packet on row batches too where the C reader is not built); with the
    default threshold (700) the collector ran every few batches and walked the whole heap of
    gRPC/FastAPI/numpy objects in its older generations: 28% of the service's samples sat on
    that allocation in a row-batch profile, 14% after freeze(), less with the higher
    threshold (benchmarks/RESULTS.md). Nothing here relies on cycles being freed promptly.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def raise_fd_limit() -> None:
    """Raise the soft open-file limit to the hard one: each connection and stream holds a
    file descriptor, and a soft limit of 1024 (a common default) is a few idle clients
    away from refusing them all."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    raised = _fd_limit()
    if raised != soft:
        logger.info("open-file limit %d (raised from %d)", raised, soft)
    else:
        logger.info("open-file limit %d", raised)


def _fd_limit() -> int:
    """The soft open-file limit (a large figure when it is unlimited)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def check_data_dir(settings: Settings) -> None:
    """Create the embedded Redis's --data-dir and check that it is writable, or say why not."""
    if settings.external_redis_url is not None:
        return
    path = settings.data_dir
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise StartupError(
            f"cannot use --data-dir / RTM_DATA_DIR {str(path)!r} for the embedded Redis "
            f"({exc.strerror or exc}): give a writable directory, or set REDIS_URL"
        ) from None


def run(settings: Settings) -> int:
    """Run the service until a signal; the process exit code."""
    raise_fd_limit()
    service = Service(settings)
    try:
        check_data_dir(settings)
        asyncio.run(service.serve())
    except (StartupError, EmbeddedRedisError) as exc:
        logger.error("%s", exc)
        return 2
    return 0
