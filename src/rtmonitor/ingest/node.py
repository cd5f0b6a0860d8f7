"""The ingest node: a pipeline fed by the gRPC server (TelemetryIngest, OTLP metrics, health,
reflection) and by the HTTP receivers the HTTP node serves in the same process (OTLP/HTTP,
HTTP JSON), whose figures it publishes to Redis for every HTTP node to report."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import time

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from redis.exceptions import RedisError

from rtmonitor.auth import Principal, TokenRegistry
from rtmonitor.config import Settings, StartupError
from rtmonitor.ingest.columnar import C_ROWS
from rtmonitor.ingest.http_json import SURFACE as JSON_SURFACE
from rtmonitor.ingest.http_json import JsonReceiver
from rtmonitor.ingest.mqtt import MqttBridge
from rtmonitor.ingest.otlp import SURFACE as OTLP_SURFACE
from rtmonitor.ingest.otlp import OtlpReceiver
from rtmonitor.ingest.receiver import Receiver, ReceiverLimits, Sender
from rtmonitor.ingest.rpc import SERVICE_NAME
from rtmonitor.ingest.server import build_server
from rtmonitor.ingest.servicer import IngestServicer
from rtmonitor.ingest.validation import Limits, Validator
from rtmonitor.lifecycle import Node
from rtmonitor.model import C_NUMBERING, HttpReply, IngestStats, InstanceStats, PipelineStats
from rtmonitor.pipeline.pipeline import Pipeline
from rtmonitor.pipeline.recovery import HEARTBEAT_TTL_S
from rtmonitor.storage.committer import RedisCommitter
from rtmonitor.storage.store import RedisStore

logger = logging.getLogger(__name__)

# How often an ingest node publishes its figures (they expire with its heartbeat's TTL).
STATS_INTERVAL_S = 1.0
STATS_TIMEOUT_S = 2.0


def server_credentials(s: Settings) -> grpc.ServerCredentials | None:
    """TLS for gRPC from --tls-cert/--tls-key (and mTLS with --tls-client-ca), or None."""
    if s.tls_cert is None or s.tls_key is None:
        return None
    client_ca = s.tls_client_ca.read_bytes() if s.tls_client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(s.tls_key.read_bytes(), s.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


class IngestNode(Node):
    """`async with IngestNode(...)`: serving gRPC on entry; on exit stops in order (see
    stop()) losing no acknowledged packet."""

    def __init__(
        self,
        settings: Settings,
        store: RedisStore,
        *,
        reuse_port: bool = False,
        auth: TokenRegistry | None = None,
    ) -> None:
        s = self.settings = settings
        self.store = store
        # The tokens in force (the runtime's, shared with HTTP); disabled without a file.
        self.auth = auth if auth is not None else TokenRegistry(None)
        self.reuse_port = reuse_port  # --workers: every worker binds the same port
        self.validator = validator = Validator(
            Limits(
                max_payload_bytes=s.max_payload_bytes,
                max_values_per_packet=s.max_values_per_packet,
                max_kinds_per_device=s.max_kinds_per_device,
                max_value_names_per_device=s.max_value_names_per_device,
                max_devices=s.max_devices,
            )
        )
        self.pipeline = Pipeline(
            settings, RedisCommitter(store), devices=lambda: validator.device_count
        )
        self.servicer = IngestServicer(
            self.validator,
            self.pipeline.queue,
            self.pipeline.aggregator,
            max_batch_packets=s.max_batch_packets,
            max_inflight_batches=s.max_inflight_batches,
            max_streams=s.max_streams,
            max_streams_per_peer=s.max_streams_per_peer,
            max_inflight_message_bytes=s.max_inflight_message_bytes,
            idle_timeout=s.stream_idle_timeout,
            auth=self.auth,
        )
        self.mqtt = (
            MqttBridge(s, self.validator, self.pipeline.queue, self.pipeline.aggregator)
            if s.mqtt_url is not None
            else None
        )
        self.receiver = Receiver(
            self.validator,
            self.pipeline.queue,
            self.pipeline.aggregator,
            ReceiverLimits(
                max_body_bytes=s.http_ingest_max_bytes,
                max_packets=s.max_batch_packets,
                queue_timeout_s=s.receiver_queue_timeout,
                commit_timeout_s=s.receiver_commit_timeout,
                device_attribute=s.otlp_device_attribute,
            ),
            redis_error=lambda: self.pipeline.redis_error,
            auth=self.auth,
        )
        self.otlp = OtlpReceiver(self.receiver)
        self.json = JsonReceiver(self.receiver)
        self.health = health_aio.HealthServicer()
        self.grpc_port: int | None = None
        self.serving = False
        self._server: grpc.aio.Server | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._started = time.monotonic()
        self._stopped = False

    @property
    def instance_id(self) -> str:
        return self.pipeline.instance_id

    async def start(self) -> None:
        s = self.settings
        if not C_ROWS:
            logger.warning(
                "the compiled row-batch reader (rtmonitor/ingest/_rows.c) is not built: row "
                "batches are parsed by protobuf, several times slower. Reinstall with a C "
                "compiler and Python's headers (e.g. apt-get install gcc python3-dev)"
            )
        if not C_NUMBERING:
            logger.warning(
                "the compiled numbering of a flush's devices (rtmonitor/_model.c) is not "
                "built: a fleet's flushes sort their device keys, several times slower. "
                "Reinstall with a C compiler and Python's headers"
            )
        await self.pipeline.start()
        self._tasks["stats"] = asyncio.create_task(self._publish_stats(), name="stats")
        self._server = build_server(
            self.servicer,
            self.health,
            otlp=self.otlp,
            max_message_bytes=s.max_message_bytes,
            noop=s.noop,
            reuse_port=self.reuse_port,
        )
        address = f"{s.host}:{s.grpc_port}"
        try:
            credentials = server_credentials(s)
            if credentials is None:
                self.grpc_port = self._server.add_insecure_port(address)
            else:
                self.grpc_port = self._server.add_secure_port(address, credentials)
        except OSError as exc:
            raise StartupError(f"cannot read the TLS files: {exc}") from None
        except RuntimeError as exc:
            raise StartupError(
                f"cannot listen for gRPC on {s.host}:{s.grpc_port} ({exc}): the port is in use "
                "or the address is wrong; choose another with --grpc-port / RTM_GRPC_PORT"
            ) from None
        await self._server.start()
        self._tasks["idle"] = asyncio.create_task(self.servicer.watch_idle(), name="idle-watch")
        if s.retention > 0:
            self._tasks["device-slots"] = asyncio.create_task(
                self._rotate_devices(s.retention), name="device-slots"
            )
        if self.mqtt is not None:
            await self.mqtt.start()
        await self.health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        self.serving = True

    async def stop(self) -> None:
        """Stop in order, losing no acknowledged packet. Calling it twice is harmless."""
        if self._stopped:
            return
        self._stopped = True
        s = self.settings
        # 1. Tell load balancers and health watchers to go elsewhere.
        await self.health.enter_graceful_shutdown()
        # 2. Stop accepting streams; open ones stop reading but still send the acks of what
        #    they read, within the grace period (the pipeline keeps committing meanwhile).
        self.servicer.stop_reading()
        if self.mqtt is not None:  # what it queued is acknowledged after the final flush
            self.mqtt.stop_reading()
        if self._server is not None:
            await self._server.stop(s.grace_period)
        self.serving = False
        for name in ("idle", "device-slots"):
            if (task := self._tasks.pop(name, None)) is not None:
                task.cancel()
        # 3-4. Drain the queue into the aggregator, then the final flush (retried up to
        #      --shutdown-flush-timeout if Redis is away).
        await self.pipeline.drain(s.shutdown_flush_timeout)
        # 5. The MQTT bridge's last PUBACKs, then it disconnects (its session stays).
        if self.mqtt is not None:
            await self.mqtt.close(s.grace_period)
        # The figures of the final flush, for whoever reads them before they expire.
        if (task := self._tasks.pop("stats", None)) is not None:
            task.cancel()
            await self._publish_once()

    def not_ready(self) -> list[str]:
        """Why this node's receivers do not take traffic now (empty: they do)."""
        return self.mqtt.not_ready() if self.mqtt is not None else []

    # --- the HTTP receivers, served by the HTTP node of this process (api.deps.HttpIngest) ---

    async def otlp_metrics(
        self, body: bytes, content_type: str, encoding: str, principal: Principal, peer: str
    ) -> HttpReply:
        """POST /v1/metrics (the route checked the token's `ingest` scope)."""
        sender = Sender(principal, peer, OTLP_SURFACE)
        return await self.otlp.export_http(body, content_type, encoding, sender)

    async def telemetry(
        self,
        body: bytes,
        encoding: str,
        idempotency_key: str | None,
        principal: Principal,
        peer: str,
    ) -> HttpReply:
        """POST /v1/telemetry (the route checked the token's `ingest` scope)."""
        sender = Sender(principal, peer, JSON_SURFACE)
        return await self.json.telemetry(body, encoding, idempotency_key, sender)

    @property
    def redis_error(self) -> str | None:
        """Why commits to Redis fail while they do (e.g. Redis is full), else None."""
        return self.pipeline.redis_error

    @property
    def broken(self) -> asyncio.Event:
        """Set once this instance commits nothing more: the runtime stops the process."""
        return self.pipeline.broken

    def stats(self) -> PipelineStats:
        """The pipeline's figures and the receivers'."""
        servicer = self.servicer
        ingest = IngestStats(
            active_streams=servicer.active_streams,
            streams_refused=servicer.streams_refused,
            streams_refused_by_reason=dict(servicer.streams_refused_by_reason),
            messages_refused_by_reason=dict(
                servicer.messages_refused_by_reason + self.receiver.refused
            ),
            inflight_message_bytes=servicer.budget.used,
            streams_waiting_for_bytes=servicer.budget.waiting,
            inflight_message_waits=servicer.budget.waits,
            streams_idle_closed=servicer.streams_idle_closed,
            devices_known=self.validator.device_count,
            **(self.mqtt.stats() if self.mqtt is not None else {}),
            auth_refused=self.auth.refusals(exclude=("http",)),
        )
        return dataclasses.replace(self.pipeline.stats(), ingest=ingest)

    def instance_stats(self) -> InstanceStats:
        return InstanceStats(
            instance_id=self.instance_id,
            pid=os.getpid(),
            uptime_s=round(time.monotonic() - self._started, 3),
            stats=self.stats(),
        )

    async def _publish_once(self) -> None:
        doc = json.dumps(self.instance_stats().to_json(), separators=(",", ":"))
        try:
            await asyncio.wait_for(
                self.store.publish_stats(self.instance_id, doc, HEARTBEAT_TTL_S), STATS_TIMEOUT_S
            )
        except (RedisError, OSError, TimeoutError) as exc:  # Redis away: the flusher says so
            logger.debug("publishing the stats failed: %s", exc)

    async def _publish_stats(self) -> None:
        """Publish this node's figures every STATS_INTERVAL_S, next to its heartbeat."""
        while True:
            try:
                await self._publish_once()
            except Exception:  # never die silently
                logger.exception("publishing the stats failed unexpectedly")
            await asyncio.sleep(STATS_INTERVAL_S)

    async def _rotate_devices(self, period_s: float) -> None:
        """Free the --max-devices slots of devices silent past the retention (on a timer,
        so slots come back even when no packet arrives)."""
        while True:
            await asyncio.sleep(period_s)
            with self.validator.lock:
                freed = self.validator.rotate()
            if freed:
                logger.info("%d devices silent for the retention freed their slots", freed)
