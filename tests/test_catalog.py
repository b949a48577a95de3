"""FunctionCatalog (picopool._catalog) and service sessions on a real server.

Defect 10: under 20 concurrent statements with check_function_volatility=True the
pool used to run 20 lookups at once on the one service connection (19 "another
operation is in progress" warnings, nothing cached), and a lookup colliding with
the reset-elision catalog check killed the service connection.  Here lookups are
single-flight and batched, and every user of the service connection holds its
session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import asyncpg
import pytest

from picopool._catalog import USER_VOLATILITY_QUERY, FunctionCatalog
from picopool._service import ServiceConnections
from picopool._sql import classify
from picopool._sql_probes import ELISION_SAFE_QUERY
from picopool._topology import Address
from picopool.cluster import LocalCluster

pytestmark = pytest.mark.integration

S = "h6_catalog"
SETUP = f"""
drop schema if exists {S} cascade;
create schema {S};
create function {S}.cat_volatile() returns int language sql volatile as 'select 1';
create function {S}.cat_stable() returns int language sql stable as 'select 2';
create function {S}.cat_immutable() returns int language sql immutable as 'select 3';
create function {S}.cat_mixed(int) returns int language sql immutable as 'select 4';
create function {S}.cat_mixed(text) returns int language sql volatile as 'select 5';
-- a user function that shadows a built-in's name (reachable qualified, or by search_path)
create function {S}.upper(int) returns int language sql volatile as 'select 6';
"""


@pytest.fixture(scope="module")
def shared(cluster: LocalCluster) -> Iterator[LocalCluster]:
    cluster.primary.sql(SETUP)
    cluster.wait_replayed()
    try:
        yield cluster
    finally:
        cluster.primary.sql(f"drop schema if exists {S} cascade")


class Recorder:
    """A connect= hook that opens real connections and records their queries."""

    def __init__(self) -> None:
        self.queries: list[str] = []
        self.connections: list[Any] = []

    async def __call__(self, dsn: str, **kwargs: Any) -> Any:
        connection = await asyncpg.connect(dsn, **kwargs)
        connection.add_query_logger(lambda record: self.queries.append(record.query))
        self.connections.append(connection)
        return connection

    def count(self, query: str) -> int:
        return sum(1 for q in self.queries if q == query)


def service_for(cluster: LocalCluster, recorder: Recorder | None = None,
                port: int | None = None) -> ServiceConnections:
    node = cluster.primary
    return ServiceConnections(
        dsn=cluster.dsn, connect_kwargs={}, seeds=(Address(node.host, port or node.port),),
        service_dsn=None, current=lambda: None, connect_timeout=2.0, connect=recorder,
    )


@pytest.fixture
async def recorded(shared: LocalCluster) -> AsyncIterator[tuple[ServiceConnections, Recorder]]:
    recorder = Recorder()
    service = service_for(shared, recorder)
    try:
        yield service, recorder
    finally:
        await service.aclose()


async def test_concurrent_lookups_share_one_query(
    recorded: tuple[ServiceConnections, Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    service, recorder = recorded
    catalog = FunctionCatalog(service)
    caplog.set_level(logging.DEBUG, logger="picopool")
    names = frozenset({"cat_volatile", "count"})
    results = await asyncio.gather(*(catalog.volatile_user_functions(names) for _ in range(20)))
    assert results == [frozenset({"cat_volatile"})] * 20
    assert recorder.count(USER_VOLATILITY_QUERY) == 1
    assert catalog.known() == {"cat_volatile": True, "count": False}
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    # cached: no more queries
    assert await catalog.volatile_user_functions(names) == {"cat_volatile"}
    assert recorder.count(USER_VOLATILITY_QUERY) == 1


async def test_concurrent_different_names_are_batched(
    recorded: tuple[ServiceConnections, Recorder]
) -> None:
    service, recorder = recorded
    catalog = FunctionCatalog(service)
    batches = [frozenset({f"cat_unknown_{i}", "cat_stable"}) for i in range(20)]
    batches.append(frozenset({"cat_volatile"}))
    results = await asyncio.gather(*(catalog.volatile_user_functions(b) for b in batches))
    assert results[:20] == [frozenset()] * 20
    assert results[20] == {"cat_volatile"}
    assert recorder.count(USER_VOLATILITY_QUERY) == 1
    assert len(catalog.known()) == 22


async def test_lookups_and_the_elision_check_never_collide(
    recorded: tuple[ServiceConnections, Recorder], caplog: pytest.LogCaptureFixture
) -> None:
    """The reset-elision catalog check holds the session while lookups queue up;
    the service connection survives and serves both."""
    service, recorder = recorded
    catalog = FunctionCatalog(service)
    caplog.set_level(logging.DEBUG, logger="picopool")

    async def elision_check() -> bool:
        async with service.service_session() as conn:
            await conn.execute("SELECT pg_sleep(0.2)")
            return bool(await conn.fetchval(ELISION_SAFE_QUERY))

    async def lookup(i: int) -> frozenset[str]:
        return await catalog.volatile_user_functions(frozenset({"cat_volatile", f"n{i % 3}"}))

    first = asyncio.ensure_future(elision_check())
    await asyncio.sleep(0.05)  # the check holds the session now
    results = await asyncio.gather(*(lookup(i) for i in range(20)), elision_check())
    assert await first in (True, False)
    assert all(r == {"cat_volatile"} for r in results[:20])
    assert len(recorder.connections) == 1  # never discarded and reopened
    assert not recorder.connections[0].is_closed()
    assert recorder.count(USER_VOLATILITY_QUERY) == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_sessions_are_reentrant_within_a_task(
    recorded: tuple[ServiceConnections, Recorder]
) -> None:
    service, _ = recorded
    async with service.service_session() as outer, service.service_session() as inner:
        assert inner is outer
        assert await inner.fetchval("SELECT 1") == 1
    address = service.seeds[0]
    async with service.probe_session(address) as outer, \
            service.probe_session(address) as inner:
        assert inner is outer


async def test_a_cancelled_session_discards_the_connection(
    recorded: tuple[ServiceConnections, Recorder]
) -> None:
    service, recorder = recorded

    async def stuck() -> None:
        async with service.service_session() as conn:
            await conn.execute("SELECT pg_sleep(10)")

    task = asyncio.ensure_future(stuck())
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with service.service_session() as conn:  # a fresh, idle connection
        assert await conn.fetchval("SELECT 2") == 2
    assert len(recorder.connections) == 2


async def test_known_read_only(recorded: tuple[ServiceConnections, Recorder]) -> None:
    service, _ = recorded
    catalog = FunctionCatalog(service)
    # built-ins are known without a lookup
    assert catalog.known_read_only(frozenset({"now", "lower", "count", "random"}))
    assert not catalog.known_read_only(frozenset({"pg_reload_conf"}))
    assert not catalog.known_read_only(frozenset({"nextval"}))
    assert not catalog.known_read_only(frozenset({"txid_current"}))  # STABLE, takes an xid
    # user functions: not known until learned
    user = frozenset({"cat_stable", "cat_immutable"})
    assert not catalog.known_read_only(user)
    await catalog.learn(user | {"cat_volatile", "cat_mixed", "upper", "no_such_fn"})
    assert catalog.known_read_only(user)
    assert catalog.known_read_only(frozenset({"no_such_fn"}))  # no function: no effect
    assert not catalog.known_read_only(frozenset({"cat_volatile"}))
    assert not catalog.known_read_only(frozenset({"cat_mixed"}))  # one overload volatile
    assert not catalog.known_read_only(frozenset({"upper"}))  # shadowed by a volatile one
    assert not catalog.known_read_only(user | {"cat_volatile"})
    assert catalog.known_read_only(frozenset())
    # whole statements
    assert catalog.statement_read_only(classify(f"SELECT {S}.cat_stable(), now()"))
    assert not catalog.statement_read_only(classify(f"SELECT {S}.cat_volatile()"))
    assert not catalog.statement_read_only(classify("SELECT pg_current_wal_lsn()"))
    assert not catalog.statement_read_only(classify("SELECT a OPERATOR(x.+) b FROM t"))
    assert not catalog.statement_read_only(classify("UPDATE t SET a = now()"))
    catalog.clear()
    assert catalog.known() == {}
    assert not catalog.known_read_only(user)


async def test_a_failed_lookup_is_not_cached(
    shared: LocalCluster, caplog: pytest.LogCaptureFixture
) -> None:
    """No instance reachable: every caller gets all its names back (the primary),
    one warning per lookup, nothing cached."""
    service = service_for(shared, port=1)  # nothing listens on port 1
    catalog = FunctionCatalog(service, timeout=3.0)
    try:
        names = frozenset({"cat_stable", "lower"})
        results = await asyncio.gather(*(catalog.volatile_user_functions(names)
                                         for _ in range(5)))
        assert results == [names] * 5
        assert catalog.known() == {}
        warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "cannot check function volatility" in warnings[0].message
        await catalog.learn(frozenset({"cat_stable"}))  # logs, does not raise
        assert not catalog.known_read_only(frozenset({"cat_stable"}))
    finally:
        await catalog.aclose()
        await service.aclose()
