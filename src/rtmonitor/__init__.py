"""RealTimeDataMonitor: real-time telemetry ingest over gRPC, counted in Redis, served over HTTP."""

__version__ = "0.1.0"
