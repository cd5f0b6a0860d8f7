"""Settings and CLI: flags beat environment twins beat defaults; nonsense fails fast."""

from __future__ import annotations

import os

import pytest

from rtmonitor.cli import _build, make_parser
from rtmonitor.config import SendSettings, Settings


def build(argv: list[str]) -> Settings:
    args = make_parser().parse_args(["serve", *argv])
    settings: Settings = _build(Settings, args)
    return settings


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("REDIS_URL", "REDIS_HOST", "REDIS_PORT", "RTM_GRPC_PORT"):
        monkeypatch.delenv(var, raising=False)
    s = build([])
    assert (s.grpc_port, s.http_port, s.flush_interval) == (50051, 8000, 0.2)
    assert s.external_redis_url is None


def test_grpc_verbosity_off_by_default_and_the_users_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for var in ("GRPC_VERBOSITY", "RTM_GRPC_VERBOSITY"):
        monkeypatch.delenv(var, raising=False)
    settings = build([])
    monkeypatch.setenv("GRPC_VERBOSITY", "placeholder")  # restored after the test
    settings.export_grpc_verbosity()
    assert os.environ["GRPC_VERBOSITY"] == "NONE"
    monkeypatch.setenv("GRPC_VERBOSITY", "ERROR")
    assert build([]).grpc_verbosity == "error"
    assert build(["--grpc-verbosity", "info"]).grpc_verbosity == "info"


def test_env_twin_and_flag_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RTM_GRPC_PORT", "6000")
    monkeypatch.setenv("RTM_FLUSH_INTERVAL", "0.5")
    s = build(["--grpc-port", "7000"])
    assert s.grpc_port == 7000 and s.flush_interval == 0.5


def test_redis_url_sources(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    monkeypatch.setenv("REDIS_HOST", "cache")
    assert build([]).external_redis_url == "redis://cache:6379/0"
    monkeypatch.setenv("REDIS_PORT", "6380")
    assert build([]).external_redis_url == "redis://cache:6380/0"
    monkeypatch.setenv("REDIS_URL", "redis://other:1/2")
    assert build([]).external_redis_url == "redis://other:1/2"
    assert build(["--redis-url", "unix:///tmp/r.sock"]).external_redis_url == "unix:///tmp/r.sock"


def test_nonsense_fails_fast_with_the_name(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("REDIS_URL", raising=False)
    with pytest.raises(SystemExit) as exc:
        build(["--redis-url", "http://nope"])
    assert "must start with redis://" in str(exc.value)
    monkeypatch.setenv("RTM_FLUSH_INTERVAL", "-1")
    with pytest.raises(SystemExit) as exc:
        build([])
    assert "flush_interval" in str(exc.value)


def test_per_device_limits_fit_what_a_merge_can_unpack() -> None:
    """Kinds and value names per device beyond what one record can hold (the merge script
    unpacks it in one Lua call) are refused at startup, naming both flags."""
    build(["--max-kinds-per-device", "500", "--max-value-names-per-device", "900"])
    with pytest.raises(SystemExit) as exc:
        build(["--max-kinds-per-device", "500", "--max-value-names-per-device", "1000"])
    assert "--max-value-names-per-device (1000)" in str(exc.value)


def test_send_count_or_duration() -> None:
    assert SendSettings().total == 10_000
    assert SendSettings(duration=1.0).total is None
    with pytest.raises(ValueError, match="not both"):
        SendSettings(count=5, duration=1.0)


def test_every_setting_has_a_flag() -> None:
    help_text = make_parser()._subparsers._group_actions[0].choices["serve"].format_help()  # type: ignore[union-attr]
    for name in Settings.model_fields:
        if name in ("redis_host", "redis_port"):
            continue
        assert "--" + name.replace("_", "-") in help_text
        assert "RTM_" + name.upper() in help_text


def test_each_flag_names_what_it_takes() -> None:
    """A float is seconds and a path a directory or file only where the field says so:
    `send --rate PACKETS_PER_S`, `bench --output FILE`, `serve --data-dir DIR`."""
    import argparse

    from rtmonitor.cli import _base_type
    from rtmonitor.config import BenchSettings, TopSettings

    sub = next(
        a for a in make_parser()._actions if isinstance(a, argparse._SubParsersAction)
    ).choices
    metavars = {
        (command, action.dest): action.metavar
        for command, parser in sub.items()
        for action in parser._actions
    }
    assert metavars[("send", "rate")] == "PACKETS_PER_S"
    assert metavars[("bench", "output")] == "FILE"
    assert metavars[("serve", "data_dir")] == "DIR"
    models = {"serve": Settings, "send": SendSettings, "bench": BenchSettings, "top": TopSettings}
    for command, model in models.items():
        for name, field in model.model_fields.items():
            metavar = metavars.get((command, name))
            if metavar == "SECONDS":
                assert "second" in (field.description or "").lower(), (command, name)
            if _base_type(field.annotation).__name__ == "Path":
                assert metavar in ("FILE", "DIR"), (command, name, metavar)
