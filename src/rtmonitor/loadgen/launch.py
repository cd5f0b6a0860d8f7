"""`rtmonitor serve` as a child process on free ports: what `bench` measures, and what the
tests start (tests/helpers adds log files, resource limits and restarts on top)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from typing import IO, Self

import httpx

from rtmonitor.clients import ClientSecurity
from rtmonitor.storage.embedded import free_port


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without RTM_*/REDIS_* settings (a child `serve` gets
    its options from its flags only), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTM_", "REDIS_"))}
    env.update(extra or {})
    return env


def wait_until_ready(
    proc: subprocess.Popen[bytes],
    http: str,
    timeout: float,
    log: Callable[[], str] = str,
    client: ClientSecurity | None = None,
) -> None:
    """Wait until a child `serve` answers GET /readyz with 200; raise RuntimeError (with
    `log()`) if it exits or stays unready past `timeout` seconds."""
    deadline = time.monotonic() + timeout
    with (client or ClientSecurity()).http_client(timeout=1) as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode}\n{log()}")
            try:
                if session.get(f"{http}/readyz").status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
    raise RuntimeError(f"the service did not become ready within {timeout:g}s\n{log()}")


class ServeProcess:
    """`rtmonitor serve --host 127.0.0.1` on free ports (never 50051/8000) plus `flags`.

    `env` is added to this process's environment minus its RTM_*/REDIS_* settings. With
    `output`, the child's stdout and stderr go there; without, stdout is discarded and
    stderr (warnings, errors) is inherited."""

    def __init__(
        self,
        *flags: str,
        env: dict[str, str] | None = None,
        grpc_port: int | None = None,
        http_port: int | None = None,
        output: IO[bytes] | None = None,
        preexec_fn: Callable[[], None] | None = None,
        client: ClientSecurity | None = None,
    ) -> None:
        # How to reach it: its token, and its CA when it serves TLS (http becomes https).
        self.client = client or ClientSecurity()
        self._chosen = (grpc_port is None, http_port is None)  # ports picked here
        self.grpc_port = grpc_port or free_port()
        self.http_port = http_port or free_port()
        self._flags, self._env, self._output, self._preexec_fn = flags, env, output, preexec_fn
        self._spawn()

    def _spawn(self) -> None:
        args = [
            sys.executable, "-m", "rtmonitor", "serve", "--host", "127.0.0.1",
            "--grpc-port", str(self.grpc_port), "--http-port", str(self.http_port),
            *self._flags,
        ]  # fmt: skip
        self._log_from = len(self.log())
        output = self._output
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL if output is None else output,
            stderr=None if output is None else subprocess.STDOUT,
            env=child_env(self._env),
            preexec_fn=self._preexec_fn,
        )

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    @property
    def http(self) -> str:
        scheme = "https" if self.client.tls else "http"
        return f"{scheme}://127.0.0.1:{self.http_port}"

    def log(self) -> str:
        """What the child wrote, for error messages (nothing unless a subclass keeps it)."""
        return ""

    def wait_ready(self, timeout: float = 30.0) -> Self:
        """Wait until it answers /readyz. A port picked here can be taken by another
        process before the child binds it (free_port only knows it was free a moment ago):
        when its log says so, it starts again on new ports, up to twice."""
        retries = 2
        while True:
            try:
                wait_until_ready(self.proc, self.http, timeout, self.log, self.client)
                return self
            except RuntimeError:
                lost = "cannot listen for" in self.log()[self._log_from :]
                if not retries or self.proc.poll() is None or not lost or not any(self._chosen):
                    raise
            retries -= 1
            if self._chosen[0]:
                self.grpc_port = free_port()
            if self._chosen[1]:
                self.http_port = free_port()
            self._spawn()

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the clean stop (raises TimeoutExpired if it does not end)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it has not ended within `timeout` seconds."""
        try:
            self.terminate(timeout)
        except subprocess.TimeoutExpired:
            self.kill()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def memory_mb(pid: int, field: str = "VmRSS") -> float:
    """A process's memory from /proc/<pid>/status, in MiB: VmRSS (now) or VmHWM (peak)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) / 1024
    raise ValueError(f"no {field} for process {pid}")
