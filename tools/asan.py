"""`make test-asan`: the C parts under AddressSanitizer and UBSan.

Builds src/rtmonitor/ingest/_rows.c, the validator's device table
(src/rtmonitor/ingest/_devices.c), the flush's numbering (src/rtmonitor/_model.c), the
flush's scatter (src/rtmonitor/storage/_pack.c)
and the rtm Redis module (src/rtmonitor/storage/_merge.c) with -fsanitize=address,undefined
into a copy of the package, then runs the differential tests (tests/unit/test_rows_wire.py,
test_columnar.py: random, mutated and hand-built wire data against protobuf;
test_otlp_reader.py: random OTLP requests against the Python mapping; test_device_table.py
and test_fleet_admission.py: random table operations against a dict, random batches
admitted against packet by packet; test_numbering.py: random keys numbered against a
dict; test_resp.py: random commands packed against redis-py's packer; test_device_keys.py:
random device keys joined against Python's; test_packing.py:
random deltas packed against struct.pack, and rows refused outside their buffer;
tests/integration/test_merge_module.py: random flushes merged by the
module and by the Lua script, and malformed calls) with the sanitizer runtimes preloaded,
in Python and in the embedded redis-server that loads the module (it inherits the
environment; its libc malloc is then the sanitizer's). Any out-of-bounds access, overflow
or undefined behaviour aborts the process that hit it: the run fails and prints the
reports. Needs gcc with libasan/libubsan (Debian's gcc has them).
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
        sources = ("ingest/_rows", "ingest/_devices", "_model", "storage/_pack", "storage/_merge")
        for source in sources:
            subprocess.run(
                ["gcc", "-shared", "-fPIC", "-O1", "-g", "-std=c11", "-Wall", "-Wextra",
                 "-fsanitize=address,undefined", "-fno-sanitize-recover=undefined",
                 "-fno-omit-frame-pointer", f"-I{sysconfig.get_paths()['include']}",
                 str(package / f"{source}.c"), "-o", str(package / f"{source}{suffix}"), "-lm"],
                check=True,
            )  # fmt: skip
        reports = Path(tmp) / "reports"
        reports.mkdir()
        env = {
            **os.environ,
            "PYTHONPATH": tmp,  # the sanitized copy comes before the installed package
            "LD_PRELOAD": f"{runtime('libasan.so')} {runtime('libubsan.so')}",
            # CPython's own allocations are not leaks; a report goes to a file of the
            # process that wrote it (redis-server's stderr is not the terminal's)
            "ASAN_OPTIONS": f"detect_leaks=0:log_path={reports}/asan",
            "UBSAN_OPTIONS": f"print_stacktrace=1:log_path={reports}/ubsan",
            # every object its own malloc block, so a read past a bytes object hits a
            # redzone instead of the next object in a pymalloc arena
            "PYTHONMALLOC": "malloc",
        }
        probe = (
            "import rtmonitor.ingest._rows as m, rtmonitor.storage._pack as s, "
            "rtmonitor.ingest._devices as d, rtmonitor._model as n; from "
            "rtmonitor.storage.embedded import merge_module_path as p; print(m.__file__); "
            "print(d.__file__); print(n.__file__); print(s.__file__); print(p())"
        )
        found = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True
        ).stdout.split()
        if len(found) != 5 or not all(where.startswith(tmp) for where in found):
            raise SystemExit(f"test-asan: found {found}, not the sanitized builds")
        print(f"test-asan: sanitized reader, table, numbering, scatter and module at {found}",
              flush=True)  # fmt: skip
        tests = [
            "tests/unit/test_rows_wire.py",
            "tests/unit/test_columnar.py",
            "tests/unit/test_otlp_reader.py",
            "tests/unit/test_device_table.py",
            "tests/unit/test_numbering.py",
            "tests/unit/test_fleet_admission.py",
            "tests/unit/test_packing.py",
            "tests/unit/test_resp.py",
            "tests/unit/test_device_keys.py",
            "tests/integration/test_merge_module.py",
        ]
        code = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
            env=env, cwd=ROOT,
        ).returncode  # fmt: skip
        for report in sorted(reports.iterdir()):
            print(f"test-asan: {report.name}:\n{report.read_text(errors='replace')}")
            code = code or 1
        return code


if __name__ == "__main__":
    raise SystemExit(main())
