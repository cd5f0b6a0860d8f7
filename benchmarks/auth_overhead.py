"""What authentication and TLS cost: `rtmonitor bench` with auth off, with an auth file and
a token, and with auth + TLS, alternated round by round in one run (the machine is shared:
only figures measured side by side compare).

    .venv/bin/python benchmarks/auth_overhead.py --rounds 3 --duration 5

Makes a throwaway token file and CA/server certificate (trustme, a dev dependency) in a
temporary directory; prints the e2e rates and the service's CPU per packet by mode and
configuration, with the medians of the rounds, and writes them to
benchmarks/auth_overhead.json.
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--modes", default="packets,rows,columns")
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
                for r in bench(config, tmp, secret, args, n):
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
    (ROOT / "benchmarks" / "auth_overhead.json").write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
