"""Lagging replicas get no reads: ``max_replica_lag_bytes`` and ``max_replica_lag_seconds``.

One replica is made to apply commits 3 s late while a background writer keeps
producing WAL on the primary, so it stays far behind for as long as the writer
runs. The pool's lag monitor (one probe per topology refresh, every 0.2 s) must
stop sending it reads, and send them again once the delay is removed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import asyncpg
import pytest

import picopool
from picopool.cluster import LocalCluster, LocalNode

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]
ClusterFactory = Callable[..., LocalCluster]

REFRESH = 0.2
READS = 20


@pytest.fixture(scope="module")
def lag_cluster(cluster_factory: ClusterFactory) -> LocalCluster:
    # The default 200 ms WAL writer delay (with synchronous_commit=off) would keep even
    # the undelayed replica ~200 ms of WAL behind a busy primary.
    private = cluster_factory(replicas=2, settings={"wal_writer_delay": "10ms"})
    private.primary.sql("create table lag_t (id bigserial primary key, pad text)")
    private.wait_replayed()
    return private


@contextlib.asynccontextmanager
async def writing(primary: LocalNode) -> AsyncIterator[None]:
    """Commit a few KB of WAL on the primary every 20 ms until the block ends."""
    con = await asyncpg.connect(primary.dsn)
    stop = asyncio.Event()

    async def write() -> None:
        while not stop.is_set():
            await con.execute(
                "insert into lag_t (pad) select repeat('x', 200) from generate_series(1, 20)")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)

    task = asyncio.ensure_future(write())
    try:
        yield
    finally:
        stop.set()
        await task
        await con.close()


async def read_ports(pool: picopool.Pool, count: int = READS) -> collections.Counter[int]:
    ports: collections.Counter[int] = collections.Counter()
    for _ in range(count):
        ports[await pool.fetchval("select inet_server_port()")] += 1
    return ports


async def wait_for(condition: Callable[[], Awaitable[bool]], timeout: float, what: str) -> float:
    started = time.monotonic()
    while not await condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what} not within {timeout} s")
        await asyncio.sleep(0.05)
    return time.monotonic() - started


async def set_delay(node: LocalNode, delay: str | None) -> None:
    await asyncio.to_thread(node.set_apply_delay, delay)


def served(pool: picopool.Pool, port: int) -> int:
    return next(s.served for s in pool.stats().instances if s.address.endswith(f":{port}"))


async def check_lagging_replica_is_skipped(
    cluster: LocalCluster, pool: picopool.Pool, slow: LocalNode, fast: LocalNode
) -> None:
    # both replicas serve reads at first
    assert set(await read_ports(pool, 4)) == {slow.port, fast.port}
    await set_delay(slow, "3s")
    try:
        async with writing(cluster.primary):
            # a couple of poll intervals for the monitor to see the lag (the seconds
            # limit also needs the lag itself to grow past 1 s)
            await asyncio.sleep(2 * REFRESH)
            took = await wait_for(lambda: _excluded(pool, slow.port), 5,
                                  "the slow replica excluded")
            assert took < 3
            before = served(pool, slow.port)
            ports = await read_ports(pool)
            assert ports == {fast.port: READS}, ports
            assert served(pool, slow.port) == before
            assert await pool.fetchval("select inet_server_port()", role="replica") == fast.port
            async with pool.acquire(role="replica") as con:
                assert await con.fetchval("select inet_server_port()") == fast.port
    finally:
        await set_delay(slow, None)
    took = await wait_for(lambda: _included(pool, slow.port), 10, "the slow replica back")
    assert took < 5
    assert set(await read_ports(pool, 6)) == {slow.port, fast.port}


async def _excluded(pool: picopool.Pool, port: int) -> bool:
    return set(await read_ports(pool, 4)) == {_other(pool, port)}


async def _included(pool: picopool.Pool, port: int) -> bool:
    return port in await read_ports(pool, 4)


def _other(pool: picopool.Pool, port: int) -> int:
    (other,) = (int(s.address.rsplit(":", 1)[1]) for s in pool.stats().instances
                if s.role == "replica" and not s.address.endswith(f":{port}"))
    return other


async def test_max_replica_lag_bytes(lag_cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(lag_cluster.dsn, max_replica_lag_bytes=64 * 1024,
                           topology_refresh_interval=REFRESH)
    slow, fast = lag_cluster.replicas
    await check_lagging_replica_is_skipped(lag_cluster, pool, slow, fast)


async def test_max_replica_lag_seconds(lag_cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(lag_cluster.dsn, max_replica_lag_seconds=1.0,
                           topology_refresh_interval=REFRESH)
    fast, slow = lag_cluster.replicas
    await check_lagging_replica_is_skipped(lag_cluster, pool, slow, fast)


async def test_both_replicas_lagging_fall_back_to_the_primary(
    lag_cluster: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(lag_cluster.dsn, max_replica_lag_seconds=1.0,
                           topology_refresh_interval=REFRESH)
    strict = await make_pool(lag_cluster.dsn, max_replica_lag_seconds=1.0,
                             topology_refresh_interval=REFRESH, fallback_to_primary=False,
                             failover_timeout=0.5)
    replicas = lag_cluster.replicas
    await asyncio.gather(*(set_delay(r, "3s") for r in replicas))
    try:
        async with writing(lag_cluster.primary):
            primary = lag_cluster.primary.port

            async def only_primary() -> bool:
                return set(await read_ports(pool, 4)) == {primary}

            await wait_for(only_primary, 5, "reads on the primary")
            assert await read_ports(pool) == {primary: READS}

            async def strict_refuses() -> bool:
                try:
                    await strict.fetchval("select 1")
                except picopool.NoAvailableInstanceError:
                    return True
                return False

            # the strict pool measures on its own schedule: give it time to agree
            await wait_for(strict_refuses, 5, "no replica for the strict pool")
    finally:
        await asyncio.gather(*(set_delay(r, None) for r in replicas))
    replica_ports = {r.port for r in replicas}

    async def replicas_again() -> bool:
        return set(await read_ports(pool, 4)) == replica_ports

    await wait_for(replicas_again, 10, "reads on the replicas")


async def test_no_limits_means_lag_is_ignored(
    lag_cluster: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(lag_cluster.dsn, topology_refresh_interval=REFRESH)
    slow, fast = lag_cluster.replicas
    await set_delay(slow, "3s")
    try:
        async with writing(lag_cluster.primary):
            await asyncio.sleep(3 * REFRESH)
            assert set(await read_ports(pool, 6)) == {slow.port, fast.port}
    finally:
        await set_delay(slow, None)


# -- bugs ----------------------------------------------------------------------------


async def test_pinned_lagging_replica_still_serves(
    lag_cluster: LocalCluster, make_pool: PoolFactory
) -> None:
    pool = await make_pool(lag_cluster.dsn, max_replica_lag_bytes=64 * 1024,
                           topology_refresh_interval=REFRESH, failover_timeout=1)
    slow = lag_cluster.replicas[0]
    await set_delay(slow, "3s")
    try:
        async with writing(lag_cluster.primary):
            await asyncio.sleep(2 * REFRESH)
            await wait_for(lambda: _excluded(pool, slow.port), 5, "the slow replica excluded")
            assert await pool.fetchval(
                f"/* picopool: instance=127.0.0.1:{slow.port} */ select inet_server_port()"
            ) == slow.port
    finally:
        await set_delay(slow, None)


async def test_restarted_lagging_replica_is_excluded_by_seconds(
    lag_cluster: LocalCluster, make_pool: PoolFactory
) -> None:
    slow = lag_cluster.replicas[0]

    def restart_delayed() -> None:
        # A checkpoint replayed before the stop: the restart replays no commit, so
        # pg_last_xact_replay_timestamp() stays NULL until the first delayed one.
        lag_cluster.primary.sql("checkpoint")
        lag_cluster.wait_replayed()
        slow.stop()
        slow.set_apply_delay("3s")
        slow.start()
        lag_cluster.wait_streaming()

    await asyncio.to_thread(restart_delayed)
    try:
        pool = await make_pool(lag_cluster.dsn, max_replica_lag_seconds=1.0,
                               topology_refresh_interval=REFRESH)
        async with writing(lag_cluster.primary):
            await asyncio.sleep(1.6)  # 1.6 s of commits held back, none applied
            behind = await asyncio.to_thread(
                slow.sql, "select pg_last_wal_receive_lsn() > pg_last_wal_replay_lsn()")
            assert behind == "t"
            ports = await read_ports(pool, 10)
            assert slow.port not in ports, ports
    finally:
        await set_delay(slow, None)
