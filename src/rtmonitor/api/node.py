"""The HTTP node: uvicorn serving the FastAPI app on the event loop of the process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import uvicorn

from rtmonitor.api.app import create_app
from rtmonitor.api.connections import ConnectionGuard
from rtmonitor.api.deps import ApiLimits, IngestSource, ReadinessCheck, StatsSource
from rtmonitor.auth import TokenRegistry
from rtmonitor.config import Settings, StartupError
from rtmonitor.lifecycle import Node
from rtmonitor.storage.store import RedisStore

logger = logging.getLogger(__name__)


class _HttpServer(uvicorn.Server):
    """uvicorn inside our event loop; the runtime, not uvicorn, owns the signals."""

    def __init__(self, config: uvicorn.Config, guard: ConnectionGuard) -> None:
        super().__init__(config)
        self.guard = guard

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield

    async def on_tick(self, counter: int) -> bool:
        if counter % 10 == 0:  # uvicorn ticks every 0.1 s
            self.guard.sweep()
        return await super().on_tick(counter)


class HttpNode(Node):
    """`async with HttpNode(...)`: serving HTTP on entry; on exit uvicorn stops (open
    requests get a grace period) and the app's lifespan closes the live feed."""

    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        readiness: ReadinessCheck,
        stats: StatsSource,
        ingest: IngestSource | None = None,
        *,
        auth: TokenRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.app = create_app(
            store,
            readiness,
            stats,
            ApiLimits.from_settings(settings),
            ingest,
            auth=auth,
            secure_cookies=settings.tls,
        )
        self.port: int | None = None
        self._server: _HttpServer | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def guard(self) -> ConnectionGuard | None:
        return self._server.guard if self._server is not None else None

    async def start(self) -> None:
        s = self.settings
        sock = self._bind()
        self.port = int(sock.getsockname()[1])
        # Every connection holds a file descriptor: leave most of the open-file limit to
        # gRPC streams, Redis and files. The listen backlog is also how many connections
        # asyncio accepts in one go, before the guard sees any of them.
        max_connections = max(1, min(s.http_max_connections, fd_limit() // 8))
        if max_connections < s.http_max_connections:
            logger.info(
                "at most %d HTTP connections: 1/8 of the open-file limit %d, below "
                "--http-max-connections %d",
                max_connections,
                fd_limit(),
                s.http_max_connections,
            )
        guard = ConnectionGuard(max_connections, s.http_idle_timeout, s.http_max_unsent_bytes)
        config = uvicorn.Config(
            self.app,
            http=guard.protocol_class(),
            log_config=None,
            access_log=False,
            lifespan="on",
            timeout_graceful_shutdown=5,
            timeout_keep_alive=max(1, round(s.http_idle_timeout)),
            backlog=min(2048, max(16, max_connections)),
            **tls_options(s),
        )
        server = self._server = _HttpServer(config, guard)
        self._task = task = asyncio.create_task(server.serve(sockets=[sock]), name="http")
        while not server.started:
            if task.done():
                task.result()
                raise StartupError("the HTTP server stopped during startup")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        """Stop accepting, let open requests finish (uvicorn's grace period), then the
        app's lifespan ends. Calling it twice is harmless."""
        if self._server is not None:
            self._server.should_exit = True
        if self._task is not None:
            await self._task

    def _bind(self) -> socket.socket:
        s = self.settings
        family = socket.AF_INET6 if ":" in s.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Inherited by every accepted connection: without it a small response written in
        # two parts waits for the client's delayed ACK.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((s.host, s.http_port))
        except OSError as exc:
            sock.close()
            raise StartupError(
                f"cannot listen for HTTP on {s.host}:{s.http_port} ({exc.strerror}); "
                "choose another port with --http-port / RTM_HTTP_PORT"
            ) from None
        sock.set_inheritable(True)
        return sock


def tls_options(s: Settings) -> dict[str, Any]:
    """uvicorn's HTTPS options from --tls-cert/--tls-key (client certificates required with
    --tls-client-ca), or none."""
    if s.tls_cert is None or s.tls_key is None:
        return {}
    options: dict[str, Any] = {"ssl_certfile": str(s.tls_cert), "ssl_keyfile": str(s.tls_key)}
    if s.tls_client_ca is not None:
        options |= {"ssl_ca_certs": str(s.tls_client_ca), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def fd_limit() -> int:
    """The soft open-file limit (a large figure when it is unlimited)."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft
