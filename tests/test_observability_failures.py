"""Observability when an instance dies, on a private cluster: a real Prometheus server
scraping the pool, and the logs a dead replica produces."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator

import pytest
from harness.prometheus import PrometheusServer, free_port
from prometheus_client import CollectorRegistry, start_http_server

import picopool
import picopool.prometheus
from picopool.cluster import LocalCluster

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]


@pytest.fixture(scope="module")
def private(cluster_factory: Callable[..., LocalCluster]) -> LocalCluster:
    return cluster_factory(2)


@pytest.fixture
def healthy(private: LocalCluster) -> Iterator[LocalCluster]:
    """The private cluster with every node running, before and after the test."""
    for node in private.nodes:
        node.start()
    yield private
    for node in private.nodes:
        node.start()


def _port(label: str) -> int:
    return int(label.rsplit(":", 1)[1])


async def test_prometheus_scrapes_statements_breakers_and_lag(
        healthy: LocalCluster, make_pool: PoolFactory) -> None:
    # The poller refreshes only when errors ask: the killed replica is seen failing
    # (its breaker opens) before a refresh drops it.
    pool = await make_pool(healthy.dsn, topology_refresh_interval=None,
                           health_check_interval=None)
    registry = CollectorRegistry()
    picopool.prometheus.register(pool, registry)
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    try:
        with PrometheusServer(f"127.0.0.1:{port}") as prom:
            ran: Counter[tuple[int, str]] = Counter()
            for _ in range(40):  # reads: each says which server ran it
                ran[(await pool.fetchval("select inet_server_port()"), "replica")] += 1
            await pool.execute("create table if not exists prom_t (x int)")
            for i in range(7):
                await pool.execute("insert into prom_t values ($1)", i)
            ran[(healthy.primary.port, "primary")] += 8
            assert {port for port, _ in ran} == {n.port for n in healthy.nodes}

            def scraped() -> dict[tuple[int, str], float] | None:
                got = prom.values('picopool_statements_total{outcome="ok"}', "db_instance", "role")
                by_port = {(_port(i), r): v for (i, r), v in got.items()}
                return by_port if by_port == ran else None

            prom.wait_for(scraped, what="statement counters equal the statements run")
            assert prom.target_health() == "up"
            hist = prom.values("picopool_statement_duration_seconds_count", "db_instance", "role")
            assert {(_port(i), r): v for (i, r), v in hist.items()} == ran
            live_lag = prom.values("picopool_replica_lag_bytes", "db_instance")
            assert {_port(i) for (i,) in live_lag} == {r.port for r in healthy.replicas}
            assert prom.query("picopool_topology_version")[0]["value"][1] == "1"

            victim = healthy.replicas[0]
            await asyncio.to_thread(victim.kill)
            for _ in range(6):  # reads that reach the dead replica are retried elsewhere
                assert await pool.fetchval("select 1") == 1
            await pool.refresh_topology()

            def dead_seen() -> bool:
                breaker = prom.values('picopool_breaker_state{state="open"}', "db_instance")
                lag = prom.values("picopool_replica_lag_bytes", "db_instance")
                opened = [i for (i,), v in breaker.items() if _port(i) == victim.port and v == 1]
                return bool(opened) and all(_port(i) != victim.port for (i,) in lag)

            prom.wait_for(dead_seen, what="the killed replica's breaker open, its lag absent")
            lag_seconds = prom.values("picopool_replica_lag_seconds", "db_instance")
            assert all(_port(i) != victim.port for (i,) in lag_seconds)

            def failure_counted() -> float:
                # Two queries, added here. `A + on(db_instance) sum(B) or A` returns
                # both the sum (labels: db_instance) and A's own series (with job and
                # instance) for the same db_instance; keyed by db_instance, A's came
                # last. So a failure counted as a statement error (a read sent on a
                # connection not yet seen closed) hid behind 0 failed checkouts.
                acquire = prom.values("picopool_acquire_failures_total", "db_instance")
                errors = prom.values("sum by (db_instance) (picopool_statement_errors_total)",
                                     "db_instance")
                return sum(v for (i,), v in [*acquire.items(), *errors.items()]
                           if _port(i) == victim.port)

            try:
                prom.wait_for(failure_counted, timeout=10,
                              what="a failed checkout or statement counted on the killed replica")
            except AssertionError as exc:  # say what the pool itself counted
                local = {label: (m.acquire_failures, dict(m.statements))
                         for label, m in pool._metrics.instances.items()}
                raise AssertionError(f"{exc}; the pool's own counts: {local}; "
                                     f"its stats: {pool.stats()}") from None
            assert prom.values("picopool_topology_refreshes_total")[()] >= 2
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


async def test_a_dead_replica_logs_one_warning_not_tracebacks(
        healthy: LocalCluster, make_pool: PoolFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    # Static discovery keeps the dead replica in the topology, so its sub-pool's
    # floor maintenance keeps retrying (1 s, 2 s, 4 s ...) for the whole test.
    from picopool.discovery import Static

    caplog.set_level(logging.DEBUG, logger="asyncpg")
    caplog.set_level(logging.INFO, logger="picopool")
    victim = healthy.replicas[1]
    pool = await make_pool(healthy.dsn, discovery=Static(), min_size=2, max_size=2,
                           health_check_interval=None)
    for _ in range(6):
        await pool.fetchval("select 1")
    await asyncio.to_thread(victim.kill)
    for _ in range(6):
        assert await pool.fetchval("select 1") == 1
    await asyncio.sleep(3.2)  # the floor maintenance retries after 1 s and 2 s more
    asyncpg_records = [r for r in caplog.records if r.name.startswith("asyncpg")]
    assert asyncpg_records == [], [r.getMessage() for r in asyncpg_records]
    unreachable = [r for r in caplog.records if r.name == "picopool"
                   and "unreachable" in r.getMessage() and f":{victim.port}" in r.getMessage()]
    assert len(unreachable) == 1, [r.getMessage() for r in caplog.records]
    assert unreachable[0].levelno == logging.WARNING and unreachable[0].exc_info is None
    assert all(r.exc_info is None for r in caplog.records if r.levelno >= logging.WARNING)

    # Back, then dead again: news again, once.
    await asyncio.to_thread(victim.start)
    await pool.refresh_topology()

    async def reopened() -> None:
        while pool.stats().instances and not any(
                _port(i.label) == victim.port and i.size > 0 for i in pool.stats().instances):
            await pool.fetchval("select 1")
            await asyncio.sleep(0.1)

    await asyncio.wait_for(reopened(), 20)
    await asyncio.to_thread(victim.kill)
    for _ in range(6):
        assert await pool.fetchval("select 1") == 1

    def reported() -> int:
        return sum(1 for r in caplog.records if r.name == "picopool"
                   and "unreachable" in r.getMessage() and f":{victim.port}" in r.getMessage())

    for _ in range(80):
        if reported() == 2:
            break
        await pool.fetchval("select 1")
        await asyncio.sleep(0.1)
    await asyncio.sleep(2.5)
    assert reported() == 2
    assert not [r for r in caplog.records if r.name.startswith("asyncpg")]
