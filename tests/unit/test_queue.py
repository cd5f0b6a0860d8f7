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


def test_grow_adds_to_an_item_only_while_it_is_queued() -> None:
    async def main() -> None:
        q: PacketQueue[list[int]] = PacketQueue(10)
        item = [1]
        ticket = await q.put(item, 1)
        assert q.grow(ticket, 2) and q.packets == 3
        item += [2, 3]
        await q.put([9], 1)  # another stream's item after it: the first still grows
        assert q.grow(ticket, 1) and q.packets == 5
        item.append(4)
        assert await q.get_all() == [[1, 2, 3, 4], [9]] and q.packets == 0
        assert not q.grow(ticket, 1), "an item already taken cannot grow"
        assert q.grow(await q.put([5], 1), 1)

    asyncio.run(main())


def test_grow_respects_the_bound_waiting_putters_and_close() -> None:
    async def main() -> None:
        q: PacketQueue[str] = PacketQueue(3)
        ticket = await q.put("a", 2)
        assert q.grow(ticket, 1) and q.packets == 3
        assert not q.grow(ticket, 1) and q.packets == 3, "past the bound: put (and wait)"

        q = PacketQueue(3)
        ticket = await q.put("a", 2)
        waiting = asyncio.create_task(q.put("b", 2))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        assert not q.grow(ticket, 1) and q.packets == 2, "it fits, but a putter waits first"
        assert await q.get_all() == ["a"]
        await asyncio.wait_for(waiting, 1)

        q = PacketQueue(10)
        ticket = await q.put("a", 1)
        q.close()
        assert not q.grow(ticket, 1), "closed: nothing more goes in"
        assert await q.get_all() == ["a"] and await q.get_all() == []

    asyncio.run(main())


def test_a_take_is_bounded_by_the_room_given_and_grown_items_weigh_their_growth() -> None:
    """get_all(max_packets) takes the oldest items that fit in it (always one at least);
    an item that grew weighs what it grew to, and the rest stay queued, still growable."""

    async def main() -> None:
        q: PacketQueue[str] = PacketQueue(100)
        a = await q.put("a", 3)
        b = await q.put("b", 4)
        c = await q.put("c", 5)
        assert q.grow(a, 2)  # "a" weighs 5 now
        assert await q.get_all(9) == ["a", "b"] and q.packets == 5
        assert not q.grow(b, 1), "taken"
        assert q.grow(c, 1) and q.packets == 6, "still queued: it grows"
        d = await q.put("d", 2)
        assert await q.get_all(1) == ["c"], "one item at least, however heavy"
        assert q.packets == 2 and q.grow(d, 1)
        assert await q.get_all(0) == ["d"] and q.packets == 0
        await q.put("e", 1)
        await q.put("f", 1)
        assert await q.get_all(None) == ["e", "f"] and q.packets == 0

    asyncio.run(main())


def test_a_bounded_take_makes_room_for_waiting_putters() -> None:
    async def main() -> None:
        q: PacketQueue[str] = PacketQueue(4)
        await q.put("a", 2)
        await q.put("b", 2)
        waiting = asyncio.create_task(q.put("c", 2))
        await asyncio.sleep(0.01)
        assert not waiting.done()
        assert await q.get_all(2) == ["a"]
        await asyncio.wait_for(waiting, 1)
        assert q.packets == 4 and await q.get_all() == ["b", "c"]

    asyncio.run(main())


def test_a_rooms_callable_is_asked_once_the_wait_is_over() -> None:
    """The taker's room can change while it waits for items (a flush begins, the budget in
    force shrinks): it is asked when there is something to take."""

    async def main() -> None:
        q: PacketQueue[str] = PacketQueue(100)
        room = [100]
        getter = asyncio.create_task(q.get_all(lambda: room[0]))
        await asyncio.sleep(0.01)
        await q.put("x", 2)
        await q.put("y", 2)
        room[0] = 2
        assert await getter == ["x"] and q.packets == 2

    asyncio.run(main())
