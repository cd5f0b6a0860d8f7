"""最小的客户端：连上服务，用 StreamPackets 发几个包，打印服务端回的 Ack。

运行（在仓库根目录）：

    .venv/bin/python examples/send_once.py                      # 发给 make run 启动的服务
    .venv/bin/python examples/send_once.py --target 127.0.0.1:50061 --count 5
"""

import argparse
import asyncio

import grpc

# 项目从 proto/rtmonitor/v1/telemetry.proto 生成的代码：消息类型和客户端存根（stub）
from rtmonitor.ingest.v1 import telemetry_pb2, telemetry_pb2_grpc


async def main(target: str, device_id: str, count: int) -> None:
    # 第 1 步：建立一条到服务端的 gRPC 连接（不加密，只适合本机练习）
    async with grpc.aio.insecure_channel(target) as channel:
        # 第 2 步：用连接造一个存根，它的方法就是 .proto 里的 rpc
        stub = telemetry_pb2_grpc.TelemetryIngestStub(channel)
        # 第 3 步：准备要发的包；values 是带名字的数值读数
        packets = [
            telemetry_pb2.Packet(
                device_id=device_id, kind="reading", payload=b"hello", values={"temp": 20.0 + i}
            )
            for i in range(count)
        ]
        # 第 4 步：StreamPackets 是“客户端流”：把包一个个发过去，发完后服务端回一个 Ack
        ack = await stub.StreamPackets(iter(packets))
        # 第 5 步：打印 Ack：accepted 是被接受的包数，rejected 是被拒绝的包数
        print(f"accepted={ack.accepted} rejected={ack.rejected}", dict(ack.rejected_by_reason))


if __name__ == "__main__":
    # 命令行参数：发到哪里、用哪个设备 id、发几个包
    parser = argparse.ArgumentParser(description="发几个包，打印 Ack")
    parser.add_argument("--target", default="localhost:50051", help="服务的 gRPC 地址")
    parser.add_argument("--device-id", default="demo-1", help="设备 id")
    parser.add_argument("--count", type=int, default=3, help="发几个包")
    args = parser.parse_args()
    asyncio.run(main(args.target, args.device_id, args.count))
