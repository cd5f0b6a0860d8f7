"""Logging setup shared by every process: one format, repeats rate-limited, secrets redacted."""

from __future__ import annotations

import logging
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# A repeated record (same logger, level, call site and message template) is let through
# at most REPEAT_BURST times per REPEAT_WINDOW_S: a hostile client that makes the service
# log on every connection or request must not fill the disk.
REPEAT_WINDOW_S = 10.0
REPEAT_BURST = 5
# Call sites with dynamic templates (f-strings) could grow the table without end: past
# this many kinds, those whose window is over are forgotten, and new ones are not tracked.
MAX_TRACKED = 1024

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"

# scheme://user:PASSWORD@host, and ?password=PASSWORD / &password=… (redis-py reads both).
_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://[^/\s:@]*:)[^@\s]*@")
_QUERY_PASSWORD = re.compile(r"([?&]password=)[^&#\s]*", re.IGNORECASE)


def redact_url(text: str) -> str:
    """`text` (a URL, or a message that contains URLs) with every password replaced by ***."""
    return _QUERY_PASSWORD.sub(r"\1***", _USERINFO.sub(r"\1***@", text))


@dataclass(slots=True)
class _Kind:
    """What a RepeatFilter remembers of one kind of record, in its current window."""

    start: float
    passed: int = 1
    suppressed: int = 0


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
        self._kinds: dict[tuple[object, ...], _Kind] = {}
        self.suppressed_total = 0

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno, record.pathname, record.lineno, str(record.msg))
        now = self._clock()
        with self._lock:
            kind = self._kinds.get(key)
            if kind is not None and now - kind.start < self.window_s:
                if kind.passed < self.burst:
                    kind.passed += 1
                    return True
                kind.suppressed += 1
                self.suppressed_total += 1
                return False
            if kind is not None and kind.suppressed:
                _append(record, f" [{kind.suppressed} similar messages suppressed]")
            if kind is None and len(self._kinds) >= MAX_TRACKED:
                self._forget(now)
                if len(self._kinds) >= MAX_TRACKED:
                    return True  # too many kinds at once to track: pass, never suppress
            self._kinds[key] = _Kind(now)
            return True

    def _forget(self, now: float) -> None:
        """Drop kinds whose window is over (their suppressed count is lost: rare, bounded)."""
        for key in [k for k, kind in self._kinds.items() if now - kind.start >= self.window_s]:
            del self._kinds[key]


def _append(record: logging.LogRecord, note: str) -> None:
    """Add `note` to the record's message, keeping the arguments' formatting."""
    try:
        message = record.getMessage()
    except Exception:  # a bad format string: the handler reports it, not the caller
        return
    record.msg = message + note
    record.args = None


class RedactFilter(logging.Filter):
    """Every record's message with URL passwords replaced by *** (a library's exception
    text can quote a URL: no log site has to remember to redact it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        redacted = redact_url(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        return True


def setup_logging(level: str, fmt: str = FORMAT) -> None:
    """Log to stderr at `level`, with URL passwords redacted and repeats rate-limited on the
    root handler."""
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactFilter) for f in handler.filters):
            handler.addFilter(RedactFilter())
        if not any(isinstance(f, RepeatFilter) for f in handler.filters):
            handler.addFilter(RepeatFilter())
