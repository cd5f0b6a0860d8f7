"""What the process's nodes share: an ordered start and stop, as an async context manager."""

from __future__ import annotations

from types import TracebackType
from typing import Self


class Node:
    """A part of the process (the ingest node, the HTTP node) that starts and stops in
    order. Used with `async with`: a start that fails half-way is stopped, so stop() must
    cope with whatever start() got to; calling stop() twice is harmless."""

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        try:
            await self.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
