"""The embedded Redis: supervised (a kill -9 is restarted, losing nothing acknowledged),
ours alone (a port taken by another Redis is refused), password-protected and bounded in
memory (a full Redis refuses writes; backpressure holds, nothing acknowledged is lost)."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import time
from pathlib import Path

import httpx
import pytest
import redis
from helpers import ServiceProcess, get_json, packet, stream_packets

from rtmonitor.storage.embedded import EmbeddedRedis, free_port

DEVICES = [f"emb-{i}" for i in range(5)]


def embedded_service(tmp_path: Path, *extra: str, port: int | None = None) -> ServiceProcess:
    """`rtmonitor serve` with no --redis-url: it starts its own Redis under tmp_path/data."""
    port = port or free_port()
    svc = ServiceProcess(
        None,
        tmp_path / "svc.log",
        "--data-dir",
        str(tmp_path / "data"),
        "--embedded-redis-port",
        str(port),
        *extra,
    )
    return svc.wait_ready()


def redis_child(svc: ServiceProcess) -> int:
    """The pid of the service's redis-server child, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            comm = (entry / "comm").read_text().strip()
        except OSError:
            continue
        if int(fields[1]) == svc.proc.pid and comm.startswith("redis-server"):
            return int(entry.name)
    raise AssertionError(f"no redis-server child of {svc.proc.pid}")


def password_of(tmp_path: Path) -> str:
    """What an operator reads to reach the embedded Redis: its 0600 config file."""
    conf = tmp_path / "data" / "redis.conf"
    for line in conf.read_text().splitlines():
        if line.startswith("requirepass "):
            return line.split(" ", 1)[1]
    raise AssertionError("no requirepass in redis.conf")


def counted(svc: ServiceProcess) -> int:
    total = 0
    for d in DEVICES:
        r = httpx.get(f"{svc.http}/metrics/{d}", timeout=10)
        if r.status_code == 200:
            total += int(r.json()["packets"])
    return total


def test_a_killed_embedded_redis_is_restarted_and_loses_nothing(tmp_path: Path) -> None:
    svc = embedded_service(tmp_path)
    try:
        old_pid = redis_child(svc)

        async def main() -> tuple[int, float]:
            acked = 0
            stop = asyncio.Event()

            async def send() -> None:
                nonlocal acked
                i = 0
                while not stop.is_set():
                    batch = [packet(DEVICES[(i + j) % len(DEVICES)]) for j in range(50)]
                    ack = await asyncio.wait_for(stream_packets(svc.target, batch), 60)
                    acked += ack.accepted
                    i += 1
                    await asyncio.sleep(0.02)

            sender = asyncio.create_task(send())
            try:
                await asyncio.sleep(1.0)
                assert acked > 0
                os.kill(old_pid, signal.SIGKILL)
                killed = time.monotonic()
                async with httpx.AsyncClient(timeout=2) as http:
                    await asyncio.sleep(0.3)
                    while (await http.get(f"{svc.http}/readyz")).status_code != 200:
                        assert time.monotonic() - killed < 10, "still not ready 10 s after"
                        await asyncio.sleep(0.1)
                back_after = time.monotonic() - killed
                await asyncio.sleep(1.0)  # more batches through the restarted Redis
            finally:
                stop.set()
                await asyncio.wait_for(sender, 60)
            return acked, back_after

        acked, back_after = asyncio.run(main())
        assert back_after < 10
        assert redis_child(svc) != old_pid
        assert counted(svc) == acked
        embedded = get_json(svc.http, "/stats")["embedded_redis"]
        assert embedded["restarts"] == 1 and embedded["up"] is True
        text = httpx.get(f"{svc.http}/metrics", params={"format": "prometheus"}).text
        assert "rtm_embedded_redis_restarts_total 1" in text
        assert "restarted" in svc.log()
    finally:
        svc.kill()


def test_a_port_taken_by_another_redis_is_refused(tmp_path: Path) -> None:
    other = EmbeddedRedis(tmp_path / "other").start()
    try:
        log = tmp_path / "svc.log"
        svc = ServiceProcess(
            None,
            log,
            "--data-dir",
            str(tmp_path / "data"),
            "--embedded-redis-port",
            str(other.port),
        )
        try:
            code = svc.proc.wait(30)
        except Exception:
            svc.kill()
            raise AssertionError(f"the service started on another's Redis:\n{svc.log()}") from None
        svc.kill()
        text = svc.log()
        assert code != 0
        assert "Traceback" not in text
        [line] = [ln for ln in text.splitlines() if "ERROR" in ln]
        assert "--embedded-redis-port" in line and str(other.port) in line
        # and nothing was written to the other Redis
        client = redis.Redis.from_url(other.url)
        assert client.dbsize() == 0
        client.close()
    finally:
        other.stop()


def test_the_embedded_redis_wants_a_password_that_is_never_shown(tmp_path: Path) -> None:
    port = free_port()
    svc = embedded_service(tmp_path, port=port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"HINCRBY rtm:dev:emb-0 packets 1000\r\n")
            assert s.recv(256).startswith(b"-NOAUTH")
        password = password_of(tmp_path)
        assert len(password) >= 32
        conf = tmp_path / "data" / "redis.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        cmdline = Path(f"/proc/{redis_child(svc)}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        stats = httpx.get(f"{svc.http}/stats").text
        assert password not in svc.log() and password not in stats
        assert "ready" in svc.log()
        client = redis.Redis(port=port, password=password)
        assert client.ping()
        client.close()
    finally:
        svc.terminate()
    assert password not in svc.log()


def test_the_embedded_redis_data_is_this_users_only(tmp_path: Path) -> None:
    """The AOF and RDB hold every device's counts: the data directory is 0700 (also one
    an older version left 0755) and what Redis writes in it is not group/other-readable."""
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    data.chmod(0o755)
    embedded = EmbeddedRedis(data).start()
    try:
        client = redis.Redis.from_url(embedded.url)
        client.set("k", "v")
        client.save()
        client.close()
    finally:
        embedded.stop()
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    fresh = EmbeddedRedis(tmp_path / "new" / "data").start()
    fresh.stop()
    assert stat.S_IMODE((tmp_path / "new" / "data").stat().st_mode) == 0o700
    written = [p for p in data.rglob("*") if p.name != ".rtmonitor.lock"]
    assert any("appendonly" in p.name for p in written) and (data / "dump.rdb").exists()
    for path in written:
        assert stat.S_IMODE(path.stat().st_mode) & 0o077 == 0, (path, oct(path.stat().st_mode))


@pytest.mark.parametrize("workers", [1, 2])
def test_a_full_embedded_redis_refuses_writes_and_loses_nothing(
    tmp_path: Path, workers: int
) -> None:
    """--embedded-redis-maxmemory: past it Redis refuses writes (OOM); the service stays up,
    says why it is not ready, holds the acks, and commits everything once there is room.
    With --workers the worker whose commits fail tells its supervisor's /readyz (through
    shared memory: a full Redis refuses the figures a worker publishes there too)."""
    port = free_port()
    extra = ("--workers", str(workers)) if workers > 1 else ()
    svc = embedded_service(tmp_path, "--embedded-redis-maxmemory", "2", *extra, port=port)
    try:

        async def main() -> tuple[int, int]:
            acked = 0
            for i in range(400):
                batch = [packet(f"fill-{i}-{j}", t=1.0, h=2.0) for j in range(100)]
                pending = asyncio.create_task(stream_packets(svc.target, batch))
                done, _ = await asyncio.wait({pending}, timeout=3)
                if not done:
                    break  # Redis is full: the ack waits for a commit that cannot happen
                acked += pending.result().accepted
            else:
                raise AssertionError("2 MB held 40,000 devices: maxmemory is not applied")
            async with httpx.AsyncClient(timeout=2) as http:
                assert (await http.get(f"{svc.http}/healthz")).status_code == 200
                for _ in range(20):  # (a worker reports every 0.5 s)
                    ready = await http.get(f"{svc.http}/readyz")
                    if ready.status_code == 503:
                        break
                    await asyncio.sleep(0.1)
                reasons = " ".join(ready.json()["reasons"])
                assert ready.status_code == 503 and "commits to Redis fail" in reasons
                assert "OOM" in reasons
                stats = (await http.get(f"{svc.http}/stats")).json()
                assert "OOM" in " ".join(stats["not_ready_reasons"])
                if workers == 1:
                    assert "OOM" in stats["flush"]["redis_error"]
            assert not pending.done()
            # The operator makes room (here: lifts the limit); the held acks come.
            client = redis.Redis(port=port, password=password_of(tmp_path))
            client.config_set("maxmemory", 0)
            client.close()
            ack = await asyncio.wait_for(pending, 30)
            return acked + ack.accepted, i + 1

        acked, batches = asyncio.run(main())
        assert acked == batches * 100
        totals = get_json(svc.http, "/metrics")["totals"]
        assert totals["packets"] == acked
        deadline = time.monotonic() + 5  # (a worker's report may be 0.5 s old)
        while (ready := httpx.get(f"{svc.http}/readyz")).status_code != 200:
            assert time.monotonic() < deadline, ready.json()
            time.sleep(0.1)
    finally:
        svc.kill()
