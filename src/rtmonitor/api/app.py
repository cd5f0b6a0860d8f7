"""The FastAPI application: GET /metrics, /metrics/{device_id}, /healthz, /readyz, /docs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pathlib
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from rtmonitor import __version__
from rtmonitor.api.prometheus import OPENMETRICS, device_series, exposition, negotiate
from rtmonitor.api.schemas import DeviceMetrics, MetricsPage, Problem, Readiness, Totals
from rtmonitor.api.stream import TRANSPORT, ChangeFeed, EventStream
from rtmonitor.model import ServiceStats
from rtmonitor.storage.store import RedisStore, SortField, SortTooBroad

logger = logging.getLogger(__name__)

STATIC = pathlib.Path(__file__).parent / "static"
# Devices fetched per step of a scrape: it stops fetching once --prometheus-max-series is
# spent, so fat devices cost what fits in the scrape, not --prometheus-max-devices of them.
SCRAPE_CHUNK = 100
# Devices of a JSON page fetched and rendered per turn of the event loop.
PAGE_SLICE = 50

# Returns the reasons the service is not ready to ingest (empty list: ready).
ReadinessCheck = Callable[[], Awaitable[list[str]]]
# Returns the self-metrics of this process and of the ingest instances on its Redis.
StatsSource = Callable[[], Awaitable[ServiceStats]]


class _Api(FastAPI):
    """FastAPI that puts the server's transport of each connection into the scope (when
    the server's `send` is a method of an object that has one, as uvicorn's is), so that a
    GET /stream whose client stopped reading can be aborted (stream.EventStream)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        transport = getattr(getattr(send, "__self__", None), "transport", None)
        if transport is not None and hasattr(transport, "abort"):
            scope[TRANSPORT] = transport
        await super().__call__(scope, receive, send)


def create_app(
    store: RedisStore,
    readiness: ReadinessCheck,
    stats: StatsSource,
    *,
    offline_after_s: float = 30.0,
    prometheus_max_devices: int = 1000,
    prometheus_max_series: int = 30_000,
    prefix_sort_max_devices: int = 10_000,
    stream_interval_s: float = 0.2,
    max_stream_subscribers: int = 100,
    stream_send_timeout_s: float = 10.0,
    max_concurrent_pages: int = 2,
) -> FastAPI:
    """Build the app around the process's one store (owned and closed by the runtime)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await feed.close()

    app = _Api(
        lifespan=lifespan,
        title="RealTimeDataMonitor",
        version=__version__,
        description=(
            "Per-device telemetry counts, ingested over gRPC (`rtmonitor.v1.TelemetryIngest`) "
            "and kept in Redis. Times are milliseconds since the Unix epoch."
        ),
    )

    def with_status(record: dict[str, Any]) -> DeviceMetrics:
        silent_ms = time.time() * 1000 - (record["last_seen"] or 0)
        return DeviceMetrics.model_validate(
            {**record, "online": silent_ms <= offline_after_s * 1000}
        )

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/", include_in_schema=False)
    async def dashboard() -> FileResponse:
        """The web dashboard (static files, no build step)."""
        return FileResponse(STATIC / "index.html")

    feed = ChangeFeed(store, stream_interval_s, max_stream_subscribers)
    app.state.feed = feed
    refused: Counter[str] = Counter()  # requests refused by a limit, by reason
    # A page of 1,000 devices with 64 readings each, or a scrape, holds tens of MB while it
    # is fetched and rendered: the rest wait their turn (the connection limit bounds how
    # many wait), so many at once cannot add up.
    pages = asyncio.Semaphore(max_concurrent_pages)

    def render(record: dict[str, Any]) -> dict[str, Any]:
        return with_status(record).model_dump(mode="json")

    def api_stats() -> dict[str, Any]:
        """This API's own self-metrics."""
        return {"refused_by_reason": dict(sorted(refused.items())), "stream": feed.stats()}

    @app.get(
        "/stream",
        tags=["metrics"],
        summary="Live updates (Server-Sent Events)",
        response_class=EventStream,
        status_code=200,
        responses={
            503: {
                "description": "--max-stream-subscribers clients are connected already.",
                "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/Problem"}}
                },
            }
        },
    )
    async def stream(
        prefix: Annotated[
            str, Query(max_length=128, description="Only devices whose id starts with this.")
        ] = "",
    ) -> Response:
        """`event: update` with the devices that changed (at most once per flush interval)
        and the totals; a comment every 15 s keeps proxies from closing an idle stream. A
        client that reads slowly gets the latest state of each device, not a backlog: an
        event carries at most ~256 KB of devices and says how many are still `pending`
        (they follow at once); `lagged: true` means some changes could not be kept (re-read
        GET /metrics). A client whose writes stay blocked for --stream-send-timeout is
        disconnected."""
        if feed.full:
            refused["stream_subscribers"] += 1
            return JSONResponse(
                status_code=503,
                content={
                    "detail": f"{feed.max_subscribers} GET /stream clients are connected, the "
                    "most this instance serves (--max-stream-subscribers); retry later or "
                    "use GET /metrics"
                },
                headers={"Retry-After": "10"},
            )
        return EventStream(feed, feed.subscribe(prefix), render, stream_send_timeout_s)

    @app.exception_handler(RedisError)
    async def redis_unavailable(request: Request, exc: RedisError) -> JSONResponse:
        logger.warning("%s %s: Redis error: %s", request.method, request.url.path, exc)
        return JSONResponse(
            status_code=503,
            content={"detail": f"Redis is unavailable ({type(exc).__name__}); retry shortly"},
            headers={"Retry-After": "1"},
        )

    @app.get("/healthz", tags=["health"], summary="Liveness: the process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="Readiness: Redis reachable and ingest serving",
        response_model=Readiness,
        responses={503: {"model": Readiness}},
    )
    async def readyz() -> JSONResponse:
        reasons = await readiness()
        body = Readiness(ready=not reasons, reasons=reasons).model_dump()
        return JSONResponse(status_code=503 if reasons else 200, content=body)

    @app.get("/stats", tags=["health"], summary="Self-metrics of the ingest instances")
    async def self_stats() -> dict[str, Any]:
        """Queue depth, pending deltas, flush latency, rejections by reason, Redis errors and
        recoveries, duplicate batches skipped, journals recovered: summed over the ingest
        instances on this Redis (the `ingest`, `queue`, `pending`, `flush` and `recovery`
        sections), and for each of them (`instances`, by instance id; every ingest process
        publishes its figures each second). `http`, `api` and `embedded_redis` are this
        process's own."""
        return {**(await stats()).to_json(), "api": api_stats()}

    @app.get(
        "/metrics",
        tags=["metrics"],
        response_model=MetricsPage,
        responses={
            200: {
                "content": {
                    "text/plain; version=0.0.4": {},
                    "application/openmetrics-text; version=1.0.0": {},
                },
                "description": "JSON; or the Prometheus/OpenMetrics exposition when the "
                "Accept header asks for it (as Prometheus does) or with `format`.",
            }
        },
    )
    async def list_metrics(
        request: Request,
        format: Annotated[
            Literal["json", "prometheus", "openmetrics"] | None,
            Query(description="Force a format; by default the Accept header decides."),
        ] = None,
        prefix: Annotated[
            str, Query(max_length=128, description="Only devices whose id starts with this.")
        ] = "",
        sort: Annotated[SortField, Query(description="Order devices by this field.")] = (
            "device_id"
        ),
        order: Annotated[Literal["asc", "desc"], Query()] = "asc",
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Response:
        """All devices, paginated, sortable and filterable by id prefix, plus the totals.

        Prometheus scrapes the same path: with `Accept: text/plain` or OpenMetrics it gets
        the exposition format, with per-device series for the busiest devices only.
        """
        async with pages:
            return await build_page(request, format, prefix, sort, order, offset, limit)

    async def build_page(
        request: Request,
        format: str | None,
        prefix: str,
        sort: SortField,
        order: Literal["asc", "desc"],
        offset: int,
        limit: int,
    ) -> Response:
        """GET /metrics, rendered (so the page's memory is released before the next one)."""
        content_type = negotiate(request.headers.get("accept"), format)
        if content_type is not None and format != "json":
            totals = await store.totals()
            busiest, omitted = await scrape_devices(totals["devices"])
            body = exposition(
                totals,
                busiest,
                await stats(),
                api_stats(),
                offline_after_s=offline_after_s,
                openmetrics=content_type == OPENMETRICS,
                omitted=omitted,
            )
            return Response(body, media_type=content_type)
        # the ids and the totals are independent: one wait for both
        try:
            (matched, ids), totals = await asyncio.gather(
                store.list_ids(
                    prefix=prefix,
                    sort=sort,
                    descending=order == "desc",
                    offset=offset,
                    limit=limit,
                    max_ranked=prefix_sort_max_devices,
                ),
                store.totals(),
            )
        except SortTooBroad as exc:
            refused["prefix_sort_too_broad"] += 1
            return JSONResponse(
                status_code=400,
                content={
                    "detail": f"{exc.matched} devices match prefix {prefix!r}; sorting them by "
                    f"{sort} is limited to {prefix_sort_max_devices} "
                    "(--prefix-sort-max-devices): narrow the prefix, or sort by device_id"
                },
            )
        head = MetricsPage(
            totals=Totals.model_validate(totals),
            matched=matched,
            offset=offset,
            limit=limit,
            sort=sort,
            order=order,
            devices=[],
        ).model_dump_json()
        assert head.endswith('"devices":[]}')  # devices is the last field
        # Fetched and rendered a slice at a time, yielding in between: a page of 1,000
        # devices with 64 readings each is ~1 s of work, which must not stall the loop.
        parts: list[str] = []
        for start in range(0, len(ids), PAGE_SLICE):
            records = await store.get_devices(ids[start : start + PAGE_SLICE])
            parts.extend(with_status(d).model_dump_json() for d in records)
            await asyncio.sleep(0)
        body = "".join((head[:-2], ",".join(parts), "]}"))
        return Response(body, media_type="application/json")

    async def scrape_devices(known: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
        """The busiest devices whose series fit in --prometheus-max-series (in order, up to
        the first that does not fit), and how many devices were left out, by reason."""
        ranked = min(known, prometheus_max_devices)
        kept: list[dict[str, Any]] = []
        budget = prometheus_max_series
        offset = 0
        while offset < ranked:
            size = min(SCRAPE_CHUNK, ranked - offset)
            _, chunk = await store.list_devices(
                sort="packets", descending=True, offset=offset, limit=size
            )
            offset += size
            for device in chunk:
                budget -= device_series(device)
                if budget < 0:
                    break
                kept.append(device)
            if budget < 0 or not chunk:
                break
        omitted = {"max_devices": known - ranked, "max_series": max(ranked - len(kept), 0)}
        return kept, omitted

    @app.get(
        "/metrics/{device_id:path}",
        tags=["metrics"],
        response_model=DeviceMetrics,
        responses={404: {"model": Problem, "description": "No packet from this device yet."}},
    )
    async def device_metrics(
        device_id: Annotated[str, Path(min_length=1, max_length=128)],
    ) -> DeviceMetrics | JSONResponse:
        """One device's counters."""
        record = await store.get_device(device_id)
        if record is None:
            return JSONResponse(
                status_code=404,
                content={
                    "detail": f"unknown device {device_id!r}: no packet from it has been "
                    "counted yet (see GET /metrics for the known devices)"
                },
            )
        return with_status(record)

    return app
