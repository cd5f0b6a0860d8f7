"""The docs stay true: every setting is documented, the quickstart is two commands, and
every path, `path:function`, flag, environment variable and default that README.md, the
run guide, the learning guide and examples/README.md name exists in the code: paths in
the tree, functions in the file's AST, flags in the argparse parsers (`rtmonitor`'s and
the example scripts'), defaults in the Settings fields."""

from __future__ import annotations

import argparse
import ast
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from rtmonitor.cli import make_parser
from rtmonitor.config import BenchSettings, SendSettings, Settings, TopSettings

ROOT = Path(__file__).resolve().parents[2]
DOCS = [
    ROOT / "README.md",
    ROOT / "docs" / "运行指南.md",
    ROOT / "docs" / "代码详细注释与学习指导.md",
    ROOT / "examples" / "README.md",
]
MODELS: dict[str, type[BaseSettings]] = {
    "serve": Settings,
    "send": SendSettings,
    "bench": BenchSettings,
    "top": TopSettings,
}
ENV_PREFIXES = {"RTM_SEND_": SendSettings, "RTM_BENCH_": BenchSettings, "RTM_TOP_": TopSettings}
# Scripts the docs run with flags of their own.
SCRIPTS = [
    "examples/minimal/server.py",
    "examples/send_once.py",
    "examples/resend_batch.py",
    "benchmarks/seed_design.py",
    "benchmarks/store_merge.py",
    "benchmarks/flush_encode.py",
]
# Flags of other tools that the docs name in prose (not rtmonitor's).
OTHER_TOOLS_FLAGS = {"--profile", "--pdeathsig"}
SKIP_DIRS = {".git", ".venv", "data", "test-artifacts", "build", "dist", "node_modules"}
# Directories made at run time (the embedded Redis's data, the dashboard's screenshots).
GENERATED = {"data/", "test-artifacts/"}
# Files the user makes (`rtmonitor token new >> tokens.toml`), never committed.
GENERATED_FILES = {"tokens.toml", "deploy/tokens.toml"}

CODE_SPAN = re.compile(r"`([^`\n]+)`")
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
LINK = re.compile(r"\]\(([^)\s#]+)(?:#[^)]*)?\)")
PATH = re.compile(
    r"^(?P<path>[\w./-]+\.(?:py|proto|md|c|pyi|json|yml|yaml|toml|js|css|html))"
    r"(?::(?P<name>[A-Za-z_][\w.]*))?$"
)
DIRECTORY = re.compile(r"^[a-z_][\w-]*(?:/[\w-]+)*/$")
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
ENV = re.compile(r"\bRTM_[A-Z0-9_]*[A-Z0-9]\b")
SUBCOMMAND = re.compile(r"rtmonitor (serve|send|bench|top)\b|make run ARGS=")


# Environment names that are a field's alias (RTM_TOKEN for every client's --token).
ALIASES = {
    name
    for model in (Settings, *MODELS.values())
    for field in model.model_fields.values()
    if isinstance(field.validation_alias, AliasChoices)
    for name in field.validation_alias.choices
    if isinstance(name, str)
}


def test_readme_documents_every_setting() -> None:
    readme = (ROOT / "README.md").read_text()
    for name in Settings.model_fields:
        if name in ("redis_host", "redis_port"):
            assert name.upper() in readme
            continue
        assert f"`--{name.replace('_', '-')}`" in readme, name
        assert f"`RTM_{name.upper()}`" in readme, name


def test_quickstart_is_make_run_and_make_test() -> None:
    readme = (ROOT / "README.md").read_text()
    quickstart = readme.split("## Quickstart", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].strip() for line in quickstart.strip().splitlines()]
    assert commands == ["make run", "make test"]
    for guide in ("运行指南.md", "代码详细注释与学习指导.md"):
        assert (ROOT / "docs" / guide).exists()


# --- what the docs name ---------------------------------------------------------------------


def _tree() -> tuple[set[str], set[str]]:
    files: set[str] = set()
    dirs: set[str] = set()
    for top, subdirs, names in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if d not in SKIP_DIRS and not d.startswith(".")]
        rel = Path(top).relative_to(ROOT).as_posix()
        if rel != ".":
            dirs.add(rel)
        files.update(f"{rel}/{n}" if rel != "." else n for n in names)
    return files, dirs


FILES, DIRS = _tree()


def _resolve(path: str, known: set[str]) -> list[str]:
    """Files (or directories) of the tree that `path` names: itself, or as a suffix
    (`storage/scripts.py` is src/rtmonitor/storage/scripts.py)."""
    path = path.removeprefix("./").rstrip("/")
    return sorted(k for k in known if k == path or k.endswith("/" + path))


def _spans(doc: Path) -> Iterator[str]:
    """Code spans of the prose (outside fenced blocks), then the lines of fenced blocks."""
    text = doc.read_text()
    yield from CODE_SPAN.findall(FENCE.sub("", text))
    for block in FENCE.findall(text):
        yield from block.splitlines()


def _defines(tree: ast.Module, qualname: str) -> bool:
    body: list[ast.stmt] = tree.body
    for part in qualname.split("."):
        found = None
        for node in body:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                if node.name == part:
                    found = node
            elif isinstance(node, ast.Assign | ast.AnnAssign):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if any(isinstance(t, ast.Name) and t.id == part for t in targets):
                    found = node
        if found is None:
            return False
        body = getattr(found, "body", [])
    return True


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_named_paths_and_functions_exist(doc: Path) -> None:
    problems = []
    for span in _spans(doc):
        for word in span.split():
            match = PATH.match(word.strip("(),;:。，、"))
            if match and not word.startswith(("http", "/")):
                path, name = match["path"], match["name"]
                found = _resolve(path, FILES)
                if not found and path in GENERATED_FILES:
                    continue
                if not found:
                    problems.append(f"{word}: no such file")
                elif name and not any(
                    f.endswith(".py") and _defines(ast.parse((ROOT / f).read_text()), name)
                    for f in found
                ):
                    problems.append(f"{word}: {path} defines no {name}")
        if DIRECTORY.match(span) and span not in GENERATED and not _resolve(span, DIRS):
            problems.append(f"{span}: no such directory")
    for target in LINK.findall(doc.read_text()):
        if not target.startswith(("http:", "https:", "mailto:")):
            if not (doc.parent / target).exists():
                problems.append(f"link {target}: no such file")
    assert not problems, "\n".join(problems)


def _options(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    return next(
        (a.choices for a in parser._actions if isinstance(a, argparse._SubParsersAction)), {}
    )


def _parsers() -> dict[str, set[str]]:
    flags = {}
    for name, p in _subparsers(make_parser()).items():
        # a command's own flags and those of its subcommands (`token new --json`)
        flags[name] = _options(p).union(*map(_options, _subparsers(p).values()))
    for script in SCRIPTS:
        source = (ROOT / script).read_text()
        flags[script] = set(re.findall(r"add_argument\(\s*\"(--[\w-]+)\"", source)) | {"--help"}
    return flags


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_named_flags_and_environment_variables_exist(doc: Path) -> None:
    parsers = _parsers()
    known = set().union(*parsers.values()) | OTHER_TOOLS_FLAGS
    problems = []
    for span in _spans(doc):
        command = SUBCOMMAND.search(span)
        script = next((s for s in SCRIPTS if s in span), None)
        if command is not None:  # flags after `rtmonitor <sub>` are that command's
            sub = command.group(1) or "serve"
            allowed = parsers[sub]
            flags = FLAG.findall(span[command.end() :])
        elif script is not None:
            allowed = parsers[script]
            flags = FLAG.findall(span[span.index(script) :])
        elif span.startswith("--"):  # a flag named in prose
            allowed, flags = known, FLAG.findall(span)[:1]
        else:
            continue
        problems += [
            f"{span!r}: {flag} is not a flag of it" for flag in flags if flag not in allowed
        ]
    for env in ENV.findall(doc.read_text()):
        if env in ALIASES:
            continue
        model = next((m for p, m in ENV_PREFIXES.items() if env.startswith(p)), Settings)
        prefix = next((p for p in ENV_PREFIXES if env.startswith(p)), "RTM_")
        if env.removeprefix(prefix).lower() not in model.model_fields:
            problems.append(f"{env}: no such setting")
    assert not problems, "\n".join(sorted(set(problems)))


# --- defaults -------------------------------------------------------------------------------

# `--flag` (N unit …), `--flag`（默认 N unit…）, or "default N" inside the parenthesis
DEFAULT_NEAR_FLAG = re.compile(r"`(--[a-z][a-z0-9-]*)`\s*[(（]([^)）]*)[)）]")
# `--flag`，默认 N / `--flag`, default N / `--flag` N (a number right after the flag)
DEFAULT_AFTER_FLAG = re.compile(
    r"`(--[a-z][a-z0-9-]*)`(?:\s*[,，]\s*(?:默认|default)\s*|\s+)(\d[\d,]*(?:\.\d+)?\s*\S*)"
)
NUMBER = re.compile(
    r"^(?:默认\s*|default\s+)?(\d[\d,]*(?:\.\d+)?)\s*(KiB|MiB|GiB|MB|days|day|s|万|%)?(?![\w.])"
)
UNITS = {"KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "days": 86400, "day": 86400, "万": 10_000}


def _defaults(flag: str) -> list[Any]:
    name = flag.removeprefix("--").replace("-", "_")
    return [m.model_fields[name].default for m in MODELS.values() if name in m.model_fields]


def _number_matches(text: str, defaults: list[Any]) -> bool | None:
    """None: the parenthesis states no number; else whether it is one of the defaults."""
    match = NUMBER.match(text.strip())
    if match is None:
        inner = re.search(r"(?:default|默认)\s*(\d[\d,]*(?:\.\d+)?)", text)
        if inner is None:
            return None
        match = NUMBER.match(inner.group(0))
        assert match is not None
    value = float(match.group(1).replace(",", ""))
    scaled = value * UNITS.get(match.group(2) or "", 1)
    numbers = [d for d in defaults if isinstance(d, int | float) and not isinstance(d, bool)]
    return any(d in (value, scaled) for d in numbers)


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.relative_to(ROOT).as_posix())
def test_defaults_named_next_to_a_flag_are_the_settings(doc: Path) -> None:
    problems = []
    text = doc.read_text()
    for flag, inside in DEFAULT_NEAR_FLAG.findall(text) + DEFAULT_AFTER_FLAG.findall(text):
        defaults = _defaults(flag)
        if defaults and _number_matches(inside, defaults) is False:
            problems.append(f"`{flag}` ({inside}): the default is {defaults}")
    assert not problems, "\n".join(problems)


def test_the_readme_configuration_table_has_the_defaults() -> None:
    rows = re.findall(
        r"^\| `(--[a-z0-9-]+)` \| `RTM_[A-Z0-9_]+`[^|]* \| ([^|]+) \|",
        (ROOT / "README.md").read_text(),
        re.M,
    )
    assert len(rows) >= len(Settings.model_fields) - 2
    for flag, cell in rows:
        default = Settings.model_fields[flag[2:].replace("-", "_")].default
        shown = cell.strip().split(" (")[0].strip("`")
        if isinstance(default, bool):
            assert shown == ("on" if default else "off"), flag
        elif default is None:
            assert shown == "none", flag
        elif isinstance(default, int | float):
            assert float(shown) == default, (flag, shown, default)
        else:
            assert shown == str(default), (flag, shown, default)
