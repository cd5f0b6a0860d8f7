"""Logging setup shared by every process: one format, repeats rate-limited, secrets redacted."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable

# A repeated record (same logger, level, call site and message template) is let through
# at most REPEAT_BURST times per REPEAT_WINDOW_S: a hostile client that makes the service
# log on every connection or request must not fill the disk.
REPEAT_WINDOW_S = 10.0
REPEAT_BURST = 5
# Call sites with dynamic templates (f-strings) could grow the table without end: past
# this, windows that are over are forgotten.
MAX_TRACKED = 1024

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# scheme://user:PASSWORD@host, and ?password=PASSWORD / &password=… (redis-py reads both).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#\s]*", re.IGNORECASE)


def redact_url(text: str) -> str:
    """`text` (a URL, or a message that contains URLs) with every password replaced by ***."""
    return _QUERY_PASSWORD.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


class RepeatFilter(logging.Filter):
    """Lets the first records of a kind through and suppresses repeats within a window.

    A kind is (logger, level, file, line, message template): records with different
    templates or from different call sites are never suppressed. The first record of a
    kind after its window carries the count of those suppressed in it.
    """

    def __init__(
        self,
        window_s: float = REPEAT_WINDOW_S,
        burst: int = REPEAT_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.window_s = window_s
        self.burst = burst
        self._clock = clock
        self._lock = threading.Lock()
        # kind -> [window start, records let through in it, records suppressed in it]
        self._seen: dict[tuple[object, ...], list[float]] = {}
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        kind = (record.name, record.levelno, record.pathname, record.lineno, str(record.msg))
        now = self._clock()
        with self._lock:
            entry = self._seen.get(kind)
            if entry is None or now - entry[0] >= self.window_s:
                suppressed = int(entry[2]) if entry is not None else 0
                if entry is None and len(self._seen) >= MAX_TRACKED:
                    self._forget(now)
                self._seen[kind] = [now, 1, 0]
                if suppressed:
                    _append(record, f" [{suppressed} similar messages suppressed]")
                return True
            if entry[1] < self.burst:
                entry[1] += 1
                return True
            entry[2] += 1
            self.suppressed_total += 1
            return False

    def _forget(self, now: float) -> None:
        """Drop kinds whose window is over (their suppressed count is lost: rare, bounded)."""
        for kind in [k for k, e in self._seen.items() if now - e[0] >= self.window_s]:
            del self._seen[kind]


def _append(record: logging.LogRecord, note: str) -> None:
    """Add `note` to the record's message, keeping the arguments' formatting."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: the handler reports it, not the caller
        return
    record.msg = message + note
    record.args = None


def setup_logging(level: str, fmt: str = FORMAT) -> None:
    """Log to stderr at `level`, with repeats rate-limited on the root handler."""
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(RepeatFilter())
