"""`serve --workers N`: N ingest processes on one gRPC port, one process for the HTTP API.

One Python process uses one core, hence processes. The kernel spreads new gRPC connections
over the workers (SO_REUSEPORT); each worker is a full ingest pipeline with its own instance
id, so their counts add up exactly in Redis like separate replicas'. This process starts the
embedded Redis (if any), serves HTTP, restarts a worker that dies, and on SIGTERM/SIGINT
stops the workers (each in its ordered way) before it stops itself and Redis.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import signal
import time
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType

from rtmonitor.config import Settings
from rtmonitor.logs import setup_logging
from rtmonitor.service import (
    Service,
    StartupError,
    check_data_dir,
    raise_fd_limit,
    start_embedded_redis,
)
from rtmonitor.storage.embedded import EmbeddedRedis, EmbeddedRedisError, free_port

logger = logging.getLogger(__name__)

RESTART_BACKOFF_MAX_S = 10.0


def _worker_main(settings: Settings, redis_url: str, index: int, serving: EventType) -> None:
    """One ingest worker (a fresh interpreter: multiprocessing's spawn)."""
    setup_logging(
        settings.log_level, f"%(asctime)s %(levelname)-7s worker-{index} %(name)s: %(message)s"
    )
    # If the supervisor dies, even by SIGKILL, this worker gets SIGTERM and stops in order.
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # pragma: no cover - not Linux
        pass
    try:
        service = Service(settings, role="ingest", redis_url=redis_url, on_ready=serving.set)
        asyncio.run(service.serve())
    except StartupError as exc:
        logger.error("%s", exc)
        raise SystemExit(2) from None


class Supervisor:
    """Starts, watches and stops the ingest workers."""

    def __init__(self, settings: Settings, redis_url: str) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self._ctx = multiprocessing.get_context("spawn")
        self.workers: list[BaseProcess | None] = [None] * settings.workers
        # Set by each worker once its gRPC server serves: readiness waits for all of them
        # (a worker that is alive but still starting must not be sent traffic).
        self.serving: list[EventType] = [self._ctx.Event() for _ in range(settings.workers)]
        self.restarts = 0
        self._stopping = False

    def _start(self, index: int) -> None:
        self.serving[index].clear()
        proc = self._ctx.Process(
            target=_worker_main,
            args=(self.settings, self.redis_url, index, self.serving[index]),
            name=f"rtmonitor-worker-{index}",
        )
        proc.start()
        self.workers[index] = proc
        logger.info("ingest worker %d started (pid %s)", index, proc.pid)

    def start(self) -> None:
        for i in range(len(self.workers)):
            self._start(i)

    def not_ready(self) -> list[str]:
        """Readiness reasons from the workers (empty: all running)."""
        down = [i for i, w in enumerate(self.workers) if w is None or not w.is_alive()]
        starting = [i for i, e in enumerate(self.serving) if i not in down and not e.is_set()]
        reasons = [f"ingest workers not running: {down}"] if down else []
        if starting:
            reasons.append(f"ingest workers still starting: {starting}")
        return reasons

    async def watch(self) -> None:
        """Restart a worker that died, with capped backoff."""
        backoff = 0.5
        while not self._stopping:
            await asyncio.sleep(0.5)
            for i, w in enumerate(self.workers):
                if self._stopping or w is None or w.is_alive():
                    continue
                logger.error(
                    "ingest worker %d (pid %s) exited with %s; restarting in %.1fs",
                    i,
                    w.pid,
                    w.exitcode,
                    backoff,
                )
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
                if not self._stopping:
                    self.restarts += 1
                    self._start(i)

    def stop(self, timeout: float) -> None:
        """SIGTERM every worker (each stops in order), wait, then kill stragglers."""
        self._stopping = True
        for w in self.workers:
            if w is not None and w.is_alive() and w.pid is not None:
                w.terminate()
        deadline = time.monotonic() + timeout
        for w in self.workers:
            if w is not None:
                w.join(max(0.0, deadline - time.monotonic()))
                if w.is_alive():
                    logger.error("worker pid %s did not stop in time; killing it", w.pid)
                    w.kill()
                    w.join()


def run_workers(settings: Settings) -> int:
    """The process exit code of `serve --workers N`."""
    embedded: EmbeddedRedis | None = None
    raise_fd_limit()  # the workers inherit it
    try:
        check_data_dir(settings)
        url = settings.external_redis_url
        if url is None:
            embedded = start_embedded_redis(settings)
            url = embedded.url
        if settings.grpc_port == 0:  # the workers must agree on one port
            settings = settings.model_copy(update={"grpc_port": free_port()})
        supervisor = Supervisor(settings, url)
        # The API process supervises the embedded Redis (restarts it on its port) and stops
        # it last; the workers reach it by its URL (with the password) like any Redis.
        api = Service(
            settings,
            role="api",
            redis_url=url,
            worker_check=supervisor.not_ready,
            embedded=embedded,
        )

        async def main() -> None:
            api.install_signal_handlers()
            watcher: asyncio.Task[None] | None = None
            try:
                supervisor.start()
                await api.startup()
                watcher = asyncio.create_task(supervisor.watch())
                await api.should_exit.wait()
            finally:
                if watcher is not None:
                    watcher.cancel()
                # Workers first: their final flushes need Redis (stopped last).
                budget = settings.grace_period + settings.shutdown_flush_timeout + 10
                await asyncio.to_thread(supervisor.stop, budget)
                await api.shutdown()

        asyncio.run(main())
    except (StartupError, EmbeddedRedisError) as exc:
        logger.error("%s", exc)
        return 2
    finally:
        if embedded is not None:
            embedded.stop()
    return 0
