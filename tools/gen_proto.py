"""Generate the Python modules for proto/ into src/ (``make proto``).

The .proto is mapped to the virtual path ``rtmonitor/ingest/v1/`` so the
generated modules live inside the package and import each other with
package-absolute imports (``from rtmonitor.ingest.v1 import telemetry_pb2``),
with no rewriting of generated files.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = ROOT / "proto" / "rtmonitor" / "v1"
VIRTUAL_DIR = "rtmonitor/ingest/v1"
PROTOS = ["telemetry.proto"]
GENERATED = ["telemetry_pb2.py", "telemetry_pb2.pyi", "telemetry_pb2_grpc.py"]


def generate(out_dir: Path) -> list[Path]:
    """Run protoc (grpcio-tools) and return the generated files."""
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{VIRTUAL_DIR}={PROTO_DIR}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *(f"{PROTO_DIR / name}" for name in PROTOS),
    ]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed: {' '.join(args)}")
    return [out_dir / VIRTUAL_DIR / name for name in GENERATED]


if __name__ == "__main__":
    files = generate(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "src")
    for f in files:
        print(f.relative_to(ROOT) if f.is_relative_to(ROOT) else f)
