"""GET /stream: live updates as Server-Sent Events (the feed is in api/stream.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse, Response

from rtmonitor.api.deps import ApiDep
from rtmonitor.api.schemas import STREAM_EVENT_SCHEMA, STREAM_EXAMPLE
from rtmonitor.api.security import REFUSALS, ReadDep, read_access
from rtmonitor.api.stream import EventStream
from rtmonitor.model import DEVICE_ID_MAX

PROBLEM_REF = {"$ref": "#/components/schemas/Problem"}
# A `read` token (header, or the dashboard's login cookie: EventSource sends no header).
router = APIRouter(tags=["metrics"], dependencies=[Depends(read_access)], responses=REFUSALS)


@router.get(
    "/stream",
    summary="Live updates (Server-Sent Events)",
    response_class=EventStream,
    status_code=200,
    responses={
        200: {
            "description": "An endless stream of `update` events.",
            "content": {
                "text/event-stream": {"schema": STREAM_EVENT_SCHEMA, "example": STREAM_EXAMPLE}
            },
        },
        # JSON, not the event stream: refused before it starts (a `model` here would be
        # declared under the route's text/event-stream)
        **{
            status: {
                "description": refusal["description"],
                "content": {"application/json": {"schema": PROBLEM_REF}},
            }
            for status, refusal in REFUSALS.items()
        },
        503: {
            "description": "--max-stream-subscribers clients are connected already.",
            "headers": {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "schema": {"type": "integer", "example": 10},
                }
            },
            "content": {"application/json": {"schema": PROBLEM_REF}},
        },
    },
)
async def stream(
    api: ApiDep,
    principal: ReadDep,
    prefix: Annotated[
        str, Query(max_length=DEVICE_ID_MAX, description="Only devices whose id starts with this.")
    ] = "",
) -> Response:
    """`event: update` with the devices that changed (at most once per flush interval)
    and the totals; a comment every 15 s keeps proxies from closing an idle stream. A
    client that reads slowly gets the latest state of each device, not a backlog: an
    event carries at most ~256 KB of devices and says how many are still `pending`
    (they follow at once); `lagged: true` means some changes could not be kept (re-read
    GET /metrics). A client whose writes stay blocked for --stream-send-timeout is
    disconnected."""
    feed = api.feed
    if feed.full:
        api.refused["stream_subscribers"] += 1
        return JSONResponse(
            status_code=503,
            content={
                "detail": f"{feed.max_subscribers} GET /stream clients are connected, the "
                "most this instance serves (--max-stream-subscribers); retry later or "
                "use GET /metrics"
            },
            headers={"Retry-After": "10"},
        )
    # A stream outlives the request's token check: it ends once the token is removed.
    allowed = (lambda: api.auth.is_current(principal)) if api.auth.enabled else None
    return EventStream(
        feed, feed.subscribe(prefix), api.render, api.limits.stream_send_timeout_s, allowed
    )
