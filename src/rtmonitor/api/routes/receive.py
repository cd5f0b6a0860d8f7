"""The HTTP receivers: POST /v1/telemetry (JSON packets) and POST /v1/metrics (OTLP/HTTP).

Thin: the token is checked here (`Authorization: Bearer`, the `ingest` scope, as gRPC's
ingest RPCs require; never the dashboard's cookie: a cookie route must stay a read), the
body is read, bounded (--http-ingest-max-bytes, 413 past it), and handed with the headers
that matter to this process's ingest node (deps.HttpIngest), whose reply is sent as it is.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Security
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials

from rtmonitor.api.deps import ApiDep, ApiState, HttpIngest
from rtmonitor.api.schemas import IngestRefusal, TelemetryAnswer, TelemetryPacket
from rtmonitor.api.security import REFUSALS as AUTH_REFUSALS
from rtmonitor.api.security import bearer
from rtmonitor.auth import AuthError, Principal, require
from rtmonitor.model import HttpReply

router = APIRouter(tags=["ingest"])

_PACKET_SCHEMA = TelemetryPacket.model_json_schema()
_TELEMETRY_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "oneOf": [
                        _PACKET_SCHEMA,
                        {"type": "array", "items": _PACKET_SCHEMA, "maxItems": 10_000},
                    ]
                },
                "example": [
                    {"device_id": "sensor-1", "kind": "env", "values": {"temp": 21.5}},
                    {"device_id": "sensor-2", "ts": 1767225600000, "values": {"temp": 19}},
                ],
            }
        },
    }
}
_OTLP_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/x-protobuf": {"schema": {"type": "string", "format": "binary"}},
            "application/json": {"schema": {"type": "object"}},
        },
    }
}
_REFUSALS: dict[int | str, dict[str, Any]] = {
    **AUTH_REFUSALS,
    413: {"model": IngestRefusal, "description": "Body over --http-ingest-max-bytes"},
    503: {"model": IngestRefusal, "description": "Queue full or Redis away: retry"},
}


def _refusal(status: int, reason: str, detail: str, retry: bool = False) -> JSONResponse:
    headers = {"Retry-After": "1"} if retry else None
    return JSONResponse(
        status_code=status, content={"detail": detail, "reason": reason}, headers=headers
    )


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]


def _peer(request: Request) -> str:
    return request.client.host if request.client is not None else ""


def _principal(api: ApiState, request: Request, surface: str) -> Principal | JSONResponse:
    """The sender's token, with the `ingest` scope; else 401/403, counted and logged."""
    try:
        principal = api.auth.authenticate(request.headers.get("authorization"))
        require(principal, "ingest")
    except AuthError as exc:
        api.auth.refuse(surface, _peer(request), exc)
        if exc.status == "unauthenticated":
            return JSONResponse(
                status_code=401,
                content={"detail": exc.message},
                headers={"WWW-Authenticate": "Bearer"},
            )
        return JSONResponse(status_code=403, content={"detail": exc.message})
    return principal


def _receivers(api: ApiState) -> HttpIngest | JSONResponse:
    """This process's HTTP receivers, or the answer saying why there are none."""
    if api.ingest is None:
        return _refusal(
            501,
            "not_served_here",
            "this process runs no ingest node (serve --workers): send over gRPC "
            "(TelemetryIngest or OTLP), or run the HTTP receivers without --workers",
        )
    receivers = api.ingest()
    if receivers is None:
        return _refusal(503, "not_ready", "ingest is not running yet: retry shortly", True)
    return receivers


async def _read_body(request: Request, api: ApiState) -> bytes | JSONResponse:
    """The whole body, or 413 as soon as it is known to be over the limit."""
    limit = api.limits.ingest_max_body_bytes
    too_large = _refusal(
        413,
        "body_too_large",
        f"the body is over {limit} bytes (--http-ingest-max-bytes): send less per request",
    )
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        api.refused["body_too_large"] += 1
        return too_large
    chunks = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            api.refused["body_too_large"] += 1
            return too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _send(reply: HttpReply) -> Response:
    return Response(
        reply.body,
        status_code=reply.status,
        media_type=reply.media_type,
        headers=dict(reply.headers),
    )


@router.post(
    "/v1/telemetry",
    summary="Ingest JSON packets (one object or a list)",
    response_model=TelemetryAnswer,
    responses={
        **_REFUSALS,
        400: {"model": IngestRefusal, "description": "Not JSON"},
        422: {"model": IngestRefusal, "description": "A field of the wrong shape (named)"},
    },
    openapi_extra=_TELEMETRY_BODY,
)
async def telemetry(
    request: Request,
    api: ApiDep,
    _: BearerDep,
    idempotency_key: Annotated[
        str | None,
        Header(
            description="Counts a retried POST once (within --dedupe-window seconds): any "
            "1-256 printable characters, unique per body."
        ),
    ] = None,
) -> Response:
    """Packets as JSON, counted like a gRPC batch: answered after the accepted packets are
    committed, with the refused ones by reason. Gzip bodies are accepted
    (`Content-Encoding: gzip`). Limits: --http-ingest-max-bytes per body (as sent and
    inflated), --max-batch-packets packets per body."""
    principal = _principal(api, request, "http-json")
    if isinstance(principal, Response):
        return principal
    receivers = _receivers(api)
    if isinstance(receivers, Response):
        return receivers
    body = await _read_body(request, api)
    if isinstance(body, Response):
        return body
    encoding = request.headers.get("content-encoding", "")
    reply = await receivers.telemetry(body, encoding, idempotency_key, principal, _peer(request))
    return _send(reply)


@router.post(
    "/v1/metrics",
    summary="Ingest OTLP metrics (OTLP/HTTP: protobuf or JSON)",
    responses={
        200: {
            "description": "ExportMetricsServiceResponse, in the request's encoding: empty, "
            "or a partial success counting the rejected data points.",
            "content": {
                "application/json": {
                    "schema": {"type": "object"},
                    "example": {
                        "partialSuccess": {
                            "rejectedDataPoints": "1",
                            "errorMessage": "1 data points rejected (no_device_id: 1); see "
                            "the README's OTLP mapping and GET /stats",
                        }
                    },
                },
                "application/x-protobuf": {
                    "schema": {"type": "string", "format": "binary"},
                    "example": "",
                },
            },
        },
        **_REFUSALS,
        400: {"description": "Not an ExportMetricsServiceRequest"},
    },
    openapi_extra=_OTLP_BODY,
)
async def otlp_metrics(request: Request, api: ApiDep, _: BearerDep) -> Response:
    """An OpenTelemetry exporter's endpoint (`OTEL_EXPORTER_OTLP_METRICS_ENDPOINT`): data
    points counted per the README's mapping, answered after their commit with OTLP's
    partial success for the rejected ones."""
    principal = _principal(api, request, "otlp")
    if isinstance(principal, Response):
        return principal
    receivers = _receivers(api)
    if isinstance(receivers, Response):
        return receivers
    body = await _read_body(request, api)
    if isinstance(body, Response):
        return body
    content_type = request.headers.get("content-type", "")
    encoding = request.headers.get("content-encoding", "")
    reply = await receivers.otlp_metrics(body, content_type, encoding, principal, _peer(request))
    return _send(reply)
