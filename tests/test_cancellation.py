"""Cancellation at random points never leaks a connection.

Hundreds of operations are cancelled at random moments (task.cancel(),
asyncio.timeout, asyncio.wait_for) around pool-level queries, acquire()
blocks and release(). Afterwards every sub-pool must be whole again and the
servers must hold no backend the pool does not know about.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import picopool
from picopool.cluster import LocalCluster, LocalNode

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]

SEED = 20240611
ITERATIONS = 300
MAX_SIZE = 2
QUERY = "select pg_sleep(0.001)"


async def cancelled_at_random(rng: random.Random, mode: str,
                              operation: Callable[[], Awaitable[Any]]) -> None:
    """Run *operation*, cancelling it after a random tiny delay (it may finish first)."""
    delay = rng.uniform(0, 0.005)
    if mode == "cancel":
        task = asyncio.ensure_future(operation())
        await asyncio.sleep(delay)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        error = None if task.cancelled() else task.exception()
        if error is not None:
            raise error
    elif mode == "timeout":
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(delay):
                await operation()
    else:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(operation(), delay)


async def one_round(pool: picopool.Pool, rng: random.Random) -> None:
    mode = rng.choice(["cancel", "timeout", "wait_for"])
    target = rng.choice(["query", "acquire", "release"])
    role = rng.choice([None, "primary", "replica", "any"])

    if target == "query":
        await cancelled_at_random(rng, mode, lambda: pool.fetchval(QUERY, role=role))
    elif target == "acquire":
        async def use() -> None:
            async with pool.acquire(role=role or "primary") as connection:
                await connection.fetchval(QUERY)

        await cancelled_at_random(rng, mode, use)
    else:
        connection = await pool.acquire(role=role or "primary")
        await connection.fetchval(QUERY)
        await cancelled_at_random(rng, mode, lambda: pool.release(connection))
        if connection in pool._checked_out:
            # Cancelled before release() even started (e.g. task.cancel() before its
            # first step): the caller still owns the connection and releases it.
            await pool.release(connection)


async def client_backends(node: LocalNode, application_name: str) -> int:
    """Backends of *application_name* on *node* (the psql running the check has another)."""
    count = await asyncio.to_thread(
        node.sql,
        "select count(*) from pg_stat_activity where backend_type = 'client backend' "
        f"and application_name = '{application_name}'",
    )
    return int(count)


def pool_size(pool: picopool.Pool, port: int) -> int:
    return sum(s.size for s in pool.stats().instances if s.address.endswith(f":{port}"))


async def test_random_cancellation_leaks_nothing(cluster: LocalCluster,
                                                 make_pool: PoolFactory) -> None:
    application_name = f"pp-cancel-{uuid.uuid4().hex[:8]}"
    pool = await make_pool(cluster.dsn, min_size=MAX_SIZE, max_size=MAX_SIZE,
                           server_settings={"application_name": application_name})
    rng = random.Random(SEED)
    started = time.monotonic()
    for _ in range(ITERATIONS):
        # Up to 4 at once: more than max_size, so some wait inside asyncpg's queue.
        concurrent = rng.randint(1, 4)
        rngs = [random.Random(rng.random()) for _ in range(concurrent)]
        await asyncio.gather(*(one_round(pool, r) for r in rngs))
    assert time.monotonic() - started < 40

    def settled() -> bool:
        return (not pool._checked_out
                and all(s.in_use == 0 for s in pool.stats().instances)
                and pool.get_idle_size() == pool.get_size())

    deadline = time.monotonic() + 5
    while not settled():
        assert time.monotonic() < deadline, (pool.stats(), pool._checked_out)
        await asyncio.sleep(0.05)
    assert pool.get_size() <= pool.get_max_size() == 3 * MAX_SIZE
    for stats in pool.stats().instances:
        assert stats.size <= MAX_SIZE

    # Server side: each instance holds at most its sub-pool's connections plus the
    # discovery connections (a role probe to each instance, the service connection
    # to one). Backends of terminated connections may take a moment to exit.
    discovery = {node.port: 2 for node in cluster.nodes}
    for node in cluster.nodes:
        deadline = time.monotonic() + 5
        while (count := await client_backends(node, application_name)) > MAX_SIZE + 2:
            assert time.monotonic() < deadline, f"{node.name}: {count} backends"
            await asyncio.sleep(0.1)
        discovery[node.port] = count - pool_size(pool, node.port)
    assert sum(discovery.values()) <= len(cluster.nodes) + 1, discovery

    # And the pool still works everywhere.
    assert await pool.fetchval("select 1", role="primary") == 1
    assert await pool.fetchval("select 1", role="replica") == 1


async def test_cancellation_with_read_your_writes_leaks_nothing(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """read_your_writes adds a WAL-position query after writes and on release(): a
    cancellation landing there must still hand the connection back (regression)."""
    pool = await make_pool(cluster.dsn, min_size=MAX_SIZE, max_size=MAX_SIZE,
                           read_your_writes=True, drain_timeout=0.5)
    table = f"ryw_{uuid.uuid4().hex[:8]}"
    await pool.execute(f"create table {table} (id serial primary key)")
    try:
        for _ in range(MAX_SIZE + 1):  # acquire() times out once MAX_SIZE have leaked
            connection = await pool.acquire(timeout=2)
            await connection.execute(f"insert into {table} default values")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0):  # cancelled at release()'s first await
                    await pool.release(connection)
            if connection in pool._checked_out:
                await pool.release(connection)
        rng = random.Random(SEED)
        for _ in range(60):
            mode = rng.choice(["cancel", "timeout", "wait_for"])
            await cancelled_at_random(
                rng, mode, lambda: pool.execute(f"insert into {table} default values"))
        await asyncio.sleep(0.2)
        assert not pool._checked_out
        assert all(s.in_use == 0 for s in pool.stats().instances), pool.stats()
        async with pool.acquire(timeout=2) as connection:
            assert await connection.fetchval("select 1") == 1
    finally:
        await pool.execute(f"drop table {table}")
