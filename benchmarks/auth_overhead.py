"""What authentication and TLS cost: auth off, an auth file and a token, and auth + TLS,
alternated round by round in one run (the machine is shared: only figures measured side
by side compare).

    .venv/bin/python benchmarks/auth_overhead.py --rounds 3 --duration 5
    .venv/bin/python benchmarks/auth_overhead.py --rounds 5 --cpu-only

The first runs `rtmonitor bench` (e2e rates, and the service's CPU per packet over the load,
probes included); `--cpu-only` runs `serve` and one `rtmonitor send` of a fixed count per
mode, no probes, and reports the service's CPU per packet: the figure the shared machine
disturbs least. Makes a throwaway token file and CA/server certificate (trustme, a dev
dependency) in a temporary directory; prints every round and the medians, and writes them
to benchmarks/auth_overhead.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import trustme

from rtmonitor.auth import new_token

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ("off", "auth", "auth+tls")


def bench(
    config: str, tmp: Path, secret: str, args: argparse.Namespace, n: int
) -> list[dict[str, Any]]:
    out = tmp / f"{config}-{n}.json"
    flags = [
        "--duration", str(args.duration), "--no-ceiling", "--modes", args.modes,
        "--output", str(out),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("RTM_")}
    if config != "off":
        flags += ["--auth-file", str(tmp / "tokens.toml")]
        env["RTM_TOKEN"] = secret  # not on the command line (ps)
    if config == "auth+tls":
        flags += [
            "--server-tls-cert", str(tmp / "cert.pem"), "--server-tls-key", str(tmp / "key.pem"),
            "--tls-ca", str(tmp / "ca.pem"),
        ]  # fmt: skip
    cmd = [sys.executable, "-m", "rtmonitor", "bench", *flags]
    subprocess.run(cmd, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
    results: list[dict[str, Any]] = json.loads(out.read_text())["results"]
    assert all(r["exact"] for r in results), f"{config}: not exact"
    return results


SEND = {  # mode -> send flags (a fixed count: the same work in every configuration)
    "packets": ["--count", "40000", "--batch-size", "1", "--streams", "2"],
    "rows": ["--count", "3000000", "--batch-size", "1000", "--streams", "2"],
    "columns": ["--count", "10000000", "--batch-size", "10000", "--columnar", "--streams", "2"],
}


def cpu_only(config: str, tmp: Path, secret: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    """serve + one `send` per mode; the service's CPU per packet over the send."""
    from rtmonitor.clients import ClientSecurity
    from rtmonitor.loadgen.bench import _service_cpu_s
    from rtmonitor.loadgen.launch import ServeProcess

    flags = ["--data-dir", str(tmp / f"data-{config}"), "--log-level", "warning"]
    env: dict[str, str] = {}
    client = ClientSecurity()
    if config != "off":
        flags += ["--auth-file", str(tmp / "tokens.toml")]
        env["RTM_TOKEN"] = secret
        client = ClientSecurity(secret)
    if config == "auth+tls":
        flags += ["--tls-cert", str(tmp / "cert.pem"), "--tls-key", str(tmp / "key.pem")]
        env["RTM_SEND_TLS_CA"] = str(tmp / "ca.pem")
        client = ClientSecurity(secret, tmp / "ca.pem")
    results = []
    for mode in args.modes.split(","):
        svc = ServeProcess(*flags, client=client).wait_ready()
        try:
            start = _service_cpu_s(svc.proc.pid)
            sent = subprocess.run(
                [sys.executable, "-m", "rtmonitor", "send", "--target", svc.target,
                 "--devices", "100", "--no-progress", "--json-output", *SEND[mode]],
                check=True, capture_output=True, text=True,
                env={**{k: v for k, v in os.environ.items() if not k.startswith("RTM_")}, **env},
            )  # fmt: skip
            cpu = _service_cpu_s(svc.proc.pid) - start
            report = json.loads(sent.stdout)
            assert report["accepted"] == report["sent"], report
            results.append(
                {
                    "mode": mode,
                    "e2e_pps": round(report["packets_per_s"]),
                    "service_cpu_ns_per_packet": round(cpu * 1e9 / report["accepted"]),
                }
            )
        finally:
            svc.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--modes", default="packets,rows,columns")
    parser.add_argument("--cpu-only", action="store_true", help="serve + send, no probes")
    args = parser.parse_args()
    table: dict[str, dict[str, list[tuple[int, int]]]] = {}
    with tempfile.TemporaryDirectory(prefix="rtm-auth-bench-") as name:
        tmp = Path(name)
        secret, block = new_token("bench", ["admin"])
        (tmp / "tokens.toml").write_text(block)
        ca = trustme.CA()
        server = ca.issue_cert("127.0.0.1", "localhost")
        ca.cert_pem.write_to_path(str(tmp / "ca.pem"))
        server.private_key_pem.write_to_path(str(tmp / "key.pem"))
        for i, pem in enumerate(server.cert_chain_pems):
            pem.write_to_path(str(tmp / "cert.pem"), append=i > 0)
        for n in range(args.rounds):
            # rotate the order each round: no configuration always runs first
            order = CONFIGS[n % 3 :] + CONFIGS[: n % 3]
            for config in order:
                measured = (
                    cpu_only(config, tmp, secret, args)
                    if args.cpu_only
                    else bench(config, tmp, secret, args, n)
                )
                for r in measured:
                    row = (r["e2e_pps"], r.get("service_cpu_ns_per_packet", 0))
                    table.setdefault(r["mode"], {}).setdefault(config, []).append(row)
                    print(f"round {n + 1} {config:9} {r['mode']:8} e2e {row[0]:>10,} pkt/s  "
                          f"service CPU {row[1]:>6,} ns/pkt", flush=True)  # fmt: skip
    print()
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for mode, configs in table.items():
        for config, rows in configs.items():
            summary.setdefault(mode, {})[config] = {
                "e2e_pps_median": statistics.median(r[0] for r in rows),
                "cpu_ns_median": statistics.median(r[1] for r in rows),
            }
        base = summary[mode]["off"]
        for config in CONFIGS[1:]:
            s = summary[mode][config]
            print(f"{mode:8} {config:9} e2e x{s['e2e_pps_median'] / base['e2e_pps_median']:.3f}"
                  f"  CPU/pkt x{s['cpu_ns_median'] / base['cpu_ns_median']:.3f}")  # fmt: skip
    doc = {"rounds": table, "medians": summary, "args": vars(args), "cpus": os.cpu_count()}
    name = "auth_overhead_cpu.json" if args.cpu_only else "auth_overhead.json"
    (ROOT / "benchmarks" / name).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
