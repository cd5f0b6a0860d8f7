"""The FastAPI application: routers by concern (routes/), the state they share (deps.py),
and a lifespan that owns the live feed.

GET /metrics, /metrics/{device_id}, /stream, /healthz, /readyz, /stats, the dashboard at /,
the HTTP receivers POST /v1/telemetry and /v1/metrics, POST /login and /logout (the
dashboard's session cookie), and the OpenAPI contract at /docs. Who may read what:
api/security.py.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.types import Receive, Scope, Send

from rtmonitor import __version__
from rtmonitor.api import security
from rtmonitor.api.deps import ApiLimits, ApiState, IngestSource, ReadinessCheck, StatsSource
from rtmonitor.api.routes import dashboard, docs, live, metrics, ops, receive
from rtmonitor.api.stream import TRANSPORT
from rtmonitor.auth import TokenRegistry
from rtmonitor.storage.store import RedisStore

logger = logging.getLogger(__name__)


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
    limits: ApiLimits,
    ingest: IngestSource | None = None,
    *,
    auth: TokenRegistry | None = None,
    secure_cookies: bool = False,
) -> FastAPI:
    """Build the app around the process's one store (owned and closed by the runtime);
    `ingest`: the HTTP receivers of this process's ingest node (None: it has none);
    `auth` None or disabled: every route is open (loopback, or --allow-unauthenticated)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = app.state.api = ApiState.open(
            store, readiness, stats, limits, auth, secure_cookies, ingest
        )
        state.loop_lag.start()
        try:
            yield
        finally:
            await state.aclose()

    app = _Api(
        lifespan=lifespan,
        # served by routes/docs.py from an installed package, not from a CDN
        docs_url=None,
        redoc_url=None,
        title="RealTimeDataMonitor",
        version=__version__,
        description=(
            "Per-device telemetry counts, ingested over gRPC (`rtmonitor.v1.TelemetryIngest`) "
            "and kept in Redis. Times are milliseconds since the Unix epoch."
        ),
    )
    app.add_exception_handler(RedisError, redis_unavailable)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, invalid_request)  # type: ignore[arg-type]
    routers = (metrics.router, live.router, ops.router, receive.router, security.router)
    for router in (*routers, dashboard.router, docs.router):
        app.include_router(router)
    app.mount("/static", dashboard.static_files(), name="static")
    app.mount(docs.ASSETS_PATH, docs.assets(), name="docs-assets")
    return app


async def redis_unavailable(request: Request, exc: RedisError) -> JSONResponse:
    """A read that Redis could not answer: 503, retry shortly."""
    logger.warning("%s %s: Redis error: %s", request.method, request.url.path, exc)
    return JSONResponse(
        status_code=503,
        content={"detail": f"Redis is unavailable ({type(exc).__name__}); retry shortly"},
        headers={"Retry-After": "1"},
    )


# What a 422 keeps of each of pydantic's errors: where and what, never the value sent.
_ERROR_KEYS = ("loc", "msg", "type")


async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    """A request of the wrong shape: 422 naming each bad field and what is wrong with it.

    FastAPI's own handler also echoes the value (`input`, and `ctx` may quote it): a
    token posted to /login as a form, or pasted into the wrong field, would come back in
    the response and in any log or proxy that keeps responses."""
    errors = [{k: error[k] for k in _ERROR_KEYS if k in error} for error in exc.errors()]
    return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})
