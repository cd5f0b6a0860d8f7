"""The packet-bounded queue: backpressure, fairness, cancel-safety, close and drain."""

from __future__ import annotations

import asyncio

import pytest

from rtmonitor.pipeline.queue import PacketQueue, QueueClosed


def test_put_waits_while_full_and_resumes_after_get() -> None:
    async def main() -> None:
        q: PacketQueue[str] = PacketQueue(10)
        await q.put("a", 6)
        await q.put("b", 4)
        blocked = asyncio.create_task(q.put("c", 1))
        await asyncio.sleep(0.01)
        assert not blocked.done() and q.packets == 10
        assert await q.get_all() == ["a", "b"]
        await asyncio.wait_for(blocked, 1)
        assert q.packets == 1 and await q.get_all() == ["c"]

    asyncio.run(main())


def test_oversized_item_admitted_when_empty() -> None:
    async def main() -> None:
        q: PacketQueue[str] = PacketQueue(10)
        await asyncio.wait_for(q.put("big", 50), 1)
        assert q.packets == 50

    asyncio.run(main())


def test_waiting_putters_are_served_in_order() -> None:
    async def main() -> None:
        q: PacketQueue[int] = PacketQueue(2)
        await q.put(0, 2)
        tasks = [asyncio.create_task(q.put(i, 1)) for i in range(1, 5)]
        await asyncio.sleep(0.01)
        seen: list[int] = []
        while len(seen) < 5:
            seen += await q.get_all()
            await asyncio.sleep(0.01)
        assert seen == [0, 1, 2, 3, 4]
        await asyncio.gather(*tasks)

    asyncio.run(main())


def test_cancelled_put_enqueues_nothing() -> None:
    async def main() -> None:
        q: PacketQueue[str] = PacketQueue(1)
        await q.put("a", 1)
        t = asyncio.create_task(q.put("lost", 1))
        await asyncio.sleep(0.01)
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert await q.get_all() == ["a"]
        await q.put("b", 1)
        assert await q.get_all() == ["b"]

    asyncio.run(main())


def test_close_drains_then_returns_empty_and_refuses_puts() -> None:
    async def main() -> None:
        q: PacketQueue[str] = PacketQueue(1)
        await q.put("a", 1)
        waiting = asyncio.create_task(q.put("b", 1))
        await asyncio.sleep(0.01)
        q.close()
        with pytest.raises(QueueClosed):
            await waiting
        with pytest.raises(QueueClosed):
            await q.put("c", 1)
        assert await q.get_all() == ["a"]
        assert await q.get_all() == []

    asyncio.run(main())


def test_getter_wakes_on_close() -> None:
    async def main() -> None:
        q: PacketQueue[str] = PacketQueue(1)
        getter = asyncio.create_task(q.get_all())
        await asyncio.sleep(0.01)
        q.close()
        assert await asyncio.wait_for(getter, 1) == []

    asyncio.run(main())
