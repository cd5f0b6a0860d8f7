"""Several stateless replicas on one Redis and on a Redis Cluster: one is killed mid-load,
clients move to the others, and every acknowledged batch is counted exactly once."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import RedisClusterFixture, ServiceProcess, assert_exact, get_json, load, run

from rtmonitor.loadgen.sender import SendReport, send
from rtmonitor.storage.embedded import EmbeddedRedis


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterFixture]:
    cluster = RedisClusterFixture(tmp_path / "cluster").start()
    try:
        yield cluster
    finally:
        cluster.stop()


def kill_one_mid_load(replicas: list[ServiceProcess], count: int) -> SendReport:
    targets = ",".join(r.target for r in replicas)

    async def scenario() -> SendReport:
        sender = asyncio.create_task(send(load(targets, count=count, streams=6, retry_for=90)))
        await asyncio.sleep(1.5)
        assert not sender.done()
        replicas[1].kill()  # SIGKILL: no goodbye; its prepared journals are replayed
        return await asyncio.wait_for(sender, 150)

    return run(scenario())  # type: ignore[no-any-return]


def start_replicas(tmp_path: Path, url: str, n: int, *extra: str) -> list[ServiceProcess]:
    replicas = [ServiceProcess(url, tmp_path / f"replica-{i}.log", *extra) for i in range(n)]
    return [r.wait_ready() for r in replicas]


def test_three_replicas_on_one_redis_survive_a_kill(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    replicas = start_replicas(tmp_path, redis_server.url, 3)
    try:
        report = kill_one_mid_load(replicas, 240_000)
        assert replicas[1].proc.returncode == -signal.SIGKILL
        assert report.as_dict()["reconnects"] > 0
        assert_exact(report, redis_server.url)
        for survivor in (replicas[0], replicas[2]):  # both serve the same shared totals
            assert get_json(survivor.http, "/metrics")["totals"]["packets"] == report.sent
    finally:
        for r in replicas:
            r.kill()


def test_replicas_on_a_redis_cluster_survive_a_kill(
    redis_cluster: RedisClusterFixture, tmp_path: Path
) -> None:
    replicas = start_replicas(tmp_path, redis_cluster.url, 3, "--redis-cluster")
    try:
        report = kill_one_mid_load(replicas, 150_000)
        assert report.errors == [] and report.accepted == report.sent
        assert report.as_dict()["reconnects"] > 0
        # the device listing works across the cluster's nodes, and every count is exact
        expected = report.acked_per_device()
        page = get_json(replicas[0].http, "/metrics", limit=1000)
        assert page["totals"]["packets"] == report.sent
        assert {d["device_id"]: d["packets"] for d in page["devices"]} == expected
        by_packets = get_json(replicas[2].http, "/metrics", sort="packets", order="desc")
        assert by_packets["devices"][0]["packets"] == max(expected.values())
    finally:
        for r in replicas:
            r.kill()
