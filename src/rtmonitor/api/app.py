"""The FastAPI application: GET /metrics, /metrics/{device_id}, /healthz, /readyz, /docs."""

from __future__ import annotations

import asyncio
import json
import logging
import pathlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from redis.exceptions import RedisError

from rtmonitor import __version__
from rtmonitor.api.prometheus import OPENMETRICS, exposition, negotiate
from rtmonitor.api.schemas import DeviceMetrics, MetricsPage, Problem, Readiness, Totals
from rtmonitor.api.stream import ChangeFeed
from rtmonitor.storage.store import RedisStore, SortField

logger = logging.getLogger(__name__)

STATIC = pathlib.Path(__file__).parent / "static"

# Returns the reasons the service is not ready to ingest (empty list: ready).
ReadinessCheck = Callable[[], Awaitable[list[str]]]
# Returns the service's self-metrics (the pipeline's, this process only).
StatsSource = Callable[[], Awaitable[dict[str, Any]]]


def create_app(
    store: RedisStore,
    readiness: ReadinessCheck,
    stats: StatsSource,
    *,
    offline_after_s: float = 30.0,
    prometheus_max_devices: int = 1000,
    stream_interval_s: float = 0.2,
) -> FastAPI:
    """Build the app around the process's one store (owned and closed by the service)."""
    app = FastAPI(
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

    feed = ChangeFeed(store, stream_interval_s)
    app.state.feed = feed

    @app.get("/stream", tags=["metrics"], summary="Live updates (Server-Sent Events)")
    async def stream(
        request: Request,
        prefix: Annotated[
            str, Query(max_length=128, description="Only devices whose id starts with this.")
        ] = "",
    ) -> StreamingResponse:
        """`event: update` with the devices that changed (at most once per flush interval)
        and the totals; a comment every 15 s keeps proxies from closing an idle stream. A
        client that reads slowly gets the latest state of each device, not a backlog."""
        sub = feed.subscribe(prefix)

        async def events() -> AsyncIterator[str]:
            try:
                yield "retry: 2000\n\n"
                while not await request.is_disconnected():
                    try:
                        update = await asyncio.wait_for(sub.next(), 15)
                    except TimeoutError:
                        yield ": keep-alive\n\n"
                        continue
                    update["devices"] = [
                        with_status(d).model_dump(mode="json") for d in update["devices"]
                    ]
                    yield f"event: update\ndata: {json.dumps(update, separators=(',', ':'))}\n\n"
            finally:
                feed.unsubscribe(sub)

        return StreamingResponse(
            events(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

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

    @app.get("/stats", tags=["health"], summary="Self-metrics of this instance's pipeline")
    async def self_stats() -> dict[str, Any]:
        """Queue depth, pending deltas, flush latency, rejections by reason, Redis errors and
        recoveries, duplicate batches skipped, journals recovered — for this process."""
        return await stats()

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
    ) -> MetricsPage | Response:
        """All devices, paginated, sortable and filterable by id prefix, plus the totals.

        Prometheus scrapes the same path: with `Accept: text/plain` or OpenMetrics it gets
        the exposition format, with per-device series for the busiest devices only.
        """
        content_type = negotiate(request.headers.get("accept"), format)
        if content_type is not None and format != "json":
            _, busiest = await store.list_devices(
                sort="packets", descending=True, limit=prometheus_max_devices
            )
            body = exposition(
                await store.totals(),
                busiest,
                await stats(),
                offline_after_s=offline_after_s,
                openmetrics=content_type == OPENMETRICS,
            )
            return Response(body, media_type=content_type)
        # the page and the totals are independent: one wait for both
        (matched, devices), totals = await asyncio.gather(
            store.list_devices(
                prefix=prefix, sort=sort, descending=order == "desc", offset=offset, limit=limit
            ),
            store.totals(),
        )
        return MetricsPage(
            totals=Totals.model_validate(totals),
            matched=matched,
            offset=offset,
            limit=limit,
            sort=sort,
            order=order,
            devices=[with_status(d) for d in devices],
        )

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
