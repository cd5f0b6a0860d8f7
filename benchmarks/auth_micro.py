"""What authentication adds on the hot paths, measured in-process (the least noisy way on a
shared machine): the same messages decoded with and without a token's device prefix, the
per-packet step with and without it, one token check, and the floor of what TLS adds (the
AES-GCM decryption of a message's bytes; gRPC's own TLS framing comes on top).

    .venv/bin/python benchmarks/auth_micro.py

Each figure is the best of 7 repeats (timeit), the two variants alternated repeat by repeat.
"""

from __future__ import annotations

import os
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from rtmonitor.auth import ANONYMOUS, Principal, TokenRegistry, new_token
from rtmonitor.config import SendSettings
from rtmonitor.ingest.columnar import decode_columns, decode_rows, parse_batch
from rtmonitor.ingest.servicer import IngestServicer
from rtmonitor.ingest.v1.telemetry_pb2 import Packet
from rtmonitor.ingest.validation import Limits, Validator
from rtmonitor.loadgen.sender import PacketPool


def best(fn: Callable[[], Any], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=1)) / number


def pair(a: Callable[[], Any], b: Callable[[], Any], number: int) -> tuple[float, float]:
    """Best of 7 of each, alternated."""
    ta, tb = [], []
    for _ in range(7):
        ta.append(best(a, number))
        tb.append(best(b, number))
    return min(ta), min(tb)


RECV = 1_700_000_000_000


def main() -> None:
    pool = PacketPool(SendSettings.model_validate({"devices": 100, "batch_size": 10_000}))
    validator = Validator(Limits())
    rows, cols = batches(pool, validator)
    packets(pool, validator)
    token_checks()
    tls_floor(rows, cols)


def batches(pool: PacketPool, validator: Validator) -> tuple[bytes, bytes]:
    recv = RECV
    rows = pool.batch_body(0, 1000)
    cols = pool.columns_body(0, 10_000)
    prefix = "dev-"  # the pool's devices: every packet is checked and permitted

    def rows_with(p: str | None) -> Callable[[], Any]:
        return lambda: decode_rows(parse_batch(rows, 10_000).rows, validator, recv, p)

    def cols_with(p: str | None) -> Callable[[], Any]:
        def run() -> Any:
            batch = parse_batch(cols, 10_000)
            assert batch.columns is not None
            return decode_columns(batch.columns, validator, recv, p)

        return run

    rows_with(prefix)()  # admit the devices first
    print("per packet, ns (best of 7)        no prefix   prefix   difference")
    for label, (a, b), n in (
        ("rows, 1,000-packet batches", pair(rows_with(None), rows_with(prefix), 50), 1000),
        ("columns, 10,000-packet batches", pair(cols_with(None), cols_with(prefix), 20), 10_000),
    ):
        print(f"{label:34} {a * 1e9 / n:8.1f} {b * 1e9 / n:8.1f} {(b - a) * 1e9 / n:+8.1f}")
    return rows, cols


def packets(pool: PacketPool, validator: Validator) -> None:
    recv = RECV
    # StreamPackets: the step before (parse, validate) and now (the closure, prefix check)
    servicer = object.__new__(IngestServicer)
    servicer.validator = validator
    raw = pool.packets[:1000]
    check = validator.check
    parse = Packet.FromString

    def before() -> None:
        for r in raw:
            check(parse(r), recv)

    def now(principal: Principal) -> Callable[[], None]:
        step = servicer._packet_check(principal, None)  # type: ignore[arg-type]

        def run() -> None:
            for r in raw:
                step(r, recv)

        return run

    a, b = pair(before, now(ANONYMOUS), 200)
    print(
        f"{'StreamPackets step (no auth)':34} {a * 1e6:8.1f} {b * 1e6:8.1f} {(b - a) * 1e6:+8.1f}"
    )
    fleet = Principal("fleet", frozenset({"ingest"}), "dev-")
    a, b = pair(before, now(fleet), 200)
    print(f"{'StreamPackets step (prefix)':34} {a * 1e6:8.1f} {b * 1e6:8.1f} {(b - a) * 1e6:+8.1f}")


def check_once(registry: TokenRegistry, secret: str) -> Callable[[], Principal]:
    return lambda: registry.authenticate(f"Bearer {secret}")


def token_checks() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for count in (1, 100):
            blocks, secret = [], ""
            for i in range(count):
                secret, block = new_token(f"t{i}", ["ingest"])
                blocks.append(block)
            path = Path(tmp) / f"t{count}.toml"
            path.write_text("\n".join(blocks))
            registry = TokenRegistry(path)
            t = best(check_once(registry, secret), 2000)
            print(
                f"one token check, {count:3} tokens in the file: {t * 1e6:.1f} µs (once per stream)"
            )


def tls_floor(rows: bytes, cols: bytes) -> None:
    """AES-128-GCM decryption of the message bytes, in 16 KB records."""
    key = AESGCM(AESGCM.generate_key(bit_length=128))
    nonce = os.urandom(12)
    record = key.encrypt(nonce, os.urandom(16_384), None)
    per_byte = best(lambda: key.decrypt(nonce, record, None), 2000) / 16_384
    for label, size, n in (("rows", len(rows), 1000), ("columns", len(cols), 10_000)):
        print(
            f"TLS floor, {label}: {size / n:.1f} bytes/packet x {per_byte * 1e9:.2f} ns/byte "
            f"= {size / n * per_byte * 1e9:.1f} ns/packet"
        )


if __name__ == "__main__":
    main()
