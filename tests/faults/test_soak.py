"""Long soak: repeated crashes and Redis restarts under one continuous load (`make test-slow`)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import ServiceProcess, assert_exact, load, run

from rtmonitor.loadgen.sender import SendReport, send
from rtmonitor.storage.embedded import EmbeddedRedis


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_soak_kills_and_redis_restarts_stay_exact(
    start_service: Callable[..., ServiceProcess], redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    svc = start_service()
    rng = random.Random(7)

    async def scenario() -> SendReport:
        nonlocal svc
        sender = asyncio.create_task(
            send(load(svc.target, count=2_000_000, rate=40_000, retry_for=120))
        )
        for cycle in range(8):
            await asyncio.sleep(rng.uniform(2.0, 5.0))
            if cycle % 3 == 2:
                redis_server.stop()
                await asyncio.sleep(rng.uniform(1.0, 6.0))
                redis_server.start()
            else:
                await asyncio.to_thread(svc.kill if cycle % 2 else svc.terminate)
                svc = svc.restarted(tmp_path / f"restart-{cycle}.log")
                await asyncio.to_thread(svc.wait_ready)
        return await asyncio.wait_for(sender, 400)

    try:
        report = run(scenario())
        assert report.as_dict()["reconnects"] >= 5
        assert_exact(report, redis_server.url)
    finally:
        svc.kill()
