"""Fault injection against real processes: every acknowledged batch counted exactly once.

Each test starts a real Redis and real `rtmonitor serve` processes, drives them with the
real load generator (which resends unacknowledged batches after a reconnect), breaks
something in the middle of the load, and then compares Redis with what the generator
had generated, device by device.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path

from helpers import ServiceProcess, assert_exact, get_json, load, run

from rtmonitor.loadgen.sender import SendReport, send
from rtmonitor.storage.embedded import EmbeddedRedis


def restart_mid_load(
    svc: ServiceProcess, tmp_path: Path, stop: Callable[[ServiceProcess], None], count: int
) -> tuple[SendReport, ServiceProcess]:
    """Run a load, break `svc` with `stop` half-way, start it again on the same ports."""

    async def scenario() -> tuple[SendReport, ServiceProcess]:
        sender = asyncio.create_task(send(load(svc.target, count=count)))
        await asyncio.sleep(1.0)
        assert not sender.done()
        await asyncio.to_thread(stop, svc)
        await asyncio.sleep(0.5)
        again = svc.restarted(tmp_path / "restarted.log")
        await asyncio.to_thread(again.wait_ready)
        return await asyncio.wait_for(sender, 120), again

    return run(scenario())  # type: ignore[no-any-return]


def test_sigterm_mid_load_then_restart_exact(
    start_service: Callable[..., ServiceProcess], redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    svc = start_service()
    report, again = restart_mid_load(svc, tmp_path, lambda s: s.terminate(), 150_000)
    try:
        assert svc.proc.returncode == 0
        assert report.as_dict()["reconnects"] > 0
        assert_exact(report, redis_server.url)
    finally:
        again.kill()


def test_sigkill_mid_load_then_restart_exact(
    start_service: Callable[..., ServiceProcess], redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    svc = start_service()
    report, again = restart_mid_load(svc, tmp_path, lambda s: s.kill(), 150_000)
    try:
        assert svc.proc.returncode == -signal.SIGKILL
        assert report.as_dict()["reconnects"] > 0
        assert_exact(report, redis_server.url)
        # acks of batches the dead instance had prepared wait for its journal to be replayed
        stats = get_json(again.http, "/stats")
        assert stats["flush"]["duplicate_batches"] == report.as_dict()["duplicate_batches"]
    finally:
        again.kill()


def test_redis_stopped_for_10s_mid_load_exact(
    start_service: Callable[..., ServiceProcess], redis_server: EmbeddedRedis
) -> None:
    svc = start_service()

    async def scenario() -> SendReport:
        sender = asyncio.create_task(send(load(svc.target, count=400_000, rate=30_000)))
        await asyncio.sleep(1.0)
        redis_server.stop()  # a clean stop: Redis syncs its AOF (a Redis crash can lose 1 s)
        await asyncio.sleep(2.0)
        stats = await asyncio.to_thread(get_json, svc.http, "/stats")
        assert stats["ready"] is False and "Redis" in stats["not_ready_reasons"][0]
        assert stats["flush"]["redis_error"]
        await asyncio.sleep(8.0)
        redis_server.start()
        return await asyncio.wait_for(sender, 120)

    report = run(scenario())
    assert_exact(report, redis_server.url)
    stats = get_json(svc.http, "/stats")
    assert stats["flush"]["commit_errors"] > 0 and stats["flush"]["redis_error"] is None
    assert stats["ready"] is True


def test_outage_budget_pushes_receivers_back(
    start_service: Callable[..., ServiceProcess], redis_server: EmbeddedRedis
) -> None:
    """While Redis is away, pending packets stop at --max-pending-packets (plus what the
    queue holds): receivers stop reading, and the sender is held back, not dropped."""
    svc = start_service("--max-pending-packets", "20000", "--queue-max-packets", "5000")

    async def scenario() -> SendReport:
        redis_server.stop()
        sender = asyncio.create_task(send(load(svc.target, count=300_000, rate=None)))
        await asyncio.sleep(4.0)
        stats = await asyncio.to_thread(get_json, svc.http, "/stats")
        held = stats["pending"]["packets"] + stats["pending"]["inflight_packets"]
        # the budget, overshot by at most one queue-load (taken after the check) and one batch
        assert 0 < held <= 20_000 + 5_000 + 250
        assert stats["queue"]["packets"] <= 5_000 + 250
        assert not sender.done()
        redis_server.start()
        return await asyncio.wait_for(sender, 120)

    report = run(scenario())
    assert_exact(report, redis_server.url)
