"""picopool.Pool against real PostgreSQL clusters.

Tests on the shared session ``cluster`` only read it or create their own tables.
Tests that stop, kill or promote nodes get a private cluster from ``cluster_factory``.
"""

from __future__ import annotations

import asyncio
import io
import logging
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import pytest

import picopool
from picopool import (
    ConfigurationError,
    Instance,
    NoAvailableInstanceError,
    PoolClosedError,
    Role,
    TopologyError,
)
from picopool.cluster import LocalCluster, LocalNode
from picopool.discovery import (
    Discovered,
    DiscoveryContext,
    DiscoveryProvider,
    Static,
    Streaming,
)
from picopool.strategies import Candidate

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]
ClusterFactory = Callable[..., LocalCluster]

PASSWORD = "secret"
PORT_QUERY = "select inet_server_port()"


# -- helpers -----------------------------------------------------------------------


def with_password(dsn: str, password: str = PASSWORD) -> str:
    """``postgres://user@hosts/db`` -> ``postgres://user:password@hosts/db``.

    For DSNs of closed ports, to prove the password never leaks. The clusters'
    DSNs already carry their real password (``cluster.password``).
    """
    scheme, rest = dsn.split("://", 1)
    user, hosts = rest.split("@", 1)
    return f"{scheme}://{user}:{password}@{hosts}"


def closed_port() -> int:
    """A loopback port nobody listens on."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def ports(instances: Sequence[Instance]) -> set[int]:
    return {i.address.port for i in instances}


def stats_ports(pool: picopool.Pool) -> set[int]:
    return {int(s.address.rsplit(":", 1)[1]) for s in pool.stats().instances}


def topology_ports(pool: picopool.Pool, role: Role | None = None) -> set[int]:
    topology = pool.topology
    assert topology is not None
    return ports([i for i in topology.instances if role is None or i.role is role])


async def eventually(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Wait until ``condition()`` holds; return how long it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def picopool_tasks() -> list[asyncio.Task[Any]]:
    """Pending tasks running picopool code (other than the caller)."""
    current = asyncio.current_task()
    found = []
    for task in asyncio.all_tasks():
        if task is current or task.done():
            continue
        code = getattr(task.get_coro(), "cr_code", None)
        if code is not None and "picopool" in code.co_filename:
            found.append(task)
    return found


@pytest.fixture
async def table(cluster: LocalCluster) -> AsyncIterator[str]:
    """A fresh table ``(id int primary key, note text)`` on the shared cluster."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    await asyncio.to_thread(cluster.primary.sql,
                            f"create table {name} (id int primary key, note text)")
    try:
        yield name
    finally:
        await asyncio.to_thread(cluster.primary.sql, f"drop table if exists {name}")


# -- discovery and routing -------------------------------------------------------------


async def test_discovers_primary_and_replicas(cluster: LocalCluster,
                                              pool: picopool.Pool) -> None:
    topology = pool.topology
    assert topology is not None
    assert topology.provider == "streaming"  # auto-detected for plain PostgreSQL
    assert topology.primary is not None
    assert topology.primary.address.port == cluster.primary.port
    assert ports(topology.replicas) == {r.port for r in cluster.replicas}
    assert len(topology.instances) == 3
    assert pool.stats().provider == "streaming"
    assert {s.role for s in pool.stats().instances} == {"primary", "replica"}


async def test_queries_run_on_the_primary(cluster: LocalCluster, pool: picopool.Pool,
                                          table: str) -> None:
    primary = cluster.primary.port
    assert await pool.execute(f"insert into {table} values (1, 'one')") == "INSERT 0 1"
    await pool.executemany(f"insert into {table} values ($1, $2)", [(2, "two"), (3, "three")])
    row = await pool.fetchrow(
        f"insert into {table} values (4, 'four') returning id, inet_server_port() as port")
    assert row is not None and (row["id"], row["port"]) == (4, primary)
    rows = await pool.fetchmany(
        f"insert into {table} values ($1, $2) returning inet_server_port()",
        [(5, "five"), (6, "six")])
    assert [r[0] for r in rows] == [primary, primary]
    assert await pool.copy_records_to_table(table, records=[(7, "seven")]) == "COPY 1"
    assert await pool.copy_to_table(table, source=io.BytesIO(b"8\teight\n9\tnine\n")) == "COPY 2"

    # Reads go where they are told; with role="primary" they see every write at once.
    assert await pool.fetchval(PORT_QUERY, role="primary") == primary
    fetched = await pool.fetch(f"select id, inet_server_port() from {table} order by id",
                               role="primary")
    assert [r[0] for r in fetched] == list(range(1, 10))
    assert {r[1] for r in fetched} == {primary}
    assert await pool.fetchval(f"select note from {table} where id = $1", 8,
                               role="primary") == "eight"
    out = io.BytesIO()
    await pool.copy_from_table(table, output=out, columns=["id"], role="primary")
    assert out.getvalue().split() == [str(i).encode() for i in range(1, 10)]
    out = io.BytesIO()
    await pool.copy_from_query("select inet_server_port(), $1::int", 5, output=out,
                               role="primary")
    assert out.getvalue() == f"{primary}\t5\n".encode()
    # Without a role a read lands on some instance of the cluster.
    assert await pool.fetchval(PORT_QUERY) in {n.port for n in cluster.nodes}


async def test_acquire_gives_an_asyncpg_connection(cluster: LocalCluster, pool: picopool.Pool,
                                                   table: str) -> None:
    async with pool.acquire() as connection:
        assert isinstance(connection, asyncpg.pool.PoolConnectionProxy)
        assert await connection.fetchval(PORT_QUERY) == cluster.primary.port
        async with connection.transaction():
            await connection.execute(f"insert into {table} values (1, 'kept')")
        with pytest.raises(RuntimeError):
            async with connection.transaction():
                await connection.execute(f"insert into {table} values (2, 'rolled back')")
                raise RuntimeError("roll back")
    assert await pool.fetchval(f"select array_agg(id) from {table}", role="primary") == [1]

    connection = await pool.acquire(timeout=5)
    await pool.release(connection)
    await pool.release(connection)  # twice: a no-op, as in asyncpg


async def test_replica_connections_round_robin(cluster: LocalCluster,
                                               pool: picopool.Pool) -> None:
    seen = []
    for _ in range(4):
        async with pool.acquire(role="replica") as connection:
            assert await connection.fetchval("select pg_is_in_recovery()") is True
            seen.append(await connection.fetchval(PORT_QUERY))
    assert set(seen) == {r.port for r in cluster.replicas}
    assert seen[0] != seen[1] and seen[0] == seen[2] and seen[1] == seen[3]


async def test_sizes_sum_over_instances(pool: picopool.Pool) -> None:
    # 3 instances, min_size=1, max_size=2 each.
    assert pool.get_min_size() == 3
    assert pool.get_max_size() == 6
    assert pool.get_size() == 3
    assert pool.get_idle_size() == 3
    assert pool.get_size() == sum(s.size for s in pool.stats().instances)
    first = await pool.acquire()
    second = await pool.acquire()
    try:
        assert pool.get_size() == 4  # the primary's sub-pool grew to 2
        assert pool.get_idle_size() == 2
        primary = next(s for s in pool.stats().instances if s.role == "primary")
        assert (primary.size, primary.in_use, primary.idle) == (2, 2, 0)
    finally:
        await pool.release(first)
        await pool.release(second)
    assert pool.get_idle_size() == pool.get_size() == 4


async def test_expire_connections(pool: picopool.Pool) -> None:
    async def primary_pids() -> set[int]:
        connections = [await pool.acquire(), await pool.acquire()]
        try:
            return {c.get_server_pid() for c in connections}
        finally:
            for c in connections:
                await pool.release(c)

    before = await primary_pids()
    assert await primary_pids() == before  # pooled: the same backends
    await pool.expire_connections()
    after = await primary_pids()
    assert not before & after


async def test_set_connect_args(cluster: LocalCluster, pool: picopool.Pool) -> None:
    pool.set_connect_args(cluster.dsn, server_settings={"application_name": "pp-reconfigured"})
    await pool.expire_connections()
    for role in ("primary", "replica", "replica"):
        async with pool.acquire(role=role) as connection:
            name = await connection.fetchval("select current_setting('application_name')")
            assert name == "pp-reconfigured"


async def test_set_connect_args_keeps_the_connect_timeout(cluster: LocalCluster,
                                                          make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, connect_timeout=1.5)
    pool.set_connect_args(cluster.dsn)
    for member in pool._membership.members.values():
        assert member.pool._connect_kwargs.get("timeout") == 1.5


async def test_terminate(pool: picopool.Pool) -> None:
    assert await pool.fetchval("select 1") == 1
    pool.terminate()
    assert pool.is_closing()
    assert repr(pool).startswith("<picopool.Pool closed")
    with pytest.raises(PoolClosedError):
        await pool.fetchval("select 1")
    await asyncio.sleep(0)  # let the cancelled poller finish
    await asyncio.sleep(0)
    assert picopool_tasks() == []


async def test_closed_pool_refuses_work(pool: picopool.Pool) -> None:
    await pool.close()
    await pool.close()  # idempotent
    assert pool.is_closing()
    for call in (lambda: pool.fetchval("select 1"), lambda: pool.execute("select 1"),
                 lambda: pool.fetch("select 1", role="replica"), pool.acquire):
        with pytest.raises(PoolClosedError) as info:
            await call()
        assert isinstance(info.value, asyncpg.InterfaceError)
    with pytest.raises(PoolClosedError):
        async with pool.acquire():
            pass


async def test_close_waits_for_checked_out_connections(pool: picopool.Pool) -> None:
    connection = await pool.acquire()
    closing = asyncio.ensure_future(pool.close())
    await asyncio.sleep(0.2)
    assert not closing.done()  # graceful: waits for the connection, as asyncpg does
    assert await connection.fetchval("select 1") == 1
    await pool.release(connection)
    await asyncio.wait_for(closing, 5)


async def test_static_discovery(cluster: LocalCluster, make_pool: PoolFactory) -> None:
    single = await make_pool(cluster.primary.dsn, discovery=Static())
    topology = single.topology
    assert topology is not None and topology.provider == "static"
    assert [(i.address.port, i.role) for i in topology.instances] == [
        (cluster.primary.port, Role.UNKNOWN)]
    assert await single.fetchval(PORT_QUERY) == cluster.primary.port

    everyone = await make_pool(
        cluster.dsn, discovery=Static([f"127.0.0.1:{n.port}" for n in cluster.nodes]))
    seen = []
    for _ in range(3):
        async with everyone.acquire(role="any") as connection:
            seen.append(await connection.fetchval(PORT_QUERY))
    assert sorted(seen) == sorted(n.port for n in cluster.nodes)


async def test_refresh_without_poller(cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, topology_refresh_interval=None)
    first = pool.topology
    assert first is not None
    refreshed = await pool.refresh_topology()
    assert refreshed.instances == first.instances
    assert refreshed.version == first.version  # nothing changed: same snapshot version
    assert pool.stats().refreshes >= 2
    assert await pool.fetchval("select 1") == 1


async def test_no_task_outlives_close(cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, topology_refresh_interval=0.05)
    await pool.fetchval("select 1")
    async with pool.acquire(role="replica") as connection:
        await connection.fetchval("select 1")
    await asyncio.sleep(0.2)  # the poller refreshes a few times
    assert pool.stats().refreshes > 1
    assert picopool_tasks(), "the poller should be running"
    await pool.close()
    await asyncio.sleep(0)  # tasks cancelled during close() finish on the next step
    assert picopool_tasks() == []


async def test_repr_and_logs_mask_the_password(cluster: LocalCluster, make_pool: PoolFactory,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    # One seed is a closed port, so the failure paths log too.
    password = cluster.password  # the DSN's, checked by the servers
    dsn = cluster.dsn.replace("@", f"@127.0.0.1:{closed_port()},", 1)
    assert password in dsn
    pool = picopool.create_pool(dsn, min_size=1, max_size=2, topology_refresh_interval=0.05)
    assert password not in repr(pool)
    await pool
    try:
        text = repr(pool)
        assert text.startswith("<picopool.Pool ready") and "***" in text
        assert password not in text
        await pool.fetchval("select 1")
        await pool.fetchval("select 1", role="replica")
        await asyncio.sleep(0.2)
        assert password not in repr(pool.stats()) and password not in repr(pool.topology)
    finally:
        await pool.close()
    assert password not in repr(pool) and "closed" in repr(pool)
    assert caplog.records, "expected picopool to log something"
    assert password not in caplog.text


# -- balancing ---------------------------------------------------------------------


class PickLast:
    """A user strategy: a plain class with pick(), no picopool base class."""

    def __init__(self) -> None:
        self.calls = 0

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        self.calls += 1
        return candidates[-1]


async def test_user_defined_strategy(cluster: LocalCluster, make_pool: PoolFactory) -> None:
    strategy = PickLast()
    pool = await make_pool(cluster.dsn, strategy=strategy)
    topology = pool.topology
    assert topology is not None
    last_replica = topology.replicas[-1].address.port
    for _ in range(4):
        async with pool.acquire(role="replica") as connection:
            assert await connection.fetchval(PORT_QUERY) == last_replica
    assert strategy.calls >= 4
    with pytest.raises(ConfigurationError):
        picopool.create_pool(cluster.dsn, strategy=object())  # type: ignore[arg-type]


# -- draining: an instance leaves while a connection to it is in use ----------------


class Hiding(DiscoveryProvider):
    """Streaming discovery that can pretend instances are gone, with their server up."""

    name = "hiding"

    def __init__(self) -> None:
        self.inner = Streaming()
        self.hidden: set[int] = set()

    async def discover(self, ctx: DiscoveryContext) -> Discovered:
        found = await self.inner.discover(ctx)
        return Discovered(tuple(i for i in found.instances if i.address.port not in self.hidden),
                          found.symmetric)


async def test_removed_instance_drains_after_in_flight_work(cluster: LocalCluster,
                                                            make_pool: PoolFactory) -> None:
    provider = Hiding()
    pool = await make_pool(cluster.dsn, discovery=provider, topology_refresh_interval=None)
    connection = await pool.acquire(role="replica")
    port = await connection.fetchval(PORT_QUERY)
    other = ({r.port for r in cluster.replicas} - {port}).pop()
    in_flight = asyncio.ensure_future(connection.fetchval("select pg_sleep(0.5), 42", column=1))
    await asyncio.sleep(0.05)

    provider.hidden.add(port)
    await pool.refresh_topology()
    assert port not in topology_ports(pool)
    assert port not in stats_ports(pool)  # no longer routed to or listed
    assert pool.stats().draining == 1
    for _ in range(3):
        async with pool.acquire(role="replica") as replica:
            assert await replica.fetchval(PORT_QUERY) == other

    assert await in_flight == 42  # the drain let the running statement finish
    assert await connection.fetchval(PORT_QUERY) == port  # still usable until released
    await pool.release(connection)
    await eventually(lambda: pool.stats().draining == 0, 5, "the drained sub-pool to close")

    provider.hidden.clear()
    await pool.refresh_topology()
    assert port in stats_ports(pool)
    seen = set()
    for _ in range(2):
        async with pool.acquire(role="replica") as replica:
            seen.add(await replica.fetchval(PORT_QUERY))
    assert seen == {port, other}


# -- topology changes (private clusters) ----------------------------------------------


async def test_stopped_replica_leaves_and_returns(cluster_factory: ClusterFactory,
                                                  make_pool: PoolFactory) -> None:
    private = await asyncio.to_thread(cluster_factory)
    interval = 0.3
    pool = await make_pool(private.dsn, topology_refresh_interval=interval)
    stopped: LocalNode = private.replicas[1]
    remaining: LocalNode = private.replicas[0]
    assert stopped.port in stats_ports(pool)

    await asyncio.to_thread(stopped.stop)
    took = await eventually(lambda: stopped.port not in topology_ports(pool), 5,
                            "the stopped replica to leave the topology")
    assert took < 2 * interval + 1.0  # ~1-2 poll intervals, with slack for a busy CI box
    assert stopped.port not in stats_ports(pool)
    await eventually(lambda: pool.stats().draining == 0, 5, "its sub-pool to be drained")
    for _ in range(3):  # reads keep working on the other replica
        assert await pool.fetchval(PORT_QUERY, role="replica") == remaining.port
    assert await pool.fetchval(PORT_QUERY, role="primary") == private.primary.port

    await asyncio.to_thread(stopped.start)
    took = await eventually(lambda: stopped.port in topology_ports(pool, Role.REPLICA), 5,
                            "the restarted replica to come back")
    assert took < 2 * interval + 1.0
    seen = {await pool.fetchval(PORT_QUERY, role="replica") for _ in range(4)}
    assert seen == {stopped.port, remaining.port}


async def test_failover_writes_resume(cluster_factory: ClusterFactory,
                                      make_pool: PoolFactory) -> None:
    private = await asyncio.to_thread(cluster_factory)
    pool = await make_pool(private.dsn, topology_refresh_interval=0.3)
    old = private.primary
    await pool.execute("create table failover_log (id int primary key)")
    assert await pool.fetchval("insert into failover_log values (0) returning inet_server_port()"
                               ) == old.port
    await asyncio.to_thread(private.wait_replayed)  # asynchronous replication: no loss

    new = await asyncio.to_thread(private.failover)
    started = time.monotonic()
    errors: list[str] = []
    next_id = 1
    while True:
        try:
            port = await pool.fetchval(
                "insert into failover_log values ($1) returning inet_server_port()", next_id)
            break
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
            if time.monotonic() - started > 15:
                pytest.fail("writes did not resume after failover: " + "; ".join(errors[-5:]))
            next_id += 1
            await asyncio.sleep(0.05)
    assert port == new.port
    assert time.monotonic() - started < 10
    topology = pool.topology
    assert topology is not None and topology.primary is not None
    assert topology.primary.address.port == new.port
    await eventually(lambda: old.port not in topology_ports(pool), 5, "the old primary to leave")
    assert await pool.fetchval("select count(*) from failover_log", role="primary") >= 2


def stop_all(cluster: LocalCluster) -> None:
    for node in cluster.nodes:
        node.stop()


def _assert_names_no_password(exc: BaseException, password: str = PASSWORD) -> None:
    assert password not in str(exc)
    assert password not in repr(exc)


async def test_every_instance_down_fails_fast(cluster_factory: ClusterFactory,
                                              make_pool: PoolFactory) -> None:
    private = await asyncio.to_thread(cluster_factory)
    pool = await make_pool(private.dsn, topology_refresh_interval=0.3,
                           failover_timeout=2.0)
    assert await pool.fetchval("select 1") == 1
    await asyncio.to_thread(stop_all, private)

    started = time.monotonic()
    with pytest.raises(NoAvailableInstanceError) as acquired:
        async with asyncio.timeout(10), pool.acquire(timeout=2):
            pass
    assert time.monotonic() - started < 2 + 2
    _assert_names_no_password(acquired.value, private.password)

    started = time.monotonic()
    with pytest.raises(NoAvailableInstanceError) as fetched:
        async with asyncio.timeout(10):
            await pool.fetchval("select 1")
    assert time.monotonic() - started < 2 + 2  # failover_timeout bounds pool-level calls
    _assert_names_no_password(fetched.value, private.password)


async def test_every_instance_down_error_names_each_instance(
        cluster_factory: ClusterFactory, make_pool: PoolFactory) -> None:
    private = await asyncio.to_thread(cluster_factory)
    pool = await make_pool(private.dsn, topology_refresh_interval=None,
                           failover_timeout=2.0)
    await asyncio.to_thread(stop_all, private)
    with pytest.raises(TopologyError):  # the fix: keep the last good topology
        await pool.refresh_topology()
    with pytest.raises(NoAvailableInstanceError) as info:
        async with asyncio.timeout(10), pool.acquire(timeout=2):
            pass
    message = str(info.value)
    for node in private.nodes:
        assert f"127.0.0.1:{node.port}" in message, message
    _assert_names_no_password(info.value, private.password)


async def test_create_pool_with_closed_ports_fails_fast() -> None:
    dsn = with_password(f"postgres://postgres@127.0.0.1:{closed_port()},"
                        f"127.0.0.1:{closed_port()}/postgres")
    for discovery in (None, Static()):
        pool = picopool.create_pool(dsn, discovery=discovery, min_size=1, max_size=1)
        started = time.monotonic()
        try:
            with pytest.raises((TopologyError, NoAvailableInstanceError)) as info:
                async with asyncio.timeout(10):
                    await pool
        finally:
            await pool.close()
        assert time.monotonic() - started < 5
        _assert_names_no_password(info.value)


async def test_create_pool_with_closed_ports_fails_with_explicit_streaming() -> None:
    dsn = f"postgres://postgres@127.0.0.1:{closed_port()},127.0.0.1:{closed_port()}/postgres"
    pool = picopool.create_pool(dsn, discovery=Streaming(), min_size=1, max_size=1)
    try:
        with pytest.raises((TopologyError, NoAvailableInstanceError)):
            async with asyncio.timeout(10):
                await pool
    finally:
        await pool.close()


@pytest.mark.parametrize("dsn", ["garbage", "not a dsn at all", "host=a,b port=1,2,3"])
async def test_garbage_dsn_is_a_configuration_error(dsn: str) -> None:
    with pytest.raises(ConfigurationError):
        await picopool.create_pool(dsn)


@pytest.mark.parametrize("options", [{"min_size": 3, "max_size": 2}, {"max_size": 0},
                                     {"topology_refresh_interval": 0},
                                     {"health_check_interval": -1}])
async def test_bad_options_are_configuration_errors(options: dict[str, Any]) -> None:
    with pytest.raises(ConfigurationError):
        await picopool.create_pool("postgres://u@h/db", **options)


async def test_unknown_role_is_a_configuration_error(pool: picopool.Pool) -> None:
    with pytest.raises(ConfigurationError):
        await pool.fetchval("select 1", role="leader")
    with pytest.raises(ConfigurationError):
        pool.acquire(role="leader")


async def test_bad_port_in_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError):
        await picopool.create_pool("postgres://u@h:notaport/db")


async def test_key_value_dsn_works_end_to_end(cluster: LocalCluster,
                                              make_pool: PoolFactory) -> None:
    hosts = ",".join("127.0.0.1" for _ in cluster.nodes)
    port_list = ",".join(str(n.port) for n in cluster.nodes)
    pool = await make_pool(f"host={hosts} port={port_list} user=postgres dbname=postgres "
                           f"password={cluster.password}")
    assert await pool.fetchval(PORT_QUERY, role="primary") == cluster.primary.port


async def test_released_connections_leave_no_trace(cluster: LocalCluster,
                                                   make_pool: PoolFactory) -> None:
    """Connections asyncpg closes on release (here: max_queries) leave no trace behind."""
    pool = await make_pool(cluster.dsn, max_size=1, max_queries=2)
    for _ in range(6):
        assert await pool.fetchval("select 1", role="primary") == 1
    assert not any(m.inflight or m.acquiring for m in pool._membership.members.values())


async def test_joined_instance_is_routed_as_soon_as_it_is_in_the_topology(
        cluster: LocalCluster, make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The topology is published before the refresh's lag measurement ends; reads
    that see the new topology must also be able to reach the new instance."""
    provider = Hiding()
    pool = await make_pool(cluster.dsn, discovery=provider, topology_refresh_interval=None)
    hidden, shown = (r.port for r in cluster.replicas)
    provider.hidden.add(hidden)
    await pool.refresh_topology()
    assert await pool.fetchval(PORT_QUERY, role="replica") == shown  # candidates now cached

    measuring = asyncio.Event()
    release = asyncio.Event()

    async def slow_measure(topology: picopool.Topology) -> None:
        measuring.set()
        await release.wait()  # a slow replica under load

    monkeypatch.setattr(pool._membership, "measure_lag", slow_measure)
    provider.hidden.clear()
    refresh = asyncio.ensure_future(pool.refresh_topology())
    try:
        await asyncio.wait_for(measuring.wait(), 10)
        assert hidden in topology_ports(pool, Role.REPLICA)
        seen = {await pool.fetchval(PORT_QUERY, role="replica") for _ in range(2)}
        assert seen == {hidden, shown}
    finally:
        release.set()
        await refresh
