"""A real mosquitto on a free port with a generated configuration: what `bench --modes
mqtt` measures against, and what the MQTT tests start."""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Self

from rtmonitor.storage.embedded import free_port


def mosquitto_binary(name: str = "mosquitto") -> str | None:
    """mosquitto (Debian puts it in /usr/sbin, often not on a user's PATH) or one of its
    clients (mosquitto_pub, mosquitto_sub); None if not installed."""
    found = shutil.which(name)
    if found is None and os.access(f"/usr/sbin/{name}", os.X_OK):
        found = f"/usr/sbin/{name}"
    return found


class Mosquitto:
    """mosquitto on 127.0.0.1 and a free port, data and log in `directory`. Persistence is
    on (a restart keeps sessions and their queued messages) and nothing limits what it
    queues for a disconnected session."""

    def __init__(self, directory: Path, *, listener: str = "", anonymous: bool = True) -> None:
        """`listener`: more lines for the listener (TLS files, password_file)."""
        binary = mosquitto_binary()
        if binary is None:
            raise RuntimeError("mosquitto is not installed (apt-get install mosquitto)")
        self.binary = binary
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"{listener}"
            f"allow_anonymous {'true' if anonymous else 'false'}\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            f"log_dest file {self.dir}/mosquitto.log\n"
            # run as root, mosquitto would switch to its own user, who cannot write here
            f"user {getpass.getuser()}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self, timeout: float = 10.0) -> Self:
        """Start it and wait until it listens."""
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(self.conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited with {self.proc.returncode}") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("mosquitto did not listen in time") from None
                time.sleep(0.05)

    def stop(self) -> None:
        """SIGTERM: mosquitto saves its persistence file and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
