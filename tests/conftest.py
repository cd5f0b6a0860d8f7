"""Fixtures that start real things: Redis (the embedded launcher) and the service."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import RedisClusterFixture, ServiceProcess

from rtmonitor.storage.embedded import EmbeddedRedis


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    """A fresh real Redis on a free port, data in a temporary directory."""
    server = EmbeddedRedis(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterFixture]:
    """A fresh real 3-master Redis Cluster on free ports (helpers.cluster)."""
    cluster = RedisClusterFixture(tmp_path / "cluster").start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def start_service(
    tmp_path: Path, redis_server: EmbeddedRedis
) -> Iterator[Callable[..., ServiceProcess]]:
    """Start real `rtmonitor serve` processes on free ports against `redis_server`."""
    started: list[ServiceProcess] = []

    def start(*extra: str, redis_url: str | None = None, **env: str) -> ServiceProcess:
        log = tmp_path / f"service-{len(started)}.log"
        svc = ServiceProcess(redis_url or redis_server.url, log, *extra, env=env)
        started.append(svc)
        return svc.wait_ready()

    yield start
    for svc in started:
        svc.kill()


@pytest.fixture
def service(start_service: Callable[..., ServiceProcess]) -> ServiceProcess:
    """One running service on its own fresh Redis."""
    return start_service()
