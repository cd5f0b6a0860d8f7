"""The --workers supervisor restarts a worker that exits, with a backoff that doubles while
the worker keeps dying young and starts over once it had served a while (a broken
instance stops itself by design: runtime.Runtime._until_exit)."""

from __future__ import annotations

import asyncio
import logging
import re

import pytest

from rtmonitor import supervisor
from rtmonitor.config import Settings
from rtmonitor.supervisor import Supervisor, WorkerLink


def exits_at_once(settings: Settings, redis_url: str, index: int, link: WorkerLink) -> None:
    """A worker that stops by itself with exit code 1 (spawned: found by its name)."""
    raise SystemExit(1)


def _backoffs(
    reset_s: float, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> list[float]:
    """The backoffs of the first three restarts of a worker that exits at once."""
    monkeypatch.setattr(supervisor, "RESTART_BACKOFF_RESET_S", reset_s)
    caplog.clear()
    caplog.set_level(logging.ERROR, logger="rtmonitor.supervisor")
    sup = Supervisor(Settings(workers=1), "redis://127.0.0.1:1", exits_at_once)

    async def main() -> None:
        sup.start()
        watching = asyncio.create_task(sup.watch())
        while sup.restarts < 3:
            await asyncio.sleep(0.05)
        watching.cancel()
        sup.stop(5.0)

    asyncio.run(asyncio.wait_for(main(), 60))
    found = [float(m) for m in re.findall(r"exited with 1; restarting in ([\d.]+)s", caplog.text)]
    return found[:3]


def test_a_worker_that_keeps_exiting_waits_longer_each_time(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert _backoffs(3600.0, monkeypatch, caplog) == [0.5, 1.0, 2.0]


def test_a_worker_that_had_served_a_while_restarts_after_the_first_backoff(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    assert _backoffs(0.0, monkeypatch, caplog) == [0.5, 0.5, 0.5]


def test_a_workers_reasons_reach_the_supervisor_whole_or_cut_with_a_mark() -> None:
    sup = Supervisor(Settings(workers=1), "redis://127.0.0.1:1", exits_at_once)
    link = sup.links[0]
    assert link.get_reasons() == []
    link.set_reasons(["commits to Redis fail: OOM", "MQTT bridge to b:1883 is down"])
    assert link.get_reasons() == ["commits to Redis fail: OOM", "MQTT bridge to b:1883 is down"]
    link.set_reasons(["x" + "é" * 5000])  # two bytes each: cut inside one, never refused
    (reason,) = link.get_reasons()
    assert reason.endswith("é…") and len(reason.encode()) < supervisor.REASONS_MAX_BYTES
    assert reason[0] == "x" and set(reason[1:-1]) == {"é"}
    link.set_reasons(["a\nb", "\udc80"])  # a line break inside one, a lone surrogate
    assert link.get_reasons() == ["a b", "?"]
    link.set_reasons([])
    assert link.get_reasons() == []
