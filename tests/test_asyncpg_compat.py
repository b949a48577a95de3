"""asyncpg compatibility: asyncpg's own pool tests, and each difference they found, fixed.

``test_asyncpg_pool_suite`` runs asyncpg's ``tests/test_pool.py`` (from the installed
version's sdist, see tests/asyncpg_compat/run.py) against picopool; CI also runs it
under the oldest asyncpg that pyproject.toml allows (.ci/asyncpg-oldest.sh).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

import picopool
from picopool.cluster import LocalCluster

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]
RUNNER = Path(__file__).parent / "asyncpg_compat" / "run.py"


@pytest.mark.timeout(900)
def test_asyncpg_pool_suite() -> None:
    """asyncpg's test_pool.py passes, apart from the reasoned entries of skips.toml."""
    result = subprocess.run([sys.executable, str(RUNNER)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONWARNINGS": ""}, check=False)
    summary = [line for line in result.stdout.splitlines() if "against picopool" in line]
    assert result.returncode == 0, (
        f"{summary}\n{result.stdout[-20000:]}\n{result.stderr[-5000:]}")


async def test_release_twice_is_a_no_op(pool: picopool.Pool) -> None:
    con = await pool.acquire()
    await pool.release(con)
    await pool.release(con)  # asyncpg: "Already released, do nothing"
    async with pool.acquire() as con:
        await pool.release(con)  # released inside the block; __aexit__ releases again
    assert [i.in_use for i in pool.stats().instances] == [0] * len(pool.stats().instances)
    assert await pool.fetchval("select 1") == 1


async def test_a_foreign_connection_is_not_a_member(
    pool: picopool.Pool, make_pool: PoolFactory, cluster: LocalCluster,
) -> None:
    other = await make_pool(cluster.dsn)
    con = await other.acquire()
    try:
        with pytest.raises(asyncpg.InterfaceError, match="is not a member of this pool"):
            await pool.release(con)
        with pytest.raises(asyncpg.InterfaceError, match="is not a member of this pool"):
            await pool.release(con._con)  # the raw connection, not the proxy
    finally:
        await other.release(con)
    with pytest.raises(asyncpg.InterfaceError, match="is not a member of this pool"):
        await pool.release(con)  # released by its own pool: still not ours


async def test_awaiting_the_pool_from_two_tasks(cluster: LocalCluster) -> None:
    pool = picopool.create_pool(cluster.dsn, min_size=1, max_size=1)
    first = asyncio.ensure_future(pool)
    second = asyncio.ensure_future(pool)
    try:
        await first
        with pytest.raises(asyncpg.InterfaceError,
                           match="pool is being initialized in another task"):
            await second
    finally:
        await pool.close()


async def test_using_the_pool_while_it_starts(cluster: LocalCluster) -> None:
    pool = picopool.create_pool(cluster.dsn, min_size=1, max_size=1)
    starting = asyncio.ensure_future(pool)
    await asyncio.sleep(0)
    try:
        with pytest.raises(asyncpg.InterfaceError, match="being initialized, but not yet ready"):
            await pool.fetchval("select 1")
        with pytest.raises(asyncpg.InterfaceError, match="being initialized, but not yet ready"):
            await pool.acquire()
        await starting
        assert await pool.fetchval("select 1") == 1
    finally:
        await pool.close()
    unstarted = picopool.create_pool(cluster.dsn)
    with pytest.raises(asyncpg.InterfaceError, match="pool is not initialized"):
        await unstarted.fetchval("select 1")


@pytest.mark.parametrize(("sizes", "message"), [
    ({"init_size": 1, "min_size": 2, "max_size": 5}, "init_size is smaller than min_size"),
    ({"init_size": 3, "min_size": 3, "max_size": 2}, "min_size is greater than max_size"),
    ({"init_size": 5, "min_size": 1, "max_size": 3}, "init_size is greater than max_size"),
    ({"init_size": -1, "min_size": 0, "max_size": 3},
     "init_size is expected to be greater or equal to zero"),
    ({"max_size": 0, "min_size": 0}, "max_size is expected to be greater than zero"),
    ({"max_queries": 0}, "max_queries is expected to be greater than zero"),
])
def test_sizes_are_checked_at_creation_with_asyncpgs_words(
    sizes: dict[str, Any], message: str,
) -> None:
    with pytest.raises(ValueError, match=message):
        picopool.create_pool("postgres://h1,h2/db", **sizes)


def test_the_pool_is_not_an_asyncpg_pool() -> None:
    """A deliberate difference, documented: same API, not a subclass."""
    pool = picopool.create_pool("postgres://h1,h2/db")
    assert not isinstance(pool, asyncpg.pool.Pool)


async def test_repr_shows_the_hosts_without_a_dsn(
    cluster: LocalCluster, make_pool: PoolFactory,
) -> None:
    node = cluster.primary
    pool = await make_pool(None, host=node.host, port=node.port, user="postgres",
                           password=cluster.password, database="postgres")
    assert f"hosts={node.host}:{node.port}" in repr(pool)
    assert "dsn=''" not in repr(pool)
    assert cluster.password not in repr(pool)
    with_dsn = await make_pool(cluster.dsn)
    assert "dsn='postgres://" in repr(with_dsn)
    assert cluster.password not in repr(with_dsn)
