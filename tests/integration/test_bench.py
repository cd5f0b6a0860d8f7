"""`rtmonitor bench` end to end (short): it runs, verifies exactly, reports every figure."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import cast

import grpc
import pytest
import redis
from helpers import ServiceProcess, load

from rtmonitor.config import SendSettings
from rtmonitor.loadgen import bench, sender
from rtmonitor.loadgen.sender import run_loop, send
from rtmonitor.storage.embedded import EmbeddedRedis, free_port


def test_bench_runs_and_verifies_exactly(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable, "-m", "rtmonitor", "bench", "--duration", "1",
            "--modes", "packets,columns", "--devices", "20", "--output", str(out),
        ],
        check=True,
        timeout=180,
        capture_output=True,
    )  # fmt: skip
    doc = json.loads(out.read_text())
    results = {r["mode"]: r for r in doc["results"]}
    assert set(results) == {"packets", "columns"}
    for r in results.values():
        assert r["exact"] is True and r["errors"] == []
        assert r["acked"] > 0 and r["committed"] == r["acked"]
        assert r["e2e_pps"] > 0 and r["ceiling_pps"] > 0 and 0 < r["ratio_to_ceiling"]
        assert r["freshness_ms_samples"] > 0 and r["freshness_ms_p99"] >= r["freshness_ms_p50"]
        assert r["get_device_ms_samples"] > 0 and r["peak_rss_mb"] > 0
        # the list probe takes the sorts in turn (the target: any sort), each one
        # counted on its own as well
        sorts = ("device_id", "packets", "bytes", "rate", "last_seen")
        assert r["get_metrics_ms_samples"] > 0
        assert sum(r[f"get_metrics_{s}_ms_samples"] for s in sorts) == r["get_metrics_ms_samples"]
        assert isinstance(r["redis_bytes_per_device"], int)
        assert isinstance(r["redis_forks"], int) and isinstance(r["redis_stalls"], dict)
        # the HTTP process's event-loop lag during the load (bucket bounds, ms)
        assert 0 < r["loop_lag_ms_p50"] <= r["loop_lag_ms_p99"] <= 5000
        # the service's CPU until everything was committed (not the check's reads)
        for figure in ("service_cpu_ns_per_packet", "redis_us_per_merge"):
            assert isinstance(r[figure], int | float) and r[figure] > 0, (figure, r[figure])
        # the embedded Redis's main thread: on a CPU, and waiting for one, over that time
        assert 0 < r["redis_ran_share"] <= 1.05 and 0 <= r["redis_waited_share"] <= 1.05
    # the load generator's window (StreamBatches only): 2 streams x 128 batches x 10,000
    columns = results["columns"]
    assert columns["window_packets"] == 2 * 128 * 10_000
    assert 0 <= columns["window_wait_share"] < 1 and columns["ack_latency_ms"] > 0
    assert "window_packets" not in results["packets"]


def test_send_reports_how_long_its_window_held_it_back(service: ServiceProcess) -> None:
    """A stream that may have one batch unacknowledged waits for each ack (its commit: a
    flush) nearly all the time; one paced well below what its window allows never does.
    bench reports the share and says when it bounded the rate (WINDOW_BOUND_SHARE)."""

    def window(inflight: int, rate: float | None) -> dict[str, object]:
        opts = load(service.target, devices=10, duration=1.5, batch_size=100, streams=1,
                    inflight=inflight, rate=rate)  # fmt: skip
        report = run_loop(send(opts))
        assert report.errors == [] and report.accepted == report.sent
        return report.as_dict()

    tight = window(1, None)  # (writing a batch takes microseconds; its ack a flush)
    assert cast(float, tight["window_wait_share"]) > 0.9, tight
    assert cast(float, tight["ack_latency_ms"]) > 0
    paced = window(64, 2000)  # a batch every 50 ms, acked within a flush or two
    assert cast(float, paced["window_wait_share"]) < 0.2, paced  # (the last acks: waited)
    assert cast(float, paced["ack_latency_ms"]) > 0


def test_a_first_round_registers_the_fleet_before_the_timed_load(tmp_path: Path) -> None:
    """--first-round: each device sends once first (counted, verified with the rest), and
    the figures are of the timed load alone."""
    out = tmp_path / "bench.json"
    subprocess.run(
        [
            sys.executable, "-m", "rtmonitor", "bench", "--duration", "1", "--modes", "rows",
            "--devices", "3000", "--first-round", "--no-ceiling", "--output", str(out),
        ],
        check=True,
        timeout=180,
        capture_output=True,
    )  # fmt: skip
    (r,) = json.loads(out.read_text())["results"]
    # exact: Redis holds the first round's packet of each device plus the timed load's
    assert r["exact"] is True and r["errors"] == [] and r["committed"] == r["acked"]
    assert r["first_round_pps"] > 0 and r["first_round_s"] > 0
    # the timed load's merges and flushes: at most the fleet and the probe's device each
    assert 0 < r["device_merges"] <= 3001 * r["flushes"]
    # Redis's memory is measured from before the first round: the devices' records are in
    # it (~700 B each here; ~90 B from after the first round, which holds them already)
    assert r["redis_bytes_per_device"] > 300


def test_a_sends_time_starts_once_its_packets_are_built(
    service: ServiceProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Building a million devices' packets takes `send` seconds before its first send: the
    report's rate and bench's e2e start from its first send (SendReport.started_at), not
    from the call."""
    build = sender.PacketPool.__init__

    def slow_build(self: sender.PacketPool, opts: SendSettings) -> None:
        time.sleep(1.0)
        build(self, opts)

    monkeypatch.setattr(sender.PacketPool, "__init__", slow_build)
    called = time.time()
    settings = SendSettings(  # type: ignore[call-arg]  # pydantic fills in the rest
        target=service.target, devices=10, count=1000, batch_size=100, progress=False
    )
    report = run_loop(send(settings))
    ended = time.time()
    assert report.errors == [] and report.accepted == 1000
    assert report.started_at >= called + 1.0
    assert report.started_at + report.elapsed <= ended + 0.01


def test_e2e_ends_once_redis_holds_what_was_acked_not_when_the_counts_are_handed_over(
    service: ServiceProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A load generator says how many packets were acknowledged at its last ack, before it
    builds and hands over its per-device counts (seconds at a million devices): the moment
    everything is committed is watched for from then on (bench._watch_commit), while its
    result has not come back; and a load generator that failed ends the watch."""
    report = run_loop(send(load(service.target, devices=10, count=2000, batch_size=100)))
    assert report.errors == [] and report.accepted == 2000
    context = bench.multiprocessing.get_context("spawn")
    acked_to = context.Queue()
    handing_over: Future[dict[str, object]] = Future()  # (its result not back yet)
    for share in (1500, 500):
        acked_to.put(share)
    readings: list[int] = []

    def read(acked: int) -> dict[str, object]:
        readings.append(acked)
        return {"taken": True}

    commit = bench._watch_commit(service, acked_to, [handing_over, handing_over], 0, read)
    assert commit is not None and not handing_over.done()
    assert commit.packets == 2000 and readings == [2000] and commit.readings == {"taken": True}
    assert time.time() - 5 < commit.at <= time.time()

    acked_to.put(None)  # a load generator whose send raised says so
    assert bench._watch_commit(service, acked_to, [Future()], 0, read) is None
    died: Future[dict[str, object]] = Future()
    died.set_exception(RuntimeError("a load generator's process died"))
    assert bench._watch_commit(service, acked_to, [died], 0, read) is None
    # one that returned and whose count never came: given up on after _QUIET_S
    returned: Future[dict[str, object]] = Future()
    returned.set_result({})
    monkeypatch.setattr(bench, "_QUIET_S", 0.3)
    assert bench._watch_commit(service, acked_to, [returned], 0, read) is None
    assert readings == [2000]


def test_the_loop_lag_of_the_load_is_read_between_two_readings() -> None:
    """bench's loop-lag figures: of the probes between the two readings only; none from a
    service without the section (an older one) or without a probe between; past the last
    bucket's bound, said as a string (JSON has no infinity)."""
    before = {"1": 5, "2": 5, "5": 5, "+Inf": 5}
    after = {"1": 54, "2": 103, "5": 105, "+Inf": 105}  # (49, 98, 100 between)
    assert bench._loop_lag(before, after) == {"loop_lag_ms_p50": 2.0, "loop_lag_ms_p99": 5.0}
    assert bench._loop_lag({}, {}) == {} and bench._loop_lag(after, after) == {}
    beyond = {**after, "+Inf": 110}
    assert bench._loop_lag(after, beyond)["loop_lag_ms_p99"] == f">{bench.LAG_BUCKETS_MS[-1]}"


def test_bench_reports_what_stalled_redis_and_puts_its_threshold_back(
    redis_server: EmbeddedRedis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Redis's latency monitor, watched for the timed load: a command that holds Redis for
    0.3 s is reported as a stall of at least that, with the second it happened in; one from
    before the watch is not, and Redis's history of it is left alone; the threshold Redis had
    is put back, also when reading the stalls fails."""
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    busy = "local t = redis.call('TIME') local s = t[1] + t[2] / 1e6 repeat t = redis.call('TIME') until t[1] + t[2] / 1e6 - s > tonumber(ARGV[1])"  # noqa: E501
    threshold = "latency-monitor-threshold"
    client.config_set(threshold, 7)
    client.eval(busy, 0, 0.05)  # (before the watch, in an earlier second)
    time.sleep(1.1)
    watch = bench._watch_stalls(redis_server.url)
    assert watch is not None and watch.had == "7"
    assert client.config_get(threshold)[threshold] == str(bench.STALL_THRESHOLD_MS)
    assert bench._stalls(redis_server.url, watch) == {"redis_stalls": {}}
    client.eval(busy, 0, 0.3)
    stalls = bench._stalls(redis_server.url, watch)["redis_stalls"]
    assert set(stalls) == {"command"}
    assert stalls["command"]["max_ms"] >= 300 and stalls["command"]["seconds"] == 1
    assert len(client.latency_history("command")) == 2  # (the operator's sample is kept)
    bench._unwatch_stalls(redis_server.url, watch)
    assert client.config_get(threshold)[threshold] == "7"
    # a reply it cannot read (or a Redis that refuses): nothing reported, threshold put back
    watch = bench._watch_stalls(redis_server.url)
    monkeypatch.setattr(redis.Redis, "latency_latest", lambda self: [["command"]])
    monkeypatch.setattr(redis.Redis, "latency_history", lambda self, event: [["x"]])
    assert bench._stalls(redis_server.url, watch) == {}
    bench._unwatch_stalls(redis_server.url, watch)
    assert client.config_get(threshold)[threshold] == "7"
    assert bench._stalls(redis_server.url, None) == {}


def test_the_seed_baseline_counts_what_send_sends(redis_server: EmbeddedRedis) -> None:
    """benchmarks/seed_design.py (the "N x the seed" baseline) takes `send`'s per-packet
    stream and counts every packet in Redis, one HINCRBY each."""
    port = free_port()
    script = Path(__file__).parents[2] / "benchmarks" / "seed_design.py"
    seed = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--redis-url", redis_server.url]
    )
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            grpc.channel_ready_future(channel).result(timeout=30)
        settings = SendSettings(  # type: ignore[call-arg]  # pydantic fills in the rest
            target=f"127.0.0.1:{port}",
            devices=7,
            count=700,
            batch_size=1,
            device_prefix="d-",
            progress=False,
        )
        report = asyncio.run(send(settings))
        assert report.errors == [] and report.accepted == 700
        client = redis.Redis.from_url(redis_server.url)
        try:
            counts = [int(client.hget(f"seed:d-{d:05d}", "packets") or 0) for d in range(7)]
        finally:
            client.close()
        assert sum(counts) == 700 and min(counts) > 0
        seed.terminate()
        assert seed.wait(10) == 0  # SIGTERM stops it cleanly
    finally:
        if seed.poll() is None:
            seed.kill()
            seed.wait()


def test_load_generators_run_on_uvloop() -> None:
    """`send` and bench's generators share the machine with the service they measure: they
    run on uvloop (less CPU per packet sent), which is a dependency on this platform."""

    async def loop_module() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run_loop(loop_module()).startswith("uvloop")
