"""OpenTelemetry: picopool's metrics through the SDK's in-memory reader, and spans of the
asyncpg instrumentation for statements run through picopool."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import picopool
import picopool.otel
from picopool.cluster import LocalCluster

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]


def _points(reader: InMemoryMetricReader) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    assert data is not None
    points: dict[str, list[Any]] = {}
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            assert scope.scope.name == "picopool"
            for metric in scope.metrics:
                points.setdefault(metric.name, []).extend(metric.data.data_points)
    return points


async def test_metrics_through_the_in_memory_reader(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    pool = await make_pool(cluster.dsn)
    instruments = picopool.otel.register(pool, meter_provider=provider)
    try:
        ports: dict[int, int] = {}
        for _ in range(12):
            port = await pool.fetchval("select inet_server_port()")
            ports[port] = ports.get(port, 0) + 1
        await pool.execute("select 1", role="primary")
        with pytest.raises(Exception, match="division by zero"):
            await pool.fetchval("select 1 / 0")
        points = _points(reader)

        durations = points["db.client.operation.duration"]
        ok = {p.attributes["server.port"]: p.count for p in durations
              if p.attributes["picopool.outcome"] == "ok"
              and p.attributes["db.operation.name"] == "SELECT"
              and p.attributes["picopool.role"] == "replica"}
        assert ok == ports
        for p in durations:
            assert p.attributes["db.system.name"] == "postgresql"
            assert p.attributes["server.address"] == "127.0.0.1"
            assert p.sum >= 0
        (failed,) = [p for p in durations if p.attributes["picopool.outcome"] != "ok"]
        assert failed.attributes["error.type"] == "statement-error" and failed.count == 1
        primary = [p for p in durations if p.attributes["picopool.role"] == "primary"]
        assert sum(p.count for p in primary) == 1

        counts = points["db.client.connection.count"]
        states = {(p.attributes["db.client.connection.pool.name"],
                   p.attributes["db.client.connection.state"]) for p in counts}
        labels = {i.label for i in pool.stats().instances}
        assert states == {(label, s) for label in labels for s in ("idle", "used")}
        assert sum(p.value for p in counts) >= len(labels)  # min_size=1 per instance
        assert {p.value for p in points["db.client.connection.max"]} == {2}
        assert {p.value for p in points["db.client.connection.pending_requests"]} == {0}
        waits = points["db.client.connection.wait_time"]
        assert sum(p.count for p in waits) == 14
        assert sum(p.value for p in points["picopool.statements"]) == 14
        assert {p.value for p in points["picopool.breaker.open"]} == {0}
        lagging = {p.attributes["picopool.instance"] for p in points["picopool.replica.lag"]}
        assert lagging == {i.label for i in pool.stats().instances if i.role == "replica"}
        assert points["picopool.topology.version"][0].value == 1
        elided = sum(p.value for p in points["picopool.resets"]
                     if p.attributes["picopool.elided"])
        assert elided >= 12
    finally:
        instruments.unregister()
        provider.shutdown()


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    instrumentor.instrument(tracer_provider=provider)
    try:
        yield provider, exporter
    finally:
        instrumentor.uninstrument()
        provider.shutdown()


async def test_asyncpg_instrumentation_traces_statements_run_through_picopool(
        cluster: LocalCluster, make_pool: PoolFactory,
        spans: tuple[TracerProvider, InMemorySpanExporter]) -> None:
    provider, exporter = spans
    pool = await make_pool(cluster.dsn, topology_refresh_interval=None)
    instruments = picopool.otel.register(pool, meter_provider=MeterProvider())
    tracer = provider.get_tracer("test")
    try:
        with tracer.start_as_current_span("read request") as read_span:
            port = await pool.fetchval("select inet_server_port()")
        with tracer.start_as_current_span("write request") as write_span:
            await pool.execute("select 1", role="primary")
        async with pool.acquire() as conn:
            with tracer.start_as_current_span("acquired") as acquired_span:
                await conn.fetchval("select 2")
    finally:
        instruments.unregister()
    finished = exporter.get_finished_spans()

    def children(parent: Any) -> list[Any]:
        return [s for s in finished if s.parent is not None
                and s.parent.span_id == parent.get_span_context().span_id]

    def attributes(span: Any) -> dict[str, Any]:
        return dict(span.attributes or {})

    (read,) = children(read_span)
    assert "select inet_server_port()" in str(read.attributes.get("db.statement", ""))
    peer = read.attributes.get("net.peer.port", read.attributes.get("server.port"))
    assert peer == port
    recorded = {s.name: s for s in finished}
    read_parent = attributes(recorded["read request"])
    assert read_parent["picopool.instance"].endswith(f":{port}")
    assert read_parent["picopool.role"] == "replica"
    assert read_parent["picopool.routing_reason"] == "select"
    assert read_parent["picopool.attempt"] == 0
    (write,) = children(write_span)
    write_parent = attributes(recorded["write request"])
    assert write_parent["picopool.role"] == "primary"
    assert write_parent["picopool.instance"].endswith(f":{cluster.primary.port}")
    assert write.attributes.get("net.peer.port",
                                write.attributes.get("server.port")) == cluster.primary.port
    # An acquire()d connection is a real asyncpg Connection: traced as well.
    assert len(children(acquired_span)) == 1
