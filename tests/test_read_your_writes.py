"""Read-your-writes on a real cluster whose replicas apply WAL 500 ms late.

Without a causal scope a read right after a write lands on a replica that has not
applied it yet; inside ``pool.read_your_writes()`` (or with ``read_your_writes=True``)
every read must see every earlier write, served by a caught-up replica or else by
the primary. The counts of reads each kind of instance served are printed (``-s``)
and attached to the test report as user properties.
"""

from __future__ import annotations

import asyncio
import collections
import io
import itertools
import time
from collections.abc import Awaitable, Callable

import pytest

import picopool
from picopool.cluster import LocalCluster
from picopool.discovery import Streaming

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]
ClusterFactory = Callable[..., LocalCluster]

APPLY_DELAY = "500ms"
READ = "select count(*), inet_server_port() from t where id = $1"
COUNT = "select count(*) from t where id = $1"
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def delayed(cluster_factory: ClusterFactory) -> LocalCluster:
    """A primary and two replicas, both applying commits 500 ms late."""
    private = cluster_factory(replicas=2, apply_delay=APPLY_DELAY)
    assert all(r.sql("show recovery_min_apply_delay") == APPLY_DELAY for r in private.replicas)
    private.primary.sql(
        "create table t (id int primary key);"
        "create function undeclared_writer(i int) returns int language plpgsql as "
        "$$ begin insert into t values (i); return i; end $$;"
    )
    private.wait_replayed()
    return private


class Tally:
    """Which kind of instance served the checked reads."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.replica_ports = {r.port for r in cluster.replicas}
        self.primary_port = cluster.primary.port
        self.counts: collections.Counter[str] = collections.Counter()
        self.misses = 0

    def saw(self, count: int, port: int) -> None:
        if count != 1:
            self.misses += 1
        assert port in self.replica_ports | {self.primary_port}
        self.counts["replica" if port in self.replica_ports else "primary"] += 1

    def report(self, label: str, record: Callable[[str, object], None]) -> None:
        print(f"\n{label}: {self.counts['replica']} reads on replicas, "
              f"{self.counts['primary']} on the primary, {self.misses} missed their write")
        record(f"{label}_replica_reads", self.counts["replica"])
        record(f"{label}_primary_reads", self.counts["primary"])


async def cycle(pool: picopool.Pool, tally: Tally) -> None:
    """Insert a new id, then read it back."""
    new_id = next(_ids)
    await pool.execute("insert into t values ($1)", new_id)
    row = await pool.fetchrow(READ, new_id)
    tally.saw(row[0], row[1])


async def test_without_a_scope_a_replica_misses_the_write(
    delayed: LocalCluster, make_pool: PoolFactory
) -> None:
    """The control: the cluster really is lagging, so the tests below mean something."""
    pool = await make_pool(delayed.dsn)
    tally = Tally(delayed)
    for _ in range(3):
        await cycle(pool, tally)
    assert tally.counts == {"replica": 3}
    assert tally.misses == 3


async def test_without_replicas_causal_reads_go_straight_to_the_primary(
    delayed: LocalCluster, make_pool: PoolFactory
) -> None:
    """No replica can serve: reads in scope neither wait ``causal_wait`` for one nor
    ask for topology refreshes."""
    primary = delayed.primary
    pool = await make_pool(delayed.dsn, discovery=Streaming([f"{primary.host}:{primary.port}"]),
                           topology_refresh_interval=None, causal_wait=5.0)
    refreshes = pool.stats().refreshes
    tally = Tally(delayed)
    started = time.monotonic()
    async with pool.read_your_writes():
        for _ in range(5):
            await cycle(pool, tally)
    assert tally.counts == {"primary": 5}
    assert tally.misses == 0
    assert time.monotonic() - started < 5  # never waited causal_wait for a replica
    await asyncio.sleep(0.2)  # a refresh asked for would have run by now
    assert pool.stats().refreshes == refreshes


async def test_500_sequential_cycles_in_one_scope(
    delayed: LocalCluster, make_pool: PoolFactory, record_property: Callable[[str, object], None]
) -> None:
    # causal_wait far below the apply delay: every read gives up on the replicas
    # quickly and must then go to the primary.
    pool = await make_pool(delayed.dsn, causal_wait=0.005)
    tally = Tally(delayed)
    started = time.monotonic()
    async with pool.read_your_writes():
        for _ in range(500):
            await cycle(pool, tally)
    tally.report("sequential", record_property)
    assert tally.misses == 0
    assert sum(tally.counts.values()) == 500
    assert time.monotonic() - started < 30


async def test_500_concurrent_cycles_each_in_its_scope(
    delayed: LocalCluster, make_pool: PoolFactory, record_property: Callable[[str, object], None]
) -> None:
    # causal_wait above the apply delay: reads wait for a replica to catch up.
    # Sub-pools are big enough that no replica acquire has to wait.
    workers, cycles = 25, 20
    pool = await make_pool(delayed.dsn, causal_wait=1.5, min_size=workers + 2,
                           max_size=workers + 2)
    tally = Tally(delayed)

    async def worker() -> None:
        for _ in range(cycles):
            async with pool.read_your_writes():
                await cycle(pool, tally)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(workers)))
    tally.report("concurrent", record_property)
    assert tally.misses == 0
    assert sum(tally.counts.values()) == workers * cycles
    assert tally.counts["replica"] > 0  # waiting for replay is what causal_wait is for
    assert time.monotonic() - started < 40


async def test_pool_wide_read_your_writes(
    delayed: LocalCluster, make_pool: PoolFactory, record_property: Callable[[str, object], None]
) -> None:
    workers, cycles = 10, 10
    pool = await make_pool(delayed.dsn, read_your_writes=True, causal_wait=1.5,
                           min_size=workers + 2, max_size=workers + 2)
    tally = Tally(delayed)

    async def worker() -> None:
        for _ in range(cycles):
            await cycle(pool, tally)

    await asyncio.gather(*(worker() for _ in range(workers)))
    tally.report("pool_wide", record_property)
    assert tally.misses == 0
    assert sum(tally.counts.values()) == workers * cycles
    # and it is a pool-wide property: no scope needed, nothing to carry
    sequential = await make_pool(delayed.dsn, read_your_writes=True, causal_wait=0.005)
    tally = Tally(delayed)
    for _ in range(20):
        await cycle(sequential, tally)
    assert tally.misses == 0


async def test_token_carries_the_position_to_a_fresh_scope_and_pool(
    delayed: LocalCluster, make_pool: PoolFactory
) -> None:
    writer = await make_pool(delayed.dsn)
    reader = await make_pool(delayed.dsn)
    for _ in range(3):
        new_id = next(_ids)
        async with writer.read_your_writes() as scope:
            assert scope.token() == writer.causal_token() == "pp1:0/0"
            await writer.execute("insert into t values ($1)", new_id)
            token = scope.token()
            assert writer.causal_token() == token
        assert token.startswith("pp1:") and token != "pp1:0/0"
        async with reader.read_your_writes(token=token) as fresh:
            assert fresh.token() == token
            assert await reader.fetchval(COUNT, new_id) == 1
    # the token's position is not a write of the fresh scope's own, but it is kept
    async with reader.read_your_writes(token=token) as fresh:
        await reader.fetchval("select 1")
        assert fresh.token() == token


async def test_nested_scopes_share_positions(delayed: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(delayed.dsn, causal_wait=0.005)
    new_id = next(_ids)
    async with pool.read_your_writes() as outer:
        async with pool.read_your_writes() as inner:
            await pool.execute("insert into t values ($1)", new_id)
        assert outer.token() == inner.token() != "pp1:0/0"
        assert await pool.fetchval(COUNT, new_id) == 1


@pytest.mark.parametrize("token", ["garbage", "pp1:zz/zz", "pp1:16", "pp1:1/2/3", "pp2:0/16",
                                   " pp1:0/16", "PP1:0/16"])
async def test_garbage_token_is_a_configuration_error(
    delayed: LocalCluster, make_pool: PoolFactory, token: str
) -> None:
    pool = await make_pool(delayed.dsn)
    with pytest.raises(picopool.ConfigurationError):
        async with pool.read_your_writes(token=token):
            pass
    with pytest.raises(ValueError):  # ConfigurationError is a ValueError, too
        async with pool.read_your_writes(token=token):
            pass


async def test_no_write_in_scope_reads_from_caught_up_replicas(
    delayed: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(delayed.dsn, causal_wait=0.005)
    await pool.execute("insert into t values ($1)", next(_ids))  # outside any scope
    await asyncio.to_thread(delayed.wait_replayed)
    tally = Tally(delayed)
    async with pool.read_your_writes():
        for _ in range(10):
            row = await pool.fetchrow("select 1, inet_server_port()")
            tally.saw(row[0], row[1])
    assert tally.counts == {"replica": 10}
    served = {int(s.address.rsplit(":", 1)[1]) for s in pool.stats().instances
              if s.role == "replica" and s.served > 0}
    assert served == tally.replica_ports  # round robin over both


async def test_pool_wide_reads_use_replicas_once_they_caught_up(
    delayed: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(delayed.dsn, read_your_writes=True, causal_wait=0.005)
    new_id = next(_ids)
    await pool.execute("insert into t values ($1)", new_id)
    await asyncio.to_thread(delayed.wait_replayed)
    tally = Tally(delayed)
    for _ in range(10):
        await asyncio.sleep(0)
        row = await pool.fetchrow(READ, new_id)
        tally.saw(row[0], row[1])
    assert tally.misses == 0
    assert tally.counts == {"replica": 10}


async def test_other_write_paths_are_tracked(delayed: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(delayed.dsn, causal_wait=0.005)
    ids = [next(_ids) for _ in range(4)]
    async with pool.read_your_writes():
        async with pool.transaction() as con:
            await con.execute("insert into t values ($1)", ids[0])
        async with pool.acquire() as con:
            await con.execute("insert into t values ($1)", ids[1])
        await pool.executemany("insert into t values ($1)", [(ids[2],)])
        await pool.copy_records_to_table("t", records=[(ids[3],)])
        for new_id in ids:
            assert await pool.fetchval(COUNT, new_id) == 1


# -- bugs ----------------------------------------------------------------------------


async def test_busy_replica_sub_pool_does_not_fail_causal_reads(
    delayed: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(delayed.dsn, min_size=1, max_size=2, causal_wait=0.6)
    tally = Tally(delayed)

    async def worker() -> None:
        for _ in range(3):
            async with pool.read_your_writes():
                await cycle(pool, tally)

    await asyncio.gather(*(worker() for _ in range(12)))
    assert tally.misses == 0


async def insert(pool: picopool.Pool, new_id: int) -> None:
    await pool.execute("insert into t values ($1)", new_id)


async def insert_forced_to_the_primary(pool: picopool.Pool, new_id: int) -> None:
    """A write hidden in a function (the classifier sees a read), sent with ``role="primary"``."""
    await pool.fetchval("select undeclared_writer($1)", new_id, role="primary")


async def count(pool: picopool.Pool, new_id: int) -> object:
    return await pool.fetchval(COUNT, new_id)


async def count_by_copy_out(pool: picopool.Pool, new_id: int) -> object:
    out = io.BytesIO()
    await pool.copy_from_query(COUNT, new_id, output=out)
    return out.getvalue()


async def count_in_readonly_transaction(pool: picopool.Pool, new_id: int) -> object:
    async with pool.transaction(readonly=True) as con:
        return await con.fetchval(COUNT, new_id)


Step = Callable[[picopool.Pool, int], Awaitable[object]]


@pytest.mark.parametrize(("write", "read", "expected"), [
    pytest.param(insert_forced_to_the_primary, count, 1, id="write-forced-to-the-primary"),
    pytest.param(insert, count_by_copy_out, b"1\n", id="copy-out"),
    pytest.param(insert, count_in_readonly_transaction, 1, id="readonly-transaction"),
])
async def test_read_in_scope_sees_the_write(
    delayed: LocalCluster, make_pool: PoolFactory, write: Step, read: Step, expected: object
) -> None:
    pool = await make_pool(delayed.dsn, causal_wait=0.005)
    new_id = next(_ids)
    async with pool.read_your_writes():
        await write(pool, new_id)
        assert await read(pool, new_id) == expected
