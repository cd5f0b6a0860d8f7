"""What the HTTP app holds while it runs, and how a route asks for it.

The lifespan (app.py) builds one ApiState and puts it on `app.state`; routes take it as a
dependency, `api: ApiDep`, in the FastAPI template's `Annotated[..., Depends(...)]` form.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Protocol, Self

from fastapi import Depends, Request

from rtmonitor.api.loop import LoopLag, LoopLagStats
from rtmonitor.api.schemas import JsonRender
from rtmonitor.api.stream import ChangeFeed, StreamStats
from rtmonitor.auth import Principal, TokenRegistry
from rtmonitor.config import Settings
from rtmonitor.model import HttpReply, ServiceStats
from rtmonitor.storage.store import RedisStore

# Returns the reasons the service is not ready to ingest (empty list: ready).
ReadinessCheck = Callable[[], Awaitable[list[str]]]
# Returns the self-metrics of this process and of the ingest instances on its Redis.
StatsSource = Callable[[], Awaitable[ServiceStats]]


class HttpIngest(Protocol):
    """The HTTP receivers of this process's ingest node (ingest/otlp.py, ingest/http_json.py):
    the routes hand them the body and the headers that matter, and send back their reply.
    The api room knows them only by this protocol (tests/unit/test_layering.py)."""

    async def otlp_metrics(
        self, body: bytes, content_type: str, encoding: str, principal: Principal, peer: str
    ) -> HttpReply:
        """POST /v1/metrics, from `principal` (its `ingest` scope checked) at `peer`."""
        ...

    async def telemetry(
        self,
        body: bytes,
        encoding: str,
        idempotency_key: str | None,
        principal: Principal,
        peer: str,
    ) -> HttpReply:
        """POST /v1/telemetry; the Idempotency-Key is scoped by the principal's token."""
        ...


# This process's HTTP receivers, or None while its ingest node is not running (starting up).
IngestSource = Callable[[], HttpIngest | None]


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiLimits:
    """The HTTP API's settings, taken from Settings (which has the defaults)."""

    offline_after_s: float
    prometheus_max_devices: int
    prometheus_max_series: int
    prefix_sort_max_devices: int
    stream_interval_s: float  # the live feed polls once per flush interval
    max_stream_subscribers: int
    stream_send_timeout_s: float
    max_concurrent_pages: int
    ingest_max_body_bytes: int = 16 * 1024 * 1024  # POST /v1/telemetry and /v1/metrics

    @classmethod
    def from_settings(cls, s: Settings) -> Self:
        return cls(
            offline_after_s=s.offline_after,
            prometheus_max_devices=s.prometheus_max_devices,
            prometheus_max_series=s.prometheus_max_series,
            prefix_sort_max_devices=s.prefix_sort_max_devices,
            stream_interval_s=s.flush_interval,
            max_stream_subscribers=s.max_stream_subscribers,
            stream_send_timeout_s=s.stream_send_timeout,
            max_concurrent_pages=s.max_concurrent_pages,
            ingest_max_body_bytes=s.http_ingest_max_bytes,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiStats:
    """This API's own self-metrics: requests refused by a limit, and GET /stream."""

    refused_by_reason: dict[str, int] = field(default_factory=dict)
    stream: StreamStats = field(default_factory=StreamStats)
    event_loop: LoopLagStats | None = None  # (None before the app's lifespan began)

    def to_json(self) -> dict[str, Any]:
        """The `api` section of GET /stats."""
        return {
            "refused_by_reason": dict(sorted(self.refused_by_reason.items())),
            "stream": dataclasses.asdict(self.stream),
            "event_loop": self.event_loop.to_json() if self.event_loop is not None else None,
        }


@dataclass(slots=True, kw_only=True)
class ApiState:
    """The process's one store (owned and closed by the runtime), the readiness and stats
    sources, the limits, and what the app owns: the live feed, the page semaphore and the
    counts of refused requests."""

    store: RedisStore
    readiness: ReadinessCheck
    stats: StatsSource
    limits: ApiLimits
    feed: ChangeFeed
    render: JsonRender
    # A page of 1,000 devices with 64 readings each, or a scrape, holds tens of MB while it
    # is fetched and rendered: the rest wait their turn (the connection limit bounds how
    # many wait), so many at once cannot add up.
    pages: asyncio.Semaphore
    refused: Counter[str] = field(default_factory=Counter)  # requests refused, by reason
    # how late the loop runs what is due (started by the app's lifespan)
    loop_lag: LoopLag = field(default_factory=LoopLag)
    # The tokens in force (disabled without an auth file), and whether the login cookie
    # is marked Secure (the service serves TLS).
    auth: TokenRegistry = field(default_factory=lambda: TokenRegistry(None))
    secure_cookies: bool = False
    # None: this process serves no HTTP receivers (`serve --workers`' HTTP process)
    ingest: IngestSource | None = None

    @classmethod
    def open(
        cls,
        store: RedisStore,
        readiness: ReadinessCheck,
        stats: StatsSource,
        limits: ApiLimits,
        auth: TokenRegistry | None = None,
        secure_cookies: bool = False,
        ingest: IngestSource | None = None,
    ) -> Self:
        return cls(
            auth=auth if auth is not None else TokenRegistry(None),
            secure_cookies=secure_cookies,
            ingest=ingest,
            store=store,
            readiness=readiness,
            stats=stats,
            limits=limits,
            feed=ChangeFeed(store, limits.stream_interval_s, limits.max_stream_subscribers),
            render=JsonRender(limits.offline_after_s),
            pages=asyncio.Semaphore(limits.max_concurrent_pages),
        )

    async def aclose(self) -> None:
        """Stop the live feed's poller and the loop's probe (the store is the runtime's to
        close)."""
        await self.loop_lag.stop()
        await self.feed.close()

    def api_stats(self) -> ApiStats:
        return ApiStats(
            refused_by_reason=dict(self.refused),
            stream=self.feed.stats(),
            event_loop=self.loop_lag.stats(),
        )


async def api_state(request: Request) -> ApiState:
    """The app's state (async: FastAPI would run a plain function in a thread)."""
    state: ApiState = request.app.state.api
    return state


ApiDep = Annotated[ApiState, Depends(api_state)]
