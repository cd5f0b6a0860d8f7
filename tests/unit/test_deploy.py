"""deploy/ is checked without a Docker engine or a cluster: Kubernetes manifests against
the Kubernetes schemas, the Compose file against the Compose specification, and the
Dockerfile by a parser-level lint. (`make check-image` runs the image's build and install
steps for real.)"""

from __future__ import annotations

import getpass
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from dockerfile_parse import DockerfileParser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
K8S_VERSION = "1.33.0"


def k8s_documents() -> list[tuple[str, dict[str, object]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


@pytest.mark.parametrize(
    ("name", "doc"), k8s_documents(), ids=lambda x: x if isinstance(x, str) else ""
)
def test_kubernetes_manifests_match_the_schemas(name: str, doc: dict[str, object]) -> None:
    kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_kustomization_lists_every_manifest_and_the_deployment_is_sound() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files
    kinds = {d["kind"] for _, d in k8s_documents()}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget",
            "ConfigMap", "Secret"} <= kinds  # fmt: skip
    deployment = next(d for _, d in k8s_documents() if d["kind"] == "Deployment")
    pod = deployment["spec"]["template"]["spec"]  # type: ignore[index]
    container = pod["containers"][0]
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["resources"]["requests"] and container["resources"]["limits"]
    assert deployment["spec"]["replicas"] >= 2  # type: ignore[index]
    grpc = next(d for _, d in k8s_documents() if d["kind"] == "Service" and "grpc" in
                d["metadata"]["name"])  # type: ignore[index]  # fmt: skip
    assert grpc["spec"]["clusterIP"] == "None", "gRPC needs per-pod addresses (headless)"
    # auth on: the token file comes from a Secret volume at the configured path
    config = next(d for _, d in k8s_documents() if d["kind"] == "ConfigMap")
    auth_file = config["data"]["RTM_AUTH_FILE"]  # type: ignore[index]
    mount = next(m for m in container["volumeMounts"] if m["name"] == "tokens")
    assert auth_file.startswith(mount["mountPath"] + "/")
    volume = next(v for v in pod["volumes"] if v["name"] == "tokens")
    secret = next(
        d for _, d in k8s_documents()
        if d["kind"] == "Secret" and d["metadata"]["name"] == volume["secret"]["secretName"]  # type: ignore[index]
    )  # fmt: skip
    assert auth_file.rsplit("/", 1)[1] in secret["stringData"]  # type: ignore[operator]


def image_env() -> dict[str, str]:
    """The ENV of the Dockerfile's final stage."""
    parser = DockerfileParser(path=str(ROOT / "deploy" / "Dockerfile"))
    return dict(parser.envs)


def auth_file(service: dict[str, Any]) -> str | None:
    """The RTM_AUTH_FILE a Compose service runs `serve` with: its own, else the image's
    (None: it does not run the service, e.g. `token new`)."""
    if service.get("image") != "rtmonitor:local" or service.get("command", ["serve"])[0] != "serve":
        return None
    environment = service.get("environment") or {}
    return environment.get("RTM_AUTH_FILE", image_env().get("RTM_AUTH_FILE"))


def secret_paths(service: dict[str, Any]) -> set[str]:
    """Where a Compose service's secrets are mounted: the short form `- name` at
    /run/secrets/name, the long form at its `target` (relative: under /run/secrets)."""
    paths = set()
    for secret in service.get("secrets", []):
        if isinstance(secret, str):
            paths.add(f"/run/secrets/{secret}")
        else:
            target = secret.get("target", secret["source"])
            paths.add(target if target.startswith("/") else f"/run/secrets/{target}")
    return paths


def test_compose_file_matches_the_compose_specification() -> None:
    checker = shutil.which("check-jsonschema") or str(
        Path(__file__).parents[2] / ".venv/bin/check-jsonschema"
    )
    result = subprocess.run(
        [checker, "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    service = compose["services"]["rtmonitor"]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "REDIS_URL" in service["environment"]
    redis_command = " ".join(compose["services"]["redis"]["command"])
    assert "appendonly" in redis_command
    # as the embedded Redis: rewrites at +400%, expired rate windows freed off the main thread
    assert "--auto-aof-rewrite-percentage 400" in redis_command
    assert "--lazyfree-lazy-expire yes" in redis_command
    # no RDB snapshots beside the AOF (an empty argument: save points none)
    command = compose["services"]["redis"]["command"]
    assert command[command.index("--save") + 1] == ""
    assert compose["services"]["redis"]["healthcheck"] and compose["volumes"]
    assert compose["services"]["proxy"]["profiles"] == ["scale"]
    # auth on: the token file is a secret of every service instance, mounted where
    # RTM_AUTH_FILE (the service's, else the image's) says it is
    assert service["environment"]["RTM_AUTH_FILE"] == "/run/secrets/rtm-tokens.toml"
    serving = [n for n, s in compose["services"].items() if auth_file(s) is not None]
    assert {"rtmonitor", "ingest", "mqtt-bridge"} <= set(serving)
    for name in serving:
        assert auth_file(compose["services"][name]) in secret_paths(compose["services"][name])
    assert compose["secrets"]["rtm-tokens"]["file"] == "./deploy/tokens.toml"
    assert compose["services"]["tokens"]["command"][:2] == ["token", "new"]
    ignored = (ROOT / ".gitignore").read_text().split()
    assert "deploy/tokens.toml" in ignored and "deploy/prometheus/token" in ignored
    broker, bridge = compose["services"]["mosquitto"], compose["services"]["mqtt-bridge"]
    assert broker["profiles"] == bridge["profiles"] == ["mqtt"]
    assert broker["image"].startswith("eclipse-mosquitto:2")
    assert bridge["environment"]["RTM_MQTT_URL"] == "mqtt://mosquitto:1883"
    # `$$` is Compose's escape: the service sees one `$`
    assert bridge["environment"]["RTM_MQTT_TOPIC"] == "$$share/rtm/rtm/+/telemetry"
    assert "mosquitto-data" in compose["volumes"]


# Published on every interface only where a token is checked (the service, the proxy in
# front of its replicas); whatever else answers without one is published on loopback.
AUTHENTICATED = {"rtmonitor", "proxy"}


def test_compose_publishes_nothing_unauthenticated_beyond_loopback() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str), (name, port)
            if name not in AUTHENTICATED:
                assert port.startswith("127.0.0.1:"), f"{name} publishes {port} to the network"
    assert {"prometheus", "grafana", "mosquitto"} <= {
        n for n, s in compose["services"].items() if s.get("ports")
    }
    grafana = compose["services"]["grafana"]["environment"]
    assert grafana["GF_AUTH_ANONYMOUS_ENABLED"] == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in grafana
    # its admin password is a secret of the user's, not Grafana's admin/admin
    password = grafana["GF_SECURITY_ADMIN_PASSWORD__FILE"]
    assert password in secret_paths(compose["services"]["grafana"])
    source = compose["secrets"]["grafana-admin-password"]["file"].removeprefix("./")
    assert source in (ROOT / ".gitignore").read_text().split()
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    if "allow_anonymous true" in conf:  # then only this machine may reach it
        assert compose["services"]["mosquitto"]["ports"] == ["127.0.0.1:1883:1883"]


def test_mosquitto_config_mounted_by_compose_is_accepted_by_mosquitto(tmp_path: Path) -> None:
    """The compose profile's broker configuration, run by Debian's mosquitto (paths moved
    to a temporary directory): it starts and listens."""
    from rtmonitor.loadgen.broker import mosquitto_binary

    mosquitto = mosquitto_binary()
    if mosquitto is None:
        pytest.skip("needs Debian's mosquitto (.ci/run installs it)")
    from rtmonitor.storage.embedded import free_port

    port = free_port()
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    assert "listener 1883" in conf and "persistence true" in conf
    conf = conf.replace("listener 1883", f"listener {port} 127.0.0.1")
    conf = conf.replace("/mosquitto/data/", f"{tmp_path}/")
    conf += f"user {getpass.getuser()}\n"
    (tmp_path / "m.conf").write_text(conf)
    proc = subprocess.Popen(
        [mosquitto, "-c", str(tmp_path / "m.conf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            assert proc.poll() is None, proc.communicate()[0].decode()
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        proc.terminate()
        proc.communicate(timeout=10)


def test_dockerfile_lint() -> None:
    parser = DockerfileParser(path=str(ROOT / "deploy" / "Dockerfile"))
    instructions = parser.structure
    froms = [i for i in instructions if i["instruction"] == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a slim runtime"
    assert not any("latest" in i["value"] for i in froms)
    final = instructions[max(i for i, x in enumerate(instructions) if x["instruction"] == "FROM") :]
    names = [i["instruction"] for i in final]
    users = [i["value"] for i in final if i["instruction"] == "USER"]
    assert users and users[-1] not in ("root", "0"), "the runtime runs as a non-root user"
    assert "HEALTHCHECK" in names and "/healthz" in next(
        i["value"] for i in final if i["instruction"] == "HEALTHCHECK"
    )
    exposed = " ".join(i["value"] for i in final if i["instruction"] == "EXPOSE").split()
    assert {"50051", "8000"} <= set(exposed)
    assert next(i["value"] for i in final if i["instruction"] == "ENTRYPOINT").startswith("[")
    assert not any(i["instruction"] == "ADD" for i in instructions), "COPY, not ADD"
    for run in (i["value"] for i in instructions if i["instruction"] == "RUN"):
        if "pip install" in run:
            assert "--no-cache-dir" in run
        assert "curl" not in run and "wget" not in run, "no downloads outside package managers"
    copies = [i["value"] for i in final if i["instruction"] == "COPY"]
    assert copies and all(c.startswith("--from=build") for c in copies), "only the wheel"
    env = " ".join(i["value"] for i in final if i["instruction"] == "ENV")
    assert "RTM_AUTH_FILE=/run/secrets/rtm-tokens.toml" in env, "the image ships with auth on"
    dockerignore = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "data"} <= set(dockerignore)
