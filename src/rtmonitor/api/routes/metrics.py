"""GET /metrics (JSON pages, or the Prometheus exposition for a scraper) and
GET /metrics/{device_id}."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Path, Query, Request
from fastapi.responses import JSONResponse, Response

from rtmonitor.api.deps import ApiDep, ApiState
from rtmonitor.api.prometheus import OPENMETRICS, device_series, exposition, negotiate
from rtmonitor.api.schemas import DeviceMetrics, MetricsPage, Problem, totals
from rtmonitor.api.security import REFUSALS, read_access
from rtmonitor.model import DEVICE_ID_MAX, DeviceRecord
from rtmonitor.storage.store import SortField, SortTooBroad

# Devices fetched per step of a scrape.
SCRAPE_CHUNK = 100
# Devices of a JSON page fetched and rendered per turn of the event loop.
PAGE_SLICE = 100

# A `read` token (header, or the dashboard's login cookie) for every route here.
router = APIRouter(tags=["metrics"], dependencies=[Depends(read_access)], responses=REFUSALS)

Prefix = Annotated[
    str, Query(max_length=DEVICE_ID_MAX, description="Only devices whose id starts with this.")
]
Order = Literal["asc", "desc"]


@router.get(
    "/metrics",
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
    api: ApiDep,
    format: Annotated[
        Literal["json", "prometheus", "openmetrics"] | None,
        Query(description="Force a format; by default the Accept header decides."),
    ] = None,
    prefix: Prefix = "",
    sort: Annotated[SortField, Query(description="Order devices by this field.")] = "device_id",
    order: Annotated[Order, Query()] = "asc",
    offset: Annotated[int, Query(ge=0, le=10_000_000)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> Response:
    """All devices, paginated, sortable and filterable by id prefix, plus the totals.

    Prometheus scrapes the same path: with `Accept: text/plain` or OpenMetrics it gets
    the exposition format, with per-device series for the busiest devices only.
    """
    # Built and rendered under the semaphore, sent after: the page's memory is released
    # before the next one is built, and a slow reader holds no turn.
    async with api.pages:
        content_type = negotiate(request.headers.get("accept"), format)
        if content_type is not None and format != "json":
            return await _scrape(api, content_type)
        return await _page(api, prefix, sort, order, offset, limit)


@router.get(
    "/metrics/{device_id:path}",
    response_model=DeviceMetrics,
    responses={404: {"model": Problem, "description": "No packet from this device yet."}},
)
async def device_metrics(
    api: ApiDep,
    device_id: Annotated[str, Path(min_length=1, max_length=DEVICE_ID_MAX)],
) -> DeviceMetrics | JSONResponse:
    """One device's counters."""
    record = await api.store.get_device(device_id)
    if record is None:
        return JSONResponse(
            status_code=404,
            content={
                "detail": f"unknown device {device_id!r}: no packet from it has been "
                "counted yet (see GET /metrics for the known devices)"
            },
        )
    return api.render.device(record)


async def _page(
    api: ApiState, prefix: str, sort: SortField, order: Order, offset: int, limit: int
) -> Response:
    """A JSON page, or 400 if the prefix matches too many devices to rank."""
    store, max_ranked = api.store, api.limits.prefix_sort_max_devices
    # the ids and the totals are independent: one wait for both
    try:
        (matched, ids), total = await asyncio.gather(
            store.list_ids(
                prefix=prefix,
                sort=sort,
                descending=order == "desc",
                offset=offset,
                limit=limit,
                max_ranked=max_ranked,
            ),
            store.totals(),
        )
    except SortTooBroad as exc:
        api.refused["prefix_sort_too_broad"] += 1
        return JSONResponse(
            status_code=400,
            content={
                "detail": f"{exc.matched} devices match prefix {prefix!r}; sorting them by "
                f"{sort} is limited to {max_ranked} "
                "(--prefix-sort-max-devices): narrow the prefix, or sort by device_id"
            },
        )
    head = MetricsPage(
        totals=totals(total),
        matched=matched,
        offset=offset,
        limit=limit,
        sort=sort,
        order=order,
        devices=[],
    ).model_dump_json()
    assert head.endswith('"devices":[]}')  # devices is the last field
    # Fetched and rendered a slice at a time, yielding in between: a page of 1,000 devices
    # with 64 readings each in one step would stall every other request (RESULTS.md).
    parts: list[str] = []
    for start in range(0, len(ids), PAGE_SLICE):
        if start:
            await asyncio.sleep(0)
        records = await store.get_devices(ids[start : start + PAGE_SLICE])
        parts.extend(map(api.render.device_json, records))
    body = "".join((head[:-2], ",".join(parts), "]}"))
    return Response(body, media_type="application/json")


async def _scrape(api: ApiState, content_type: str) -> Response:
    """The Prometheus or OpenMetrics exposition."""
    total, stats = await asyncio.gather(api.store.totals(), api.stats())
    busiest, omitted = await _scrape_devices(api, total.devices)
    body = exposition(
        total,
        busiest,
        stats,
        api.api_stats(),
        offline_after_s=api.limits.offline_after_s,
        openmetrics=content_type == OPENMETRICS,
        omitted=omitted,
    )
    return Response(body, media_type=content_type)


async def _scrape_devices(api: ApiState, known: int) -> tuple[list[DeviceRecord], dict[str, int]]:
    """The busiest devices whose series fit in --prometheus-max-series (in order, up to
    the first that does not fit), and how many devices were left out, by reason."""
    ranked = min(known, api.limits.prometheus_max_devices)
    kept: list[DeviceRecord] = []
    budget = api.limits.prometheus_max_series
    # Ranked once (one consistent order), then fetched a chunk at a time until the series
    # budget is spent: fat devices cost what fits, not --prometheus-max-devices of them.
    _, ids = await api.store.list_ids(sort="packets", descending=True, limit=ranked)
    for start in range(0, len(ids), SCRAPE_CHUNK):
        for device in await api.store.get_devices(ids[start : start + SCRAPE_CHUNK]):
            budget -= device_series(device)
            if budget < 0:
                break
            kept.append(device)
        if budget < 0:
            break
    omitted = {"max_devices": known - ranked, "max_series": max(ranked - len(kept), 0)}
    return kept, omitted
