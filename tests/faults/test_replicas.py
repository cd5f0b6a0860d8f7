"""Several stateless replicas on one Redis and on a Redis Cluster: one is killed mid-load,
clients move to the others, and every acknowledged batch is counted exactly once."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from helpers import (
    RedisClusterFixture,
    ServiceProcess,
    assert_exact,
    get_json,
    load,
    packet,
    run,
    self_metrics,
    stream_batches,
    stream_packets,
    wait_for_committed,
)

from rtmonitor.ingest.v1.telemetry_pb2 import Batch
from rtmonitor.loadgen.sender import SendReport, send
from rtmonitor.storage.embedded import EmbeddedRedis


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


def test_each_replica_reports_every_instance_and_their_sum(
    redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    replicas = start_replicas(tmp_path, redis_server.url, 2)
    try:
        for i, r in enumerate(replicas):  # packets to one replica, batches to the other
            run(stream_packets(r.target, [packet(f"p{i}-{n}") for n in range(30 + i)]))
            batch = Batch(producer_id=f"b{i}", batch_id=1, packets=[packet("b")] * (50 + i))
            run(stream_batches(r.target, [batch]))
        sent = 30 + 50 + 31 + 51
        views = [wait_for_committed(r.http, sent) for r in replicas]
        for stats in views:
            assert stats["flush"]["packets_committed"] == sent
            assert len(stats["instances"]) == 2
            committed = sorted(i["flush"]["packets_committed"] for i in stats["instances"].values())
            assert committed == [80, 82]
        assert views[0]["instance_id"] != views[1]["instance_id"]
        assert set(views[0]["instances"]) == set(views[1]["instances"])
        for r in replicas:
            scraped = self_metrics(r.http)
            assert scraped["rtm_committed_packets_total"] == sent
            assert scraped["rtm_flushes_total"] >= 2
            assert scraped["rtm_ingest_instances"] == 2
    finally:
        for r in replicas:
            r.kill()
