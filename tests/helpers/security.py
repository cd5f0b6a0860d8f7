"""Tokens and certificates made at test time (nothing secret is committed): an auth file
written from `rtmonitor.auth.new_token`, and a throwaway CA (trustme) with a server
certificate for 127.0.0.1 and client certificates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme

from helpers import ServiceProcess
from rtmonitor.auth import hash_secret, new_token
from rtmonitor.clients import ClientSecurity


@dataclass
class Tokens:
    """An auth file and the secret of each of its tokens, by name."""

    path: Path
    secrets: dict[str, str]

    def client(self, name: str | None, **tls: Path | None) -> ClientSecurity:
        return ClientSecurity(self.secrets[name] if name else None, **tls)

    def header(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.secrets[name]}"}

    def write(self, specs: dict[str, tuple[list[str], str | None]]) -> None:
        """Rewrite the file with `specs` (name -> (scopes, device prefix)); a name already
        known keeps its secret."""
        blocks = []
        for name, (scopes, prefix) in specs.items():
            secret, block = new_token(name, scopes, prefix)
            if name in self.secrets:  # keep the secret: same digest
                block = block.replace(hash_secret(secret), hash_secret(self.secrets[name]))
            else:
                self.secrets[name] = secret
            blocks.append(block)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(blocks))
        tmp.replace(self.path)  # atomic, as an operator's editor or a Secret volume does


# The ingest tokens both ingest-auth suites (gRPC, the other receivers) run against:
# a plain writer, a reader and an admin (wrong or broader scopes), a device-prefixed
# writer, and two writers that must not share producer ids.
INGEST_TOKENS: dict[str, tuple[list[str], str | None]] = {
    "writer": (["ingest"], None),
    "reader": (["read"], None),
    "boss": (["admin"], None),
    "fleet-a": (["ingest"], "fleet-a/"),
    "twin-1": (["ingest"], None),
    "twin-2": (["ingest"], None),
}


def make_tokens(path: Path, specs: dict[str, tuple[list[str], str | None]]) -> Tokens:
    tokens = Tokens(path, {})
    tokens.write(specs)
    return tokens


def secured_service(
    tmp: Path, specs: dict[str, tuple[list[str], str | None]], admin: str = "boss"
) -> tuple[ServiceProcess, Tokens]:
    """A service on its own embedded Redis with an auth file of `specs`; its own probes and
    helpers use the `admin` token. Not yet waited for: call wait_ready()."""
    tokens = make_tokens(tmp / "tokens.toml", specs)
    svc = ServiceProcess(
        None,
        tmp / "service.log",
        "--data-dir", str(tmp / "data"), "--auth-file", str(tokens.path),
        client=tokens.client(admin),
    )  # fmt: skip
    return svc, tokens


@dataclass
class Pki:
    """A CA, the server's certificate and key, and a client certificate it signed."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA that signed nothing of this service's


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA()
    server = ca.issue_cert("127.0.0.1", "localhost")
    client = ca.issue_cert("client@example.test")
    paths = {name: directory / f"{name}.pem" for name in Pki.__dataclass_fields__}
    ca.cert_pem.write_to_path(str(paths["ca"]))
    server.cert_chain_pems[0].write_to_path(str(paths["server_cert"]))
    for pem in server.cert_chain_pems[1:]:
        pem.write_to_path(str(paths["server_cert"]), append=True)
    server.private_key_pem.write_to_path(str(paths["server_key"]))
    client.cert_chain_pems[0].write_to_path(str(paths["client_cert"]))
    client.private_key_pem.write_to_path(str(paths["client_key"]))
    trustme.CA().cert_pem.write_to_path(str(paths["other_ca"]))
    return Pki(**paths)
