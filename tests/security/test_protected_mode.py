"""Protected by default: without an auth file the service binds loopback; asked for a
network address it refuses to start, naming --auth-file and --allow-unauthenticated; with
the opt-out it starts and warns; a malformed auth file refuses to start naming the line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ServiceProcess

from rtmonitor.config import Settings
from rtmonitor.loadgen.launch import child_env
from rtmonitor.storage.embedded import free_port


def serve(*flags: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rtmonitor", "serve", *flags],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )


def test_network_address_without_auth_file_refuses_to_start(tmp_path: Path) -> None:
    done = serve("--host", "0.0.0.0", "--data-dir", str(tmp_path))
    assert done.returncode != 0
    assert "--auth-file" in done.stderr and "--allow-unauthenticated" in done.stderr
    # the environment twin too
    env_done = subprocess.run(
        [sys.executable, "-m", "rtmonitor", "serve"],
        capture_output=True,
        text=True,
        timeout=30,
        env=child_env({"RTM_HOST": "::"}),
    )
    assert env_done.returncode != 0 and "--allow-unauthenticated" in env_done.stderr


def test_malformed_auth_file_refuses_to_start(tmp_path: Path) -> None:
    auth = tmp_path / "tokens.toml"
    auth.write_text('[[token]]\nname = "a"\nscopes = ["read"\n')
    done = serve(
        "--auth-file", str(auth), "--data-dir", str(tmp_path / "data"),
        "--grpc-port", str(free_port()), "--http-port", str(free_port()),
    )  # fmt: skip
    assert done.returncode != 0
    assert "tokens.toml" in done.stderr and "line 3" in done.stderr, done.stderr


def test_tls_files_that_do_not_fit_refuse_to_start_in_one_line(tmp_path: Path) -> None:
    """A key of another certificate, or a client CA that is no PEM: one line naming the
    flags, no traceback."""
    import trustme

    ca = trustme.CA()
    cert, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.1")
    paths = {name: tmp_path / f"{name}.pem" for name in ("cert", "key", "other_key", "ca")}
    cert.cert_chain_pems[0].write_to_path(str(paths["cert"]))
    cert.private_key_pem.write_to_path(str(paths["key"]))
    other.private_key_pem.write_to_path(str(paths["other_key"]))
    paths["ca"].write_text("not a certificate\n")
    ports = ["--grpc-port", str(free_port()), "--http-port", str(free_port())]
    cases = [
        (["--tls-cert", str(paths["cert"]), "--tls-key", str(paths["other_key"])], "--tls-key"),
        (["--tls-cert", str(paths["key"]), "--tls-key", str(paths["key"])], "--tls-cert"),
        (
            ["--tls-cert", str(paths["cert"]), "--tls-key", str(paths["key"]),
             "--tls-client-ca", str(paths["ca"])],
            "--tls-client-ca",
        ),
    ]  # fmt: skip
    for flags, named in cases:
        done = serve(*flags, *ports, "--data-dir", str(tmp_path / "data"))
        assert done.returncode != 0
        assert "Traceback" not in done.stderr, done.stderr
        lines = [line for line in done.stderr.splitlines() if named in line]
        assert lines and len(done.stderr.splitlines()) <= 3, done.stderr


def test_opt_out_starts_with_a_warning(tmp_path: Path) -> None:
    svc = ServiceProcess(
        None, tmp_path / "svc.log", "--data-dir", str(tmp_path / "data"),
        "--host", "0.0.0.0", "--allow-unauthenticated",
    )  # fmt: skip
    try:
        svc.wait_ready()
        assert "no --auth-file and --allow-unauthenticated" in svc.log()
    finally:
        svc.kill()


def test_default_is_loopback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(ServeProcess passes --host 127.0.0.1 itself: the default is checked on Settings,
    with no RTM_* variable of this process in the way.)"""
    for name in [k for k in os.environ if k.startswith("RTM_")]:
        monkeypatch.delenv(name)
    assert Settings().host == "127.0.0.1"
    auth = tmp_path / "t.toml"
    auth.write_text("")
    assert Settings(auth_file=auth).host == "0.0.0.0"
