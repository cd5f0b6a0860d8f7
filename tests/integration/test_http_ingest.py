"""POST /v1/telemetry against a real service and a real Redis: answers after commit, refused
packets by reason, bounds (413, 422), Idempotency-Key retries counted once, 503 with
Retry-After while Redis is away."""

from __future__ import annotations

import gzip
import json
import time
from collections.abc import Callable
from typing import Any

import httpx
from helpers import ServiceProcess, get_json

from rtmonitor.storage.embedded import EmbeddedRedis


def post(base: str, body: Any, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{base}/v1/telemetry",
        content=content,
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )


def packets_of(base: str, device_id: str) -> int:
    r = httpx.get(f"{base}/metrics/{device_id}", timeout=10)
    return 0 if r.status_code == 404 else int(r.json()["packets"])


def test_packets_counted_after_commit_with_rejections_by_reason(service: ServiceProcess) -> None:
    body = [
        {"device_id": "j-1", "kind": "env", "values": {"temp": 21.5, "hum": 40}},
        {"device_id": "j-1", "ts": int(time.time() * 1000) - 1000, "values": {"temp": 22}},
        {"device_id": "j-2", "payload_size": 100},
        {"device_id": "bad id"},
        {"device_id": "j-3", "values": {"bad name!": 1}},
    ]
    r = post(service.http, body)
    assert r.status_code == 200, r.text
    assert r.json() == {
        "accepted": 3,
        "rejected": {"invalid_device_id": 1, "invalid_value_name": 1},
        "duplicate": False,
    }
    # answered after the commit: already readable, no waiting
    got = get_json(service.http, "/metrics/j-1")
    assert got["packets"] == 2 and got["kinds"] == {"env": 1, "unspecified": 1}
    assert got["values"]["temp"]["sum"] == 43.5 and got["values"]["temp"]["last"] == 21.5
    assert get_json(service.http, "/metrics/j-2")["bytes"] == 100
    # one object, gzip
    r = post(service.http, gzip.compress(b'{"device_id": "j-4"}'), **{"content-encoding": "gzip"})
    assert r.status_code == 200 and r.json()["accepted"] == 1
    assert packets_of(service.http, "j-4") == 1


def test_shape_errors_name_the_field(service: ServiceProcess) -> None:
    cases = {
        "body[1].device_id": [{"device_id": "a"}, {"kind": "x"}],
        "body.values.t": {"device_id": "a", "values": {"t": "hot"}},
        "body.ts": {"device_id": "a", "ts": -1},
        "body.payload_size": {"device_id": "a", "payload_size": True},
        "body.value": {"device_id": "a", "value": 1},
        "body[0]": [3],
        "body.kind": {"device_id": "a", "kind": 7},
        # past int64 (once a 500: numpy could not hold it)
        "body[1].ts": [{"device_id": "a"}, {"device_id": "a", "ts": 2**63}],
        "body[2].payload_size": [{"device_id": "a"}] * 2
        + [{"device_id": "a", "payload_size": 2**63}],
    }
    for field, body in cases.items():
        r = post(service.http, body)
        assert r.status_code == 422, (field, r.text)
        assert r.json()["field"] == field and field in r.json()["detail"]
    r = post(service.http, b"{not json")
    assert r.status_code == 400 and r.json()["reason"] == "malformed_body"
    assert packets_of(service.http, "a") == 0  # a refused body counts nothing
    refused = get_json(service.http, "/stats")["ingest"]["messages_refused_by_reason"]
    assert refused == {"invalid_body": len(cases), "malformed_body": 1}
    # JSON Schema's integers: 12.0 is 12
    r = post(service.http, {"device_id": "f-1", "ts": 0.0, "payload_size": 12.0})
    assert r.status_code == 200 and r.json()["accepted"] == 1


def test_bounds_answer_413(start_service: Callable[..., ServiceProcess]) -> None:
    svc = start_service("--http-ingest-max-bytes", "20000", "--max-batch-packets", "100")
    r = post(svc.http, [{"device_id": "b"}] * 101)
    assert r.status_code == 413 and "--max-batch-packets" in r.json()["detail"]
    assert post(svc.http, [{"device_id": "b"}] * 100).json()["accepted"] == 100
    r = post(svc.http, [{"device_id": "b", "kind": "k" * 50}] * 100 * 4)
    assert r.status_code == 413 and "--http-ingest-max-bytes" in r.json()["detail"]
    # a gzip bomb: a small body that inflates past the limit is refused while inflating
    bomb = gzip.compress(b"[" + b" " * 5_000_000 + b"]")
    r = post(svc.http, bomb, **{"content-encoding": "gzip"})
    assert r.status_code == 413 and r.json()["reason"] == "body_too_large"
    r = post(svc.http, b"[]", **{"content-encoding": "br"})
    assert r.status_code == 415
    assert packets_of(svc.http, "b") == 100


def test_idempotency_key_counts_a_retried_post_once(service: ServiceProcess) -> None:
    body = [{"device_id": "idem", "values": {"v": 1}}] * 10
    first = post(service.http, body, **{"idempotency-key": "order-42"})
    assert first.json() == {"accepted": 10, "rejected": {}, "duplicate": False}
    for _ in range(3):  # the client never saw the answer and retries
        again = post(service.http, body, **{"idempotency-key": "order-42"})
        assert again.status_code == 200 and again.json()["duplicate"] is True
    assert post(service.http, body, **{"idempotency-key": "order-43"}).json()["duplicate"] is False
    assert post(service.http, body).json()["duplicate"] is False  # no key: at-least-once
    assert packets_of(service.http, "idem") == 30
    r = post(service.http, body, **{"idempotency-key": "k" * 300})
    assert r.status_code == 422 and r.json()["field"] == "Idempotency-Key"


def test_redis_away_answers_503_and_the_retry_counts_once(
    start_service: Callable[..., ServiceProcess], redis_server: EmbeddedRedis
) -> None:
    svc = start_service("--receiver-commit-timeout", "1")
    body = [{"device_id": "outage", "values": {"v": 2}}] * 5
    assert post(svc.http, body, **{"idempotency-key": "warm"}).status_code == 200
    redis_server.stop()
    try:
        statuses = []
        for _ in range(3):  # the first waits for its commit; later ones see Redis failing
            r = post(svc.http, body, **{"idempotency-key": "during-outage"})
            statuses.append((r.status_code, r.json()["reason"]))
            assert r.headers["retry-after"] == "1"
        assert {s for s, _ in statuses} == {503}
        assert {reason for _, reason in statuses} <= {"commit_timeout", "redis_unavailable"}
    finally:
        redis_server.start()
    deadline = time.monotonic() + 30
    while True:  # the client keeps retrying with the same key until it gets its 200
        r = post(svc.http, body, **{"idempotency-key": "during-outage"})
        if r.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert r.status_code == 200
    assert packets_of(svc.http, "outage") == 10  # the warm-up and the outage's body, once
    refused = get_json(svc.http, "/stats")["ingest"]["messages_refused_by_reason"]
    assert sum(refused.get(k, 0) for k in ("commit_timeout", "redis_unavailable")) >= 3


def test_openapi_documents_the_receivers(service: ServiceProcess) -> None:
    paths = get_json(service.http, "/openapi.json")["paths"]
    telemetry = paths["/v1/telemetry"]["post"]
    content = telemetry["requestBody"]["content"]["application/json"]
    assert content["example"][0]["device_id"] == "sensor-1"
    assert {"200", "413", "422", "503"} <= set(telemetry["responses"])
    assert any(p["name"] == "idempotency-key" for p in telemetry["parameters"])
    assert "/v1/metrics" in paths
