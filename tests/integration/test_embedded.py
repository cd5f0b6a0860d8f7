"""The embedded Redis launcher: free ports, persistence, one owner per data directory."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis

from rtmonitor.storage.embedded import EmbeddedRedis, EmbeddedRedisError


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
    client.close()
    again.stop()


def test_kill_and_restart_on_same_port(tmp_path: Path) -> None:
    server = EmbeddedRedis(tmp_path).start()
    port = server.port
    server.kill()
    server.start()
    assert server.port == port
    assert redis.Redis.from_url(server.url).ping()
    server.stop()
