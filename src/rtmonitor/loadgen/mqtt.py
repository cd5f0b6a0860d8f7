"""`rtmonitor send --protocol mqtt`: devices publishing JSON to a broker with QoS 1.

Each stream is one paho client (its network loop in its own thread) publishing to
rtm/<device>/telemetry (--mqtt-topic), at most --inflight messages unacknowledged by the
broker. What it reports as acknowledged is what the *broker* acknowledged: the service
acknowledges to the broker, after its commit, not to the device (`bench` waits until Redis
shows it all).
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from rich.progress import Progress

from rtmonitor.config import SendSettings, parse_mqtt_url
from rtmonitor.loadgen.sender import KINDS, SendReport, StreamResult, device_name

_CONNECT_TIMEOUT_S = 10.0


def _payloads(opts: SendSettings) -> list[bytes]:
    """One message per device and kind: `batch_size` packets (a JSON list when more than
    one), in the service's structured form."""
    out = []
    for k, kind in enumerate(KINDS):
        packet: dict[str, object] = {"kind": kind}
        packet["values"] = {"temperature": 20.5 + k, "humidity": 40.0} if kind == "reading" else {}
        doc: object = packet if opts.batch_size == 1 else [packet] * opts.batch_size
        out.append(json.dumps(doc, separators=(",", ":")).encode())
    return out


class _Fleet:
    """What every stream publishes: each device's name and topic, each kind's message.
    Built once, before the load's time starts (a million devices' topics take seconds)."""

    def __init__(self, opts: SendSettings) -> None:
        self.payloads = _payloads(opts)
        self.names = [device_name(opts.device_prefix, d, opts.devices) for d in range(opts.devices)]
        self.topics = [opts.mqtt_topic.replace("{device}", n) for n in self.names]


class _Publisher:
    """One stream: a paho client publishing its share, --inflight unacknowledged at most."""

    def __init__(self, opts: SendSettings, index: int, result: StreamResult, fleet: _Fleet) -> None:
        self.opts, self.index, self.result, self.fleet = opts, index, result, fleet
        self.window = threading.Semaphore(opts.inflight)
        self.connected = threading.Event()
        # Published, per device: all of it once every PUBACK is in (else the run failed).
        self.per_device: Counter[str] = Counter()
        client = self.client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=f"rtm-send-{index}-{time.monotonic_ns()}",
            protocol=MQTTProtocolVersion.MQTTv5,
        )
        client.max_inflight_messages_set(opts.inflight)
        client.on_connect = lambda *_: self.connected.set()
        client.on_publish = self._on_publish

    def _on_publish(self, *_: object) -> None:
        self.result.accepted += self.opts.batch_size
        self.window.release()

    def run(
        self, share: int | None, end: float | None, rate: float | None, counter: list[int]
    ) -> None:
        opts, result = self.opts, self.result
        broker = parse_mqtt_url(opts.target if "://" in opts.target else f"mqtt://{opts.target}")
        if broker.username is not None:
            self.client.username_pw_set(broker.username, broker.password)
        if broker.tls:
            self.client.tls_set()
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        try:
            if not self.connected.wait(_CONNECT_TIMEOUT_S):
                result.error = f"no connection to {broker.host}:{broker.port}"
                return
            self._publish_all(share, end, rate, counter)
            deadline = time.monotonic() + 60
            while result.accepted < result.sent and time.monotonic() < deadline:
                time.sleep(0.01)
            if result.accepted < result.sent:
                result.error = f"{result.sent - result.accepted} never acknowledged by the broker"
        finally:
            self.client.disconnect()
            self.client.loop_stop()

    def _publish_all(
        self, share: int | None, end: float | None, rate: float | None, counter: list[int]
    ) -> None:
        opts, result = self.opts, self.result
        payloads, names, topics = self.fleet.payloads, self.fleet.names, self.fleet.topics
        started = time.monotonic()
        m = result.offset
        while share is None or result.sent < share:
            if end is not None and time.monotonic() >= end:
                break
            self.window.acquire()
            d = m % opts.devices
            self.client.publish(topics[d], payloads[(m // opts.devices) % len(KINDS)], qos=1)
            self.per_device[names[d]] += opts.batch_size
            m += 1
            result.sent += opts.batch_size
            counter[0] += opts.batch_size
            if rate is not None:
                delay = started + result.sent / rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)


async def send_mqtt(opts: SendSettings, progress: Progress | None = None) -> SendReport:
    """Publish as `opts` says; report what the broker acknowledged, per device."""
    streams = opts.streams
    total = opts.total
    shares: list[int | None] = (
        [total // streams + (1 if s < total % streams else 0) for s in range(streams)]
        if total is not None
        else [None] * streams
    )
    results = [StreamResult(offset=s * max(1, opts.devices // streams)) for s in range(streams)]
    fleet = _Fleet(opts)
    publishers = [_Publisher(opts, s, results[s], fleet) for s in range(streams)]
    end = time.monotonic() + opts.duration if opts.duration else None
    rate = opts.rate / streams if opts.rate else None
    counter = [0]
    task_id = progress.add_task(f"MQTT -> {opts.target}", total=total) if progress else None
    started, started_at = time.monotonic(), time.time()
    tasks = [
        asyncio.create_task(asyncio.to_thread(p.run, shares[s], end, rate, counter))
        for s, p in enumerate(publishers)
    ]
    while not all(t.done() for t in tasks):
        await asyncio.wait(tasks, timeout=0.2)
        if progress is not None and task_id is not None:
            progress.update(task_id, completed=counter[0])
    for t in tasks:
        t.result()
    per_device: Counter[str] = Counter()
    for p in publishers:
        per_device.update(p.per_device)
    return SendReport(
        mode="MQTT (QoS 1)",
        streams=results,
        elapsed=time.monotonic() - started,
        devices=opts.devices,
        payload_size=0,
        names=[],
        per_device=dict(per_device),
        started_at=started_at,
    )
