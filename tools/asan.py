"""`make test-asan`: the C row and OTLP readers under AddressSanitizer and UBSan.

Builds src/rtmonitor/ingest/_rows.c with -fsanitize=address,undefined into a copy of the
package, then runs the differential tests (tests/unit/test_rows_wire.py,
test_columnar.py: random, mutated and hand-built wire data against protobuf;
test_otlp_reader.py: random OTLP requests against the Python mapping) with the
sanitizer runtimes preloaded. Any out-of-bounds read, overflow or undefined behaviour
aborts the run. Needs gcc with libasan/libubsan (Debian's gcc has them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def runtime(name: str) -> str:
    path = subprocess.run(
        ["gcc", f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(path):
        raise SystemExit(f"test-asan: gcc has no {name}; install gcc's sanitizer runtimes")
    return path


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="rtm-asan-") as tmp:
        package = Path(tmp) / "rtmonitor"
        shutil.copytree(ROOT / "src" / "rtmonitor", package, ignore=shutil.ignore_patterns("*.so"))
        suffix = sysconfig.get_config_var("EXT_SUFFIX")
        subprocess.run(
            ["gcc", "-shared", "-fPIC", "-O1", "-g", "-std=c11", "-Wall", "-Wextra",
             "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
             "-fno-omit-frame-pointer", f"-I{sysconfig.get_paths()['include']}",
             str(package / "ingest" / "_rows.c"), "-o", str(package / "ingest" / f"_rows{suffix}")],
            check=True,
        )  # fmt: skip
        env = {
            **os.environ,
            "PYTHONPATH": tmp,  # the sanitized copy comes before the installed package
            "LD_PRELOAD": f"{runtime('libasan.so')} {runtime('libubsan.so')}",
            "ASAN_OPTIONS": "detect_leaks=0",  # CPython's own allocations are not leaks
            # every object its own malloc block, so a read past a bytes object hits a
            # redzone instead of the next object in a pymalloc arena
            "PYTHONMALLOC": "malloc",
        }
        probe = "import rtmonitor.ingest._rows as m; print(m.__file__)"
        where = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        ).stdout.strip()
        if not where.startswith(tmp):
            raise SystemExit(f"test-asan: imported {where}, not the sanitized build")
        print(f"test-asan: sanitized reader at {where}", flush=True)
        tests = [
            "tests/unit/test_rows_wire.py",
            "tests/unit/test_columnar.py",
            "tests/unit/test_otlp_reader.py",
        ]
        return subprocess.run(
            # -s: a sanitizer report is written to stderr as the process exits; pytest's
            # capture would swallow it
            [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", *tests],
            env=env, cwd=ROOT,
        ).returncode  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
