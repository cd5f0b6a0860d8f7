"""`make check-image`: run the image's recipe without a Docker engine.

Reads deploy/Dockerfile and executes its stages' COPY and RUN steps — the same commands,
in the same order — each stage in a fresh virtual environment standing in for the base
image's Python, with the image's absolute paths mapped into a temporary directory. Then it
starts the installed service from the runtime environment (embedded Redis), runs the
image's HEALTHCHECK command against it, sends packets with the installed `rtmonitor
send`, and checks the counts over HTTP.

What it cannot check without an engine (and says so): the base image itself, `useradd` /
`chown` (user management is skipped: it would change this machine), and the image size.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import venv
from pathlib import Path

from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
# Steps that manage the image's users, system directories and Debian packages (the build
# stage's C compiler): not run on this machine, which has its own compiler.
SKIPPED = ("useradd", "chown", "mkdir -p /data", "apt-get", "rm -rf /var/lib/apt/lists")


def log(msg: str) -> None:
    print(f"check-image: {msg}", flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Stage:
    """One FROM ... stage: a venv for its Python, a directory for its filesystem."""

    def __init__(self, name: str, base: Path) -> None:
        self.name = name
        self.fs = base / f"fs-{name}"
        self.fs.mkdir(parents=True)
        self.venv = base / f"venv-{name}"
        venv.EnvBuilder(with_pip=True).create(self.venv)
        self.workdir = self.fs
        self.env = {
            **os.environ,
            "PATH": f"{self.venv / 'bin'}{os.pathsep}{os.environ['PATH']}",
            "VIRTUAL_ENV": str(self.venv),
        }

    def path(self, image_path: str) -> Path:
        """An absolute path of the image, inside this stage's directory."""
        return (
            self.fs / image_path.lstrip("/")
            if image_path.startswith("/")
            else (self.workdir / image_path)
        )

    def rewrite(self, command: str) -> str:
        """Map the image's absolute paths (/dist, /tmp/dist, ...) into the stage directory."""
        words = []
        for word in shlex.split(command, posix=True):
            if word.startswith("/") and not word.startswith(("/dev", "/proc")):
                word = str(self.fs) + word
            words.append(word)
        # quote only what needs it, so that globs (/tmp/dist/*.whl) still expand
        return " ".join(w if re.fullmatch(r"[\w@%+=:,./*-]+", w) else shlex.quote(w) for w in words)


def run_stages(base: Path) -> Stage:
    parser = DockerfileParser(path=str(DOCKERFILE))
    stages: dict[str, Stage] = {}
    stage: Stage | None = None
    for ins in parser.structure:
        kind, value = ins["instruction"], ins["value"]
        if kind == "FROM":
            name = value.split()[-1] if " AS " in value.upper() else f"stage{len(stages)}"
            name = name.lower()
            log(f"stage {name} ({value}) -> fresh venv with {sys.version.split()[0]}")
            stage = stages[name] = Stage(name, base)
        elif stage is None:
            continue
        elif kind == "WORKDIR":
            stage.workdir = stage.path(value)
            stage.workdir.mkdir(parents=True, exist_ok=True)
        elif kind == "COPY":
            parts = value.split()
            source_stage = None
            if parts[0].startswith("--from="):
                source_stage = stages[parts[0].split("=", 1)[1]]
                parts = parts[1:]
            *sources, dest = parts
            target = stage.path(dest)
            for src in sources:
                origin = source_stage.path(src) if source_stage else ROOT / src
                if origin.is_dir():
                    shutil.copytree(origin, target if dest.endswith("/") or len(sources) == 1 and
                                    not target.exists() else target / origin.name,
                                    dirs_exist_ok=True)  # fmt: skip
                else:
                    target.mkdir(parents=True, exist_ok=True) if dest.endswith("/") else None
                    shutil.copy2(origin, target if not dest.endswith("/") else target / origin.name)
            log(f"COPY {value}")
        elif kind == "RUN":
            parts = [p.strip() for p in value.replace("\\\n", " ").split("&&")]
            kept = [p for p in parts if not p.startswith(SKIPPED)]
            for p in set(parts) - set(kept):
                log(f"  skipped (system users/dirs/packages): {p}")
            command = " && ".join(stage.rewrite(p) for p in kept)
            log(f"RUN {command}")
            subprocess.run(command, shell=True, check=True, cwd=stage.workdir, env=stage.env)
    assert stage is not None
    return stage


def healthcheck_command() -> list[str]:
    parser = DockerfileParser(path=str(DOCKERFILE))
    value = next(i["value"] for i in parser.structure if i["instruction"] == "HEALTHCHECK")
    return list(json.loads(value.split("CMD", 1)[1].strip()))


def smoke(runtime: Stage, base: Path) -> None:
    """Start the installed service, run the image's HEALTHCHECK, count some packets."""
    bin_dir = runtime.venv / "bin"
    grpc_port, http_port = free_port(), free_port()
    env = {k: v for k, v in runtime.env.items() if not k.startswith(("RTM_", "REDIS_"))}
    env.update({"RTM_HOST": "127.0.0.1", "RTM_GRPC_PORT": str(grpc_port),
                "RTM_HTTP_PORT": str(http_port), "RTM_DATA_DIR": str(base / "data")})  # fmt: skip
    # The wheel must carry the compiled row reader, or row batches take the slow path, the
    # device table, or the validator looks fleets up in a dict, the flush's numbering, or
    # it sorts a fleet's keys, the flush's scatter, or
    # flushes pack with numpy's indexing, and the rtm module, or the embedded Redis merges
    # with the script.
    probe = (
        "import rtmonitor.ingest._rows as m, rtmonitor.storage._pack as s, "
        "rtmonitor.ingest._devices as d, rtmonitor._model as n; print(m.__file__); "
        "print(d.__file__); print(n.__file__); print(s.__file__); "
        "from rtmonitor.storage.embedded import merge_module_path as p; assert p(); print(p())"
    )
    built = subprocess.run([str(bin_dir / "python"), "-c", probe], env=env, cwd=base,
                           capture_output=True, text=True)  # fmt: skip
    if built.returncode != 0:
        raise SystemExit(f"check-image: the wheel lacks a compiled part:\n{built.stderr}")
    log(
        f"the compiled reader, table, numbering, scatter and rtm module are installed: "
        f"{built.stdout.split()}"
    )
    # As the image runs: with an auth file (the Dockerfile sets RTM_AUTH_FILE), made by the
    # installed `rtmonitor token new`.
    made = subprocess.run(
        [str(bin_dir / "rtmonitor"), "token", "new", "--name", "check", "--scope", "admin",
         "--json"],
        env=env, capture_output=True, text=True, check=True,
    )  # fmt: skip
    token = json.loads(made.stdout)
    (base / "tokens.toml").write_text(token["toml"])
    env["RTM_AUTH_FILE"] = str(base / "tokens.toml")
    log(f"starting {bin_dir / 'rtmonitor'} serve (embedded Redis, auth file) on "
        f"{grpc_port}/{http_port}")  # fmt: skip
    service = subprocess.Popen([str(bin_dir / "rtmonitor"), "serve"], env=env, cwd=base)
    try:
        health = [str(bin_dir / "python") if healthcheck_command()[0] == "python" else ""]
        health += healthcheck_command()[1:]
        deadline = time.monotonic() + 60
        quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        while subprocess.run(health, env=env, **quiet).returncode != 0:  # type: ignore[call-overload]
            if service.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("check-image: the installed service never became healthy")
            time.sleep(0.5)
        log("HEALTHCHECK passes")
        subprocess.run(
            [str(bin_dir / "rtmonitor"), "send", "--target", f"127.0.0.1:{grpc_port}",
             "--devices", "10", "--count", "5000", "--batch-size", "100", "--no-progress"],
            check=True, env={**env, "RTM_TOKEN": token["secret"]},
        )  # fmt: skip
        url = f"http://127.0.0.1:{http_port}/metrics?limit=1"
        try:
            urllib.request.urlopen(url, timeout=5)
            raise SystemExit("check-image: GET /metrics without a token was not refused")
        except urllib.error.HTTPError as exc:
            if exc.code != 401:
                raise
        request = urllib.request.Request(
            url, headers={"Authorization": f"Bearer {token['secret']}"}
        )
        totals = json.load(urllib.request.urlopen(request, timeout=5))["totals"]
        if totals["packets"] != 5000 or totals["devices"] != 10:
            raise SystemExit(f"check-image: wrong counts from the installed service: {totals}")
        log(f"the installed service counted exactly: {totals}")
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(60)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="rtm-check-image-") as tmp:
        base = Path(tmp)
        runtime = run_stages(base)
        smoke(runtime, base)
    log("OK — verified without an engine: the build and install steps, the HEALTHCHECK, "
        "the installed service; not verified: the base image, user setup, image size")  # fmt: skip


if __name__ == "__main__":
    main()
