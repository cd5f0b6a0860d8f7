"""HTTP with an auth file, against a real service: every protected route of the OpenAPI
schema answers 401 without a token (walked, so a new route cannot be forgotten), the probes
and the docs stay open, scopes are enforced, the dashboard's login cookie works for reads and
/stream, refusals are counted by reason and token and logged once per interval per peer,
and a real Prometheus scrapes with `authorization: {credentials: ...}`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from helpers import ServiceProcess, packet
from helpers.prometheus import prometheus
from helpers.security import Tokens, secured_service

from rtmonitor.ingest.rpc import STREAM_PACKETS
from rtmonitor.ingest.v1.telemetry_pb2 import Ack

OPEN = {"/healthz", "/readyz", "/login", "/logout"}
TOKENS: dict[str, tuple[list[str], str | None]] = {
    "writer": (["ingest"], None),
    "reader": (["read"], None),
    "boss": (["admin"], None),
    "scraper": (["read"], None),
    "viewer": (["read"], None),
}


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServiceProcess, Tokens]]:
    tmp = tmp_path_factory.mktemp("auth-http")
    svc, tokens = secured_service(tmp, TOKENS)
    svc.wait_ready()

    async def send() -> None:
        client = tokens.client("writer")
        async with client.channel(svc.target) as channel:
            call = channel.stream_unary(STREAM_PACKETS, lambda b: b, Ack.FromString)
            await call(iter([packet("web-1").SerializeToString()] * 3), metadata=client.metadata)

    asyncio.run(send())
    try:
        yield svc, tokens
    finally:
        svc.kill()


def operations(schema: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [
        (method.upper(), path, op)
        for path, item in schema["paths"].items()
        for method, op in item.items()
        if method in ("get", "post", "put", "patch", "delete")
    ]


def concrete(path: str) -> str:
    return path.replace("{device_id}", "web-1")


def test_every_protected_route_needs_a_token(secured: tuple[ServiceProcess, Tokens]) -> None:
    svc, _ = secured
    schema = httpx.get(f"{svc.http}/openapi.json").json()
    assert schema["components"]["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": "A token of the service's --auth-file (`rtmonitor token new`).",
    }
    protected = [(m, p, op) for m, p, op in operations(schema) if p not in OPEN]
    assert {p for _, p, _ in protected} >= {"/metrics", "/metrics/{device_id}", "/stream", "/stats"}
    for method, path, op in protected:
        assert op.get("security") == [{"bearer": []}], path  # Swagger's Authorize applies
        r = httpx.request(method, f"{svc.http}{concrete(path)}", timeout=10)
        assert r.status_code == 401, (method, path, r.status_code)
        assert r.headers["www-authenticate"] == "Bearer"
        assert "token" in r.json()["detail"]
        bad = httpx.request(
            method,
            f"{svc.http}{concrete(path)}",
            headers={"Authorization": "Bearer wrong"},
            timeout=10,
        )
        assert bad.status_code == 401, (method, path)
    for path in ("/healthz", "/readyz", "/docs", "/openapi.json", "/"):
        assert httpx.get(f"{svc.http}{path}").status_code == 200, path


def test_scopes(secured: tuple[ServiceProcess, Tokens]) -> None:
    svc, tokens = secured

    def status(path: str, name: str) -> int:
        return httpx.get(f"{svc.http}{path}", headers=tokens.header(name), timeout=10).status_code

    assert status("/metrics", "writer") == 403  # an ingest token cannot read
    assert status("/metrics/web-1", "reader") == 200
    assert status("/metrics", "reader") == 200
    assert status("/stats", "reader") == 403  # /stats needs admin
    assert status("/stats", "boss") == 200
    assert status("/metrics", "boss") == 200  # admin reads too
    r = httpx.get(f"{svc.http}/metrics", headers=tokens.header("writer"))
    assert "lacks the 'read' scope" in r.json()["detail"]


def test_login_cookie_for_the_dashboard(secured: tuple[ServiceProcess, Tokens]) -> None:
    svc, tokens = secured
    with httpx.Client(base_url=svc.http, timeout=10) as browser:
        assert browser.post("/login", json={"token": "wrong"}).status_code == 401
        assert browser.post("/login", json={"token": tokens.secrets["writer"]}).status_code == 403
        assert not browser.cookies
        r = browser.post("/login", json={"token": tokens.secrets["reader"]})
        assert r.status_code == 204
        cookie = r.headers["set-cookie"]
        for attribute in ("HttpOnly", "SameSite=strict", "Path=/"):
            assert attribute.lower() in cookie.lower(), cookie
        assert "secure" not in cookie.lower()  # plain HTTP here; Secure with TLS (test_tls)
        assert browser.get("/metrics/web-1").json()["packets"] == 3
        assert browser.get("/stats").status_code == 401  # the cookie opens the read routes only
        with browser.stream("GET", "/stream") as live:
            assert live.status_code == 200
            assert live.headers["content-type"].startswith("text/event-stream")
        assert browser.post("/logout").status_code == 204
        assert browser.get("/metrics").status_code == 401
        # an admin token may log in (it can read), but its cookie opens the reads only
        assert browser.post("/login", json={"token": tokens.secrets["boss"]}).status_code == 204
        assert browser.get("/metrics/web-1").status_code == 200
        assert browser.get("/stats").status_code == 401
        assert browser.get("/stats", headers=tokens.header("boss")).status_code == 200


def test_a_malformed_login_does_not_echo_the_secret(
    secured: tuple[ServiceProcess, Tokens],
) -> None:
    """A 422 names the field and what is wrong, never the value sent (FastAPI's default
    handler echoes it in `input`): a token pasted as a form, or too long, stays unseen."""
    svc, tokens = secured
    secret = tokens.secrets["reader"]
    bodies: list[dict[str, Any]] = [
        {
            "content": f"token={secret}",
            "headers": {"content-type": "application/x-www-form-urlencoded"},
        },
        {"content": secret, "headers": {"content-type": "text/plain"}},
        {"content": f'{{"token": "{secret}"', "headers": {"content-type": "application/json"}},
        {"json": {"token": secret + "x" * 600}},
        {"json": {"token": 7, "other": secret}},
    ]
    for body in bodies:
        r = httpx.post(f"{svc.http}/login", timeout=10, **body)
        assert r.status_code == 422, r.text
        assert secret not in r.text, r.text
        for error in r.json()["detail"]:
            assert set(error) == {"loc", "msg", "type"}, error


def test_the_dashboard_cannot_be_framed(secured: tuple[ServiceProcess, Tokens]) -> None:
    """The login form takes a token: no other site may show it in a frame (clickjacking)."""
    svc, _ = secured
    r = httpx.get(f"{svc.http}/", timeout=10)
    assert r.status_code == 200 and "<html" in r.text.lower()
    assert r.headers["x-frame-options"] == "DENY"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]


def test_refusals_counted_and_logged_once_per_peer(
    secured: tuple[ServiceProcess, Tokens],
) -> None:
    svc, tokens = secured
    before = svc.log().count("http: refused")
    for _ in range(30):
        assert httpx.get(f"{svc.http}/metrics", headers={"Authorization": "Bearer x"}).is_error
    time.sleep(0.5)
    assert svc.log().count("http: refused") - before <= 1  # once per interval per peer
    doc = httpx.get(f"{svc.http}/stats", headers=tokens.header("boss")).json()
    http_refused = doc["auth"]["refused"]["http"]
    assert http_refused["unknown_token:-"] >= 30
    assert http_refused["missing_scope:writer"] >= 1
    assert doc["auth"]["tokens"] == sorted(TOKENS)
    assert all(secret not in svc.log() for secret in tokens.secrets.values())
    scrape = httpx.get(
        f"{svc.http}/metrics", params={"format": "prometheus"}, headers=tokens.header("boss")
    ).text
    assert 'rtm_auth_refused_total{surface="http",reason="unknown_token",token="-"}' in scrape
    assert f"rtm_auth_tokens {len(TOKENS)}" in scrape


def test_real_prometheus_scrapes_with_a_token(
    secured: tuple[ServiceProcess, Tokens], tmp_path: Any
) -> None:
    svc, tokens = secured
    target = {"targets": [f"127.0.0.1:{svc.http_port}"]}
    jobs = [
        {
            "job_name": "with-token",
            "authorization": {"credentials": tokens.secrets["scraper"]},
            "static_configs": [target],
        },
        {"job_name": "without", "static_configs": [target]},
    ]
    with prometheus(tmp_path, jobs) as base:
        deadline = time.monotonic() + 60
        health: dict[str, str] = {}
        value = None
        while time.monotonic() < deadline:
            try:
                query = 'rtm_device_packets_total{device="web-1",job="with-token"}'
                r = httpx.get(f"{base}/api/v1/query", params={"query": query})
                result = r.json()["data"]["result"]
                value = result[0]["value"][1] if result else None
                targets = httpx.get(f"{base}/api/v1/targets").json()
                health = {t["labels"]["job"]: t["health"] for t in targets["data"]["activeTargets"]}
                if value == "3" and health.get("without") == "down":
                    break
            except (httpx.HTTPError, KeyError, ValueError, IndexError):
                pass
            time.sleep(0.5)
        assert value == "3", f"Prometheus never saw the counter (last: {value})"
        assert health == {"with-token": "up", "without": "down"}


def test_removed_token_ends_its_live_stream(secured: tuple[ServiceProcess, Tokens]) -> None:
    svc, tokens = secured
    with httpx.Client(base_url=svc.http, timeout=10) as client:
        with client.stream("GET", "/stream", headers=tokens.header("viewer")) as live:
            assert live.status_code == 200
            lines = live.iter_lines()
            assert next(lines).startswith("retry:")
            started = time.monotonic()
            tokens.write({k: v for k, v in TOKENS.items() if k != "viewer"})
            rest = list(lines)  # until the server ends the response
            assert time.monotonic() - started < 5
        assert "event: error" in rest and "data: token revoked: log in again" in rest
        assert client.get("/metrics", headers=tokens.header("viewer")).status_code == 401
    tokens.write(TOKENS)  # the other tests' tokens, unchanged (viewer back, same secret)
