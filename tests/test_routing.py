"""Statement routing observed on real instances: one primary and two streaming replicas.

Which instance served a call is read from ``pool.stats()`` (each served statement
bumps exactly one instance's ``served`` counter) and, where a statement can say it,
from ``inet_server_port()``. Writes are also proven to have reached the primary by
succeeding: a replica would refuse them as read-only.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest

import picopool
from picopool.cluster import LocalCluster

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]
ClusterFactory = Callable[..., LocalCluster]
T = TypeVar("T")

S = "h6_routing"  # this module's schema on the shared cluster

SETUP = f"""
drop schema if exists {S} cascade;
create schema {S};
create table {S}.t (id int primary key, v text);
insert into {S}.t values (1, 'one'), (2, 'two');
create sequence {S}.seq start 1000;
create function {S}.my_writer() returns int language plpgsql as $$
begin
  insert into {S}.t values (nextval('{S}.seq'), 'written by my_writer');
  return inet_server_port();
end $$;
create function {S}.vol_fn() returns int language sql volatile as 'select 1';
create function {S}.stable_fn() returns int language sql stable as 'select 2';
create function {S}.immutable_fn() returns int language sql immutable as 'select 3';
"""


@pytest.fixture(scope="module")
def shared(cluster: LocalCluster) -> Iterator[LocalCluster]:
    """The session cluster with this module's schema replayed on every replica."""
    cluster.primary.sql(SETUP)
    cluster.wait_replayed()
    try:
        yield cluster
    finally:
        cluster.primary.sql(f"drop schema if exists {S} cascade")


def node_name(cluster: LocalCluster, port: int) -> str:
    if port == cluster.primary.port:
        return "primary"
    for index, replica in enumerate(cluster.replicas):
        if replica.port == port:
            return f"replica{index}"
    raise AssertionError(f"port {port} is not a node of {cluster}")


def served(pool: picopool.Pool) -> dict[int, int]:
    return {int(s.address.rsplit(":", 1)[1]): s.served for s in pool.stats().instances}


async def served_by(pool: picopool.Pool, cluster: LocalCluster,
                    call: Awaitable[T]) -> tuple[str, T]:
    """Run *call*; return the one node that served it, and its result."""
    before = served(pool)
    result = await call
    after = served(pool)
    moved = {port: after[port] - before.get(port, 0)
             for port in after if after[port] != before.get(port, 0)}
    assert list(moved.values()) == [1], f"expected one served statement, got {moved}"
    (port,) = moved
    return node_name(cluster, port), result


async def where(pool: picopool.Pool, cluster: LocalCluster, call: Awaitable[Any]) -> str:
    return (await served_by(pool, cluster, call))[0]


def instance_id(node_port: int) -> str:
    return f"127.0.0.1:{node_port}"


# -- the classifier's verdicts, on real servers -------------------------------------

READS = [
    "select inet_server_port()",
    f"select v from {S}.t where id = 1",
    "values (1), (2)",
    f"table {S}.t",
    "show work_mem",
    f"explain select * from {S}.t",
    f"with x as (select id from {S}.t) select count(*) from x",
]


@pytest.mark.parametrize("query", READS)
async def test_reads_go_to_replicas_round_robin(
    shared: LocalCluster, make_pool: PoolFactory, query: str
) -> None:
    pool = await make_pool(shared.dsn)
    servers = [await where(pool, shared, pool.fetch(query)) for _ in range(4)]
    assert sorted(servers) == ["replica0", "replica0", "replica1", "replica1"]
    assert servers[0] != servers[1]  # round robin alternates


async def test_read_reports_the_replica_port(shared: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(shared.dsn)
    ports = {await pool.fetchval("select inet_server_port()") for _ in range(4)}
    assert ports == {r.port for r in shared.replicas}
    assert await pool.fetchval("select pg_is_in_recovery()") is True


WRITES = [
    f"insert into {S}.t values (nextval('{S}.seq'), 'insert')",
    f"update {S}.t set v = 'updated' where id = 2",
    f"delete from {S}.t where id = -1",
    f"create table if not exists {S}.ddl (id int)",
    f"select id from {S}.t where id = 1 for update",
    f"select id from {S}.t where id = 1 for no key update",
    f"select id from {S}.t where id = 1 for share",
    f"select nextval('{S}.seq')",
    f"with w as (insert into {S}.t values (nextval('{S}.seq'), 'cte') returning id) "
    "select count(*) from w",
    f"insert into {S}.t values (nextval('{S}.seq'), 'multi'); select 1",
    f"select 1; update {S}.t set v = 'multi' where id = 2",
]


@pytest.mark.parametrize("query", WRITES)
async def test_writes_go_to_the_primary_and_succeed(
    shared: LocalCluster, make_pool: PoolFactory, query: str
) -> None:
    pool = await make_pool(shared.dsn)
    # Each of these fails on a replica (read-only transaction): success proves the
    # primary ran it; the counters say the same.
    for _ in range(3):
        assert await where(pool, shared, pool.execute(query)) == "primary"


async def test_write_forced_to_a_replica_fails(
    shared: LocalCluster, make_pool: PoolFactory
) -> None:
    """Control for the test above: the writes really would fail on a replica."""
    pool = await make_pool(shared.dsn)
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await pool.execute(f"insert into {S}.t values (nextval('{S}.seq'), 'x')", role="replica")
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await pool.fetch(f"select id from {S}.t for update", role="replica")


# -- read_write_split and fallback_to_primary ---------------------------------------


async def test_split_off_sends_everything_to_the_primary(
    shared: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(shared.dsn, read_write_split="off")
    for query in READS:
        assert await where(pool, shared, pool.fetch(query)) == "primary"
    assert {await pool.fetchval("select inet_server_port()") for _ in range(4)} == {
        shared.primary.port}
    async with pool.transaction(readonly=True) as con:
        assert await con.fetchval("select pg_is_in_recovery()") is False


async def test_split_include_primary_spreads_reads_over_every_instance(
    shared: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(shared.dsn, read_write_split="include_primary")
    servers = [await where(pool, shared, pool.fetchval("select 1")) for _ in range(6)]
    assert sorted(servers) == ["primary"] * 2 + ["replica0"] * 2 + ["replica1"] * 2
    # writes still go to the primary only
    for _ in range(3):
        assert await where(pool, shared, pool.execute(
            f"update {S}.t set v = 'ip' where id = 2")) == "primary"


async def test_unknown_split_is_a_configuration_error() -> None:
    with pytest.raises(picopool.ConfigurationError):
        picopool.create_pool("postgres://x@127.0.0.1:1/db", read_write_split="sometimes")


@pytest.fixture(scope="module")
def replicaless(cluster_factory: ClusterFactory) -> LocalCluster:
    """A private cluster whose only replica is stopped: reads have no replica."""
    private = cluster_factory(replicas=1)
    private.primary.sql("create table fb (id int)")
    private.wait_replayed()
    return private


async def test_fallback_when_the_replica_stops_under_a_running_pool(
    replicaless: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(replicaless.dsn, fallback_to_primary=True)
    assert await where(pool, replicaless, pool.fetchval("select 1")) == "replica0"
    replicaless.replicas[0].stop()
    # The pooled replica connection is dead now: the read is retried and falls back.
    for _ in range(5):
        assert await where(pool, replicaless, pool.fetchval("select 1")) == "primary"
    assert await pool.fetchval("select inet_server_port()") == replicaless.primary.port


async def test_fallback_to_primary_serves_reads_without_replicas(
    replicaless: LocalCluster, make_pool: PoolFactory
) -> None:
    replicaless.replicas[0].stop()  # no-op when the test above already stopped it
    pool = await make_pool(replicaless.dsn, fallback_to_primary=True, failover_timeout=1)
    assert [s.role for s in pool.stats().instances] == ["primary"]
    for query in ("select 1", "table fb", "show work_mem", "values (1)"):
        assert await where(pool, replicaless, pool.fetch(query)) == "primary"
    async with pool.acquire(role="prefer-replica") as con:
        assert await con.fetchval("select inet_server_port()") == replicaless.primary.port
    async with pool.transaction(readonly=True) as con:
        assert await con.fetchval("select pg_is_in_recovery()") is False


async def test_no_fallback_without_replicas_raises_fast(
    replicaless: LocalCluster, make_pool: PoolFactory
) -> None:
    replicaless.replicas[0].stop()
    pool = await make_pool(replicaless.dsn, fallback_to_primary=False, failover_timeout=1)
    started = time.monotonic()
    with pytest.raises(picopool.NoAvailableInstanceError):
        await pool.fetchval("select 1")
    assert time.monotonic() - started < 5
    with pytest.raises(picopool.NoAvailableInstanceError):
        await pool.acquire(role="replica")
    with pytest.raises(picopool.NoAvailableInstanceError):
        async with pool.transaction(readonly=True):
            pass
    # writes and explicit roles the primary can serve still work
    assert await where(pool, replicaless, pool.execute("insert into fb values (1)")) == "primary"
    assert await where(pool, replicaless, pool.fetchval("select 1", role="primary")) == "primary"
    assert await where(pool, replicaless, pool.fetchval("select 1", role="any")) == "primary"


# -- acquire() and transaction() ----------------------------------------------------


async def _acquired_port(pool: picopool.Pool, role: str | None) -> int:
    async with pool.acquire(role=role) as con:
        port: int = await con.fetchval("select inet_server_port()")
        return port


async def test_acquire_roles(shared: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(shared.dsn)
    primary = shared.primary.port
    replicas = {r.port for r in shared.replicas}
    assert {await _acquired_port(pool, None) for _ in range(3)} == {primary}
    assert {await _acquired_port(pool, "primary") for _ in range(3)} == {primary}
    assert {await _acquired_port(pool, "replica") for _ in range(4)} == replicas
    assert {await _acquired_port(pool, "prefer-replica") for _ in range(4)} == replicas
    assert {await _acquired_port(pool, "prefer_replica") for _ in range(4)} == replicas
    assert {await _acquired_port(pool, "any") for _ in range(6)} == replicas | {primary}
    # the served counter is bumped on release
    assert await where(pool, shared, _acquired_port(pool, None)) == "primary"
    with pytest.raises(picopool.ConfigurationError):
        pool.acquire(role="leader")


async def test_awaited_acquire_is_on_the_primary(
    shared: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(shared.dsn)
    con = await pool.acquire()
    try:
        assert await con.fetchval("select inet_server_port()") == shared.primary.port
    finally:
        await pool.release(con)


async def test_transactions(shared: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(shared.dsn)
    async with pool.transaction() as con:
        assert await con.fetchval("select pg_is_in_recovery()") is False
        await con.execute(f"insert into {S}.t values (nextval('{S}.seq'), 'tx')")
    for _ in range(2):
        async with pool.transaction(readonly=True) as con:
            assert await con.fetchval("select pg_is_in_recovery()") is True
            assert await con.fetchval("show transaction_read_only") == "on"
    ports = set()
    for _ in range(4):
        async with pool.transaction(readonly=True) as con:
            ports.add(await con.fetchval("select inet_server_port()"))
    assert ports == {r.port for r in shared.replicas}
    async with pool.transaction(readonly=True, role="primary") as con:
        assert await con.fetchval("select pg_is_in_recovery()") is False
    async with pool.transaction(role="replica", readonly=True) as con:
        assert await con.fetchval("select pg_is_in_recovery()") is True


# -- hints: per-call role > pool.route() > comment > router > classifier -------------


async def test_hint_priority(shared: LocalCluster, make_pool: PoolFactory) -> None:
    def router(query: str, guess: str) -> str | None:
        return "primary" if "h6-router" in query else None

    pool = await make_pool(shared.dsn, router=router)
    plain = "select 'h6-router'"
    start_hint = "/* picopool: role=replica */ select 'h6-router'"
    end_hint = "select 'h6-router' /* picopool: role=replica */"

    # the router beats the classifier
    assert await where(pool, shared, pool.fetchval(plain)) == "primary"
    # a comment at the start or the end beats the router
    for hinted in (start_hint, end_hint):
        assert (await where(pool, shared, pool.fetchval(hinted))).startswith("replica")
    # pool.route() beats the comment
    with pool.route("primary"):
        for hinted in (start_hint, end_hint):
            assert await where(pool, shared, pool.fetchval(hinted)) == "primary"
        # a per-call role beats pool.route()
        for hinted in (start_hint, end_hint, plain):
            assert (await where(pool, shared, pool.fetchval(hinted, role="replica"))
                    ).startswith("replica")
    # ...and the scope ends with the block
    for hinted in (start_hint, end_hint):
        assert (await where(pool, shared, pool.fetchval(hinted))).startswith("replica")


async def test_hint_comment_sends_a_read_to_the_primary(
    shared: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(shared.dsn)
    for query in ("/* picopool: role=primary */ select inet_server_port()",
                  "select inet_server_port() /* picopool: role=primary */",
                  "  /* PICOPOOL: Role=Primary */\nselect inet_server_port()"):
        assert await pool.fetchval(query) == shared.primary.port
    # a hint inside a string literal is no hint
    assert await where(pool, shared, pool.fetchval(
        "select '/* picopool: role=primary */'")) != "primary"
    # a malformed hint is ignored
    assert await where(pool, shared, pool.fetchval(
        "/* picopool: role=leader */ select 1")) != "primary"


async def test_route_scope_sends_reads_to_the_primary(
    shared: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(shared.dsn)
    with pool.route("primary"):
        assert await pool.fetchval("select inet_server_port()") == shared.primary.port
        with pool.route("replica"):
            assert await pool.fetchval("select pg_is_in_recovery()") is True
        assert await pool.fetchval("select inet_server_port()") == shared.primary.port
    with pool.route("replica"), pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await pool.execute(f"update {S}.t set v = 'x' where id = 2")
    with pytest.raises(picopool.ConfigurationError), pool.route("leader"):
        pass


async def test_instance_hint_and_router_instance(
    shared: LocalCluster, make_pool: PoolFactory
) -> None:
    target = shared.replicas[1]
    ids = {s.id for s in (await make_pool(shared.dsn)).stats().instances}
    assert instance_id(target.port) in ids  # Streaming instances are named by address

    def router(query: str, guess: str) -> str | None:
        if "h6-to-replica1" in query:
            return instance_id(target.port)
        if "h6-to-primary" in query:
            return instance_id(shared.primary.port)
        if "h6-as-role" in query:
            return "replica"
        return None

    pool = await make_pool(shared.dsn, router=router)
    for _ in range(4):  # pinned: no round robin
        assert await pool.fetchval("select inet_server_port(), 'h6-to-replica1'") == target.port
        assert await pool.fetchval(
            "select inet_server_port(), 'h6-to-primary'") == shared.primary.port
        assert await pool.fetchval(
            f"/* picopool: instance={instance_id(target.port)} */ select inet_server_port()"
        ) == target.port
    assert (await where(pool, shared, pool.fetchval("select 'h6-as-role'"))).startswith("replica")
    # an instance the topology does not have cannot serve
    lone = await make_pool(shared.dsn, failover_timeout=0.3)
    with pytest.raises(picopool.NoAvailableInstanceError):
        await lone.fetchval("/* picopool: instance=127.0.0.1:1 */ select 1")


async def test_router_sees_the_classifier_guess(
    shared: LocalCluster, make_pool: PoolFactory
) -> None:
    seen: list[tuple[str, str]] = []

    def router(query: str, guess: str) -> str | None:
        seen.append((query, guess))
        return None

    pool = await make_pool(shared.dsn, router=router)
    await pool.fetchval("select 1")
    await pool.execute(f"update {S}.t set v = 'r' where id = 2")
    assert seen == [("select 1", "prefer-replica"),
                    (f"update {S}.t set v = 'r' where id = 2", "primary")]


async def test_rewrite_hook_changes_the_statement(
    shared: LocalCluster, make_pool: PoolFactory
) -> None:
    def rewrite(query: str) -> str:
        if query.startswith("select 1 as a"):
            return query + ", 42 as extra"
        if "h6-lock-me" in query:
            return query + " for update"
        return query

    pool = await make_pool(shared.dsn, rewrite=rewrite)
    row = await pool.fetchrow("select 1 as a")
    assert dict(row) == {"a": 1, "extra": 42}
    # routing sees the rewritten statement: now a locking read, so the primary
    name, value = await served_by(pool, shared, pool.fetchval(
        f"select id from {S}.t where id = 1 and 'h6-lock-me' <> ''"))
    assert (name, value) == ("primary", 1)


async def test_write_functions(shared: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(shared.dsn, write_functions={"my_writer"})
    for _ in range(3):
        name, port = await served_by(pool, shared, pool.fetchval(f"select {S}.my_writer()"))
        assert (name, port) == ("primary", shared.primary.port)
    # case-insensitive, qualified or not
    upper = await make_pool(shared.dsn, write_functions={"MY_WRITER"})
    assert await upper.fetchval(f"select {S}.MY_WRITER()") == shared.primary.port
    # control: without the setting the call is a read and a replica refuses it
    plain = await make_pool(shared.dsn)
    with pytest.raises(asyncpg.ReadOnlySQLTransactionError):
        await plain.fetchval(f"select {S}.my_writer()")


async def test_check_function_volatility(shared: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(shared.dsn, check_function_volatility=True)
    for _ in range(2):
        assert await where(pool, shared, pool.fetchval(f"select {S}.vol_fn()")) == "primary"
        assert (await where(pool, shared, pool.fetchval(f"select {S}.stable_fn()"))
                ).startswith("replica")
        assert (await where(pool, shared, pool.fetchval(f"select {S}.immutable_fn()"))
                ).startswith("replica")
        # a volatile function that writes now succeeds with no write_functions
        assert await pool.fetchval(f"select {S}.my_writer()") == shared.primary.port
        # built-ins are not looked up: plain reads stay on replicas
        assert (await where(pool, shared, pool.fetchval("select lower('X')"))
                ).startswith("replica")
    # without the check a volatile function is a read
    plain = await make_pool(shared.dsn)
    assert (await where(pool=plain, cluster=shared, call=plain.fetchval(
        f"select {S}.vol_fn()"))).startswith("replica")


# -- volatile built-ins (defect 14) -------------------------------------------------

SERVER_LOCAL = [
    "select pg_current_wal_lsn()::text",  # fails on a replica
    "select pg_current_wal_insert_lsn()::text",  # fails on a replica
    "select pg_reload_conf()",  # would reload a random replica's configuration
    "select pg_terminate_backend(0)",  # would act on a random replica ("not a backend")
    "select pg_stat_reset()",  # would reset a random replica's statistics
]


@pytest.mark.parametrize("query", SERVER_LOCAL)
async def test_volatile_built_ins_go_to_the_primary(
    shared: LocalCluster, make_pool: PoolFactory, query: str
) -> None:
    pool = await make_pool(shared.dsn)
    for _ in range(3):
        assert await where(pool, shared, pool.fetchval(query)) == "primary"


async def test_copy_to_a_server_file_or_program_goes_to_the_primary(
    shared: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(shared.dsn)
    target = f"/tmp/picopool-h6-copy-{time.monotonic_ns()}.csv"
    try:
        assert await where(pool, shared, pool.execute(
            f"COPY {S}.t TO '{target}' (FORMAT csv)")) == "primary"
        assert await where(pool, shared, pool.execute(
            f"COPY (SELECT * FROM {S}.t) TO PROGRAM 'cat > /dev/null'")) == "primary"
    finally:
        with contextlib.suppress(FileNotFoundError):  # the server wrote it, on this machine
            os.unlink(target)
    # COPY ... TO STDOUT still reads on a replica
    assert (await where(pool, shared, pool.copy_from_query(
        f"SELECT * FROM {S}.t", output=_ignore))).startswith("replica")


async def _ignore(data: bytes) -> None:
    return None


@pytest.mark.parametrize("query", [
    "select now()",
    "select lower('x')",
    f"select count(*) from {S}.t",
    "select random(), clock_timestamp(), pg_is_in_recovery()",
    f"select pg_relation_size('{S}.t')",
])
async def test_stable_and_allowed_built_ins_stay_on_replicas(
    shared: LocalCluster, make_pool: PoolFactory, query: str
) -> None:
    pool = await make_pool(shared.dsn)
    servers = [await where(pool, shared, pool.fetchval(query)) for _ in range(4)]
    assert sorted(servers) == ["replica0", "replica0", "replica1", "replica1"]
