"""The MQTT bridge: subscribes to a broker with QoS 1, turns each JSON message into packets
and acknowledges it (PUBACK) only once its packets are committed to Redis.

Delivery is at-least-once, as MQTT's QoS 1 is: a message is acknowledged after its commit,
so a crash, a Redis outage or a lost connection loses nothing (the broker keeps the
session, and with it the unacknowledged messages, for --mqtt-session-expiry seconds and
delivers them again). After a lost connection the broker delivers again, with their packet
ids and the DUP flag, the messages this process holds unacknowledged: it recognizes them
and acknowledges them once committed, counting them once. After a crash of this process
the messages it had committed but not acknowledged are counted again.

paho's network loop runs in its own thread. It hands messages over to the event loop in
arrival order; while the messages read but not yet parsed hold --max-inflight-message-bytes,
the network thread waits (it stops reading the socket: TCP pushes back on the broker), and
the broker never has more than --mqtt-max-inflight messages unacknowledged with us (MQTT 5
Receive Maximum). PUBACKs go out in arrival order.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from rtmonitor.config import Settings, mqtt_device_level, parse_mqtt_url
from rtmonitor.ingest.validation import Reason, Validator
from rtmonitor.logs import redact_url
from rtmonitor.model import Row
from rtmonitor.pipeline.aggregator import Aggregator
from rtmonitor.pipeline.queue import PacketQueue, QueueClosed
from rtmonitor.pipeline.work import CommitFailed, CommitTracker, RowsWork, Work

logger = logging.getLogger(__name__)

# The kind of a packet that names none (ThingsBoard's flat form never does).
DEFAULT_KIND = "mqtt"
# Messages parsed per turn of the event loop (one queue item, one commit wait for them all),
# bounded in count and bytes so that one turn stays short (~1 ms) for HTTP and gRPC.
_GROUP_MAX = 1000
_GROUP_MAX_BYTES = 64 * 1024
_TS_MAX = 2**63 - 1


class MqttReason(StrEnum):
    """Why a message, or a packet in it, was not counted (besides the validator's reasons).
    A refused message counts as one packet refused."""

    MALFORMED_JSON = "mqtt_malformed_json"
    INVALID_TOPIC = "mqtt_invalid_topic"
    INVALID_PACKET = "mqtt_invalid_packet"
    MESSAGE_TOO_LARGE = "mqtt_message_too_large"
    TOO_MANY_PACKETS = "mqtt_too_many_packets"


# --- decoding: pure functions of a message ------------------------------------------------


class TopicMatcher:
    """Finds the device id in a topic received on the subscription's filter."""

    def __init__(self, topic_filter: str) -> None:
        self.index = mqtt_device_level(topic_filter)
        levels = topic_filter.split("/")
        self.levels = levels[2:] if levels[0] == "$share" else levels

    def device_id(self, topic: str) -> str | None:
        """The `+` level of `topic`, or None if `topic` does not match the filter."""
        levels = topic.split("/")
        if len(levels) != len(self.levels):
            return None
        for i, (got, want) in enumerate(zip(levels, self.levels, strict=True)):
            if i != self.index and got != want:
                return None
        return levels[self.index]


def _number(value: Any) -> float | None:
    """A JSON number as a float (bools and strings are not numbers); None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:  # an integer beyond a double: not finite
        return float("inf")


@dataclass(frozen=True, slots=True)
class JsonPacket:
    """One packet of a message, as the validator reads it (validation.PacketFields)."""

    device_id: str
    kind: str
    timestamp_ms: int
    values: dict[str, float]
    payload: bytes = b""  # a packet's bytes are its share of the message (see _shares)


def to_packet(device_id: str, obj: Any, max_values: int) -> JsonPacket | str:
    """One JSON packet as the validator reads it, or why it is refused. Forms:
    {"kind": "...", "ts": <ms>, "values": {"name": number}} (kind and ts optional),
    or flat {"name": number, ...}."""
    if not isinstance(obj, dict):
        return MqttReason.INVALID_PACKET
    if isinstance(obj.get("values"), dict):
        kind, ts, values = obj.get("kind", DEFAULT_KIND), obj.get("ts", 0), obj["values"]
        if not isinstance(kind, str) or isinstance(ts, bool) or not isinstance(ts, int):
            return MqttReason.INVALID_PACKET
        if not 0 <= ts <= _TS_MAX:
            return Reason.BAD_TIMESTAMP
    else:
        kind, ts, values = DEFAULT_KIND, 0, obj
    if len(values) > max_values:
        return Reason.TOO_MANY_VALUES
    readings: dict[str, float] = {}
    for name, raw in values.items():
        number = _number(raw)
        if number is None:
            return MqttReason.INVALID_PACKET
        readings[name] = number
    return JsonPacket(device_id, kind, ts, readings)


def decode(payload: bytes | bytearray, max_packets: int) -> list[Any] | MqttReason:
    """A message's JSON packets (a list of one for a single object), or why the whole
    message is refused."""
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError):
        return MqttReason.MALFORMED_JSON
    if isinstance(doc, dict):
        return [doc]
    if not isinstance(doc, list) or not doc:
        return MqttReason.INVALID_PACKET
    if len(doc) > max_packets:
        return MqttReason.TOO_MANY_PACKETS
    return doc


def _shares(total: int, n: int) -> list[int]:
    """`total` bytes shared between n packets (the remainder to the first ones)."""
    each, rest = divmod(total, n)
    return [each + (1 if i < rest else 0) for i in range(n)]


# --- the bridge ---------------------------------------------------------------------------


class _ThreadBytes:
    """Bytes of messages read from the broker and not yet parsed. The network thread waits
    in acquire() while they are over the limit (one message always fits when none is held)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self.waits = 0
        self._cond = threading.Condition()
        self._closed = False

    def acquire(self, n: int) -> None:
        with self._cond:
            if self.used and self.used + n > self.limit:
                self.waits += 1
                self._cond.wait_for(
                    lambda: self._closed or not self.used or self.used + n <= self.limit
                )
            self.used += n

    def release(self, n: int) -> None:
        with self._cond:
            self.used -= n
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()


@dataclass(slots=True)
class _Message:
    """A message handed over by the network thread."""

    topic: bytes
    payload: bytes | bytearray
    mid: int
    qos: int
    dup: bool  # the broker delivers it again (after a reconnect)
    connection: int  # which connection it came on: a PUBACK goes back on that one only


@dataclass(slots=True)
class _Unacked:
    """A QoS 1 message received and not acknowledged yet."""

    mid: int
    key: int  # hash of its topic and payload: knows it again when the broker redelivers it
    connection: int  # the connection its PUBACK must go on (a redelivery moves it)
    committed: bool = False  # committed while its connection was gone: waits for the DUP


@dataclass(slots=True)
class _Group:
    """Messages parsed together: acknowledged together once their packets are committed."""

    tracker: CommitTracker
    acks: list[_Unacked]


class MqttBridge:
    """Subscribes to --mqtt-topic on --mqtt-url and feeds the pipeline (see the module's
    docstring). start() once the pipeline runs; stop_reading() then close() on shutdown."""

    def __init__(
        self,
        settings: Settings,
        validator: Validator,
        queue: PacketQueue[Work],
        aggregator: Aggregator,
    ) -> None:
        assert settings.mqtt_url is not None
        self.settings = settings
        self.broker = parse_mqtt_url(settings.mqtt_url)
        self.where = redact_url(settings.mqtt_url)
        self.client_id = settings.mqtt_client_id or f"rtmonitor-{socket.gethostname()}"
        self.validator = validator
        self.queue = queue
        self.aggregator = aggregator
        self.topics = TopicMatcher(settings.mqtt_topic)
        self.bytes = _ThreadBytes(settings.max_inflight_message_bytes)
        self.state = "connecting"
        self.error: str | None = None
        self.connects = 0
        self.messages = 0
        self.acked = 0  # acknowledged (or QoS 0: nothing to acknowledge)
        self.redelivered = 0  # delivered again after a reconnect, recognized: counted once
        # By packet id: at most 65,535 (ids are reused only once acknowledged).
        self._unacked: dict[int, _Unacked] = {}
        self._connection = 0  # written by the network thread only
        self._inbox: deque[_Message] = deque()
        self._wake = asyncio.Event()
        self._scheduled = False  # a wake-up is on its way to the event loop
        self._acks: asyncio.Queue[_Group | None] = asyncio.Queue()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.client = self._make_client()

    # --- the paho client (its callbacks run on the network thread) -----------------------

    def _make_client(self) -> paho.Client:
        s, broker = self.settings, self.broker
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=MQTTProtocolVersion.MQTTv5,
            manual_ack=True,
        )
        username = s.mqtt_username or broker.username
        password = s.mqtt_password.get_secret_value() if s.mqtt_password else broker.password
        if username is not None:
            client.username_pw_set(username, password)
        if broker.tls:
            client.tls_set(
                ca_certs=str(s.mqtt_tls_ca) if s.mqtt_tls_ca else None,
                certfile=str(s.mqtt_tls_cert) if s.mqtt_tls_cert else None,
                keyfile=str(s.mqtt_tls_key) if s.mqtt_tls_key else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        client.reconnect_delay_set(1, s.mqtt_reconnect_max)
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        return client

    def _connect_properties(self) -> Properties:
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.settings.mqtt_session_expiry
        props.ReceiveMaximum = self.settings.mqtt_max_inflight
        props.MaximumPacketSize = self.settings.mqtt_max_message_bytes
        return props

    def _on_connect(
        self, client: paho.Client, _: Any, flags: Any, reason: ReasonCode, __: Any
    ) -> None:
        if reason.is_failure:
            self._set_state("reconnecting", f"the broker refused the connection: {reason}")
            return
        self._connection += 1
        self.connects += 1
        self._set_state("subscribing", None)
        client.subscribe(self.settings.mqtt_topic, options=SubscribeOptions(qos=1))

    def _on_subscribe(
        self, _: paho.Client, __: Any, ___: int, reasons: list[ReasonCode], ____: Any
    ) -> None:
        if any(r.is_failure for r in reasons):
            self._set_state(
                "subscription refused",
                f"the broker refused the subscription to {self.settings.mqtt_topic!r}: "
                f"{reasons[0]} (check its ACL for this client's user)",
            )
        else:
            self._set_state("connected", None)

    def _on_connect_fail(self, _: paho.Client, __: Any) -> None:
        self._set_state("reconnecting", "cannot connect")

    def _on_disconnect(
        self, _: paho.Client, __: Any, ___: Any, reason: ReasonCode, ____: Any
    ) -> None:
        if not self._stopping:
            self._set_state("reconnecting", f"disconnected: {reason}")

    def _set_state(self, state: str, error: str | None) -> None:
        if state != self.state or error != self.error:
            log = logger.info if error is None else logger.warning
            log("MQTT bridge to %s: %s%s", self.where, state, f" ({error})" if error else "")
        self.state, self.error = state, error

    def _on_message(self, _: paho.Client, __: Any, msg: paho.MQTTMessage) -> None:
        if self._stopping or self._loop is None:
            return  # not acknowledged: the broker delivers it again (to the next session)
        payload = msg.payload
        self.bytes.acquire(len(payload))  # backpressure: this thread stops reading
        self._inbox.append(
            _Message(msg._topic, payload, msg.mid, msg.qos, msg.dup, self._connection)
        )
        # One wake-up of the event loop per batch of messages, not per message (each is a
        # write to the loop's self-pipe): the loop clears the flag before it drains.
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon_threadsafe(self._wake.set)

    # --- the event loop's side -------------------------------------------------------------

    async def start(self) -> None:
        """Connect (in the background: a broker that is away is retried with capped
        backoff, and /readyz says so) and start handing messages to the pipeline."""
        self._loop = asyncio.get_running_loop()
        b = self.broker
        self.client.connect_async(
            b.host, b.port, keepalive=30, clean_start=False, properties=self._connect_properties()
        )
        self.client.loop_start()
        self._tasks = [
            asyncio.create_task(self._consume(), name="mqtt-consume"),
            asyncio.create_task(self._acknowledge(), name="mqtt-ack"),
        ]

    def not_ready(self) -> list[str]:
        """Why the bridge does not deliver messages now (empty: it does)."""
        if self.state == "connected":
            return []
        error = f": {self.error}" if self.error else ""
        return [f"MQTT bridge to {self.where} is {self.state}{error}"]

    def stop_reading(self) -> None:
        """Shutdown step 2: take no more messages; what was queued is still acknowledged
        after its commit. Messages not taken stay unacknowledged (delivered again)."""
        self._stopping = True
        self.bytes.close()
        if self._tasks:
            self._tasks[0].cancel()
        self._acks.put_nowait(None)

    async def close(self, timeout: float) -> None:
        """After the final flush: send the last PUBACKs, then disconnect (the session, with
        any unacknowledged message, stays on the broker)."""
        self.stop_reading()
        if len(self._tasks) > 1:
            try:
                await asyncio.wait_for(asyncio.shield(self._tasks[1]), timeout)
            except TimeoutError:
                logger.warning("MQTT: the last acknowledgements did not go out in time")
        for task in self._tasks:
            task.cancel()
        self.state = "stopped"
        self.client.disconnect()
        await asyncio.to_thread(self.client.loop_stop)

    async def _consume(self) -> None:
        """Parse what the network thread handed over, queue it, and pass the acks on."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            self._scheduled = False
            while self._inbox:
                group = self._take()
                try:
                    await self._process(group)
                except QueueClosed:
                    return
                except Exception:  # never die silently: these stay unacknowledged
                    logger.exception("MQTT: processing %d messages failed", len(group))
                await asyncio.sleep(0)  # a turn for everyone else between groups

    def _take(self) -> list[_Message]:
        """The next messages to parse together (at least one)."""
        inbox = self._inbox
        group = [inbox.popleft()]
        size = len(group[0].payload)
        while inbox and len(group) < _GROUP_MAX and size < _GROUP_MAX_BYTES:
            group.append(inbox.popleft())
            size += len(group[-1].payload)
        return group

    async def _process(self, group: list[_Message]) -> None:
        recv_ms = time.time_ns() // 1_000_000
        rows: list[Row] = []
        acks: list[_Unacked] = []
        for msg in group:
            self.messages += 1
            try:
                if (ack := self._admit(msg)) is not None:
                    acks.append(ack)
                    self._parse(msg, recv_ms, rows)
            finally:
                self.bytes.release(len(msg.payload))
        tracker = CommitTracker()
        if rows and not self.settings.noop:
            await self.queue.put(RowsWork(rows=rows, recv_ms=recv_ms, tracker=tracker), len(rows))
            tracker.submitted()
        tracker.close()
        self._acks.put_nowait(_Group(tracker, acks))

    def _admit(self, msg: _Message) -> _Unacked | None:
        """The message's acknowledgement to send once committed, or None if it is one this
        process already holds, delivered again after a reconnect (its first copy's
        acknowledgement now goes on the new connection; at once if it is committed)."""
        if not msg.qos:
            self.acked += 1  # nothing to acknowledge, and never delivered again: no key
            return _Unacked(msg.mid, 0, msg.connection)
        key = hash((msg.topic, bytes(msg.payload)))
        held = self._unacked.get(msg.mid) if msg.dup else None
        if held is not None and held.key == key and held.connection != msg.connection:
            self.redelivered += 1
            held.connection = msg.connection
            if held.committed:
                self._send_ack(held, msg.qos)
            return None
        ack = self._unacked[msg.mid] = _Unacked(msg.mid, key, msg.connection)
        return ack

    def _parse(self, msg: _Message, recv_ms: int, rows: list[Row]) -> None:
        """Append the message's valid packets to `rows`; count the others by reason."""
        s = self.settings
        try:
            device_id = self.topics.device_id(msg.topic.decode())
        except UnicodeDecodeError:
            device_id = None
        if device_id is None:
            return self._refuse(MqttReason.INVALID_TOPIC)
        if (reason := self.validator.device_reason(device_id)) is not None:
            return self._refuse(reason)
        if len(msg.payload) > s.mqtt_max_message_bytes:
            return self._refuse(MqttReason.MESSAGE_TOO_LARGE)
        items = decode(msg.payload, s.max_batch_packets)
        if isinstance(items, MqttReason):
            return self._refuse(items)
        check = self.validator.check
        # (the validator's lock once per message, for its packets' checks: a fleet's batch
        # may be growing the validator's table in the decode thread)
        with self.validator.lock:
            for obj, nbytes in zip(items, _shares(len(msg.payload), len(items)), strict=True):
                packet = to_packet(device_id, obj, s.max_values_per_packet)
                if isinstance(packet, str):
                    self._refuse(packet)
                elif nbytes > s.max_payload_bytes:
                    self._refuse(Reason.PAYLOAD_TOO_LARGE)
                elif isinstance(row := check(packet, recv_ms), tuple):
                    rows.append((row[0], row[1], nbytes, row[3], row[4]))
                else:
                    self._refuse(row)
        return None

    def _refuse(self, reason: str) -> None:
        self.aggregator.count_rejected(str(reason))

    async def _acknowledge(self) -> None:
        """PUBACK each group once committed, in arrival order, on the connection it came on
        (after a reconnect the broker delivers the unacknowledged ones again, and a packet
        id may by then name another message)."""
        while (group := await self._acks.get()) is not None:
            try:
                await group.tracker.wait()
            except CommitFailed:
                continue  # not acknowledged: delivered again
            for ack in group.acks:
                if self._unacked.get(ack.mid) is not ack:
                    continue  # QoS 0, or the id was reused since (the broker lost the session)
                if ack.connection == self._connection:
                    self._send_ack(ack, 1)
                else:
                    ack.committed = True  # its redelivery is acknowledged when it comes

    def _send_ack(self, ack: _Unacked, qos: int) -> None:
        del self._unacked[ack.mid]
        self.client.ack(ack.mid, qos)
        self.acked += 1

    @property
    def unacked(self) -> int:
        """Received and not acknowledged (some maybe already committed)."""
        return len(self._unacked) + len(self._inbox)

    def stats(self) -> Mapping[str, int]:
        return {
            "mqtt_connected": int(self.state == "connected"),
            "mqtt_connects": self.connects,
            "mqtt_messages": self.messages,
            "mqtt_messages_acked": self.acked,
            "mqtt_messages_unacked": self.unacked,
            "mqtt_messages_redelivered": self.redelivered,
        }
