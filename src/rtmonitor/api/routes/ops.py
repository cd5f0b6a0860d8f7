"""Operations: liveness, readiness and the self-metrics of the ingest instances."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse

from rtmonitor.api.deps import ApiDep
from rtmonitor.api.schemas import Readiness
from rtmonitor.api.security import REFUSALS, admin_access

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: Redis reachable and ingest serving",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
)
async def readyz(api: ApiDep) -> JSONResponse:
    reasons = await api.readiness()
    body = Readiness(ready=not reasons, reasons=reasons).model_dump()
    return JSONResponse(status_code=503 if reasons else 200, content=body)


@router.get(
    "/stats",
    summary="Self-metrics of the ingest instances",
    dependencies=[Depends(admin_access)],  # an `admin` token
    responses=REFUSALS,
)
async def self_stats(api: ApiDep) -> dict[str, Any]:
    """Queue depth, pending deltas, flush latency, rejections by reason, Redis errors and
    recoveries, duplicate batches skipped, journals recovered: summed over the ingest
    instances on this Redis (the `ingest`, `queue`, `pending`, `flush` and `recovery`
    sections), and for each of them (`instances`, by instance id; every ingest process
    publishes its figures each second). `http`, `api` and `embedded_redis` are this
    process's own."""
    return {**(await api.stats()).to_json(), "api": api.api_stats().to_json()}
