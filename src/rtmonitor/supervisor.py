"""`serve --workers N`: starts, watches and stops the N ingest worker processes.

One Python process uses one core, hence processes. The kernel spreads new gRPC connections
over the workers (SO_REUSEPORT); each worker is a full ingest node with its own instance
id, so their counts add up exactly in Redis like separate replicas'. The process that
supervises them serves HTTP (runtime.py), restarts a worker that dies, and on SIGTERM/SIGINT
stops the workers (each in its ordered way) before it stops itself and Redis.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.context import BaseContext
from multiprocessing.process import BaseProcess
from multiprocessing.synchronize import Event as EventType

from rtmonitor.config import Settings

logger = logging.getLogger(__name__)

RESTART_BACKOFF_START_S = 0.5
RESTART_BACKOFF_MAX_S = 10.0
# A worker that served this long before it died restarts after the first backoff again.
RESTART_BACKOFF_RESET_S = 60.0
# Room for a worker's readiness reasons (bytes of UTF-8, cut beyond).
REASONS_MAX_BYTES = 2048


@dataclass(frozen=True, slots=True)
class WorkerLink:
    """What a worker tells its supervisor, through shared memory (no Redis: a full or
    unreachable Redis is what it may have to say)."""

    serving: EventType  # set once its gRPC server serves
    # Why it is not ready, one per line (empty: it is). Without a lock: a worker killed
    # while it held one (the OOM killer) would hang every later read, and the HTTP loop
    # with it. One writer; a read torn by a write says something odd once (decoded with
    # replacement characters), and the next read is whole.
    reasons: ctypes.Array[ctypes.c_char]

    @classmethod
    def create(cls, ctx: BaseContext | None = None) -> WorkerLink:
        """A link in shared memory, of `ctx` (default: multiprocessing's default context)."""
        ctx = ctx or multiprocessing.get_context()
        return cls(ctx.Event(), ctx.RawArray(ctypes.c_char, REASONS_MAX_BYTES))

    def set_reasons(self, reasons: list[str]) -> None:
        data = "\n".join(r.replace("\n", " ") for r in reasons).encode(errors="replace")
        if len(data) >= REASONS_MAX_BYTES:
            cut = data[: REASONS_MAX_BYTES - 4].decode(errors="ignore")  # (whole characters)
            data = (cut + "…").encode()
        self.reasons.value = data

    def get_reasons(self) -> list[str]:
        text = self.reasons.value.decode(errors="replace")
        return text.split("\n") if text else []


# A worker's entry point: (settings, Redis URL, worker index, its link to the supervisor).
WorkerMain = Callable[[Settings, str, int, WorkerLink], None]


class Supervisor:
    """Starts, watches and stops the ingest workers."""

    def __init__(self, settings: Settings, redis_url: str, target: WorkerMain) -> None:
        self.settings = settings
        self.redis_url = redis_url
        self.target = target  # a module-level function: spawn pickles it by name
        self._ctx = multiprocessing.get_context("spawn")
        self.workers: list[BaseProcess | None] = [None] * settings.workers
        # Readiness waits for every worker to serve (one alive but still starting must
        # not be sent traffic), and says why a serving one is not ready (its commits fail,
        # its MQTT bridge is down): each worker's link.
        self.links = [WorkerLink.create(self._ctx) for _ in range(settings.workers)]
        self.restarts = 0
        self._stopping = False
        self._started = [0.0] * settings.workers  # each worker's last start (monotonic)

    def _start(self, index: int) -> None:
        link = self.links[index]
        link.serving.clear()
        link.set_reasons([])
        self._started[index] = time.monotonic()
        proc = self._ctx.Process(
            target=self.target,
            args=(self.settings, self.redis_url, index, link),
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
        down: list[int] = []
        starting: list[int] = []
        serving: list[str] = []  # why a serving worker is not ready, each its own
        for i, (worker, link) in enumerate(zip(self.workers, self.links, strict=True)):
            if worker is None or not worker.is_alive():
                down.append(i)
            elif not link.serving.is_set():
                starting.append(i)
            else:
                serving += [f"ingest worker {i}: {r}" for r in link.get_reasons()]
        reasons = [f"ingest workers not running: {down}"] if down else []
        if starting:
            reasons.append(f"ingest workers still starting: {starting}")
        return reasons + serving

    async def watch(self) -> None:
        """Restart a worker that died, with capped backoff (back to the first one once a
        worker had served a while: a worker that stops itself, e.g. a broken instance,
        now and then is not a crash loop)."""
        backoff = RESTART_BACKOFF_START_S
        while not self._stopping:
            await asyncio.sleep(0.5)
            for i, w in enumerate(self.workers):
                if self._stopping or w is None or w.is_alive():
                    continue
                if time.monotonic() - self._started[i] >= RESTART_BACKOFF_RESET_S:
                    backoff = RESTART_BACKOFF_START_S
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
