"""The auth core: the file's checks (with the line named), scopes, prefixes, constant-time
lookup, reloads on change and on SIGHUP, and `rtmonitor token new`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from rtmonitor.auth import (
    ANONYMOUS,
    AuthError,
    AuthFileError,
    TokenRegistry,
    hash_secret,
    new_token,
    parse_tokens,
    require,
)


def block(name: str, secret: str, scopes: str = '["ingest"]', extra: str = "") -> str:
    return (
        f'[[token]]\nname = "{name}"\nsha256 = "{hash_secret(secret)}"\n'
        f"scopes = {scopes}\n{extra}\n"
    )


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_parse_reads_tokens() -> None:
    text = block("a", "s1") + block("b", "s2", '["read", "admin"]', 'device_prefix = "b/"')
    a, b = parse_tokens(text)
    assert (a.name, a.scopes, a.device_prefix) == ("a", frozenset({"ingest"}), None)
    assert (b.name, b.device_prefix, b.digest) == ("b", "b/", hash_secret("s2"))
    assert b.allows("ingest") and b.allows("read")  # admin has every scope
    assert not a.allows("read")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[token]\nname = 1\n", "not valid TOML: .*line 1"),
        (block("a", "1") + block("a", "2"), r"line 6: duplicate token name 'a'"),
        (block("a", "1") + block("b", "1"), r"line 6 \(b\): the same secret"),
        (block("a", "1", '["write"]'), r"line 1 \(a\): scopes must be"),
        (block("a", "1", "[]"), "scopes must be a non-empty"),
        (block("a/b", "1"), "line 1: name must be"),
        (block("a", "1", extra="secret = 'x'"), r"unknown key\(s\) \['secret'\]"),
        (block("a", "1", extra='device_prefix = "a b"'), "device_prefix must be"),
        ('[[token]]\nname = "a"\nsha256 = "ABC"\nscopes = ["read"]\n', "sha256 must be the 64"),
        ('[[token]]\nname = "a"\nscopes = ["read"]\n', "sha256 is required"),
        ("[tokens]\n", r"unknown table\(s\)"),
    ],
)
def test_parse_refuses_with_the_line(text: str, message: str) -> None:
    with pytest.raises(AuthFileError, match=message):
        parse_tokens(text)


@pytest.mark.parametrize(
    "text",
    [
        block("a", "1", '["rtm_pasted-secret"]'),
        block("a", "1", '"rtm_pasted-secret"'),
        block("a", "1", '["read", "rtm_pasted-secret"]'),
        block("a", "1", extra='device_prefix = "rtm_pasted secret"'),
        '[[token]]\nname = "a"\nsha256 = "rtm_pasted-secret"\nscopes = ["read"]\n',
    ],
)
def test_errors_name_the_field_never_the_value(text: str) -> None:
    """A secret pasted into the wrong field must not reach the log or /stats through the
    error: the message names the field and what it allows."""
    with pytest.raises(AuthFileError) as err:
        parse_tokens(text)
    assert "pasted" not in str(err.value), err.value
    if "scopes" in str(err.value):
        assert "ingest, read, admin" in str(err.value)


def test_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """Editors on Windows save UTF-8 with a BOM: it is not part of the TOML."""
    path = tmp_path / "t.toml"
    path.write_text("\ufeff" + block("a", "s1"), encoding="utf-8")
    assert TokenRegistry(path).authenticate("Bearer s1").name == "a"


def test_authenticate_and_require(tmp_path: Path) -> None:
    reg = TokenRegistry(write(tmp_path / "t.toml", block("a", "s1") + block("r", "s2", '["read"]')))
    assert reg.authenticate("Bearer s1").name == "a"
    assert reg.authenticate("bearer   s2").name == "r"
    for header, reason in [
        (None, "missing_token"),
        ("", "missing_token"),
        ("Basic s1", "malformed_authorization"),
        ("Bearer", "malformed_authorization"),
        ("Bearer " + "x" * 600, "malformed_authorization"),
        ("Bearer s3", "unknown_token"),
    ]:
        with pytest.raises(AuthError) as err:
            reg.authenticate(header)
        assert err.value.status == "unauthenticated" and err.value.reason == reason
        assert "s1" not in err.value.message
    with pytest.raises(AuthError) as err:
        require(reg.authenticate("Bearer s2"), "ingest")
    assert err.value.status == "permission_denied" and err.value.token_name == "r"


def test_no_auth_file_is_anonymous() -> None:
    reg = TokenRegistry(None)
    assert not reg.enabled
    assert reg.authenticate(None) is ANONYMOUS
    require(ANONYMOUS, "admin")
    assert ANONYMOUS.producer_key("p") == "p"  # producer ids unscoped, as before


def test_prefix_and_producer_scoping() -> None:
    (t,) = parse_tokens(block("fleet-a", "s", extra='device_prefix = "fleet-a/"'))
    assert t.may_write("fleet-a/1") and not t.may_write("fleet-b/1")
    assert t.producer_key("p") == "fleet-a/p"


def test_reload_on_change_keeps_old_tokens_on_error(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", block("a", "s1"))
    reg = TokenRegistry(path)
    a = reg.authenticate("Bearer s1")
    write(path, block("a", "s1") + block("b", "s2"))
    assert reg.changed() and reg.reload()
    assert reg.authenticate("Bearer s2").name == "b"
    assert reg.is_current(a)  # unchanged token: its streams stay open
    write(path, "[[token]\n")
    assert reg.changed() and not reg.reload()
    assert reg.authenticate("Bearer s2").name == "b"  # the previous tokens stay
    assert reg.reload_errors == 1 and "line 1" in (reg.last_error or "")
    assert not reg.changed()  # not retried until the file changes again
    write(path, block("b", "s2"))
    assert reg.reload()
    assert not reg.is_current(a)
    with pytest.raises(AuthError, match="unknown token"):
        reg.authenticate("Bearer s1")


def test_watch_and_sighup_reload(tmp_path: Path) -> None:
    path = write(tmp_path / "t.toml", block("a", "s1"))

    async def main() -> None:
        reg = TokenRegistry(path, poll_interval_s=0.05)
        reg.install_sighup(asyncio.get_running_loop())
        watch = asyncio.create_task(reg.watch())
        try:
            write(path, block("a", "s1") + block("bb", "s2"))
            for _ in range(100):
                await asyncio.sleep(0.02)
                if reg.reloads:
                    break
            assert reg.authenticate("Bearer s2").name == "bb"
            watch.cancel()
            # Same size and (within the filesystem's resolution) maybe the same mtime:
            # SIGHUP reloads whatever the stat says.
            write(path, block("a", "s1") + block("bc", "s3"))
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(100):
                await asyncio.sleep(0.01)
                if reg.reloads == 2:
                    break
            assert reg.authenticate("Bearer s3").name == "bc"
        finally:
            watch.cancel()
            asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)

    asyncio.run(main())


def test_a_removed_file_revokes_every_token(tmp_path: Path) -> None:
    """Fail closed: deleting (or renaming away) the auth file leaves no token in force,
    said in /stats, until a file is back. A file gone for one poll only (replaced by a
    tool that deletes then writes) changes nothing."""
    path = write(tmp_path / "t.toml", block("a", "s1"))

    async def wait_for(condition: Callable[[], bool]) -> None:
        for _ in range(200):
            if condition():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    async def main() -> None:
        reg = TokenRegistry(path, poll_interval_s=0.05)
        a = reg.authenticate("Bearer s1")
        watch = asyncio.create_task(reg.watch())
        try:
            path.rename(tmp_path / "elsewhere.toml")
            await wait_for(lambda: not reg.is_current(a))
            with pytest.raises(AuthError, match="unknown token"):
                reg.authenticate("Bearer s1")
            stats = reg.stats()
            assert stats["tokens"] == [] and "missing" in stats["last_reload_error"]
            write(path, block("a", "s1"))
            await wait_for(lambda: reg.stats()["tokens"] == ["a"])
            assert reg.authenticate("Bearer s1").name == "a" and reg.last_error is None
            # gone for less than a poll: nothing changes
            path.unlink()
            write(path, block("a", "s1"))
            await asyncio.sleep(0.2)
            assert reg.authenticate("Bearer s1").name == "a"
        finally:
            watch.cancel()
        path.unlink()
        assert not reg.reload()  # SIGHUP with the file gone: at once
        assert reg.tokens == ()

    asyncio.run(main())


def test_malformed_file_refuses_to_start(tmp_path: Path) -> None:
    with pytest.raises(AuthFileError, match="line 6, column 5"):
        TokenRegistry(write(tmp_path / "t.toml", block("a", "1") + "oops\n"))


def test_new_token_round_trips() -> None:
    secret, text = new_token("fleet-a", ["ingest"], "fleet-a/")
    (t,) = parse_tokens(text)
    assert t.digest == hash_secret(secret) and t.device_prefix == "fleet-a/"
    assert secret not in text
    with pytest.raises(AuthFileError):
        new_token("bad name", ["ingest"])


def test_token_new_command(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "rtmonitor", "token", "new", "--name", "x", "--scope", "read"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    secret = out.stderr.strip().splitlines()[-1]
    path = write(tmp_path / "t.toml", out.stdout)
    assert TokenRegistry(path).authenticate(f"Bearer {secret}").name == "x"
    doc = json.loads(
        subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=True).stdout
    )
    assert parse_tokens(doc["toml"])[0].digest == hash_secret(doc["secret"])
