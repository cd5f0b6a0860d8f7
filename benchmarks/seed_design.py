"""The seed's design, to measure "N x the seed" on the machine at hand.

One packet per gRPC message and one awaited Redis HINCRBY per packet, behind the same
`TelemetryIngest/StreamPackets` method, so `rtmonitor send --batch-size 1` drives it
exactly as it drives the service:

    .venv/bin/python benchmarks/seed_design.py --port 50995 &
    .venv/bin/rtmonitor send --target 127.0.0.1:50995 --devices 100 --duration 6 \\
        --batch-size 1 --streams 2

Without --redis-url it starts an embedded Redis in a temporary directory. It counts
nothing else (no validation, kinds or values): a baseline, not a service. SIGINT or
SIGTERM stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import pathlib
import signal
import tempfile
from collections.abc import AsyncIterator

import grpc
import redis.asyncio as aioredis

from rtmonitor.ingest.rpc import PACKETS_METHOD, SERVICE_NAME
from rtmonitor.ingest.v1.telemetry_pb2 import Ack, Packet
from rtmonitor.storage.embedded import EmbeddedRedis


async def serve(port: int, redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)

    async def stream_packets(
        requests: AsyncIterator[Packet], context: grpc.aio.ServicerContext[Packet, Ack]
    ) -> Ack:
        accepted = 0
        async for packet in requests:
            await client.hincrby(f"seed:{packet.device_id}", "packets", 1)
            accepted += 1
        return Ack(accepted=accepted)

    handler = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            PACKETS_METHOD: grpc.stream_unary_rpc_method_handler(
                stream_packets,
                request_deserializer=Packet.FromString,
                response_serializer=Ack.SerializeToString,
            )
        },
    )
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await server.stop(None)
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True, help="gRPC port (127.0.0.1)")
    parser.add_argument("--redis-url", help="an external Redis (default: an embedded one)")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.redis_url
        if url is None:
            data = stack.enter_context(tempfile.TemporaryDirectory())
            url = stack.enter_context(EmbeddedRedis(pathlib.Path(data))).url
        asyncio.run(serve(args.port, url))


if __name__ == "__main__":
    main()
