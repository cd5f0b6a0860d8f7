"""How the clients (`send`, `bench`, `top`, and the tests) present a token and check TLS:
one small value object built from their settings, picklable for load-generator processes."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:  # httpx is for `top` and `bench` (and the tests), not the service
    import httpx


@dataclass(frozen=True, slots=True)
class ClientSecurity:
    """A bearer token (sent as `authorization: Bearer`), and TLS: the CA that signed the
    server's certificate (`tls_ca`; none: the system's CAs when TLS is used), and a client
    certificate for mTLS. TLS is used when any TLS file is given."""

    token: str | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None

    @classmethod
    def of(cls, settings: Any) -> ClientSecurity:
        """From any settings with token / tls_ca / tls_cert / tls_key fields."""
        return cls(
            getattr(settings, "token", None),
            getattr(settings, "tls_ca", None),
            getattr(settings, "tls_cert", None),
            getattr(settings, "tls_key", None),
        )

    @property
    def tls(self) -> bool:
        return self.tls_ca is not None or self.tls_cert is not None

    @property
    def metadata(self) -> tuple[tuple[str, str], ...] | None:
        """gRPC call metadata carrying the token (None without one)."""
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    @property
    def headers(self) -> dict[str, str]:
        """HTTP headers carrying the token."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def channel(
        self, target: str, options: list[tuple[str, Any]] | None = None
    ) -> grpc.aio.Channel:
        """A gRPC channel to `target`: TLS (and mTLS) as configured, else plaintext."""
        if not self.tls:
            return grpc.aio.insecure_channel(target, options=options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca.read_bytes() if self.tls_ca else None,
            private_key=self.tls_key.read_bytes() if self.tls_key else None,
            certificate_chain=self.tls_cert.read_bytes() if self.tls_cert else None,
        )
        return grpc.aio.secure_channel(target, credentials, options=options)

    def ssl_context(self) -> ssl.SSLContext:
        """For HTTPS: verifies the server against `tls_ca` (or the system's CAs); presents
        the client certificate if there is one."""
        context = ssl.create_default_context(cafile=str(self.tls_ca) if self.tls_ca else None)
        if self.tls_cert is not None:
            context.load_cert_chain(self.tls_cert, self.tls_key)
        return context

    def http_options(self) -> dict[str, Any]:
        """httpx.Client / AsyncClient keyword arguments: the token's header, TLS checks."""
        options: dict[str, Any] = {"headers": self.headers}
        if self.tls:
            options["verify"] = self.ssl_context()
        return options

    def http_client(self, **kwargs: Any) -> httpx.Client:
        import httpx

        return httpx.Client(**self.http_options(), **kwargs)

    def async_http_client(self, **kwargs: Any) -> httpx.AsyncClient:
        import httpx

        return httpx.AsyncClient(**self.http_options(), **kwargs)
