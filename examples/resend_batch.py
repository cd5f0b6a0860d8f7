"""同一个批次发两次：模拟“确认在网络上丢了，客户端只好重发”。

运行（在仓库根目录）：

    .venv/bin/python examples/resend_batch.py                       # 发给 make run 启动的服务
    .venv/bin/python examples/resend_batch.py --target localhost:50052   # 发给最小版本
"""

import argparse
import asyncio

import grpc

from rtmonitor.ingest.v1 import telemetry_pb2, telemetry_pb2_grpc


async def main(target: str, device_id: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = telemetry_pb2_grpc.TelemetryIngestStub(channel)
        # 一个批次 10 个包；producer_id + batch_id 是这个批次的“身份证”
        batch = telemetry_pb2.Batch(
            producer_id="learner",
            batch_id=1,
            packets=[telemetry_pb2.Packet(device_id=device_id) for _ in range(10)],
        )
        # 同一个批次发两次（真实情况下，第二次是客户端没收到确认后的重发）
        async for ack in stub.StreamBatches(iter([batch, batch])):
            print(f"batch_id={ack.batch_id} accepted={ack.accepted} duplicate={ack.duplicate}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="同一个批次发两次，打印两个 BatchAck")
    parser.add_argument("--target", default="localhost:50051", help="服务的 gRPC 地址")
    parser.add_argument("--device-id", default="resend-1", help="设备 id")
    args = parser.parse_args()
    asyncio.run(main(args.target, args.device_id))
