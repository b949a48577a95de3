"""The opt-in read cache on a real cluster: what is cached, what is never cached,
invalidation by writes through the pool, results callers cannot change, stats."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable

import pytest

import picopool
from picopool import ReadCache
from picopool.cluster import LocalCluster

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]


def _cache(pool: picopool.Pool) -> picopool.CacheStats:
    stats = pool.stats().cache
    assert stats is not None
    return stats


async def _table(pool: picopool.Pool) -> str:
    name = f"cache_{uuid.uuid4().hex[:8]}"
    await pool.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, tags int[], v text)")
    await pool.execute(f"INSERT INTO {name} VALUES (1, ARRAY[1, 2], 'a')")
    return name


async def test_reads_are_served_from_the_cache_and_writes_invalidate_them(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, cache=ReadCache(ttl=60), read_write_split="off")
    table = await _table(pool)
    query = f"SELECT v FROM {table} WHERE id = $1"
    assert await pool.fetchval(query, 1) == "a"
    assert await pool.fetchval(query, 1) == "a"
    assert _cache(pool).hits == 1
    await pool.execute(f"UPDATE {table} SET v = 'b' WHERE id = 1")  # through the pool
    assert await pool.fetchval(query, 1) == "b"
    assert _cache(pool).invalidations >= 1
    other = f"cache_{uuid.uuid4().hex[:8]}"
    await pool.execute(f"CREATE TABLE {other} (id int)")  # DDL: every entry goes
    assert _cache(pool).entries == 0


async def test_keys_tell_arguments_types_methods_and_record_classes_apart(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, cache=ReadCache(ttl=60))
    assert await pool.fetchval("SELECT $1::text", "1") == "1"
    assert await pool.fetchval("SELECT $1::text", "2") == "2"
    assert await pool.fetchval("SELECT $1::int + 1", 1) == 2
    assert await pool.fetchval("SELECT $1::int + 1", True) == 2  # type differs: a miss
    assert _cache(pool).hits == 0
    row = await pool.fetchrow("SELECT 1 AS a, 2 AS b")
    assert await pool.fetchval("SELECT 1 AS a, 2 AS b", column=1) == 2
    assert row is not None and row["a"] == 1
    assert _cache(pool).hits == 0


async def test_volatile_functions_scopes_and_cache_ttl_zero_are_never_cached(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, cache=ReadCache(ttl=60))
    for _ in range(2):
        await pool.fetchval("SELECT random()")
        await pool.fetchval("SELECT clock_timestamp()")
        await pool.fetchval("SELECT 1", cache_ttl=0)
        async with pool.read_your_writes():
            await pool.fetchval("SELECT 2")
        async with pool.transaction() as conn:
            await conn.fetchval("SELECT 3")
    stats = _cache(pool)
    assert stats.hits == 0 and stats.entries == 0
    await pool.fetchval("SELECT lower('X')")  # immutable built-ins are fine
    await pool.fetchval("SELECT lower('X')")
    assert _cache(pool).hits == 1


async def test_per_call_ttl_opts_in_when_the_pool_ttl_is_zero(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, cache=ReadCache(ttl=0))
    await pool.fetchval("SELECT 5")
    await pool.fetchval("SELECT 5")
    assert _cache(pool).hits == 0
    await pool.fetchval("SELECT 6", cache_ttl=30)
    await pool.fetchval("SELECT 6", cache_ttl=30)
    assert _cache(pool).hits == 1


async def test_callers_cannot_change_each_others_results(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, cache=ReadCache(ttl=60), read_write_split="off")
    table = await _table(pool)
    rows = await pool.fetch(f"SELECT id, v FROM {table}")
    rows.clear()
    rows = await pool.fetch(f"SELECT id, v FROM {table}")
    assert len(rows) == 1
    tags = await pool.fetchval(f"SELECT tags FROM {table}")
    tags.append(99)
    assert await pool.fetchval(f"SELECT tags FROM {table}") == [1, 2]
    assert _cache(pool).hits == 2  # the list of records, and the array (a copy)
    record = await pool.fetchrow(f"SELECT * FROM {table}")
    assert record is not None
    record["tags"].append(7)  # a record holding a list: never cached, never shared
    again = await pool.fetchrow(f"SELECT * FROM {table}")
    assert again is not None and again["tags"] == [1, 2]
    assert _cache(pool).hits == 2


async def test_size_bound_evicts_the_least_recently_used(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, cache=ReadCache(ttl=60, max_bytes=4000))
    for n in range(50):
        await pool.fetchval("SELECT repeat('x', $1::int)", 100 + n)
    stats = _cache(pool)
    assert stats.evictions > 0 and 0 < stats.bytes <= 4000
    assert pool.invalidate_cache() == stats.entries
    assert _cache(pool).entries == 0
