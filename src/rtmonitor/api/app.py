"""The FastAPI application: GET /metrics, /metrics/{device_id}, /healthz, /readyz, /docs."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Path, Query, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError

from rtmonitor import __version__
from rtmonitor.api.schemas import DeviceMetrics, MetricsPage, Problem, Readiness, Totals
from rtmonitor.storage.store import RedisStore, SortField

logger = logging.getLogger(__name__)

# Returns the reasons the service is not ready to ingest (empty list: ready).
ReadinessCheck = Callable[[], Awaitable[list[str]]]
# Returns the service's self-metrics (the pipeline's, this process only).
StatsSource = Callable[[], Awaitable[dict[str, Any]]]


def create_app(store: RedisStore, readiness: ReadinessCheck, stats: StatsSource) -> FastAPI:
    """Build the app around the process's one store (owned and closed by the service)."""
    app = FastAPI(
        title="RealTimeDataMonitor",
        version=__version__,
        description=(
            "Per-device telemetry counts, ingested over gRPC (`rtmonitor.v1.TelemetryIngest`) "
            "and kept in Redis. Times are milliseconds since the Unix epoch."
        ),
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

    @app.get("/metrics", tags=["metrics"], response_model=MetricsPage)
    async def list_metrics(
        prefix: Annotated[
            str, Query(max_length=128, description="Only devices whose id starts with this.")
        ] = "",
        sort: Annotated[SortField, Query(description="Order devices by this field.")] = (
            "device_id"
        ),
        order: Annotated[Literal["asc", "desc"], Query()] = "asc",
        offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> MetricsPage:
        """All devices, paginated, sortable and filterable by id prefix, plus the totals."""
        matched, devices = await store.list_devices(
            prefix=prefix, sort=sort, descending=order == "desc", offset=offset, limit=limit
        )
        totals = await store.totals()
        return MetricsPage(
            totals=Totals.model_validate(totals),
            matched=matched,
            offset=offset,
            limit=limit,
            sort=sort,
            order=order,
            devices=[DeviceMetrics.model_validate(d) for d in devices],
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
        return DeviceMetrics.model_validate(record)

    return app
