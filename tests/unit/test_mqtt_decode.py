"""The MQTT bridge's pure parts: its settings, topics and payload forms."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from rtmonitor.config import Settings, mqtt_device_level, parse_mqtt_url
from rtmonitor.ingest.mqtt import MqttReason, TopicMatcher, decode, to_packet
from rtmonitor.ingest.validation import Limits, Reason, Validator


def test_url_forms_and_credentials() -> None:
    b = parse_mqtt_url("mqtt://broker")
    assert (b.host, b.port, b.tls, b.username, b.password) == ("broker", 1883, False, None, None)
    b = parse_mqtt_url("mqtts://rtm:p%40ss@broker.example:9000")
    assert (b.host, b.port, b.tls, b.username, b.password) == (
        "broker.example", 9000, True, "rtm", "p@ss",
    )  # fmt: skip
    assert parse_mqtt_url("mqtts://h").port == 8883
    for bad in ("tcp://h", "mqtt://", "mqtt://h:99999", "mqtt://h/path"):
        with pytest.raises(ValueError):
            parse_mqtt_url(bad)


@pytest.mark.parametrize(
    ("topic", "level"),
    [("rtm/+/telemetry", 1), ("+", 0), ("a/b/+", 2), ("$share/g/rtm/+/telemetry", 1)],
)
def test_topic_filters_with_one_device_level(topic: str, level: int) -> None:
    assert mqtt_device_level(topic) == level


@pytest.mark.parametrize(
    "topic", ["rtm/telemetry", "rtm/+/+", "rtm/#", "rtm/a+/x", "$share/g", "$share//rtm/+"]
)
def test_topic_filters_refused(topic: str) -> None:
    with pytest.raises(ValueError):
        mqtt_device_level(topic)


def test_settings_refuse_nonsense_and_never_echo_the_password() -> None:
    with pytest.raises(ValidationError) as err:
        Settings(mqtt_url="http://u:hunter2@h")
    message = err.value.errors()[0]["msg"]  # what the CLI prints (not the input)
    assert "--mqtt-url" in message and "hunter2" not in message
    with pytest.raises(ValidationError, match="exactly one"):
        Settings(mqtt_url="mqtt://h", mqtt_topic="rtm/x")
    with pytest.raises(ValidationError, match="shared subscription"):
        Settings(mqtt_url="mqtt://h", workers=2)
    with pytest.raises(ValidationError, match="mqtts"):
        Settings(mqtt_url="mqtt://h", mqtt_tls_ca="ca.pem")
    Settings(mqtt_url="mqtt://h", workers=2, mqtt_topic="$share/rtm/rtm/+/telemetry")


def test_topic_matcher() -> None:
    m = TopicMatcher("$share/g/rtm/+/telemetry")
    assert m.device_id("rtm/dev-1/telemetry") == "dev-1"
    assert m.device_id("rtm//telemetry") == ""
    assert m.device_id("rtm/dev-1/other") is None
    assert m.device_id("rtm/dev-1/telemetry/x") is None


def test_payload_forms() -> None:
    p = to_packet("d", {"kind": "env", "ts": 5, "values": {"t": 1, "h": 2.5}}, 64)
    assert not isinstance(p, str)
    assert (p.kind, p.timestamp_ms, dict(p.values)) == ("env", 5, {"t": 1.0, "h": 2.5})
    p = to_packet("d", {"t": 1}, 64)
    assert not isinstance(p, str) and p.kind == "mqtt" and p.timestamp_ms == 0
    assert decode(b'{"a": 1}', 10) == [{"a": 1}]
    assert decode(json.dumps([{"a": 1}] * 3).encode(), 10) == [{"a": 1}] * 3


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"{", MqttReason.MALFORMED_JSON),
        (b"\xff", MqttReason.MALFORMED_JSON),
        (b"[" * 100_000, MqttReason.MALFORMED_JSON),
        (b"[]", MqttReason.INVALID_PACKET),
        (b"5", MqttReason.INVALID_PACKET),
        (json.dumps([{}] * 11).encode(), MqttReason.TOO_MANY_PACKETS),
    ],
)
def test_messages_refused_whole(payload: bytes, reason: MqttReason) -> None:
    assert decode(payload, 10) == reason


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        (5, MqttReason.INVALID_PACKET),
        ({"t": "warm"}, MqttReason.INVALID_PACKET),
        ({"t": True}, MqttReason.INVALID_PACKET),
        ({"t": None}, MqttReason.INVALID_PACKET),
        ({"kind": 5, "values": {}}, MqttReason.INVALID_PACKET),
        ({"ts": 1.5, "values": {}}, MqttReason.INVALID_PACKET),
        ({"ts": -1, "values": {}}, Reason.BAD_TIMESTAMP),
        ({"ts": 2**64, "values": {}}, Reason.BAD_TIMESTAMP),
        ({f"v{i}": i for i in range(3)}, Reason.TOO_MANY_VALUES),
    ],
)
def test_packets_refused(obj: object, reason: str) -> None:
    assert to_packet("d", obj, 2) == reason


@pytest.mark.parametrize(
    ("obj", "reason"),
    [
        # JSON allows lone surrogates: the validator's alphabet refuses them
        ({"kind": "\ud800", "values": {}}, Reason.INVALID_KIND),
        ({"\ud800": 1}, Reason.INVALID_VALUE_NAME),
        ({"t": float("nan")}, Reason.NON_FINITE_VALUE),
        ({"kind": "", "values": {"t": 1}}, None),
    ],
)
def test_the_validator_checks_json_packets_like_protobuf_ones(
    obj: object, reason: Reason | None
) -> None:
    packet = to_packet("d", obj, 64)
    assert not isinstance(packet, str)
    result = Validator(Limits()).check(packet, 1000)
    assert result == reason if reason is not None else isinstance(result, tuple)


def test_numbers_beyond_a_double_are_not_finite() -> None:
    p = to_packet("d", json.loads('{"a": 1e999, "b": ' + "9" * 400 + "}"), 64)
    assert not isinstance(p, str) and dict(p.values) == {"a": float("inf"), "b": float("inf")}
