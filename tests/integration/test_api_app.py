"""The HTTP app's shape: the lifespan owns the live feed, routes share one ApiState, the
records every renderer reads define the rate windows once."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
from helpers import run

from rtmonitor.api.deps import ApiState
from rtmonitor.api.node import HttpNode
from rtmonitor.api.schemas import JsonRender, Rate
from rtmonitor.config import Settings
from rtmonitor.model import (
    RATE_WINDOWS_S,
    DeviceRecord,
    PipelineStats,
    Rates,
    ServiceStats,
    ValueRecord,
    rate_key,
)
from rtmonitor.storage.embedded import EmbeddedRedis
from rtmonitor.storage.store import RedisStore


async def _ready() -> list[str]:
    return []


async def _stats() -> ServiceStats:
    return ServiceStats(
        instance_id=None,
        uptime_s=0.0,
        ready=True,
        not_ready_reasons=[],
        instances={},
        total=PipelineStats(),
    )


def test_the_lifespan_builds_the_state_and_closes_the_feed(redis_server: EmbeddedRedis) -> None:
    settings = Settings(host="127.0.0.1", http_port=0, grpc_port=0, flush_interval=0.05)

    async def scenario() -> tuple[ApiState, asyncio.Task[None] | None, dict[str, object]]:
        async with (
            RedisStore.from_url(redis_server.url, "t") as store,
            HttpNode(settings, store, _ready, _stats) as node,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{node.port}") as http,
        ):
            state: ApiState = node.app.state.api
            assert state.limits.stream_interval_s == 0.05  # from Settings
            async with http.stream("GET", "/stream") as response:
                assert response.status_code == 200
                async for line in response.aiter_lines():
                    if line.startswith("data:"):  # the first event: the totals
                        break
                task = state.feed._task
                assert task is not None and not task.done()
            stats = (await http.get("/stats")).json()
            while stats["api"]["event_loop"]["probes"] == 0:  # (one every 50 ms)
                await asyncio.sleep(0.02)
                stats = (await http.get("/stats")).json()
        return state, task, stats

    state, task, stats = run(scenario())
    assert task is not None and task.done()  # the lifespan stopped the poller
    assert stats["api"]["stream"]["max_subscribers"] == state.limits.max_stream_subscribers
    # the loop's lag probe: started with the app, stopped with it
    event_loop = stats["api"]["event_loop"]
    assert event_loop["probes"] > 0 and event_loop["lag_ms_buckets"]["+Inf"] > 0
    assert state.loop_lag._task is None


def test_the_rate_windows_are_defined_once() -> None:
    rates = Rates(
        packets_per_s={w: float(w) for w in RATE_WINDOWS_S},
        bytes_per_s={w: 2.0 * w for w in RATE_WINDOWS_S},
    )
    keys = [rate_key(unit, w) for w in RATE_WINDOWS_S for unit in ("packets", "bytes")]
    assert list(rates.to_json()) == keys == list(Rate.model_fields)
    assert keys[:2] == ["packets_per_s_10s", "bytes_per_s_10s"]  # the JSON contract
    assert Rate.model_validate(rates.to_json()).model_dump() == rates.to_json()


def test_an_overflowed_sum_renders_as_null_with_overflow() -> None:
    no_rate = Rates(
        packets_per_s=dict.fromkeys(RATE_WINDOWS_S, 0.0),
        bytes_per_s=dict.fromkeys(RATE_WINDOWS_S, 0.0),
    )
    values = {
        "ok": ValueRecord(count=2, sum=3.0, min=1.0, max=2.0, last=2.0, last_timestamp_ms=5),
        "big": ValueRecord(count=2, sum=math.inf, min=1e308, max=1e308, last=1e308,
                           last_timestamp_ms=5),
    }  # fmt: skip
    record = DeviceRecord(device_id="d", packets=2, bytes=0, first_seen=None, last_seen=None,
                          kinds={}, values=values, rate=no_rate)  # fmt: skip
    doc = json.loads(JsonRender(offline_after_s=30).device_json(record))
    assert doc["values"]["ok"] == {
        "count": 2, "sum": 3.0, "min": 1.0, "max": 2.0, "mean": 1.5, "overflow": False,
        "last": 2.0, "last_timestamp_ms": 5,
    }  # fmt: skip
    assert (doc["values"]["big"]["sum"], doc["values"]["big"]["mean"]) == (None, None)
    assert doc["values"]["big"]["overflow"] is True
    assert doc["online"] is False and doc["first_seen"] is None
