"""A real 3-master Redis Cluster on free ports, from the embedded launcher's binaries."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import redis

from rtmonitor.storage.embedded import EmbeddedRedis, redis_server_binary


class RedisClusterFixture:
    """Three cluster-enabled redis-server processes joined with `redis-cli --cluster`."""

    def __init__(self, base: Path, masters: int = 3) -> None:
        self.nodes = [
            EmbeddedRedis(
                base / f"node{i}",
                extra_config={
                    "cluster-enabled": "yes",
                    "cluster-config-file": "nodes.conf",
                    "cluster-node-timeout": "2000",
                },
            )
            for i in range(masters)
        ]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisClusterFixture:
        for node in self.nodes:
            node.start()
        cli = str(Path(redis_server_binary()).with_name("redis-cli"))
        if not Path(cli).exists():
            cli = shutil.which("redis-cli") or "redis-cli"
        addresses = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run(
            [cli, "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while True:
            states = [
                redis.Redis(port=n.port, decode_responses=True).cluster("info") for n in self.nodes
            ]
            if all(s["cluster_state"] == "ok" for s in states):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok: {states}")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
