"""The edges of the process: idle connections, open files, the log, secrets, bad settings."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from helpers import ServiceProcess, get_json, healthz_seconds, packet, run, stream_packets

from rtmonitor.loadgen.launch import child_env
from rtmonitor.logs import RepeatFilter, redact_url
from rtmonitor.storage.embedded import EmbeddedRedis, free_port, redis_server_binary

# --- idle HTTP connections and open files (item 5) ------------------------------------------


def _open_idle(port: int, n: int) -> list[socket.socket]:
    """`n` TCP connections to `port` that never send a byte (non-blocking connects)."""
    conns = []
    for _ in range(n):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        conns.append(s)
    return conns


@pytest.fixture
def many_files() -> Iterator[None]:
    """Let this test process hold a few thousand sockets (the attacker's side)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = min(hard, 4096) if hard != resource.RLIM_INFINITY else 4096
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, wanted), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_idle_connections_beyond_the_open_file_limit_cannot_stall_the_service(
    tmp_path: Path, redis_server: EmbeddedRedis, many_files: None
) -> None:
    # Started with a soft limit of 64 open files and a hard limit of 256: the service
    # raises its soft limit to 256 and keeps its HTTP connections to an eighth of it.
    log = tmp_path / "service.log"
    svc = ServiceProcess(
        redis_server.url, log, limits={resource.RLIMIT_NOFILE: (64, 256)}
    ).wait_ready()
    conns: list[socket.socket] = []
    try:
        assert "open-file limit 256 (raised from 64)" in svc.log()
        assert "at most 32 HTTP connections" in svc.log()
        start = time.monotonic()
        for _ in range(4):  # 400 idle connections in all, more than the 256 files it may open
            for _ in range(10):  # in steps the listen backlog holds: no SYN is dropped
                conns += _open_idle(svc.http_port, 10)
                time.sleep(0.05)
            assert healthz_seconds(svc.http) < 1.0
        ack = run(asyncio.wait_for(stream_packets(svc.target, [packet("edge-1")]), 10))
        assert ack.accepted == 1
        http = get_json(svc.http, "/stats")["http"]
        assert http["max_connections"] == 32
        assert http["connections"] <= 32
        assert http["evicted"] >= 400 - 32
        time.sleep(max(0.0, 10 - (time.monotonic() - start)))
        assert healthz_seconds(svc.http) < 1.0
        assert log.stat().st_size < 200_000, svc.log()[-3000:]
        assert "Traceback" not in svc.log()
    finally:
        for s in conns:
            s.close()
        svc.kill()


def _closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes `sock` within `seconds` (reading whatever it sends)."""
    sock.settimeout(seconds)
    deadline = time.monotonic() + seconds
    with contextlib.suppress(TimeoutError, ConnectionResetError):
        while time.monotonic() < deadline:
            if not sock.recv(4096):
                return True
    return False


def test_connections_that_never_finish_a_request_are_closed(
    start_service: Callable[..., ServiceProcess],
) -> None:
    svc = start_service("--http-idle-timeout", "1")
    silent = socket.create_connection(("127.0.0.1", svc.http_port))
    slow = socket.create_connection(("127.0.0.1", svc.http_port))
    try:
        slow.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")
        # Slowloris: a header byte every 0.3 s never completes the request.
        t0 = time.monotonic()
        closed = False
        while time.monotonic() - t0 < 6 and not closed:
            with contextlib.suppress(OSError):
                slow.sendall(b"X")
            closed = _closed_within(slow, 0.3)
        assert closed, "a connection trickling its headers was not closed"
        assert time.monotonic() - t0 < 4
        assert _closed_within(silent, 3.0), "a silent connection was not closed"
        assert get_json(svc.http, "/stats")["http"]["idle_closed"] >= 2
        assert healthz_seconds(svc.http) < 1.0
    finally:
        silent.close()
        slow.close()


def test_a_connection_in_use_is_not_closed_as_idle(
    start_service: Callable[..., ServiceProcess],
) -> None:
    """The idle timeout counts from the end of the last response: a client asking every
    0.1 s keeps its one connection well past it (it was closed once `--http-idle-timeout`
    had passed since it opened, unless the once-a-second sweep caught a request)."""
    svc = start_service("--http-idle-timeout", "1")
    with httpx.Client(base_url=svc.http, timeout=5) as client:
        ports = set()
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.5:
            r = client.get("/healthz")
            assert r.status_code == 200
            stream = r.extensions["network_stream"]
            ports.add(stream.get_extra_info("client_addr")[1])
            time.sleep(0.1)
    assert len(ports) == 1, "the connection was closed and reopened"
    assert get_json(svc.http, "/stats")["http"]["idle_closed"] == 0


def test_one_connection_more_than_the_limit_is_refused_when_none_is_idle(
    start_service: Callable[..., ServiceProcess],
) -> None:
    svc = start_service("--http-max-connections", "2")
    streams = []
    try:
        for _ in range(2):  # two busy connections: live SSE streams
            s = socket.create_connection(("127.0.0.1", svc.http_port))
            s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
            s.settimeout(5)
            assert s.recv(4096).startswith(b"HTTP/1.1 200")
            streams.append(s)
        r = httpx.get(f"{svc.http}/healthz", timeout=5)
        assert r.status_code == 503
        assert "--http-max-connections" in r.json()["detail"]
    finally:
        for s in streams:
            s.close()
    deadline = time.monotonic() + 5
    while httpx.get(f"{svc.http}/healthz", timeout=5).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert get_json(svc.http, "/stats")["http"]["refused"] >= 1


# --- the log: repeats are rate-limited (item 5) -----------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _logger_with(flt: RepeatFilter) -> tuple[logging.Logger, list[str]]:
    out: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            out.append(self.format(record))

    handler = Capture()
    handler.addFilter(flt)
    log = logging.getLogger(f"test-edges-{secrets.token_hex(4)}")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return log, out


def test_repeated_log_records_are_suppressed_and_counted() -> None:
    clock = _Clock()
    log, out = _logger_with(RepeatFilter(window_s=10, burst=2, clock=clock))

    def fail(what: object) -> None:
        log.error("accept() failed: %s", what)  # one call site, as in a loop that floods

    for i in range(1000):
        fail(i)
    assert out == ["accept() failed: 0", "accept() failed: 1"]
    clock.now = 10.0
    fail("later")
    assert out[-1] == "accept() failed: later [998 similar messages suppressed]"


def test_different_log_messages_are_never_suppressed() -> None:
    clock = _Clock()
    log, out = _logger_with(RepeatFilter(window_s=10, burst=1, clock=clock))
    for i in range(2000):  # more kinds than the filter tracks
        log.warning(f"message number {i}")  # noqa: G004 - a different template each time
    log.warning("one %s", "a")
    log.info("one %s", "b")  # another level: another kind
    assert len(out) == 2002


# --- secrets in logs (item 11) ----------------------------------------------------------------


def test_redact_url_hides_passwords_only() -> None:
    assert redact_url("redis://:s3cret@h:1/0") == "redis://:***@h:1/0"
    assert redact_url("rediss://user:s3cret@h:1/0") == "rediss://user:***@h:1/0"
    assert redact_url("redis://h:1/0?password=s3cret&db=1") == "redis://h:1/0?password=***&db=1"
    assert redact_url("at redis://user@h:1/0 and unix://:p@/tmp/s") == (
        "at redis://user@h:1/0 and unix://:***@/tmp/s"
    )
    assert redact_url("redis://h:1/0") == "redis://h:1/0"


def _password_redis(tmp_path: Path, password: str) -> tuple[subprocess.Popen[bytes], int]:
    """A real redis-server that wants `password` (AUTH), on a free port."""
    port = free_port()
    conf = tmp_path / "pw-redis.conf"
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\ndir {tmp_path}\n'
        f"requirepass {password}\n"
    )
    conf.chmod(0o600)
    proc = subprocess.Popen(
        [redis_server_binary(), str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1) as s:
            s.sendall(f"AUTH {password}\r\nPING\r\n".encode())
            time.sleep(0.05)
            if b"+PONG" in s.recv(256):
                return proc, port
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the password-protected redis-server did not start")


def test_a_redis_password_never_reaches_the_log_or_a_response(tmp_path: Path) -> None:
    password = secrets.token_hex(16)  # made here: no secret in a fixture in git
    wrong = secrets.token_hex(16)
    redis, port = _password_redis(tmp_path, password)
    started: list[ServiceProcess] = []
    try:
        # Wrong password, then nobody listening: the retry warnings name the URL.
        for n, url in enumerate(
            [f"redis://:{wrong}@127.0.0.1:{port}/0", f"redis://u:{wrong}@127.0.0.1:1/0"]
        ):
            bad = ServiceProcess(url, tmp_path / f"bad-{n}.log")
            started.append(bad)
            deadline = time.monotonic() + 10
            while "unreachable" not in bad.log() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "unreachable" in bad.log()
            bad.terminate()
            assert wrong not in bad.log()
            assert "redis://" in bad.log() and ":***@" in bad.log()
        good = ServiceProcess(f"redis://:{password}@127.0.0.1:{port}/0", tmp_path / "good.log")
        started.append(good)
        good.wait_ready()
        # nor on its command line, which every local user can read (ps)
        cmdline = Path(f"/proc/{good.proc.pid}/cmdline").read_bytes().decode(errors="replace")
        bodies = [cmdline]
        bodies += [httpx.get(f"{good.http}{p}", timeout=5).text for p in ("/readyz", "/stats")]
        redis.kill()
        redis.wait()
        deadline = time.monotonic() + 10
        while httpx.get(f"{good.http}/readyz", timeout=5).status_code == 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        bodies += [httpx.get(f"{good.http}{p}", timeout=5).text for p in ("/readyz", "/stats")]
        good.terminate(timeout=60)
        assert "ready" in good.log()
        for text in [good.log(), *bodies]:
            assert password not in text
    finally:
        for svc in started:
            svc.kill()
        if redis.poll() is None:
            redis.kill()
            redis.wait()


# --- bad settings: one line, no traceback (item 12) -------------------------------------------


def _serve(*flags: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "rtmonitor", "serve", "--grpc-port", "0", "--http-port", "0"]
        + list(flags),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(),
    )


@pytest.mark.parametrize(
    "url", ["redis://:99999999/", "redis://host:notaport", "redis://:pw@h:99999/0"]
)
def test_an_unparsable_redis_url_is_one_line_naming_the_setting(url: str) -> None:
    done = _serve("--redis-url", url)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert "REDIS_URL" in done.stderr and "port" in done.stderr.lower()
    assert ":pw@" not in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 3, done.stderr


def _bad_data_dirs(tmp_path: Path) -> Iterator[Path]:
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    yield a_file / "data"  # under a file
    yield a_file  # a file
    yield Path("/proc/rtmonitor-data")  # a file system where nothing can be created
    if os.geteuid() != 0:  # root writes into read-only directories anyway
        read_only = tmp_path / "read-only"
        read_only.mkdir(mode=0o500)
        yield read_only / "data"


def test_a_bad_data_dir_is_one_line_naming_the_setting(tmp_path: Path) -> None:
    for data_dir in _bad_data_dirs(tmp_path):
        done = _serve("--data-dir", str(data_dir))
        assert done.returncode != 0, data_dir
        assert "Traceback" not in done.stderr, done.stderr
        assert "--data-dir" in done.stderr and str(data_dir) in done.stderr
