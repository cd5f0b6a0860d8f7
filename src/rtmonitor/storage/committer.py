"""The pipeline's committer (pipeline/commit.py) on Redis: RedisStore's plan, journal and
scripts behind the protocol, with Redis' errors as CommitUnavailable."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from redis.exceptions import OutOfMemoryError, RedisError

from rtmonitor.logs import redact_url
from rtmonitor.model import BatchId, Claim, CommitUnavailable, FlushDelta
from rtmonitor.storage.store import Call, RedisStore, journal_chunks


@asynccontextmanager
async def _unavailable() -> AsyncIterator[None]:
    """Redis unreachable, timing out or refusing a write (OOM, READONLY): worth retrying."""
    try:
        yield
    except (RedisError, OSError) as exc:
        # redis-py takes the OOM code off Redis' message: say it, as a script error would
        name = "OutOfMemoryError (OOM)" if isinstance(exc, OutOfMemoryError) else type(exc).__name__
        raise CommitUnavailable(redact_url(f"{name}: {exc}")) from exc


def _flush_id(instance: str, seq: int) -> str:
    """A flush's journal name; recovery reads the instance back from it (orphan_journals)."""
    return f"{instance}:{seq}"


class RedisFlush:
    """One flush's merge calls and batch keys; each step may be run again after a failure."""

    __slots__ = ("_store", "_flush_id", "_keys", "_calls", "_writes")

    def __init__(
        self, store: RedisStore, flush_id: str, keys: list[str], calls: list[Call], writes: bool
    ) -> None:
        self._store = store
        self._flush_id = flush_id
        self._keys = keys
        self._calls = calls
        self._writes = writes  # False: nothing to merge (a flush of resends only)

    async def prepare(self) -> dict[int, Claim]:
        if not self._keys:  # nothing to deduplicate: no journal needed
            return {}
        async with _unavailable():
            taken = await self._store.prepare(self._flush_id, self._keys, self._calls)
        return {
            pos: Claim.COMMITTED if state == "c" else Claim.PENDING for pos, state in taken.items()
        }

    async def apply(self) -> int:
        if not self._writes:
            return 0
        async with _unavailable():
            return await self._store.apply(self._calls)

    async def finalize(self, dedupe_window_s: int) -> None:
        if self._keys:
            async with _unavailable():
                await self._store.finalize(
                    self._flush_id, self._keys, dedupe_window_s, journal_chunks(len(self._calls))
                )


class RedisCommitter:
    """Implements pipeline.commit.Committer with a RedisStore (one per process)."""

    def __init__(self, store: RedisStore) -> None:
        self.store = store

    def encode(
        self, delta: FlushDelta, batch_ids: Sequence[BatchId], instance: str, seq: int
    ) -> RedisFlush:
        store = self.store
        calls = store.plan(delta, instance, seq)
        keys = [store.layout.batch(producer, n) for producer, n in batch_ids]
        return RedisFlush(store, _flush_id(instance, seq), keys, calls, bool(delta))

    async def heartbeat(self, instance: str, ttl_s: int) -> None:
        async with _unavailable():
            await self.store.heartbeat(instance, ttl_s)

    async def orphans(self, instance: str) -> list[str]:
        async with _unavailable():
            return await self.store.orphan_journals(instance)

    async def recover(self, flush_id: str, instance: str, dedupe_window_s: int) -> bool:
        async with _unavailable():
            return await self.store.recover(flush_id, instance, dedupe_window_s)

    @property
    def retention_s(self) -> int:
        return self.store.retention_s

    async def expire_silent_devices(self, now_ms: int) -> int:
        async with _unavailable():
            return await self.store.expire_silent_devices(now_ms)
