"""Bearer tokens: the auth file, its reloads, and the check every receiver makes.

The auth file (--auth-file, TOML) lists tokens by name, each stored only as the SHA-256
hex digest of its secret, with its scopes and an optional device prefix::

    [[token]]
    name = "fleet-a"
    sha256 = "<hex digest of the secret>"
    scopes = ["ingest"]          # ingest | read | admin (admin = ingest + read + /stats)
    device_prefix = "fleet-a/"   # optional: may only write devices whose id starts with it

A receiver authenticates once per stream or request, never per packet:

    principal = registry.authenticate(header_value)   # raises AuthError
    registry.require(principal, "ingest")              # raises AuthError

With no auth file, `authenticate` returns ANONYMOUS (every scope, no prefix) and producer
ids are not scoped: the service is then only reachable on loopback unless the operator
opted out (--allow-unauthenticated; see config.Settings).

This module is shared by every room (ingest, api): it imports none of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import re
import secrets
import signal
import time
import tomllib
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from rtmonitor.model import DEVICE_ID_MAX, ID_ALPHABET, ID_CHARS

logger = logging.getLogger(__name__)

Scope = Literal["ingest", "read", "admin"]
SCOPES: tuple[Scope, ...] = ("ingest", "read", "admin")
# Token names appear in logs, /stats, metric labels and scoped producer keys
# (`<name>/<producer id>`): no "/" so that the name part of such a key is unambiguous.
TOKEN_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_PREFIX = re.compile(f"[{ID_CHARS}]{{1,{DEVICE_ID_MAX}}}")
_TOKEN_KEYS = {"name", "sha256", "scopes", "device_prefix"}
# A bearer secret is at most this long: a longer header is refused before it is hashed.
SECRET_MAX = 512
POLL_INTERVAL_S = 1.0
# Failures from one peer are logged at most once per this many seconds (with a count).
FAILURE_LOG_INTERVAL_S = 10.0
_FAILURE_PEERS_MAX = 4096

# Why a request or a packet was refused (the `reason` label in /stats and metrics).
MISSING_TOKEN = "missing_token"
MALFORMED_AUTHORIZATION = "malformed_authorization"
UNKNOWN_TOKEN = "unknown_token"
MISSING_SCOPE = "missing_scope"
TOKEN_REVOKED = "token_revoked"
DEVICE_NOT_PERMITTED = "device_not_permitted"


class AuthFileError(ValueError):
    """The auth file cannot be used; the message names the file and the line."""


class AuthFileMissing(AuthFileError):
    """The auth file is not there (deleted, renamed away): no token is in force."""


class AuthError(Exception):
    """A request refused: `status` says which (no valid token, or a token without the
    scope), `reason` is counted, `message` tells the client what to fix (never a secret)."""

    def __init__(
        self,
        status: Literal["unauthenticated", "permission_denied"],
        reason: str,
        message: str,
        token_name: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message
        self.token_name = token_name


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a request comes from: a token's name, its scopes and its device prefix."""

    name: str
    scopes: frozenset[str]
    device_prefix: str | None = None
    anonymous: bool = False  # no auth file: producer ids are not scoped
    digest: str = field(default="", repr=False)  # the stored SHA-256 (not the secret)

    def allows(self, scope: Scope) -> bool:
        """True if the token has `scope` (admin has them all)."""
        return scope in self.scopes or "admin" in self.scopes

    def may_write(self, device_id: str) -> bool:
        """True if this token may write `device_id` (its device_prefix, if any)."""
        return self.device_prefix is None or device_id.startswith(self.device_prefix)

    def producer_key(self, producer_id: str) -> str:
        """The key a batch producer id is deduplicated under: `<token name>/<producer id>`,
        so that two tokens can never claim each other's batch ids."""
        return producer_id if self.anonymous else f"{self.name}/{producer_id}"


ANONYMOUS = Principal("anonymous", frozenset(SCOPES), None, anonymous=True)


def hash_secret(secret: str) -> str:
    """The SHA-256 hex digest stored in the auth file for `secret`."""
    return hashlib.sha256(secret.encode()).hexdigest()


def new_token(
    name: str, scopes: Iterable[str], device_prefix: str | None = None
) -> tuple[str, str]:
    """A fresh random secret and the TOML block that lists it (its digest only)."""
    scope_list = list(scopes)
    entry = {"name": name, "scopes": scope_list, "device_prefix": device_prefix}
    _principal(entry, "the new token")  # the same checks as the file gets
    secret = "rtm_" + secrets.token_urlsafe(32)
    lines = [
        "[[token]]",
        f'name = "{name}"',
        f'sha256 = "{hash_secret(secret)}"',
        "scopes = [" + ", ".join(f'"{s}"' for s in scope_list) + "]",
    ]
    if device_prefix is not None:
        lines.append(f'device_prefix = "{device_prefix}"')
    return secret, "\n".join(lines) + "\n"


def _token_lines(text: str) -> list[int]:
    """The line number of each `[[token]]` header, in order (for error messages)."""
    header = re.compile(r"^\s*\[\[\s*token\s*\]\]")
    return [i for i, line in enumerate(text.splitlines(), 1) if header.match(line)]


def _last_line(text: str) -> int:
    """The number of the last line that is not blank (an error "at end of document" is
    about something left open above it)."""
    lines = text.splitlines()
    return max((i for i, line in enumerate(lines, 1) if line.strip()), default=1)


def _principal(entry: Mapping[str, Any], where: str) -> Principal:
    """One [[token]] table checked; AuthFileError (prefixed with `where`) if it is wrong."""
    unknown = set(entry) - _TOKEN_KEYS
    if unknown:
        raise AuthFileError(f"{where}: unknown key(s) {sorted(unknown)}; use {sorted(_TOKEN_KEYS)}")
    name = entry.get("name")
    if not isinstance(name, str) or not TOKEN_NAME.fullmatch(name):
        raise AuthFileError(f"{where}: name must be 1-64 characters of A-Z a-z 0-9 _ . -")
    digest = entry.get("sha256", "0" * 64)
    if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
        raise AuthFileError(
            f"{where} ({name}): sha256 must be the 64-character lowercase hex digest of the "
            "secret (`rtmonitor token new` prints it)"
        )
    scopes = entry.get("scopes")
    if (
        not isinstance(scopes, list)
        or not scopes
        or any(s not in SCOPES for s in scopes)
        or len(set(scopes)) != len(scopes)
    ):
        # The field and what it allows, never what it holds: a secret pasted into the
        # wrong field would otherwise reach the log and /stats (last_reload_error).
        raise AuthFileError(
            f"{where} ({name}): scopes must be a non-empty list of distinct values among "
            f'{", ".join(SCOPES)}, e.g. scopes = ["read"]'
        )
    prefix = entry.get("device_prefix")
    if prefix is not None and (not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix)):
        raise AuthFileError(
            f"{where} ({name}): device_prefix must be 1-{DEVICE_ID_MAX} characters of {ID_ALPHABET}"
        )
    return Principal(name, frozenset(scopes), prefix, digest=digest)


def parse_tokens(text: str, source: str = "auth file") -> list[Principal]:
    """The tokens of an auth file's text; AuthFileError naming the line if it is wrong."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        where = "" if "line" in str(exc) else f" (the file ends at line {_last_line(text)})"
        raise AuthFileError(f"{source}: not valid TOML: {exc}{where}") from None
    extra = set(doc) - {"token"}
    if extra:
        raise AuthFileError(f"{source}: unknown table(s) {sorted(extra)}; only [[token]] is read")
    entries = doc.get("token", [])
    if not isinstance(entries, list):
        raise AuthFileError(f"{source}: `token` must be an array of tables ([[token]])")
    lines = _token_lines(text)
    tokens: list[Principal] = []
    names: set[str] = set()
    digests: set[str] = set()
    for i, entry in enumerate(entries):
        line = f"line {lines[i]}" if i < len(lines) else f"token #{i + 1}"
        where = f"{source}, [[token]] at {line}"
        if not isinstance(entry, dict):
            raise AuthFileError(f"{where}: must be a table")
        token = _principal(entry, where)
        if "sha256" not in entry:
            raise AuthFileError(f"{where} ({token.name}): sha256 is required")
        if token.name in names:
            raise AuthFileError(f"{where}: duplicate token name {token.name!r}")
        if token.digest in digests:
            raise AuthFileError(f"{where} ({token.name}): the same secret as an earlier token")
        names.add(token.name)
        digests.add(token.digest)
        tokens.append(token)
    return tokens


def load_tokens(path: Path) -> list[Principal]:
    """The tokens of the auth file at `path`; AuthFileError if it cannot be read or used."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (Windows editors) is no TOML
    except FileNotFoundError:
        raise AuthFileMissing(
            f"auth file {str(path)!r} is missing: no token is in force until it is back"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthFileError(f"cannot read auth file {str(path)!r}: {exc}") from None
    return parse_tokens(text, f"auth file {str(path)!r}")


def bearer_secret(value: str | None) -> str:
    """The secret of an `Authorization: Bearer <secret>` value; AuthError if absent or
    malformed."""
    if not value:
        raise AuthError(
            "unauthenticated",
            MISSING_TOKEN,
            "a token is required: send `authorization: Bearer <secret>`",
        )
    scheme, _, secret = value.strip().partition(" ")
    secret = secret.strip()
    if scheme.lower() != "bearer" or not secret or len(secret) > SECRET_MAX or " " in secret:
        raise AuthError(
            "unauthenticated",
            MALFORMED_AUTHORIZATION,
            "malformed authorization: send `authorization: Bearer <secret>`",
        )
    return secret


class FailureLog:
    """Logs refusals at most once per interval per peer, with the count of those not
    logged: a client retrying a bad token in a loop must not fill the disk."""

    def __init__(self, interval_s: float = FAILURE_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self._last: dict[str, tuple[float, int]] = {}  # peer -> (logged at, suppressed)

    def refused(self, surface: str, peer: str, error: AuthError) -> None:
        now = time.monotonic()
        last = self._last.get(peer)
        if last is not None and now - last[0] < self.interval_s:
            self._last[peer] = (last[0], last[1] + 1)
            return
        if len(self._last) >= _FAILURE_PEERS_MAX:
            self._last = {p: v for p, v in self._last.items() if now - v[0] < self.interval_s}
            if len(self._last) >= _FAILURE_PEERS_MAX:
                self._last.clear()
        suppressed = last[1] if last is not None else 0
        self._last[peer] = (now, 0)
        logger.warning(
            "%s: refused %s (%s, token %s)%s",
            surface,
            peer or "unknown peer",
            error.reason,
            error.token_name or "-",
            f" [{suppressed} more from this peer not logged]" if suppressed else "",
        )


class TokenRegistry:
    """The tokens in force, reloaded on SIGHUP and when the file changes; a reload that
    fails keeps the tokens in force and logs why. `path` None: no auth (ANONYMOUS).

    A file that is gone (deleted, renamed away) fails closed: no token is in force, and
    /stats says why, until a file is there again. Keeping the last tokens would let an
    operator believe that removing the file revoked them."""

    def __init__(self, path: Path | None, *, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self.path = path
        self.poll_interval_s = poll_interval_s
        self._tokens: tuple[Principal, ...] = ()
        self._current: frozenset[Principal] = frozenset()
        # (digest as bytes, token): encoded once per reload, not once per request
        self._digests: tuple[tuple[bytes, Principal], ...] = ()
        self._stamp: tuple[int, int, int] | None = None
        self._gone_once = False  # the watcher saw the file missing at its last poll
        self.reloads = 0
        self.reload_errors = 0
        self.last_error: str | None = None
        # Refusals by surface ("grpc", "http", a receiver's name), then `<reason>:<token>`.
        self.refused: dict[str, Counter[str]] = {}
        self.failures = FailureLog()
        if path is not None:
            self._install(load_tokens(path), self._stat())  # a bad file refuses to start

    @property
    def enabled(self) -> bool:
        return self.path is not None

    @property
    def tokens(self) -> tuple[Principal, ...]:
        return self._tokens

    def _stat(self) -> tuple[int, int, int] | None:
        assert self.path is not None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _install(self, tokens: list[Principal], stamp: tuple[int, int, int] | None) -> None:
        self._tokens = tuple(tokens)
        self._current = frozenset(tokens)
        self._digests = tuple((t.digest.encode(), t) for t in tokens)
        self._stamp = stamp

    def reload(self) -> bool:
        """Read the file again; True if the new tokens are in force."""
        if self.path is None:
            return False
        stamp = self._stat()
        try:
            tokens = load_tokens(self.path)
        except AuthFileMissing as exc:
            self._install([], stamp)  # fail closed: streams opened with them end
            self.reload_errors += 1
            self.last_error = str(exc)
            logger.error("%s", exc)
            return False
        except AuthFileError as exc:
            self.reload_errors += 1
            self.last_error = str(exc)
            self._stamp = stamp  # do not retry until it changes again
            logger.error("auth file reload failed, the previous tokens stay in force: %s", exc)
            return False
        self._install(tokens, stamp)
        self.reloads += 1
        self.last_error = None
        logger.info("auth file reloaded: %d tokens", len(tokens))
        return True

    def changed(self) -> bool:
        """True if the file's mtime, size or inode differ from the last read."""
        return self.path is not None and self._stat() != self._stamp

    async def watch(self) -> None:
        """Reload whenever the file changes (polled: works on every filesystem, and with
        Kubernetes' Secret volumes, whose files are swapped by a symlink)."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                # Gone at one poll may be a tool replacing it (delete, then write): a
                # missing file is acted on when the next poll finds it missing too.
                gone = self._stat() is None
                if self.changed() and (self._gone_once or not gone):
                    self.reload()
                self._gone_once = gone
            except Exception:  # never die silently
                logger.exception("watching the auth file failed")

    def install_sighup(self, loop: asyncio.AbstractEventLoop) -> None:
        """Reload on SIGHUP (the main thread's loop only)."""
        if self.path is not None:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signal.SIGHUP, self.reload)

    def authenticate_secret(self, secret: str) -> Principal:
        """The token whose secret this is; AuthError if none. Every token's digest is
        compared, in constant time, whatever matches: the time says nothing of the secret."""
        if self.path is None:
            return ANONYMOUS
        digest = hash_secret(secret).encode()
        found: Principal | None = None
        for stored, token in self._digests:
            if hmac.compare_digest(digest, stored):
                found = token
        if found is None:
            raise AuthError(
                "unauthenticated",
                UNKNOWN_TOKEN,
                "unknown token: check the secret (tokens are listed in the service's --auth-file)",
            )
        return found

    def authenticate(self, authorization: str | None) -> Principal:
        """The token of an `Authorization` header value (`Bearer <secret>`); ANONYMOUS
        without an auth file; AuthError if it is missing, malformed or unknown."""
        if self.path is None:
            return ANONYMOUS
        return self.authenticate_secret(bearer_secret(authorization))

    def is_current(self, principal: Principal) -> bool:
        """False once the token was removed or changed in the file (its streams end)."""
        return self.path is None or principal in self._current

    def refuse(self, surface: str, peer: str, error: AuthError, count: int = 1) -> None:
        """Count a refusal (`count` packets for device_not_permitted) by surface, reason and
        token name, and log it (at most once per interval per peer)."""
        counter = self.refused.setdefault(surface, Counter())
        counter[refusal_key(error.reason, error.token_name)] += count
        self.failures.refused(surface, peer, error)

    def refusals(self, *, exclude: Iterable[str] = ()) -> dict[str, int]:
        """Refusals summed over the surfaces not in `exclude`, by `<reason>:<token>`."""
        total: Counter[str] = Counter()
        skip = set(exclude)
        for surface, counter in self.refused.items():
            if surface not in skip:
                total.update(counter)
        return dict(total)

    def stats(self) -> dict[str, Any]:
        """The `auth` section of GET /stats (names only, never secrets or digests)."""
        return {
            "enabled": self.enabled,
            "tokens": sorted(t.name for t in self._tokens),
            "reloads": self.reloads,
            "reload_errors": self.reload_errors,
            "last_reload_error": self.last_error,
            "refused": {s: dict(sorted(c.items())) for s, c in sorted(self.refused.items())},
        }


def require(principal: Principal, scope: Scope) -> None:
    """AuthError (permission_denied) unless `principal` has `scope`."""
    if not principal.allows(scope):
        raise AuthError(
            "permission_denied",
            MISSING_SCOPE,
            f"token {principal.name!r} lacks the {scope!r} scope (it has "
            f"{', '.join(sorted(principal.scopes))})",
            principal.name,
        )


def refusal_key(reason: str, token_name: str | None) -> str:
    """How refusals are counted: `<reason>:<token name>` (`-` for no known token)."""
    return f"{reason}:{token_name or '-'}"


def device_refusal(principal: Principal) -> AuthError:
    """The refusal counted for packets outside `principal`'s device prefix."""
    return AuthError(
        "permission_denied",
        DEVICE_NOT_PERMITTED,
        f"token {principal.name!r} may only write devices whose id starts with "
        f"{principal.device_prefix!r}",
        principal.name,
    )
