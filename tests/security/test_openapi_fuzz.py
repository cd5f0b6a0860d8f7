"""No read answers 500, whatever the query: every GET of the OpenAPI schema is fuzzed by
schemathesis (hypothesis) against a real service whose Redis holds what hostile devices
could leave there (overflowed sums, odd but valid names)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from helpers import ServiceProcess, encode_columns, packet, run, stream_batches, stream_packets
from hypothesis import HealthCheck, given, settings

from rtmonitor.ingest.v1.telemetry_pb2 import Batch
from rtmonitor.storage.embedded import EmbeddedRedis


@pytest.fixture(scope="module")
def api_schema(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    tmp = tmp_path_factory.mktemp("fuzz")
    with EmbeddedRedis(tmp / "redis") as redis_server:
        svc = ServiceProcess(redis_server.url, tmp / "service.log").wait_ready()
        try:
            run(stream_packets(svc.target, [packet("over", t=1.7e308)] * 2))
            run(stream_packets(svc.target, [packet("under", t=-1.7e308)] * 2))
            odd = [packet("a:b/c@d.e-f_", kind="k:1", **{"v:n:sum": 1.0, "x.y": -0.0})]
            cols = encode_columns([packet(f"c-{i}", t=float(i)) for i in range(50)] + odd)
            run(stream_batches(svc.target, [Batch(producer_id="f", batch_id=1, columns=cols)]))
            schema = schemathesis.openapi.from_url(f"{svc.http}/openapi.json")
            # the live feed never ends; everything else is a plain read
            yield schema.include(method="GET").exclude(path="/stream")
        finally:
            svc.kill()


def test_no_read_answers_a_server_error(api_schema: Any) -> None:
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/metrics", "/metrics/{device_id}", "/healthz"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
        def no_server_error(case: Any) -> None:
            response = case.call(timeout=10)
            assert response.status_code < 500, (case.as_curl_command(), response.text[:500])

        no_server_error()
