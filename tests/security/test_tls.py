"""TLS and mTLS on gRPC and HTTPS, with certificates made at test time (trustme): a client
that trusts the CA works; a plaintext client and one that trusts another CA fail; with
--tls-client-ca a client without a certificate fails and one with a signed certificate
works; the dashboard loads over HTTPS in headless Chromium after logging in."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import httpx
import pytest
from helpers import ServiceProcess, packet
from helpers.browser import CHROMIUM_ARGS, chromium
from helpers.security import Pki, Tokens, make_pki, make_tokens

from rtmonitor.clients import ClientSecurity
from rtmonitor.config import SendSettings
from rtmonitor.ingest.rpc import STREAM_PACKETS
from rtmonitor.ingest.v1.telemetry_pb2 import Ack
from rtmonitor.loadgen.sender import run_loop, send

TOKENS: dict[str, tuple[list[str], str | None]] = {
    "writer": (["ingest"], None),
    "reader": (["read"], None),
}


def start(tmp: Path, tokens: Tokens, pki: Pki, *extra: str) -> ServiceProcess:
    svc = ServiceProcess(
        None,
        tmp / "service.log",
        "--data-dir", str(tmp / "data"), "--auth-file", str(tokens.path),
        "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), *extra,
        client=ClientSecurity(
            tokens.secrets["reader"], pki.ca,
            pki.client_cert if extra else None, pki.client_key if extra else None,
        ),
    )  # fmt: skip
    return svc.wait_ready()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_service(
    tmp_path_factory: pytest.TempPathFactory, pki: Pki
) -> Iterator[tuple[ServiceProcess, Tokens]]:
    tmp = tmp_path_factory.mktemp("tls")
    tokens = make_tokens(tmp / "tokens.toml", TOKENS)
    svc = start(tmp, tokens, pki)
    try:
        yield svc, tokens
    finally:
        svc.kill()


async def one_packet(client: ClientSecurity, target: str, device: str) -> Ack:
    async with client.channel(target) as channel:
        call = channel.stream_unary(STREAM_PACKETS, lambda b: b, Ack.FromString)
        ack: Ack = await call(
            iter([packet(device).SerializeToString()]), metadata=client.metadata, timeout=10
        )
        return ack


def test_tls_clients(tls_service: tuple[ServiceProcess, Tokens], pki: Pki) -> None:
    svc, tokens = tls_service
    writer = tokens.secrets["writer"]
    assert asyncio.run(one_packet(ClientSecurity(writer, pki.ca), svc.target, "tls-1")).accepted
    for wrong in (ClientSecurity(writer), ClientSecurity(writer, pki.other_ca)):
        with pytest.raises(grpc.aio.AioRpcError) as err:  # plaintext; another CA
            asyncio.run(one_packet(wrong, svc.target, "tls-x"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # `rtmonitor send` with --token and --tls-ca
    report = run_loop(
        send(
            SendSettings(
                target=svc.target,
                count=500,
                batch_size=100,
                token=writer,
                tls_ca=pki.ca,
                device_prefix="tls-send-",
                devices=5,
                progress=False,
            )  # fmt: skip
        )
    )
    assert report.accepted == 500 and not report.errors
    reader = ClientSecurity(tokens.secrets["reader"], pki.ca)
    assert f"HTTP https://127.0.0.1:{svc.http_port}" in svc.log()  # the ready line
    with reader.http_client(base_url=svc.http, timeout=10) as http:
        assert svc.http.startswith("https://")
        assert http.get("/metrics/tls-1").json()["packets"] == 1
        assert http.get("/metrics", params={"prefix": "tls-send-"}).json()["matched"] == 5
        r = http.post("/login", json={"token": tokens.secrets["reader"]})
        assert "secure" in r.headers["set-cookie"].lower()  # Secure when TLS
    with pytest.raises(httpx.HTTPError):  # plain HTTP to the HTTPS port
        httpx.get(svc.http.replace("https://", "http://") + "/healthz", timeout=5)
    with pytest.raises(httpx.ConnectError):  # a CA that did not sign the server's
        ClientSecurity(None, pki.other_ca).http_client().get(f"{svc.http}/healthz")


def bad_connections(port: int, count: int) -> None:
    """Strangers on the TLS gRPC port: plaintext HTTP/2, and TLS naming another server."""
    for i in range(count):
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            if i % 2:
                sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes(24))
                continue
            context = ssl.create_default_context()
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
            context.set_alpn_protocols(["h2"])
            with (
                contextlib.suppress(OSError),
                context.wrap_socket(sock, server_hostname="stranger.example") as tls,
            ):
                tls.sendall(b"not http/2")


def test_failed_handshakes_do_not_flood_the_log(
    tls_service: tuple[ServiceProcess, Tokens],
) -> None:
    """gRPC core logs each failed handshake on stderr, outside the per-peer log limit:
    the service turns its logging off (GRPC_VERBOSITY, --grpc-verbosity) by default."""
    svc, _ = tls_service
    before = len(svc.log().splitlines())
    bad_connections(svc.grpc_port, 100)
    time.sleep(0.5)
    new = svc.log().splitlines()[before:]
    assert len(new) <= 5, "\n".join(new[:20])


def test_mtls(tmp_path: Path, pki: Pki) -> None:
    tokens = make_tokens(tmp_path / "tokens.toml", TOKENS)
    svc = start(tmp_path, tokens, pki, "--tls-client-ca", str(pki.ca))
    try:
        writer = tokens.secrets["writer"]
        signed = ClientSecurity(writer, pki.ca, pki.client_cert, pki.client_key)
        assert asyncio.run(one_packet(signed, svc.target, "mtls-1")).accepted == 1
        with pytest.raises(grpc.aio.AioRpcError) as err:
            asyncio.run(one_packet(ClientSecurity(writer, pki.ca), svc.target, "mtls-x"))
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        reader = ClientSecurity(tokens.secrets["reader"], pki.ca, pki.client_cert, pki.client_key)
        with reader.http_client(base_url=svc.http, timeout=10) as http:
            assert http.get("/metrics/mtls-1").json()["packets"] == 1
        with pytest.raises((httpx.HTTPError, ssl.SSLError)):  # no client certificate
            ClientSecurity(tokens.secrets["reader"], pki.ca).http_client().get(
                f"{svc.http}/metrics"
            ).raise_for_status()
    finally:
        svc.kill()


def test_dashboard_over_https_after_login(
    tls_service: tuple[ServiceProcess, Tokens], pki: Pki
) -> None:
    browser_path = chromium()
    from playwright.sync_api import sync_playwright

    svc, tokens = tls_service
    asyncio.run(one_packet(ClientSecurity(tokens.secrets["writer"], pki.ca), svc.target, "web-1"))
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=browser_path, args=CHROMIUM_ARGS)
        try:
            # The throwaway CA is not in Chromium's store: the TLS checks themselves are
            # test_tls_clients'; here, the page, the login and the live feed over HTTPS.
            context = browser.new_context(ignore_https_errors=True)
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"{svc.http}/")
            page.wait_for_selector("#login:not([hidden])", timeout=10_000)
            page.fill("#token", "wrong")
            page.click("#login button")
            page.wait_for_function(
                "document.getElementById('login-error').textContent.includes('unknown token')"
            )
            page.fill("#token", tokens.secrets["reader"])
            page.click("#login button")
            page.wait_for_selector('tr[data-device="web-1"]', timeout=10_000)
            page.wait_for_function(
                "document.getElementById('live').textContent === 'live'", timeout=10_000
            )
            (cookie,) = context.cookies()
            assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"]) == (
                True,
                True,
                "Strict",
            )
            assert page.evaluate("document.cookie") == ""  # HttpOnly: scripts never see it
            assert not errors, errors
        finally:
            browser.close()
