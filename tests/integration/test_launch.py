"""The test and bench launcher (`loadgen/launch.py:ServeProcess`): a port picked free can be
taken by another process before the child binds it; the launcher then starts it again on
new ports instead of failing the test (a CI run once lost a module's fixture this way)."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from helpers import ServiceProcess

from rtmonitor.loadgen import launch
from rtmonitor.storage.embedded import EmbeddedRedis, free_port


@pytest.fixture
def taken() -> Iterator[int]:
    """A port another process holds (a listening socket of this one)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def picks(*first: int) -> Callable[..., int]:
    """free_port that answers `first` (the last of them a port taken since it was free),
    then real free ports."""
    answers = iter(first)

    def pick(host: str = "127.0.0.1") -> int:
        return next(answers, None) or free_port(host)

    return pick


@pytest.mark.parametrize("which", ["grpc", "http"])
def test_a_port_taken_before_the_bind_is_picked_again(
    which: str,
    taken: int,
    redis_server: EmbeddedRedis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # the gRPC port is picked first
    first = (taken,) if which == "grpc" else (free_port(), taken)
    monkeypatch.setattr(launch, "free_port", picks(*first))
    svc = ServiceProcess(redis_server.url, tmp_path / "svc.log")
    try:
        svc.wait_ready()
        assert taken not in (svc.grpc_port, svc.http_port)
        assert f"cannot listen for {'gRPC' if which == 'grpc' else 'HTTP'}" in svc.log()
        assert httpx.get(f"{svc.http}/healthz").status_code == 200
    finally:
        svc.kill()


def test_ports_given_are_not_replaced(
    taken: int, redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """A caller that chose the port (a restart on the same ports) gets the failure."""
    svc = ServiceProcess(redis_server.url, tmp_path / "svc.log", grpc_port=taken)
    try:
        with pytest.raises(RuntimeError, match="exited with"):
            svc.wait_ready()
        assert svc.grpc_port == taken
    finally:
        svc.kill()
