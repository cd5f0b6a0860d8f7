"""The MQTT bridge against a real broker: Debian's mosquitto, started here on a free port
with a generated configuration; devices are `mosquitto_pub` and a paho client."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import pytest
from helpers import ServiceProcess, get_json
from helpers.security import make_pki
from helpers.tools import installed
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from rtmonitor.loadgen.broker import Mosquitto as BrokerProcess
from rtmonitor.loadgen.broker import mosquitto_binary
from rtmonitor.storage.embedded import EmbeddedRedis


class Mosquitto(BrokerProcess):
    """The launcher, plus `mosquitto_pub` as a device."""

    def pub(self, topic: str, *messages: str) -> None:
        """mosquitto_pub, QoS 1, one message per line (-l)."""
        subprocess.run(
            [binary("mosquitto_pub"), "-p", str(self.port), "-q", "1", "-t", topic, "-l"],
            input="\n".join(messages).encode() + b"\n",
            check=True,
            timeout=30,
        )


def binary(name: str) -> str:
    return installed(mosquitto_binary(name), name, "mosquitto mosquitto-clients")


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    binary("mosquitto")
    binary("mosquitto_pub")
    b = Mosquitto(tmp_path / "mosquitto").start()
    yield b
    b.stop()


@pytest.fixture
def start_bridge(
    start_service: Callable[..., ServiceProcess], broker: Mosquitto
) -> Callable[..., ServiceProcess]:
    def start(client_id: str = "rtm-test", *extra: str) -> ServiceProcess:
        return start_service("--mqtt-client-id", client_id, *extra, RTM_MQTT_URL=broker.url)

    return start


def paho_publish(port: int, messages: list[tuple[str, str]], pace: float = 0.0) -> None:
    """A paho device: QoS 1 over MQTT 5 with a session of its own, so that what the broker
    has not acknowledged is sent again after a reconnect; returns once all are."""
    client = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"dev-{time.monotonic_ns()}",
        protocol=MQTTProtocolVersion.MQTTv5,
    )  # fmt: skip
    client.reconnect_delay_set(1, 1)
    client.max_queued_messages_set(0)
    client.max_inflight_messages_set(100)
    client.connect(
        "127.0.0.1", port, clean_start=False,
        properties=_session_props(),
    )  # fmt: skip
    acked: set[int] = set()
    client.on_publish = lambda _c, _u, mid, _rc, _p: acked.add(mid)
    client.loop_start()
    try:
        # (a message published while the connection is down is sent after the reconnect,
        # but its MQTTMessageInfo keeps saying "not connected": watch the PUBACKs instead)
        mids = []
        for topic, payload in messages:
            mids.append(client.publish(topic, payload, qos=1).mid)
            if pace:
                time.sleep(pace)
        deadline = time.monotonic() + 60
        while not acked.issuperset(mids):
            assert time.monotonic() < deadline, f"{len(set(mids) - acked)} never acknowledged"
            time.sleep(0.02)
    finally:
        client.disconnect()
        client.loop_stop()


def _session_props() -> Any:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 300
    return props


def packets_of(svc: ServiceProcess, device: str) -> int:
    r = httpx.get(f"{svc.http}/metrics/{device}", timeout=5)
    return int(r.json()["packets"]) if r.status_code == 200 else 0


def wait_for(check: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def local_ingest(svc: ServiceProcess) -> dict[str, Any]:
    """This process's own ingest figures (they do not need Redis)."""
    doc = get_json(svc.http, "/stats")
    return dict(doc["instances"][doc["instance_id"]]["ingest"])


def test_messages_count_exactly_and_are_acknowledged(
    start_bridge: Callable[..., ServiceProcess], broker: Mosquitto
) -> None:
    svc = start_bridge()
    n = 300
    broker.pub(
        "rtm/cli-1/telemetry", *[json.dumps({"kind": "r", "values": {"t": i}}) for i in range(n)]
    )
    # paho: the flat form, a list of both forms, and a timestamp
    both = [{"v": 1}, {"kind": "k", "ts": 1_700_000_000_000, "values": {"v": 2}}]
    paho_publish(
        broker.port,
        [("rtm/paho-1/telemetry", json.dumps({"temperature": 21.5, "humidity": 40}))] * 50
        + [("rtm/paho-2/telemetry", json.dumps(both))] * 25,
    )
    wait_for(lambda: packets_of(svc, "paho-2") == 50, what="paho-2")
    wait_for(lambda: packets_of(svc, "cli-1") == n, what="cli-1")
    cli = get_json(svc.http, "/metrics/cli-1")
    assert cli["kinds"] == {"r": n} and cli["values"]["t"]["sum"] == sum(range(n))
    one = get_json(svc.http, "/metrics/paho-1")
    assert one["packets"] == 50 and one["kinds"] == {"mqtt": 50}
    assert one["values"]["temperature"]["last"] == 21.5
    two = get_json(svc.http, "/metrics/paho-2")
    assert two["kinds"] == {"mqtt": 25, "k": 25} and two["values"]["v"]["sum"] == 75
    # bytes: each message's size, shared by its packets
    size = len(json.dumps({"temperature": 21.5, "humidity": 40}))
    assert one["bytes"] == 50 * size
    ingest = local_ingest(svc)
    assert ingest["mqtt_messages"] == ingest["mqtt_messages_acked"] == n + 75
    assert ingest["mqtt_messages_unacked"] == 0 and ingest["mqtt_connected"] == 1
    assert httpx.get(f"{svc.http}/readyz").json()["ready"] is True


def test_bad_messages_are_counted_by_reason_and_acknowledged(
    start_bridge: Callable[..., ServiceProcess], broker: Mosquitto, tmp_path: Path
) -> None:
    svc = start_bridge("rtm-bad")
    broker.pub("rtm/bad-1/telemetry", "not json", '{"t": "warm"}', "[]", '[{"t": 1}, 5]')
    broker.pub("rtm/bad-1/telemetry", json.dumps({f"v{i}": i for i in range(65)}))
    broker.pub("rtm/bad id/telemetry", '{"t": 1}')
    broker.pub("rtm/bad-1/telemetry", json.dumps({"ts": -5, "values": {"t": 1}}))
    expected = {
        "mqtt_malformed_json": 1,
        "mqtt_invalid_packet": 3,  # a string value, an empty list, and the 5 in a list
        "too_many_values": 1,
        "invalid_device_id": 1,
        "bad_timestamp": 1,
    }

    def rejected() -> dict[str, int]:
        return dict(get_json(svc.http, "/stats")["ingest"]["rejected_by_reason"])

    wait_for(lambda: rejected() == expected, what=f"{expected}")
    assert packets_of(svc, "bad-1") == 1  # the good half of the list
    prom = httpx.get(f"{svc.http}/metrics", params={"format": "prometheus"}).text
    assert 'rtm_rejected_packets_total{reason="mqtt_malformed_json"} 1' in prom
    assert "rtm_mqtt_messages_acked_total 7" in prom, [
        line for line in prom.splitlines() if "rtm_mqtt" in line and "#" not in line
    ]
    # Acknowledged: a new process with the same session is not sent them again.
    svc.terminate()
    again = svc.restarted(tmp_path / "again.log").wait_ready()
    broker.pub("rtm/bad-1/telemetry", '{"t": 2}')
    wait_for(lambda: packets_of(again, "bad-1") == 2, what="the sentinel")
    assert local_ingest(again)["mqtt_messages"] == 1
    assert dict(get_json(again.http, "/stats")["ingest"]["rejected_by_reason"]) == expected
    again.kill()


def test_broker_restart_mid_stream_loses_nothing(
    start_bridge: Callable[..., ServiceProcess], broker: Mosquitto
) -> None:
    svc = start_bridge("rtm-restart")
    devices = [f"br-{i}" for i in range(10)]
    messages = [(f"rtm/{devices[i % 10]}/telemetry", json.dumps({"n": i})) for i in range(600)]
    publisher = threading.Thread(target=paho_publish, args=(broker.port, messages, 0.002))
    publisher.start()
    wait_for(lambda: packets_of(svc, "br-0") > 10, what="the first messages")
    broker.stop()  # saves its sessions and their queued messages
    time.sleep(0.5)
    broker.start()
    publisher.join(90)
    assert not publisher.is_alive()
    wait_for(lambda: all(packets_of(svc, d) >= 60 for d in devices), 30, "every message")
    wait_for(lambda: httpx.get(f"{svc.http}/readyz").status_code == 200, what="ready")
    counts = {d: packets_of(svc, d) for d in devices}
    # At-least-once: a device whose PUBACK the restart lost publishes again, and the broker
    # forwards that as a new message (counted again); none is missing.
    assert all(c >= 60 for c in counts.values()), counts
    assert sum(counts.values()) <= 600 + 2 * 5000, counts


def test_sigkill_with_unacknowledged_messages_loses_nothing(
    start_bridge: Callable[..., ServiceProcess],
    broker: Mosquitto,
    redis_server: EmbeddedRedis,
    tmp_path: Path,
) -> None:
    svc = start_bridge("rtm-kill")
    broker.pub("rtm/kill-1/telemetry", *['{"v": 1}'] * 40)
    wait_for(lambda: packets_of(svc, "kill-1") == 40, what="the first 40")
    redis_server.kill()  # commits cannot happen: PUBACKs wait
    broker.pub("rtm/kill-1/telemetry", *['{"v": 1}'] * 60)
    wait_for(lambda: local_ingest(svc)["mqtt_messages_unacked"] == 60, what="60 unacked")
    svc.kill()  # SIGKILL: the 60 were received, never committed, never acknowledged
    redis_server.start()
    again = svc.restarted(tmp_path / "again.log").wait_ready()
    wait_for(lambda: packets_of(again, "kill-1") == 100, what="all 100")
    time.sleep(0.5)
    assert packets_of(again, "kill-1") == 100
    again.kill()


def test_redelivery_after_a_lost_connection_is_counted_once(
    start_bridge: Callable[..., ServiceProcess], broker: Mosquitto, redis_server: EmbeddedRedis
) -> None:
    """Messages held unacknowledged when the connection drops come back (same packet ids,
    DUP): the bridge knows them and acknowledges them once committed, without counting
    them twice."""
    svc = start_bridge("rtm-redeliver")
    broker.pub("rtm/re-1/telemetry", *['{"v": 1}'] * 20)
    wait_for(lambda: packets_of(svc, "re-1") == 20, what="the first 20")
    redis_server.kill()  # commits wait: the next 30 stay unacknowledged
    broker.pub("rtm/re-1/telemetry", *['{"v": 1}'] * 30)
    wait_for(lambda: local_ingest(svc)["mqtt_messages_unacked"] == 30, what="30 unacked")
    broker.stop()  # the connection drops; the session and its 30 in flight are saved
    broker.start()
    wait_for(lambda: local_ingest(svc)["mqtt_messages_redelivered"] == 30, what="redelivery")
    redis_server.start()
    wait_for(lambda: packets_of(svc, "re-1") == 50, what="all 50")
    wait_for(lambda: local_ingest(svc)["mqtt_messages_unacked"] == 0, what="all acknowledged")
    time.sleep(0.3)
    assert packets_of(svc, "re-1") == 50


def test_two_replicas_share_a_subscription_exactly(
    start_service: Callable[..., ServiceProcess], broker: Mosquitto
) -> None:
    shared = "$share/rtm/rtm/+/telemetry"
    replicas = [
        start_service(
            "--mqtt-client-id", f"rtm-r{i}", "--mqtt-topic", shared, RTM_MQTT_URL=broker.url
        )
        for i in range(2)
    ]
    messages = [(f"rtm/sh-{i % 20}/telemetry", '{"v": 1}') for i in range(600)]
    paho_publish(broker.port, messages)

    def total() -> int:
        return int(
            get_json(replicas[0].http, "/metrics", prefix="sh-", limit=1)["totals"]["packets"]
        )

    wait_for(lambda: total() == 600, what="600 packets")
    time.sleep(0.3)
    assert total() == 600
    received = [local_ingest(r)["mqtt_messages"] for r in replicas]
    assert sum(received) == 600 and min(received) > 0, received


def test_refuses_a_topic_without_a_device_level(tmp_path: Path) -> None:
    svc = ServiceProcess(
        None, tmp_path / "svc.log", "--mqtt-topic", "rtm/telemetry",
        env={"RTM_MQTT_URL": "mqtt://user:s3cret@127.0.0.1:1"},
    )  # fmt: skip
    try:
        assert svc.proc.wait(30) != 0
    finally:
        svc.kill()
    log = svc.log()
    assert "--mqtt-topic" in log and "exactly one `+`" in log and "s3cret" not in log


def test_send_and_bench_drive_the_bridge(
    start_bridge: Callable[..., ServiceProcess], broker: Mosquitto, tmp_path: Path
) -> None:
    """`send --protocol mqtt` publishes what it says it did; `bench --modes mqtt` runs its
    own broker, verifies exactly and reports the broker's ceiling beside it."""
    svc = start_bridge("rtm-send")
    sent = subprocess.run(
        [sys.executable, "-m", "rtmonitor", "send", "--protocol", "mqtt", "--target", broker.url,
         "--count", "500", "--devices", "5", "--device-prefix", "snd-", "--json-output"],
        check=True, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    summary = json.loads(sent.stdout)
    assert summary["accepted"] == 500 and summary["errors"] == []
    for d in range(5):
        wait_for(lambda d=d: packets_of(svc, f"snd-{d:05d}") == 100, what=f"snd-{d}")
    out = tmp_path / "bench.json"
    subprocess.run(
        [sys.executable, "-m", "rtmonitor", "bench", "--modes", "mqtt", "--duration", "1",
         "--devices", "10", "--mqtt-batch", "3", "--output", str(out)],
        check=True, capture_output=True, timeout=120,
    )  # fmt: skip
    (r,) = json.loads(out.read_text())["results"]
    assert r["mode"] == "mqtt" and r["exact"] is True and r["errors"] == []
    assert r["acked"] > 0 and r["acked"] % 3 == 0 and r["committed"] == r["acked"]
    assert r["ceiling_pps"] > 0 and r["ratio_to_ceiling"] > 0


def test_tls_and_the_bridges_own_credentials(
    start_service: Callable[..., ServiceProcess], redis_server: EmbeddedRedis, tmp_path: Path
) -> None:
    """mqtts:// with --mqtt-tls-ca, and a broker that refuses anonymous clients: the bridge
    logs in with its own user (from the URL), never logging the password; a wrong password
    keeps it unready, saying why."""
    tls = make_pki(tmp_path / "pki")
    passwd = tmp_path / "passwd"
    subprocess.run(
        [binary("mosquitto_passwd"), "-b", "-c", str(passwd), "rtm-bridge", "br1dge-pw"],
        check=True,
    )
    subprocess.run([binary("mosquitto_passwd"), "-b", str(passwd), "dev-7", "dev-pw"], check=True)
    listener = (
        f"cafile {tls.ca}\ncertfile {tls.server_cert}\nkeyfile {tls.server_key}\n"
        f"password_file {passwd}\n"
    )
    broker = Mosquitto(tmp_path / "tls-broker", listener=listener, anonymous=False).start()
    try:
        url = f"mqtts://rtm-bridge:br1dge-pw@127.0.0.1:{broker.port}"
        svc = start_service(
            "--mqtt-client-id", "rtm-tls", "--mqtt-tls-ca", str(tls.ca), RTM_MQTT_URL=url
        )
        subprocess.run(
            [binary("mosquitto_pub"), "-h", "127.0.0.1", "-p", str(broker.port),
             "--cafile", str(tls.ca), "-u", "dev-7", "-P", "dev-pw", "-q", "1",
             "-t", "rtm/tls-1/telemetry", "-m", '{"t": 1}'],
            check=True, timeout=30,
        )  # fmt: skip
        wait_for(lambda: packets_of(svc, "tls-1") == 1, what="the TLS message")
        bad = ServiceProcess(
            redis_server.url, tmp_path / "bad.log", "--mqtt-client-id", "rtm-bad",
            "--mqtt-tls-ca", str(tls.ca),
            env={"RTM_MQTT_URL": url.replace("br1dge-pw", "wrong-pw")},
        )  # fmt: skip
        try:
            wait_for(lambda: "refused" in bad.log() or "reconnecting" in bad.log(), what="refusal")
            reasons = httpx.get(f"{bad.http}/readyz", timeout=5).json()["reasons"]
            assert any("MQTT bridge" in r for r in reasons), reasons
        finally:
            bad.kill()
        for log in (svc.log(), bad.log()):
            assert "br1dge-pw" not in log and "wrong-pw" not in log
    finally:
        broker.stop()
