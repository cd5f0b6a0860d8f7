"""Device slots come back: a device silent past the retention frees its --max-devices slot."""

from __future__ import annotations

import time
from collections.abc import Callable

from helpers import ServiceProcess, get_json, packet, run, stream_packets


def test_expired_devices_free_their_slots(start_service: Callable[..., ServiceProcess]) -> None:
    svc = start_service("--max-devices", "20", "--retention", "2")
    ack = run(stream_packets(svc.target, [packet(f"junk-{i:02d}") for i in range(20)]))
    assert ack.accepted == 20
    refused = run(stream_packets(svc.target, [packet("newcomer")]))
    assert dict(refused.rejected_by_reason) == {"too_many_devices": 1}
    # Silent for more than the retention: gone from Redis, and their slots are free within
    # two retention periods (the validator's table rotates once per period).
    deadline = time.monotonic() + 15
    while True:
        ack = run(stream_packets(svc.target, [packet("newcomer")]))
        if ack.accepted == 1:
            break
        assert dict(ack.rejected_by_reason) == {"too_many_devices": 1}
        assert time.monotonic() < deadline, "an expired device still holds its slot"
        time.sleep(0.5)
    assert get_json(svc.http, "/metrics/newcomer")["packets"] == 1
    assert get_json(svc.http, "/stats")["ingest"]["devices_known"] <= 20
    # A device that keeps sending keeps its slot across rotations.
    for _ in range(6):
        assert run(stream_packets(svc.target, [packet("newcomer")])).accepted == 1
        time.sleep(0.5)
    assert get_json(svc.http, "/metrics/newcomer")["packets"] == 7
