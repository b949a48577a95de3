"""The instrumentation seam: what a listener sees, on a real cluster."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
import pytest

import picopool
from picopool import events
from picopool.cluster import LocalCluster
from picopool.discovery import Static

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]


async def test_statements_acquires_and_resets_are_reported(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn)
    seen: list[events.Event] = []
    pool.add_event_listener(seen.append)
    assert await pool.fetchval("select 1") == 1
    assert await pool.execute("select 2", role="primary") == "SELECT 1"
    with pytest.raises(asyncpg.DivisionByZeroError):
        await pool.fetchval("select 1 / 0")
    statements = [e for e in seen if isinstance(e, events.StatementFinished)]
    assert [(s.method, s.outcome, s.attempt) for s in statements] == [
        ("fetchval", "ok", 0), ("execute", "ok", 0), ("fetchval", "statement-error", 0)]
    read, write, _ = statements
    assert read.role == "replica" and read.request == "prefer-replica"
    assert read.reason == "select"
    assert write.role == "primary" and write.reason == "role="
    assert all(s.duration >= 0 for s in statements)
    acquires = [e for e in seen if isinstance(e, events.AcquireFinished)]
    assert len(acquires) == 3 and all(a.ok for a in acquires)
    resets = [e for e in seen if isinstance(e, events.ResetDone)]
    assert len(resets) == 3
    assert resets[0].elided  # a plain SELECT leaves no session state

    pool.remove_event_listener(seen.append)
    count = len(seen)
    await pool.fetchval("select 1")
    assert len(seen) == count


async def test_a_listener_that_raises_does_not_break_statements(
        cluster: LocalCluster, make_pool: PoolFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    pool = await make_pool(cluster.dsn)

    def broken(event: events.Event) -> None:
        raise RuntimeError("listener bug")

    pool.add_event_listener(broken)
    assert await pool.fetchval("select 41 + 1") == 42
    assert "listener" in caplog.text


async def test_failures_breakers_and_topology_are_reported(
        cluster_factory: Callable[..., LocalCluster], make_pool: PoolFactory) -> None:
    private = await asyncio.to_thread(cluster_factory, 1)
    seen: list[events.Event] = []
    pool = await make_pool(private.dsn, discovery=Static(), topology_refresh_interval=None,
                           health_check_interval=None)
    pool.add_event_listener(seen.append)
    await pool.refresh_topology()
    replica = private.replicas[0]
    await asyncio.to_thread(replica.stop)
    for _ in range(4):  # reads reaching the stopped replica are retried on the primary
        assert await pool.fetchval("select 1") == 1
    breakers = [e for e in seen if isinstance(e, events.BreakerChanged)]
    assert any(b.state == "open" and b.instance.endswith(f":{replica.port}") for b in breakers)
    closed = [e for e in seen if isinstance(e, events.ConnectionClosed)]
    assert closed  # the stopped replica's connections ended
    await asyncio.to_thread(replica.start)
