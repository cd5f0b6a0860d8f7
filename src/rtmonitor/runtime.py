"""Composes the nodes by role and owns the Redis lifecycle and the shutdown order.

One process (`serve`): the HTTP node and an ingest node. `serve --workers N`: this process
runs the HTTP node and supervises N worker processes, each an ingest node on one shared
gRPC port. Either way the embedded Redis (when no REDIS_URL is given) is started, supervised
and stopped by this process; every ingest node publishes its figures to Redis, where the
HTTP node reads them for GET /stats and the Prometheus self-metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import json
import logging
import os
import resource
import signal
import socket
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from redis.exceptions import RedisError

from rtmonitor.api.node import HttpNode, fd_limit
from rtmonitor.auth import AuthFileError, TokenRegistry
from rtmonitor.config import Settings, StartupError, is_loopback
from rtmonitor.ingest.node import IngestNode
from rtmonitor.logs import redact_url, setup_logging
from rtmonitor.model import InstanceStats, PipelineStats, ServiceStats
from rtmonitor.storage.embedded import AUTO, EmbeddedRedis, EmbeddedRedisError, free_port
from rtmonitor.storage.store import LayoutMismatch, RedisStore
from rtmonitor.supervisor import Supervisor, WorkerLink

logger = logging.getLogger(__name__)

STARTUP_BACKOFF_MAX_S = 5.0
# How long GET /stats waits for the published figures before it answers without them.
STATS_READ_TIMEOUT_S = 2.0
# How often a --workers worker tells the supervisor why it is not ready (if it is not).
WORKER_REPORT_INTERVAL_S = 0.5
# "single": one process does everything. With --workers: one "api" process (HTTP, the
# embedded Redis, supervision) and "worker" processes (ingest only).
Role = Literal["single", "api", "worker"]


# --- Redis: external, or embedded (started, supervised, stopped last) --------------------------


@dataclass(frozen=True, slots=True)
class RedisServer:
    """The Redis this process uses: its URL (with the password: never log it), and the
    embedded Redis if this process started it."""

    url: str
    embedded: EmbeddedRedis | None = None


@contextlib.contextmanager
def redis_server(
    url: str | None,
    data_dir: Path,
    *,
    port: int = 0,
    maxmemory_mb: int = 0,
    allocator: str = AUTO,
) -> Iterator[RedisServer]:
    """An external Redis as given (`url`), else an embedded one under `data_dir`, started
    here (on the calling, main thread: it dies with this process) and stopped on exit (it
    saves on SIGTERM). Used by `serve`, `serve --workers` and `bench`."""
    if url is not None:
        yield RedisServer(url)
        return
    # (The rtm module is always loaded: a data directory it merged into needs it to be read,
    # whether or not this service merges with it, --no-redis-merge-module.)
    with EmbeddedRedis(data_dir, port, maxmemory_mb=maxmemory_mb, allocator=allocator) as embedded:
        yield RedisServer(embedded.url, embedded)


@contextlib.asynccontextmanager
async def redis_client(
    settings: Settings, server: RedisServer, should_exit: asyncio.Event
) -> AsyncIterator[RedisStore]:
    """The process's one Redis client, once Redis answers (or should_exit is set); the
    embedded Redis supervised meanwhile (restarted on its port if it dies)."""
    store = RedisStore.from_url(
        server.url,
        settings.key_prefix,
        cluster=settings.redis_cluster,
        retention_s=settings.retention,
        merge_module=settings.redis_merge_module,
    )
    supervise = None
    if server.embedded is not None:
        supervise = asyncio.create_task(server.embedded.supervise(), name="embedded-redis")
    try:
        await _wait_for_redis(store, server.url, should_exit)
        if not should_exit.is_set():
            try:
                await store.check_layout()
            except LayoutMismatch as exc:
                raise StartupError(str(exc)) from None
        yield store
    finally:
        await store.aclose()
        if supervise is not None:
            supervise.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await supervise


async def _wait_for_redis(store: RedisStore, url: str, should_exit: asyncio.Event) -> None:
    """Retry PING with capped backoff until Redis answers (or we are told to exit)."""
    delay = 0.1
    attempts = 0
    while (error := await store.ping(timeout=3.0)) is not None:
        attempts += 1
        if attempts == 1 or attempts % 10 == 0:
            logger.warning(
                "Redis at %s is unreachable (%s); retrying every %.1fs at most",
                redact_url(url),
                redact_url(error),
                STARTUP_BACKOFF_MAX_S,
            )
        try:
            await asyncio.wait_for(should_exit.wait(), delay)
            return
        except TimeoutError:
            delay = min(delay * 2, STARTUP_BACKOFF_MAX_S)
    if attempts:
        logger.info("Redis at %s is reachable", redact_url(url))


# --- one process ------------------------------------------------------------------------------


class Runtime:
    """The nodes of one process, by role; its signals, readiness and self-metrics."""

    def __init__(
        self,
        settings: Settings,
        redis: RedisServer,
        *,
        role: Role = "single",
        supervisor: Supervisor | None = None,
        link: WorkerLink | None = None,
        auth: TokenRegistry | None = None,
    ) -> None:
        self.settings = settings
        # The tokens in force, shared by this process's nodes (disabled without a file).
        self.auth = auth if auth is not None else TokenRegistry(None)
        self.redis = redis
        self.role = role
        self.supervisor = supervisor
        self._link = link  # a worker's, to its supervisor
        self.should_exit = asyncio.Event()
        self.store: RedisStore | None = None
        self.http: HttpNode | None = None
        self.ingest: IngestNode | None = None
        self._signals = 0
        self._started = time.monotonic()
        self._stopping = False

    # --- signals -------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        # A worker takes its orders from the supervisor (SIGTERM) only: a Ctrl-C reaches
        # the whole process group, and a second signal would force an exit.
        if self.role == "worker":
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signals: tuple[signal.Signals, ...] = (signal.SIGTERM,)
        else:
            signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            loop.add_signal_handler(sig, self.handle_exit, sig)
        self.auth.install_sighup(loop)  # reload the auth file

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

    # --- lifecycle -----------------------------------------------------------------------

    async def serve(self) -> None:
        """Start the nodes of this role, run until a signal, then stop them in order.

        The nodes are entered in the reverse of the shutdown order, which is:
          1. health answers NOT_SERVING (load balancers go elsewhere);
          2. gRPC stops accepting streams; open ones stop reading and send the acks of what
             they read, within --grace-period;
          3. the queue is drained into the aggregator;
          4. the final flush, retried up to --shutdown-flush-timeout if Redis is away
             (1-4: IngestNode.stop; with --workers each worker does them on SIGTERM);
          5. HTTP (readiness answers 503 "shutting down" until here), then the app's
             lifespan closes the live feed;
          6. the Redis client is closed, then the embedded Redis stops (it saves).
        """
        self.install_signal_handlers()
        async with contextlib.AsyncExitStack() as stack:
            # 6.
            self.store = await stack.enter_async_context(
                redis_client(self.settings, self.redis, self.should_exit)
            )
            if self.should_exit.is_set():
                return
            if self.auth.enabled:
                watch = asyncio.create_task(self.auth.watch(), name="auth-file")
                stack.callback(watch.cancel)
            # 5.
            if self.role != "worker":
                # The HTTP receivers (POST /v1/telemetry, /v1/metrics) feed this process's
                # ingest node, started after HTTP: looked up per request. With --workers
                # this process has none.
                receivers = None if self.role == "api" else self._receivers
                self.http = await stack.enter_async_context(
                    HttpNode(
                        self.settings,
                        self.store,
                        self.readiness,
                        self.stats,
                        receivers,
                        auth=self.auth,
                    )
                )
            # 1-4, in the workers.
            if self.supervisor is not None:
                stack.push_async_callback(self._stop_workers, self.supervisor)
                self.supervisor.start()
                watcher = asyncio.create_task(self.supervisor.watch(), name="supervisor")
                stack.callback(watcher.cancel)
            # 1-4.
            if self.role != "api":
                self.ingest = await stack.enter_async_context(
                    IngestNode(
                        self.settings,
                        self.store,
                        reuse_port=self.role == "worker",
                        auth=self.auth,
                    )
                )
            self._log_ready()
            _tune_gc()
            sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
            if self._link is not None:
                report = asyncio.create_task(self._report(self._link), name="report")
                stack.callback(report.cancel)
            await self._until_exit()
            self._stopping = True
            if self._link is not None:  # (its drain may take the grace period and more)
                report.cancel()
                self._link.set_reasons(["shutting down", *self._worker_reasons()])
            logger.info("shutting down")
        logger.info("stopped")

    @property
    def exit_code(self) -> int:
        """The process's exit code: 1 if its ingest instance broke (_until_exit; also while
        stopping for a signal, before its drain), else 0."""
        return 1 if self.ingest is not None and self.ingest.broken.is_set() else 0

    async def _until_exit(self) -> None:
        """Until a signal, or until this process's ingest instance breaks: a flush it
        could not complete (a bug) leaves a journal that only another instance may replay,
        and this one commits nothing more (pipeline/flusher.py, _give_up). Then it stops in
        order and exits with 1, so that its supervisor (Kubernetes, Compose's restart
        policy, the --workers supervisor) starts a fresh instance; that flush's journal is
        replayed once this instance's heartbeat has expired."""
        waits = [asyncio.create_task(self.should_exit.wait(), name="signal")]
        if self.ingest is not None:
            waits.append(asyncio.create_task(self.ingest.broken.wait(), name="broken"))
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for wait in waits:
                wait.cancel()
        if self.ingest is not None and self.ingest.broken.is_set():
            reason = redact_url(self.ingest.redis_error or "")
            logger.error("stopping this process (exit code 1): %s", reason)
            self.should_exit.set()

    async def _stop_workers(self, supervisor: Supervisor) -> None:
        """Workers before HTTP and Redis: their final flushes need Redis."""
        s = self.settings
        budget = s.grace_period + s.shutdown_flush_timeout + 10
        await asyncio.to_thread(supervisor.stop, budget)

    async def _report(self, link: WorkerLink) -> None:
        """A worker's readiness, for its supervisor's /readyz: serving from now on, and why
        its ingest does not take traffic (an MQTT bridge down) or its commits fail (Redis
        full, a broken instance), every WORKER_REPORT_INTERVAL_S. Shared memory, not the
        figures published to Redis: a full Redis refuses those too."""
        link.serving.set()
        while True:
            try:
                link.set_reasons(self._worker_reasons())
            except Exception:  # never die silently: log, and report again next time
                logger.exception("reporting to the supervisor failed")
            await asyncio.sleep(WORKER_REPORT_INTERVAL_S)

    def _worker_reasons(self) -> list[str]:
        ingest = self.ingest
        return [] if ingest is None else ingest.not_ready() + self._failing_commits()

    def _failing_commits(self) -> list[str]:
        """Why this process's commits fail, if they do: Redis up but refusing them (full:
        OOM; acks wait, receivers are pushed back), or a broken instance."""
        error = self.ingest.redis_error if self.ingest is not None else None
        return [f"commits to Redis fail: {redact_url(error)}"] if error else []

    def _log_ready(self) -> None:
        s = self.settings
        ingest, http = self.ingest, self.http
        logger.info(
            "rtmonitor %sready: gRPC %s:%s, HTTP %s, Redis %s%s",
            "" if self.role == "single" else f"{self.role} process {os.getpid()} ",
            s.host,
            ingest.grpc_port if ingest is not None else s.grpc_port,
            f"{'https' if s.tls else 'http'}://{s.host}:{http.port} (docs /docs)"
            if http is not None
            else "-",
            redact_url(self.redis.url),
            " (embedded)" if self.redis.embedded is not None else "",
        )

    def _receivers(self) -> IngestNode | None:
        """The ingest node's HTTP receivers, once it serves."""
        ingest = self.ingest
        return ingest if ingest is not None and ingest.serving else None

    # --- what the HTTP node reports ---------------------------------------------------------

    async def readiness(self) -> list[str]:
        """Why the service cannot take traffic now (empty: ready)."""
        reasons = []
        if self._stopping or self.should_exit.is_set():
            reasons.append("shutting down")
        elif self.supervisor is not None:
            reasons += self.supervisor.not_ready()
        elif self.ingest is None or not self.ingest.serving:
            reasons.append("gRPC ingest is not serving yet")
        else:
            reasons += self.ingest.not_ready()
        if self.redis.embedded is not None:
            reasons += self.redis.embedded.not_ready()
        if self.store is None:
            reasons.append("Redis is not connected yet")
        elif (error := await self.store.ping()) is not None:
            reasons.append(f"Redis is unreachable: {redact_url(error)}")
        else:
            reasons += self._failing_commits()
        return reasons

    async def stats(self) -> ServiceStats:
        """This process's self-metrics, and every ingest instance's on its Redis."""
        reasons = await self.readiness()
        instances, error = await self._published()
        if self.ingest is not None:  # its live figures, not the ones it published
            local = self.ingest.instance_stats()
            instances[local.instance_id] = local
        guard = self.http.guard if self.http is not None else None
        embedded = self.redis.embedded
        return ServiceStats(
            instance_id=self.ingest.instance_id if self.ingest is not None else None,
            uptime_s=round(time.monotonic() - self._started, 3),
            ready=not reasons,
            not_ready_reasons=reasons,
            instances=instances,
            total=PipelineStats.total(i.stats for i in instances.values()),
            instances_error=error,
            http=guard.stats() if guard is not None else None,
            embedded_redis=embedded.stats() if embedded is not None else None,
            auth=self.auth.stats(),
        )

    async def _published(self) -> tuple[dict[str, InstanceStats], str | None]:
        """The figures the ingest instances published, or why they could not be read."""
        if self.store is None:
            return {}, "Redis is not connected yet"
        try:
            docs = await asyncio.wait_for(self.store.published_stats(), STATS_READ_TIMEOUT_S)
        except (RedisError, OSError, TimeoutError) as exc:
            return {}, redact_url(f"{type(exc).__name__}: {exc}")
        instances = {}
        for instance, doc in docs.items():
            try:
                instances[instance] = InstanceStats.from_json(instance, json.loads(doc))
            except (ValueError, TypeError, AttributeError) as exc:
                logger.warning("unreadable stats of instance %s: %s", instance, exc)
        return instances, None


# How long a thread holding the GIL keeps it while another thread waits for it (CPython's
# default: 5 ms). A fleet's batches are validated in the decode thread
# (servicer.DECODE_THREAD_DEVICES) while the event loop answers reads and acks; each time
# the loop wanted the GIL back it could wait 5 ms behind that thread, several times per
# request. At 1 ms, GET /metrics/{id} p99 went from 81 to 58 ms at 100,000 devices with
# the same throughput (benchmarks/RESULTS.md, twelfth pass); 0.5 ms was no better.
GIL_SWITCH_INTERVAL_S = 0.001


def _tune_gc() -> None:
    """Once started: move everything alive into the permanent generation, and collect the
    young generation less often.

    Messages allocate objects at a high rate (one protobuf object and one row per packet on
    StreamPackets); with the default threshold (700) the collector ran every few batches and
    walked the whole heap of gRPC/FastAPI/numpy objects in its older generations
    (benchmarks/RESULTS.md has the profile). Nothing here relies on cycles being freed
    promptly.
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
    raised = fd_limit()
    if raised != soft:
        logger.info("open-file limit %d (raised from %d)", raised, soft)
    else:
        logger.info("open-file limit %d", raised)


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


def open_auth(settings: Settings) -> TokenRegistry:
    """The auth file's tokens (StartupError naming the line if it is malformed); without
    one, a warning when the service is reachable from the network (the operator's
    explicit --allow-unauthenticated: config.Settings refuses it otherwise)."""
    if settings.auth_file is None:
        if not is_loopback(settings.host):
            logger.warning(
                "no --auth-file and --allow-unauthenticated: anyone who reaches %s can write "
                "and read every device",
                settings.host,
            )
        return TokenRegistry(None)
    try:
        auth = TokenRegistry(settings.auth_file)
    except AuthFileError as exc:
        raise StartupError(str(exc)) from None
    logger.info("auth file %s: %d tokens", settings.auth_file, len(auth.tokens))
    return auth


# --- entry points ---------------------------------------------------------------------------


def run(settings: Settings) -> int:
    """`serve` (with --workers N: the HTTP node and N ingest workers) until a signal; the
    process exit code."""
    raise_fd_limit()  # the workers inherit it
    try:
        auth = open_auth(settings)
        check_data_dir(settings)
        with redis_server(
            settings.external_redis_url,
            settings.data_dir,
            port=settings.embedded_redis_port,
            maxmemory_mb=settings.embedded_redis_maxmemory,
            allocator=settings.embedded_redis_allocator,
        ) as redis:
            if settings.workers > 1:
                if settings.grpc_port == 0:  # the workers must agree on one port
                    settings = settings.model_copy(update={"grpc_port": free_port()})
                # The workers reach the embedded Redis by its URL (with the password) like
                # any Redis; this process supervises it and stops it last.
                supervisor = Supervisor(settings, redis.url, worker_main)
                runtime = Runtime(settings, redis, role="api", supervisor=supervisor, auth=auth)
                asyncio.run(runtime.serve())
            else:
                runtime = Runtime(settings, redis, auth=auth)
                asyncio.run(runtime.serve())
    except (StartupError, EmbeddedRedisError) as exc:
        logger.error("%s", exc)
        return 2
    return runtime.exit_code


def worker_main(settings: Settings, redis_url: str, index: int, link: WorkerLink) -> None:
    """One ingest worker of `serve --workers N` (a fresh interpreter: multiprocessing's
    spawn)."""
    setup_logging(
        settings.log_level, f"%(asctime)s %(levelname)-7s worker-{index} %(name)s: %(message)s"
    )
    # If the supervisor dies, even by SIGKILL, this worker gets SIGTERM and stops in order.
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    if settings.mqtt_url is not None:  # each worker is its own MQTT client, with its session
        base = settings.mqtt_client_id or f"rtmonitor-{socket.gethostname()}"
        settings = settings.model_copy(update={"mqtt_client_id": f"{base}-{index}"})
    try:
        auth = open_auth(settings)
        runtime = Runtime(settings, RedisServer(redis_url), role="worker", link=link, auth=auth)
        asyncio.run(runtime.serve())
    except StartupError as exc:
        logger.error("%s", exc)
        raise SystemExit(2) from None
    if runtime.exit_code:  # the supervisor starts a fresh worker
        raise SystemExit(runtime.exit_code)
