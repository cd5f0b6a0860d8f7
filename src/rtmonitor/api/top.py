"""`rtmonitor top`: the dashboard for a terminal (busiest devices, total rate), for people
on a server with no browser. A client of the HTTP API, like the browser dashboard."""

from __future__ import annotations

import time
from typing import Any

import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from rtmonitor.clients import ClientSecurity
from rtmonitor.config import TopSettings
from rtmonitor.model import RATE_WINDOWS_S, rate_key

# The header shows the rates of the shortest window; the table a column per window.
_SHORT = min(RATE_WINDOWS_S)


def _bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def _ago(ms: int | None) -> str:
    if not ms:
        return "-"
    s = max(0.0, time.time() - ms / 1000)
    return f"{s:.0f}s" if s < 120 else f"{s / 60:.0f}m"


def frame(page: dict[str, Any], opts: TopSettings) -> Group:
    """One screen: the totals line and the busiest devices."""
    t = page["totals"]
    header = Text.assemble(
        ("rtmonitor top ", "bold"),
        f"{opts.url}  ",
        ("devices ", "dim"), f"{t['devices']:,}  ",
        ("packets ", "dim"), f"{t['packets']:,}  ",
        ("rate ", "dim"), (f"{t['rate'][rate_key('packets', _SHORT)]:,.1f} pkt/s", "bold cyan"),
        "  ", ("bytes/s ", "dim"), f"{_bytes(t['rate'][rate_key('bytes', _SHORT)])}  ",
        ("rejected ", "dim"), f"{t['rejected']:,}",
    )  # fmt: skip
    table = Table(expand=True, title_justify="left")
    table.add_column("device")
    table.add_column("status")
    for window in RATE_WINDOWS_S:
        table.add_column(f"pkt/s {window}s", justify="right")
    for name in ("packets", "bytes", "last seen"):
        table.add_column(name, justify="right")
    for d in page["devices"]:
        table.add_row(
            d["device_id"],
            Text("online", "green") if d["online"] else Text("offline", "red"),
            *(f"{d['rate'][rate_key('packets', w)]:,.1f}" for w in RATE_WINDOWS_S),
            f"{d['packets']:,}",
            _bytes(d["bytes"]),
            _ago(d["last_seen"]),
        )
    return Group(header, table)


def fetch(client: httpx.Client, opts: TopSettings) -> dict[str, Any]:
    params: dict[str, Any] = {"sort": "rate", "order": "desc", "limit": opts.limit}
    if opts.prefix:
        params["prefix"] = opts.prefix
    r = client.get("/metrics", params=params, headers={"Accept": "application/json"})
    r.raise_for_status()
    page: dict[str, Any] = r.json()
    return page


def run_top(opts: TopSettings) -> int:
    console = Console()
    with ClientSecurity.of(opts).http_client(base_url=opts.url, timeout=5) as client:
        try:
            page = fetch(client, opts)
        except httpx.HTTPStatusError as exc:
            hint = " (give a read token: --token or RTM_TOKEN)" if exc.response.status_code in (
                401, 403) else ""  # fmt: skip
            console.print(f"[red]cannot read {opts.url}/metrics: {exc}[/red]{hint}")
            return 1
        except httpx.HTTPError as exc:
            console.print(
                f"[red]cannot read {opts.url}/metrics: {exc}[/red] (is the service running?)"
            )
            return 1
        if opts.once:
            console.print(frame(page, opts))
            return 0
        with Live(frame(page, opts), console=console, screen=True, auto_refresh=False) as live:
            try:
                while True:
                    time.sleep(opts.interval)
                    try:
                        live.update(frame(fetch(client, opts), opts), refresh=True)
                    except httpx.HTTPError as exc:
                        live.update(Text(f"cannot read {opts.url}: {exc}; retrying", "red"),
                                    refresh=True)  # fmt: skip
            except KeyboardInterrupt:
                return 0
