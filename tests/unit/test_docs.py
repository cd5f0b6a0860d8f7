"""The README stays true: every setting is documented, the quickstart is two commands."""

from __future__ import annotations

from pathlib import Path

from rtmonitor.config import Settings

ROOT = Path(__file__).resolve().parents[2]


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
