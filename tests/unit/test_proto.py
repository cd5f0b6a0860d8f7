"""The committed generated code is exactly what the .proto generates."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

import gen_proto  # noqa: E402


def test_generated_code_matches_proto(tmp_path: Path) -> None:
    generated = gen_proto.generate(tmp_path)
    committed = ROOT / "src" / gen_proto.VIRTUAL_DIR
    for path in generated:
        mine = (committed / path.name).read_text()
        assert path.read_text() == mine, f"{path.name} is stale: run `make proto` and commit"


def test_generated_modules_use_package_absolute_imports() -> None:
    grpc_module = (ROOT / "src" / gen_proto.VIRTUAL_DIR / "telemetry_pb2_grpc.py").read_text()
    assert "from rtmonitor.ingest.v1 import telemetry_pb2" in grpc_module
