"""The `rtmonitor` command: thin — parse flags, build Settings, call a typed run()."""

from __future__ import annotations

import argparse
import json
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from rtmonitor import __version__
from rtmonitor.auth import SCOPES, AuthFileError, new_token
from rtmonitor.config import BenchSettings, SendSettings, Settings, TopSettings
from rtmonitor.logs import redact_url, setup_logging

# Settings fields that are environment-only (the seed's variables) or named differently.
_NO_FLAG = {"redis_host", "redis_port"}
# By type; a field whose value is something else names it: Field(json_schema_extra=
# {"metavar": "FILE"}). A float is seconds unless it says otherwise (test_config_cli checks).
_METAVARS = {int: "N", float: "SECONDS", Path: "PATH", str: "TEXT"}


def _add_flags(parser: argparse.ArgumentParser, model: type[BaseSettings], env_prefix: str) -> None:
    """One --flag per Settings field, each naming its environment twin in --help."""
    for name, field in model.model_fields.items():
        if name in _NO_FLAG:
            continue
        flag = "--" + name.replace("_", "-")
        env = f"{env_prefix}{name.upper()}"
        if name == "redis_url":
            env += " or REDIS_URL"
        if name == "grpc_verbosity":
            env += " or GRPC_VERBOSITY"
        if name == "token":
            env = "RTM_TOKEN"
        help_text = f"{field.description or ''} [env {env}; default {_default(field)}]"
        kind = _base_type(field.annotation)
        if kind is bool:
            parser.add_argument(
                flag, dest=name, default=None, action=argparse.BooleanOptionalAction, help=help_text
            )
            continue
        choices = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
        if choices:
            parser.add_argument(flag, dest=name, default=None, choices=choices, help=help_text)
        else:
            parser.add_argument(
                flag,
                dest=name,
                default=None,
                type=cast(Callable[[str], Any], kind),
                metavar=_metavar(field, kind),
                help=help_text,
            )


def _metavar(field: FieldInfo, kind: Any) -> str:
    """The field's own metavar if it declares one, else its type's."""
    extra = field.json_schema_extra
    declared = extra.get("metavar") if isinstance(extra, dict) else None
    return declared if isinstance(declared, str) else _METAVARS.get(kind, "TEXT")


def _base_type(annotation: Any) -> Any:
    """int | None -> int; Literal and plain types unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _base_type(args[0])
    if annotation in (int, float, str, bool, Path):
        return annotation
    if typing.get_origin(annotation) is typing.Literal:
        return annotation
    alias = getattr(annotation, "__value__", None)  # a `type X = ...` alias
    return _base_type(alias) if alias is not None else str


def _default(field: FieldInfo) -> str:
    return "none" if field.default is None else str(field.default)


def _build(model: type[BaseSettings], args: argparse.Namespace) -> Any:
    """Flags given on the command line win over the environment, which wins over defaults."""
    given = {
        name: value
        for name, value in vars(args).items()
        if name in model.model_fields and value is not None
    }
    try:
        return model(**given)
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "settings"
            lines.append(f"  {loc}: {redact_url(err['msg'])}")
        sys.exit("rtmonitor: invalid configuration:\n" + "\n".join(lines))


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rtmonitor",
        description="Real-time telemetry ingest: gRPC in, per-device counts in Redis, HTTP out.",
    )
    parser.add_argument("--version", action="version", version=f"rtmonitor {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = sub.add_parser(
        "serve",
        help="run the service (embedded Redis unless REDIS_URL / --redis-url is set)",
    )
    _add_flags(serve, Settings, "RTM_")
    send = sub.add_parser("send", help="send generated telemetry to a running service")
    _add_flags(send, SendSettings, "RTM_SEND_")
    bench = sub.add_parser(
        "bench", help="benchmark: start the service, load it, verify exactly, report figures"
    )
    _add_flags(bench, BenchSettings, "RTM_BENCH_")
    top = sub.add_parser("top", help="terminal live view of the busiest devices")
    _add_flags(top, TopSettings, "RTM_TOP_")
    token = sub.add_parser("token", help="manage bearer tokens of the auth file")
    token_sub = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    new = token_sub.add_parser(
        "new",
        help="print a fresh secret (once, on stderr) and the [[token]] block for --auth-file "
        "(on stdout: `rtmonitor token new ... >> tokens.toml`)",
    )
    new.add_argument("--name", required=True, help="who the token is for (logs, /stats)")
    new.add_argument(
        "--scope",
        action="append",
        required=True,
        choices=SCOPES,
        help="ingest, read or admin (ingest + read + /stats); repeat for several",
    )
    new.add_argument("--device-prefix", help="may only write devices whose id starts with this")
    new.add_argument("--json", action="store_true", help="print name, secret and block as JSON")
    return parser


def _token_new(args: argparse.Namespace) -> int:
    try:
        secret, block = new_token(args.name, args.scope, args.device_prefix)
    except AuthFileError as exc:
        sys.exit(f"rtmonitor token new: {exc}")
    if args.json:
        print(json.dumps({"name": args.name, "secret": secret, "toml": block}))
        return 0
    print(
        f"# secret of token {args.name!r} (shown once, stored nowhere; clients send it as "
        f"`authorization: Bearer <secret>`, e.g. RTM_TOKEN):\n{secret}",
        file=sys.stderr,
    )
    print(block, end="")
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    args = make_parser().parse_args(argv)
    if args.command == "serve":
        settings = _build(Settings, args)
        setup_logging(settings.log_level)
        settings.export_grpc_verbosity()  # before grpc is imported: it reads it then
        from rtmonitor.runtime import run

        sys.exit(run(settings))
    elif args.command == "send":
        options = _build(SendSettings, args)
        setup_logging("warning")
        from rtmonitor.loadgen.sender import run_loop, run_send

        sys.exit(run_loop(run_send(options)))
    elif args.command == "bench":
        bench_options = _build(BenchSettings, args)
        setup_logging("warning")
        from rtmonitor.loadgen.bench import run_bench
        from rtmonitor.storage.embedded import EmbeddedRedisError

        try:
            sys.exit(run_bench(bench_options))
        except EmbeddedRedisError as exc:  # e.g. --redis-allocator: what to give instead
            sys.exit(f"rtmonitor bench: {exc}")
    elif args.command == "token":
        sys.exit(_token_new(args))
    elif args.command == "top":
        top_options = _build(TopSettings, args)
        from rtmonitor.api.top import run_top

        sys.exit(run_top(top_options))
