"""最小版本：整条数据管道最简单的样子（项目最初就是这样开始的）。

    gRPC 接收 ──▶ asyncio.Queue(maxsize=10000) ──▶ 一个聚合任务（HINCRBY）──▶ Redis
                                                                           │
                               FastAPI GET /metrics ◀──────────────────────┘

和正式服务用同一份 .proto（proto/rtmonitor/v1/telemetry.proto），所以
examples/send_once.py 和 `rtmonitor send` 对两者都能用。运行：

    .venv/bin/python examples/minimal/server.py            # gRPC :50052，HTTP :8001
    .venv/bin/python examples/send_once.py --target localhost:50052
    curl -s localhost:8001/metrics

这个版本故意很简单，它的每一个问题都是学习指南里的一章
（docs/代码详细注释与学习指导.md）：读完这个文件，再去看正式代码怎样解决它们。
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import redis.asyncio as aioredis
import uvicorn
from fastapi import FastAPI, HTTPException

# 从 .proto 生成的代码：消息类型（telemetry_pb2）和服务端基类、注册函数（telemetry_pb2_grpc）
from rtmonitor.ingest.v1 import telemetry_pb2, telemetry_pb2_grpc

# 项目自带的内嵌 Redis 启动器：没给 --redis-url 时用它，学习者不用先装 Redis
from rtmonitor.storage.embedded import EmbeddedRedis

# 所有计数放在一个 Redis 哈希里：字段是设备 id，值是这个设备的包数
COUNTS_KEY = "minimal:packets"

# 队列里的一项：（设备 id, 负载字节数）。字节数这里只用来演示，聚合时没有用到
Item = tuple[str, int]


class MinimalIngest(telemetry_pb2_grpc.TelemetryIngestServicer):
    """gRPC 服务端：把收到的每个包放进队列，然后回确认。"""

    def __init__(self, queue: asyncio.Queue[Item]) -> None:
        # 接收端和聚合任务之间只通过这个队列联系：接收快、处理慢时，队列先攒着
        self.queue = queue

    # 方法名必须和 .proto 里的 rpc 名字一模一样，所以不是 Python 习惯的小写
    async def StreamPackets(
        self,
        request_iterator: AsyncIterator[telemetry_pb2.Packet],
        context: grpc.aio.ServicerContext[telemetry_pb2.Packet, telemetry_pb2.Ack],
    ) -> telemetry_pb2.Ack:
        accepted = 0
        # 客户端每发一个 Packet，这个循环就拿到一个（gRPC 已经替我们反序列化好了）
        async for packet in request_iterator:
            # 队列满了（10000 项）时 put 会等待：这就是最朴素的“背压”
            await self.queue.put((packet.device_id, len(packet.payload)))
            accepted += 1
        # 客户端关闭了流：回一个 Ack。注意：此时包只是进了队列，还没写进 Redis！
        return telemetry_pb2.Ack(accepted=accepted)

    async def StreamBatches(
        self,
        request_iterator: AsyncIterator[telemetry_pb2.Batch],
        context: grpc.aio.ServicerContext[telemetry_pb2.Batch, telemetry_pb2.BatchAck],
    ) -> AsyncIterator[telemetry_pb2.BatchAck]:
        # 批量接口：一条消息里有很多包，每一批回一个 BatchAck
        # （`rtmonitor send --batch-size 500` 用的就是它）
        async for batch in request_iterator:
            if batch.HasField("columns"):
                # 列式批次是正式版的高速格式，最小版本不支持：明确告诉客户端
                await context.abort(grpc.StatusCode.UNIMPLEMENTED, "columns: use packets")
            for packet in batch.packets:
                await self.queue.put((packet.device_id, len(packet.payload)))
            # 回确认时带上 producer_id 和 batch_id，客户端靠它们知道是哪一批
            yield telemetry_pb2.BatchAck(
                producer_id=batch.producer_id,
                batch_id=batch.batch_id,
                accepted=len(batch.packets),
            )


async def aggregate(queue: asyncio.Queue[Item], redis: aioredis.Redis) -> None:
    """聚合任务：从队列里一个一个取出包，给 Redis 里这个设备的计数加一。"""
    while True:
        # 队列空时 get 会等待，不占 CPU
        device_id, _size = await queue.get()
        # 每个包一次网络往返：HINCRBY 哈希 字段 1（Redis 里的加法是原子的）
        await redis.hincrby(COUNTS_KEY, device_id, 1)


def create_app(redis: aioredis.Redis) -> FastAPI:
    """HTTP 接口：从 Redis 读出计数，返回 JSON。"""
    app = FastAPI(title="RealTimeDataMonitor（最小版本）")

    @app.get("/metrics")
    async def metrics() -> dict[str, object]:
        # HGETALL 取回整个哈希：{设备 id: 包数}（值是字符串，转成 int）
        raw = await redis.hgetall(COUNTS_KEY)
        devices = {device: int(count) for device, count in raw.items()}
        return {"devices": devices, "total": sum(devices.values())}

    @app.get("/metrics/{device_id}")
    async def device(device_id: str) -> dict[str, object]:
        # HGET 只取一个字段；没有这个设备时返回 None，我们回 404
        count = await redis.hget(COUNTS_KEY, device_id)
        if count is None:
            raise HTTPException(status_code=404, detail=f"unknown device {device_id!r}")
        return {"device_id": device_id, "packets": int(count)}

    return app


async def serve(grpc_port: int, http_port: int, redis_url: str) -> None:
    """把三部分装在同一个事件循环里：gRPC 服务端、聚合任务、HTTP 服务端。"""
    # decode_responses=True：Redis 回来的字节自动解码成 str
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    # 有界队列：最多 10000 项。没有上界的话，处理跟不上时内存会一直涨
    queue: asyncio.Queue[Item] = asyncio.Queue(maxsize=10000)

    # gRPC 服务端：注册我们的 servicer，监听端口
    server = grpc.aio.server()
    telemetry_pb2_grpc.add_TelemetryIngestServicer_to_server(MinimalIngest(queue), server)
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()

    # 聚合任务在后台一直运行
    aggregator = asyncio.create_task(aggregate(queue, redis))

    # HTTP 服务端：uvicorn 跑在同一个事件循环里；它会处理 Ctrl+C，收到后 serve() 返回
    config = uvicorn.Config(create_app(redis), host="127.0.0.1", port=http_port)
    print(f"minimal: gRPC 127.0.0.1:{grpc_port}, HTTP http://127.0.0.1:{http_port}", flush=True)
    try:
        await uvicorn.Server(config).serve()
    finally:
        # 关闭：停 gRPC、取消聚合任务。队列里还没写进 Redis 的包就这样丢了（指南第 4 章）
        await server.stop(grace=None)
        aggregator.cancel()
        await redis.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description="RealTimeDataMonitor 的最小版本")
    parser.add_argument("--grpc-port", type=int, default=50052, help="gRPC 端口")
    parser.add_argument("--http-port", type=int, default=8001, help="HTTP 端口")
    parser.add_argument("--redis-url", help="外部 Redis；不给就启动一个内嵌的（数据在临时目录）")
    args = parser.parse_args()
    with contextlib.ExitStack() as stack:
        url = args.redis_url
        if url is None:
            # 临时目录 + 内嵌 Redis，退出时自动停止并删除
            data = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            embedded = stack.enter_context(EmbeddedRedis(data / "redis"))
            url = embedded.url
            # 打印进程号：学习指南里要用 kill -STOP 暂停这个 Redis，看看会发生什么
            print(f"minimal: 内嵌 Redis 进程号 {embedded.pid}", flush=True)
        asyncio.run(serve(args.grpc_port, args.http_port, url))


if __name__ == "__main__":
    main()
