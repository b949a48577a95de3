"""Pool-level statements are retried only where that is safe, and give up clearly."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

import picopool
from picopool.cluster import LocalCluster
from picopool.discovery import Static

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]


async def one_connection_pool(cluster: LocalCluster, make_pool: PoolFactory,
                              max_retries: int) -> tuple[picopool.Pool, int]:
    """A pool with one connection to the primary, and that connection's backend pid."""
    pool = await make_pool(cluster.primary.dsn, discovery=Static(), min_size=1, max_size=1,
                           max_retries=max_retries, health_check_interval=None)
    pid: int = await pool.fetchval("select pg_backend_pid()")
    return pool, pid


async def kill_while_running(cluster: LocalCluster, pool: picopool.Pool, pid: int,
                            statement: str) -> asyncio.Future[object]:
    """Start *statement* through the pool and kill its backend while it runs."""
    running: asyncio.Future[object] = asyncio.ensure_future(pool.fetchval(statement))
    await asyncio.sleep(0.3)
    killer = await asyncpg.connect(cluster.primary.dsn)
    try:
        assert await killer.fetchval("select pg_terminate_backend($1)", pid)
    finally:
        await killer.close()
    return running


async def test_a_read_killed_in_flight_is_retried(
    cluster: LocalCluster, make_pool: PoolFactory
) -> None:
    pool, pid = await one_connection_pool(cluster, make_pool, max_retries=2)
    running = await kill_while_running(
        cluster, pool, pid, "select 42 from pg_sleep(0.6)")
    assert await running == 42  # ran again on a fresh connection
    assert pool.stats().retries == 1
    assert await pool.fetchval("select pg_backend_pid()") != pid


async def test_retries_give_up_with_a_clear_error(
    cluster: LocalCluster, make_pool: PoolFactory
) -> None:
    pool, pid = await one_connection_pool(cluster, make_pool, max_retries=0)
    running = await kill_while_running(cluster, pool, pid, "select 1 from pg_sleep(0.6)")
    with pytest.raises(picopool.NoAvailableInstanceError) as raised:
        await running
    assert "gave up on a read after 1 attempt" in str(raised.value)
    assert raised.value.attempts[0][0] == f"127.0.0.1:{cluster.primary.port}"
    assert isinstance(raised.value.__cause__, asyncpg.PostgresError | asyncpg.InterfaceError)
    assert isinstance(raised.value, asyncpg.InterfaceError)  # existing except clauses work
    assert await pool.fetchval("select 1") == 1  # and the pool itself is fine


async def test_a_failed_write_in_flight_is_not_retried(
    cluster: LocalCluster, make_pool: PoolFactory
) -> None:
    """A write whose connection dies while it runs may have committed: never re-run."""
    pool, _ = await one_connection_pool(cluster, make_pool, max_retries=3)
    await pool.execute("create table if not exists retry_once (n int)")
    await pool.execute("truncate retry_once")
    pid = await pool.fetchval("select pg_backend_pid()", role="primary")
    killer = await asyncpg.connect(cluster.primary.dsn)
    try:
        # The write sleeps, then inserts; it is killed mid-way, so it did not commit,
        # but the pool cannot know that, and must not try again.
        write = asyncio.ensure_future(
            pool.execute("insert into retry_once select 1 from pg_sleep(1)"))
        await asyncio.sleep(0.3)
        assert await killer.fetchval("select pg_terminate_backend($1)", pid)
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError, OSError)) as raised:
            await write
        assert not isinstance(raised.value, picopool.NoAvailableInstanceError)
        assert await killer.fetchval("select count(*) from retry_once") == 0
        assert pool.stats().retries == 0
    finally:
        await killer.close()


@pytest.mark.parametrize("settle", [0.0, 0.05], ids=["at-once", "after-close"])
async def test_a_write_on_a_connection_killed_while_idle_runs_at_most_once(
    cluster: LocalCluster, make_pool: PoolFactory, settle: float
) -> None:
    """The server ended the pooled connection while it sat idle. Right after the FATAL
    arrives asyncpg refuses the next statement locally ("cannot switch to state"):
    never sent, so picopool retries it. Once the socket is closed, asyncpg's pool
    reconnects. If the statement went out before the FATAL came in, it may have run,
    and the error reaches the caller. In no case does the write run twice."""
    pool, pid = await one_connection_pool(cluster, make_pool, max_retries=2)
    await pool.execute("create table if not exists retry_idle (n int)")
    await pool.execute("truncate retry_idle")
    killer = await asyncpg.connect(cluster.primary.dsn)
    try:
        for _ in range(5):
            assert await killer.fetchval("select pg_terminate_backend($1)", pid)
            await asyncio.sleep(settle)
            before = await killer.fetchval("select count(*) from retry_idle")
            try:
                await pool.execute("insert into retry_idle values (1)")
            except asyncpg.ConnectionDoesNotExistError:  # sent before the FATAL came in
                assert await killer.fetchval("select count(*) from retry_idle") <= before + 1
            else:
                assert await killer.fetchval("select count(*) from retry_idle") == before + 1
            pid = await pool.fetchval("select pg_backend_pid()", role="primary")
    finally:
        await killer.close()


async def test_asyncpg_errors_for_a_connection_killed_while_idle_are_recognised(
    cluster: LocalCluster,
) -> None:
    """A canary for asyncpg upgrades: picopool tells these errors apart by their text."""
    from picopool._member import is_connection_error, rejected_before_sending

    seen: set[str] = set()
    killer = await asyncpg.connect(cluster.primary.dsn)
    try:
        for wait_closed in [False] * 8 + [True]:
            victim = await asyncpg.connect(cluster.primary.dsn)
            try:
                assert await killer.fetchval(
                    "select pg_terminate_backend($1)", victim.get_server_pid())
                await asyncio.sleep(0)
                for _ in range(500):
                    if not wait_closed or victim.is_closed():
                        break
                    await asyncio.sleep(0.01)
                with pytest.raises(Exception) as raised:
                    await victim.fetchval("select 1")
                error = raised.value
                seen.add(type(error).__name__)
                assert is_connection_error(error), error
                if isinstance(error, asyncpg.ConnectionDoesNotExistError):
                    assert not rejected_before_sending(error)  # it was sent: may have run
                else:
                    assert isinstance(error, asyncpg.InterfaceError | asyncpg.InternalClientError)
                    assert rejected_before_sending(error), error
            finally:
                victim.terminate()
    finally:
        await killer.close()
    assert "InterfaceError" in seen, seen  # the closed socket, at least once


async def test_a_cancel_while_settling_a_failed_attempt_is_not_swallowed(
    cluster: LocalCluster, make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The caller's cancellation (asyncio.timeout, task.cancel) lands while the pool settles
    an attempt that just failed (its connection handed back, its instance noted): the call
    ends cancelled, with no retry."""
    from picopool._execute import Executor

    pool, pid = await one_connection_pool(cluster, make_pool, max_retries=3)
    real_failed = Executor._failed
    settling = asyncio.Event()

    async def slow_failed(self: Executor, member: Any, connection: Any,
                          exc: BaseException) -> Any:
        settling.set()
        await asyncio.sleep(0.3)  # the cancellation lands here
        return await real_failed(self, member, connection, exc)

    monkeypatch.setattr(Executor, "_failed", slow_failed)
    running = await kill_while_running(cluster, pool, pid, "select 42 from pg_sleep(0.6)")
    await asyncio.wait_for(settling.wait(), 5)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    assert pool.stats().retries == 0
    monkeypatch.undo()
    assert await pool.fetchval("select 1") == 1
