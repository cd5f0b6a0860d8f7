"""A real 3-master Redis Cluster on free ports, from the embedded launcher's binaries."""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis

from rtmonitor.storage.embedded import EmbeddedRedis, free_port, redis_server_binary

# A cluster node also listens on its port + 10000 (the cluster bus): ports above this refuse
# to start ("Redis port number too high"), and the OS's free ports often are.
_MAX_CLUSTER_PORT = 55535


def cluster_port() -> int:
    """A free port whose cluster-bus port (+10000) is free too."""
    for _ in range(1000):
        port = free_port()
        if port > _MAX_CLUSTER_PORT:
            continue
        with socket.socket() as bus:
            try:
                bus.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair (port, port + 10000) for a cluster node")


class RedisClusterFixture:
    """Three cluster-enabled redis-server processes joined with `redis-cli --cluster`."""

    def __init__(self, base: Path, masters: int = 3) -> None:
        # One password for all: a cluster client uses its URL's for every node it finds.
        self.password = secrets.token_urlsafe(32)
        self.nodes = [
            EmbeddedRedis(
                base / f"node{i}",
                cluster_port(),
                password=self.password,
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
        try:
            return self._start()
        except BaseException:
            self.stop()  # no node left running (or its lock file open) after a failed start
            raise

    def _start(self) -> RedisClusterFixture:
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
            env={**os.environ, "REDISCLI_AUTH": self.password},  # not on its command line
        )
        deadline = time.monotonic() + 30
        while True:
            states = [
                redis.Redis(port=n.port, password=self.password, decode_responses=True).cluster(
                    "info"
                )
                for n in self.nodes
            ]
            if all(s["cluster_state"] == "ok" for s in states):
                return self
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok: {states}")
            time.sleep(0.1)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
