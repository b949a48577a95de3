"""The execution path's defects found by the fault-injection review, one test each.

Retries after cuts at protocol points, caller timeouts and black holes are in
``test_faults.py``; secrets in ``test_secrets.py``; routing of server-local
functions in ``test_routing.py``; the ``connect=`` hook in ``test_connect_hook.py``.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import picopool
from picopool import Role
from picopool.cluster import LocalCluster
from picopool.discovery import Discovered, DiscoveryContext, DiscoveryProvider, Streaming

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def on_primary(cluster: LocalCluster, query: str, *args: Any) -> Any:
    connection = await asyncpg.connect(cluster.primary.dsn)
    try:
        return await connection.fetchval(query, *args)
    finally:
        await connection.close()


async def replicated(cluster: LocalCluster, query: str) -> None:
    """Wait until every replica can run *query* (DDL made on the primary arrived)."""
    for replica in cluster.replicas:
        connection = await asyncpg.connect(replica.dsn)
        try:
            started = time.monotonic()
            while True:
                try:
                    await connection.fetchval(query)
                    break
                except asyncpg.PostgresError:
                    assert time.monotonic() - started < 10, f"never replicated: {query}"
                    await asyncio.sleep(0.05)
        finally:
            await connection.close()


async def backends(cluster: LocalCluster, application_name: str) -> int:
    count: int = await on_primary(
        cluster, "select count(*) from pg_stat_activity where application_name = $1",
        application_name)
    return count


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    started = time.monotonic()
    while not await check():
        assert time.monotonic() - started < timeout, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


class Scripted(DiscoveryProvider):
    """Streaming discovery that can lie: report a replica as the primary (a stale
    view during a failover), or hide instances."""

    name = "scripted"

    def __init__(self) -> None:
        self.inner = Streaming()
        self.fake_primary_port: int | None = None
        self.hidden: set[int] = set()
        self.lies_left = 0

    async def discover(self, ctx: DiscoveryContext) -> Discovered:
        found = await self.inner.discover(ctx)
        instances = [i for i in found.instances if i.address.port not in self.hidden]
        if self.lies_left and self.fake_primary_port is not None:
            self.lies_left -= 1
            instances = [
                dataclasses.replace(
                    i, role=Role.PRIMARY if i.address.port == self.fake_primary_port
                    else Role.REPLICA)
                for i in instances
            ]
        return Discovered(tuple(instances), found.symmetric)


# -- 3: a retried batch re-sends every row -----------------------------------------------


@pytest.mark.parametrize("method", ["executemany", "fetchmany"])
async def test_retried_batch_from_a_generator_sends_every_row(
        cluster: LocalCluster, make_pool: PoolFactory, method: str) -> None:
    """Defect 3: the first attempt hits a demoted primary (25006, confirmed in
    recovery); the retry on the real primary must send all 100 rows, not an
    exhausted generator."""
    table = unique("batch")
    await on_primary(cluster, f"create table {table} (n int)")
    await replicated(cluster, f"select count(*) from {table}")
    provider = Scripted()
    provider.fake_primary_port = cluster.replicas[0].port
    provider.lies_left = 1
    pool = await make_pool(cluster.dsn, discovery=provider, topology_refresh_interval=None)
    assert pool.topology is not None and pool.topology.primary is not None
    assert pool.topology.primary.address.port == cluster.replicas[0].port  # the stale view

    rows = ((n,) for n in range(100))
    if method == "executemany":
        await pool.executemany(f"insert into {table} values ($1)", rows)
    else:
        await pool.fetchmany(f"insert into {table} values ($1) returning n", rows)
    assert await on_primary(cluster, f"select count(*) from {table}") == 100
    assert pool.stats().retries == 1
    assert pool.topology is not None and pool.topology.primary is not None
    assert pool.topology.primary.address.port == cluster.primary.port  # refreshed


# -- 4: no session state crosses users --------------------------------------------------

tenant: contextvars.ContextVar[str | None] = contextvars.ContextVar("tenant", default=None)


async def tenant_setup(connection: Any) -> None:
    """The multi-tenant pattern: per-checkout session state from a context variable."""
    name = tenant.get()
    if name is not None:
        await connection.execute(f"set application_name = '{name}'")


async def test_a_waiting_caller_is_served_before_the_releaser_takes_the_connection_back(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """A statement's connection goes back to its sub-pool without a task. The task
    that released it must not take it again before a caller that was already
    waiting (asyncio.Queue lets a newcomer barge in; the woken waiter would queue
    again at the back and starve behind a busy loop)."""
    pool = await make_pool(cluster.dsn, min_size=1, max_size=1)
    order: list[str] = []

    async def busy() -> None:
        for _ in range(30):
            await pool.fetchval("select pg_sleep(0.01)", role="primary")
            order.append("busy")

    async def waiter() -> None:
        await asyncio.sleep(0.05)
        await pool.fetchval("select 1", role="primary")
        order.append("waiter")

    await asyncio.gather(busy(), waiter())
    assert order.index("waiter") <= 10, order  # served within a statement of waiting


async def test_setup_state_does_not_leak_to_the_next_user(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """Defect 4: the next pool-level statement must not run with the previous user's
    setup= state (asyncpg's reset clears it; skipping the reset must not keep it)."""
    pool = await make_pool(cluster.dsn, setup=tenant_setup, min_size=1, max_size=1,
                           server_settings={"application_name": "default-app"})

    async def as_tenant(name: str | None) -> str:
        tenant.set(name)
        seen: str = await pool.fetchval("select current_setting('application_name')",
                                        role="primary")
        return seen

    assert await asyncio.create_task(as_tenant("tenant-a")) == "tenant-a"
    assert await asyncio.create_task(as_tenant(None)) == "default-app"
    assert await asyncio.create_task(as_tenant("tenant-b")) == "tenant-b"
    assert await asyncio.create_task(as_tenant(None)) == "default-app"


async def test_the_users_reset_runs_on_every_release(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """Defect 4: a user's reset= is theirs: called on every release, never skipped."""
    calls: list[int] = []

    async def reset(connection: Any) -> None:
        calls.append(1)
        await connection.execute("reset all")

    pool = await make_pool(cluster.dsn, reset=reset, min_size=1, max_size=1)
    for value in range(5):
        assert await pool.fetchval("select $1::int", value, role="primary") == value
    async with pool.acquire() as connection:
        await connection.execute("select 1")
    assert len(calls) == 6


async def test_health_checks_do_not_run_setup_nor_touch_idle_connections(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """Defect 4 and 7: the idle health check runs no setup= on idle connections."""
    checkouts: list[int] = []

    async def setup(connection: Any) -> None:
        checkouts.append(1)

    pool = await make_pool(cluster.dsn, setup=setup, min_size=2, max_size=2,
                           health_check_interval=0.1)
    await asyncio.sleep(1.0)  # ten rounds of health checks
    assert checkouts == []
    assert all(s.failures == 0 for s in pool.stats().instances)


async def test_idle_connections_expire_with_health_checks_on(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """Defect 7: after a burst, max_inactive_connection_lifetime shrinks the pool even
    while health checks run (they used to check every idle connection out)."""
    pool = await make_pool(cluster.dsn, min_size=1, max_size=4,
                           max_inactive_connection_lifetime=0.5, health_check_interval=0.1)
    await asyncio.gather(*(pool.fetchval("select pg_sleep(0.3)", role="primary")
                           for _ in range(4)))
    primary = next(s for s in pool.stats().instances if s.role == "primary")
    assert primary.size == 4

    async def shrunk() -> bool:
        primary = next(s for s in pool.stats().instances if s.role == "primary")
        return primary.size <= 1

    await eventually(shrunk, 5, "idle connections to expire")


# -- 5, 6: stopping a pool whose sub-pool is still starting ----------------------------


def slow_connect(ports: set[int], delay: float, *, after: int = 0,
                 ) -> Callable[..., Awaitable[Any]]:
    """A connect= hook that stalls connections to *ports* (after the first *after*)."""
    seen: dict[int, int] = {}

    async def connect(*args: Any, **kwargs: Any) -> Any:
        port = kwargs.get("port")
        if port in ports:
            seen[port] = seen.get(port, 0) + 1
            if seen[port] > after:
                await asyncio.sleep(delay)
        return await asyncpg.connect(*args, **kwargs)

    return connect


async def test_terminate_while_a_sub_pool_starts_leaks_nothing(cluster: LocalCluster) -> None:
    """Defect 5: terminate() during start-up does not raise ("pool is being
    initialized") and leaves no server backend behind."""
    name = unique("d5")
    ports = {n.port for n in cluster.nodes}
    pool = picopool.create_pool(
        cluster.dsn, min_size=4, max_size=4, discovery=Streaming(),
        connect=slow_connect(ports, 3.0, after=2),  # a probe and one pooled one each, fast
        server_settings={"application_name": name}, topology_refresh_interval=None)
    starting = asyncio.ensure_future(pool._async__init__())
    await eventually(lambda: _backends_above(cluster, name, 2), 10, "start-up to connect")
    pool.terminate()  # must not raise
    with pytest.raises(picopool.PoolClosedError):
        await starting
    await eventually(lambda: _no_backends(cluster, name), 10, "every backend to end")
    await pool.close()  # a no-op now


async def _backends_above(cluster: LocalCluster, name: str, count: int) -> bool:
    return await backends(cluster, name) > count


async def _no_backends(cluster: LocalCluster, name: str) -> bool:
    return await backends(cluster, name) == 0


async def test_requests_waiting_for_a_starting_sub_pool_are_not_cancelled_by_close(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """Defect 6: close() cancels a joining instance's start-up; the requests waiting
    for it get PoolClosedError, and their own tasks are not cancelled."""
    joining = cluster.replicas[0].port
    provider = Scripted()
    provider.hidden = {joining}
    pool = await make_pool(cluster.dsn, discovery=provider, topology_refresh_interval=None,
                           min_size=2, max_size=2,
                           connect=slow_connect({joining}, 5.0))
    provider.hidden.clear()
    await pool.refresh_topology()  # it joins; its sub-pool starts on first use

    async def read() -> Any:
        return await pool.fetchval("select inet_server_port()", role="replica")

    readers = [asyncio.ensure_future(read()) for _ in range(4)]
    await asyncio.sleep(0.3)
    await asyncio.wait_for(pool.close(), 10)
    results = await asyncio.gather(*readers, return_exceptions=True)
    assert not any(r.cancelled() for r in readers)
    for result in results:
        assert not isinstance(result, asyncio.CancelledError), results
        assert isinstance(result, int | picopool.PoolClosedError), results


# -- 8: a read-only role is the user's error ----------------------------------------------


async def test_a_read_only_role_on_the_primary_is_the_users_error(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """Defect 8: default_transaction_read_only=on for a role raises asyncpg's
    ReadOnlySQLTransactionError at once: no retries, no expiry, no refresh storm."""
    role, table = unique("frozen"), unique("frozen_t")
    await on_primary(cluster, f"create table {table} (n int)")
    await on_primary(cluster, f"create role {role} login password '{cluster.password}'")
    await on_primary(cluster, f"grant insert on {table} to {role}")
    await on_primary(cluster, f"alter role {role} set default_transaction_read_only = on")
    dsn = cluster.dsn.replace("postgres://postgres:", f"postgres://{role}:", 1)
    pool = await make_pool(dsn, discovery=Streaming(), topology_refresh_interval=None,
                           service_dsn=cluster.dsn)
    refreshes = pool.stats().refreshes
    started = time.monotonic()
    for _ in range(3):
        with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
            await pool.execute(f"insert into {table} values (1)")
    assert time.monotonic() - started < 2
    stats = pool.stats()
    assert stats.retries == 0
    assert stats.refreshes - refreshes <= 1
    assert all(s.breaker == "closed" for s in stats.instances)


# -- 9: read-your-writes' short waits are not failures ----------------------------------


async def test_read_your_writes_does_not_fail_slow_to_connect_replicas(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """Defect 9: a replica that needs a new connection (slower than read-your-writes'
    50 ms budget) is not marked as failed."""
    table = unique("ryw")
    await on_primary(cluster, f"create table {table} (n int)")
    replicas = {r.port for r in cluster.replicas}
    pool = await make_pool(cluster.dsn, min_size=0, max_size=2, causal_wait=0.2,
                           max_inactive_connection_lifetime=0.01,
                           connect=slow_connect(replicas, 0.15))
    for n in range(6):
        async with pool.read_your_writes():
            await pool.execute(f"insert into {table} values ($1)", n)
            assert await pool.fetchval(f"select count(*) from {table}") == n + 1
        await asyncio.sleep(0.05)  # the replicas' connections expire: a new one each time
    for instance in pool.stats().instances:
        assert instance.failures == 0, instance
        assert instance.breaker == "closed", instance


# -- 10: catalog lookups share the service connection ------------------------------------


async def test_concurrent_volatility_checks_share_one_lookup(
        cluster: LocalCluster, make_pool: PoolFactory,
        caplog: pytest.LogCaptureFixture) -> None:
    """Defect 10: 20 concurrent statements calling unknown functions cause no
    "another operation is in progress" and the answers are cached."""
    functions = [unique("f") for _ in range(20)]
    for name in functions:
        await on_primary(cluster, f"create function {name}() returns int stable "
                                  "language sql as 'select 1'")
    await replicated(cluster, f"select {functions[-1]}()")
    pool = await make_pool(cluster.dsn, check_function_volatility=True,
                           topology_refresh_interval=0.05)
    with caplog.at_level(logging.WARNING, logger="picopool"):
        results = await asyncio.gather(*(pool.fetchval(f"select {name}()")
                                         for name in functions))
    assert results == [1] * 20
    assert "another operation" not in caplog.text
    assert "cannot check function volatility" not in caplog.text
    assert all(pool._catalog.known().get(name) is False for name in functions)


# -- 11: caches are bounded by bytes ------------------------------------------------------


async def test_big_statements_do_not_pile_up_in_the_caches(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """Defect 11: 100 distinct 1 MB statements keep at most a few MB alive."""
    from picopool import _sql

    pool = await make_pool(cluster.dsn)
    for n in range(100):
        statement = f"select {n} /* {'x' * (1 << 20)} */"
        await pool._executor.decide(statement, None, None)
        _sql.classify(statement)
    assert pool._executor.decisions.bytes <= 4 << 20
    assert _sql._cache.bytes <= 4 << 20


# -- 12: no refresh storms ----------------------------------------------------------------


async def test_waiting_writes_share_refreshes(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """Defect 12: ten writes waiting for a primary (none in the topology) with a 10 s
    interval caused 58 refreshes in 3 s; they share a few, spaced out."""
    provider = Scripted()
    pool = await make_pool(cluster.dsn, discovery=provider, topology_refresh_interval=10,
                           failover_timeout=3.0)
    provider.hidden = {cluster.primary.port}
    await pool.refresh_topology()
    before = pool.stats().refreshes
    results = await asyncio.gather(
        *(pool.execute("select 1", role="primary") for _ in range(10)),
        return_exceptions=True)
    assert all(isinstance(r, picopool.NoAvailableInstanceError) for r in results), results
    assert pool.stats().refreshes - before <= 12
