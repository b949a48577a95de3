"""Admission control on a real cluster: max_waiting (bounded, FIFO across
instances, stale hand-offs refused, cancellation leaks nothing), the rate limit,
max_lifetime, readiness and statement_timeout."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

import picopool
from picopool import RateLimit, RateLimitedError, TooManyWaitersError
from picopool.cluster import LocalCluster

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]


def _leaks(pool: picopool.Pool) -> list[str]:
    """What the pool still holds after every caller is gone."""
    problems = []
    queue = pool._executor.admission
    if queue is not None and queue.waiting:
        problems.append(f"{queue.waiting} waiters queued")
    for member in pool._membership.members.values():
        if member.reserved:
            problems.append(f"{member.instance.label}: {member.reserved} reserved")
        if member.in_use():
            problems.append(f"{member.instance.label}: {member.in_use()} in use")
        if member.inflight or member.acquiring:
            problems.append(f"{member.instance.label}: inflight/acquiring left")
    if pool._checked_out:
        problems.append(f"{len(pool._checked_out)} checked out")
    return problems


async def _settle(pool: picopool.Pool) -> list[str]:
    for _ in range(100):
        if not _leaks(pool):
            return []
        await asyncio.sleep(0.02)
    return _leaks(pool)


# -- max_waiting --------------------------------------------------------------------


async def test_max_waiting_refuses_at_once_and_admitted_calls_complete(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """4x overload of the primary (1 connection): max_waiting callers queue, the
    rest get TooManyWaitersError at once; every admitted statement completes."""
    pool = await make_pool(cluster.dsn, min_size=1, max_size=1, max_waiting=3)

    async def call(n: int) -> int:
        value: int = await pool.fetchval("SELECT $1::int FROM pg_sleep(0.05)", n,
                                         role="primary")
        return value

    results = await asyncio.gather(*(call(n) for n in range(8)), return_exceptions=True)
    refused = [r for r in results if isinstance(r, BaseException)]
    served = [r for r in results if not isinstance(r, BaseException)]
    assert all(isinstance(r, TooManyWaitersError) for r in refused), refused
    assert isinstance(refused[0], picopool.PicopoolError)
    assert len(served) == 4  # one running, three waiting
    assert sorted(served) == [n for n in range(8) if results[n] == n]
    stats = pool.stats().admission
    assert stats is not None
    assert stats.rejected == 4 and stats.max_waiting == 3 and stats.waiting == 0
    assert await _settle(pool) == []


async def test_waiters_are_served_in_arrival_order_across_instances(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """Two replicas, one connection each, both held: waiters that arrive one after
    another get connections in that order, whichever replica frees first."""
    pool = await make_pool(cluster.dsn, min_size=1, max_size=1, max_waiting=100)
    held = [await pool.acquire(role="replica"), await pool.acquire(role="replica")]
    order: list[int] = []

    async def waiter(n: int) -> None:
        async with pool.acquire(role="replica") as conn:
            order.append(n)
            await conn.fetchval("SELECT pg_sleep($1)", random.uniform(0, 0.02))

    tasks = []
    for n in range(12):
        tasks.append(asyncio.ensure_future(waiter(n)))
        await asyncio.sleep(0.005)  # arrival order is well defined
    for connection in held:
        await pool.release(connection)
    await asyncio.gather(*tasks)
    assert order == sorted(order)
    assert await _settle(pool) == []


async def test_no_starvation_under_overload(cluster: LocalCluster,
                                            make_pool: PoolFactory) -> None:
    """Every caller of a 4x overloaded pool is served, none waits longer than one
    that arrived after it on the same role."""
    pool = await make_pool(cluster.dsn, min_size=1, max_size=1, max_waiting=1000)
    grants: list[int] = []
    arrivals = 0

    async def caller() -> None:
        nonlocal arrivals
        for _ in range(5):
            ticket = arrivals
            arrivals += 1
            async with pool.acquire(role="replica") as conn:
                grants.append(ticket)
                await conn.fetchval("SELECT 1")

    await asyncio.gather(*(caller() for _ in range(8)))  # 8 callers, 2 connections
    assert len(grants) == 40
    assert grants == sorted(grants)
    assert await _settle(pool) == []


async def test_a_timed_out_waiter_never_gets_a_connection(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, min_size=1, max_size=1, max_waiting=10)
    held = await pool.acquire(role="primary")
    with pytest.raises(TimeoutError):
        await pool.acquire(role="primary", timeout=0.05)
    late = asyncio.ensure_future(pool.fetchval("SELECT 7", role="primary"))
    await asyncio.sleep(0.02)
    await pool.release(held)
    assert await late == 7  # the grant went past the stale waiter to this one
    assert await _settle(pool) == []


async def test_cancelling_waiters_at_random_points_leaks_nothing(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, min_size=1, max_size=1, max_waiting=6)
    rng = random.Random(20261201)

    async def operation() -> None:
        role = rng.choice(["primary", "replica", None])
        if rng.random() < 0.5:
            await pool.fetchval("SELECT pg_sleep(0.002)", role=role)
        else:
            async with pool.acquire(role=role or "any") as conn:
                await conn.fetchval("SELECT 1")

    async def one() -> None:
        task = asyncio.ensure_future(operation())
        await asyncio.sleep(rng.uniform(0, 0.01))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, TooManyWaitersError):
            await task

    for _ in range(15):
        await asyncio.gather(*(one() for _ in range(12)))
    assert await _settle(pool) == []
    assert await pool.fetchval("SELECT 1", role="primary") == 1


# -- rate limit ---------------------------------------------------------------------


async def test_rate_limit_without_blocking_refuses_over_the_burst(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, rate_limit=RateLimit(0.5, burst=3, block=False))
    for _ in range(3):
        assert await pool.fetchval("SELECT 1") == 1
    with pytest.raises(RateLimitedError):
        await pool.fetchval("SELECT 1")
    with pytest.raises(RateLimitedError):
        await pool.acquire()
    with pytest.raises(RateLimitedError):
        async with pool.transaction():
            pass
    stats = pool.stats().admission
    assert stats is not None and stats.rate_limited == 3


async def test_rate_limit_keyed_by_a_context_variable(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    tenant: contextvars.ContextVar[str] = contextvars.ContextVar("tenant", default="-")
    pool = await make_pool(cluster.dsn,
                           rate_limit=RateLimit(0.5, burst=2, key=tenant, block=False))
    tenant.set("a")
    await pool.fetchval("SELECT 1")
    await pool.fetchval("SELECT 1")
    with pytest.raises(RateLimitedError):
        await pool.fetchval("SELECT 1")
    tenant.set("b")  # another tenant has its own bucket
    assert await pool.fetchval("SELECT 2") == 2


async def test_blocking_rate_limit_waits_or_refuses_past_the_timeout(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, rate_limit=RateLimit(20, burst=1))
    results = await asyncio.gather(*(pool.fetchval("SELECT $1::int", n) for n in range(4)))
    assert results == [0, 1, 2, 3]
    stats = pool.stats().admission
    assert stats is not None and stats.rate_waited >= 2 and stats.rate_limited == 0
    slow = await make_pool(cluster.dsn, rate_limit=RateLimit(0.1, burst=1))
    await slow.fetchval("SELECT 1")
    with pytest.raises(RateLimitedError):  # the next token is 10 s away
        await slow.fetchval("SELECT 1", timeout=0.5)


# -- max_lifetime -------------------------------------------------------------------


async def test_max_lifetime_closes_old_connections_on_release_never_mid_use(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, min_size=1, max_size=1, max_lifetime=0.3)
    async with pool.acquire() as conn:
        first = await conn.fetchval("SELECT pg_backend_pid()")
        await asyncio.sleep(0.4)  # past its lifetime, but in use: it keeps working
        assert await conn.fetchval("SELECT pg_backend_pid()") == first
    second = await pool.fetchval("SELECT pg_backend_pid()", role="primary")
    assert second != first  # closed on release, a fresh one opened
    stats = pool.stats().admission
    assert stats is not None and stats.lifetime_closed >= 1
    assert await _settle(pool) == []


# -- readiness ----------------------------------------------------------------------


async def test_wait_ready_and_confirmed_roles(cluster: LocalCluster,
                                              make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, readiness_check=True)
    await pool.wait_ready(primary=True, replicas=2, timeout=10)
    assert all(m.confirmed for m in pool._membership.members.values())
    with pytest.raises(picopool.NotReadyError) as raised:
        await pool.wait_ready(replicas=3, timeout=0.2)
    assert isinstance(raised.value, TimeoutError)


async def test_a_recovering_instance_gets_no_traffic_until_confirmed(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, readiness_check=True, min_size=1, max_size=2)
    membership = pool._membership
    replica = next(m for m in membership.members.values()
                   if m.instance.role is picopool.Role.REPLICA)
    membership.note_failure(replica, ConnectionError("simulated"))
    assert not replica.confirmed
    stats = pool.stats().admission
    assert stats is not None and stats.not_ready == (replica.instance.label,)
    served_before = replica.served
    for _ in range(10):
        await pool.fetchval("SELECT 1")
    assert replica.served == served_before  # no user traffic while unconfirmed
    await pool.wait_ready(replicas=2, timeout=10)  # the background check confirms it
    assert replica.confirmed and replica.failures == 0


# -- statement_timeout --------------------------------------------------------------


async def test_statement_timeout_applies_unless_the_call_has_its_own(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, statement_timeout=0.2)
    with pytest.raises(TimeoutError):
        await pool.fetchval("SELECT pg_sleep(2)")
    assert await pool.fetchval("SELECT 1 FROM pg_sleep(0.4)", timeout=5) == 1
    assert await _settle(pool) == []



async def test_a_replica_that_comes_back_is_ready_again(cluster_factory: Any,
                                                        make_pool: PoolFactory) -> None:
    """User story: a replica is down when the service starts; the pool starts with
    what answers, wait_ready() says a replica is missing, and once the replica is
    back it is confirmed and serves reads."""
    private = cluster_factory(replicas=2)
    late = private.replicas[1]
    await asyncio.to_thread(late.stop)
    pool = await make_pool(private.dsn, readiness_check=True)
    await pool.wait_ready(primary=True, replicas=1, timeout=10)
    with pytest.raises(picopool.NotReadyError):
        await pool.wait_ready(replicas=2, timeout=0.5)
    await asyncio.to_thread(late.start)
    await pool.wait_ready(replicas=2, timeout=30)
    ports = {await pool.fetchval("SELECT inet_server_port()") for _ in range(12)}
    assert late.port in ports


async def test_statement_timeout_wins_over_command_timeout_on_pool_level_calls(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """Precedence: the call's timeout=, then statement_timeout=, then asyncpg's
    command_timeout (which still governs acquire()d connections)."""
    pool = await make_pool(cluster.dsn, statement_timeout=5, command_timeout=0.1)
    assert await pool.fetchval("SELECT 1 FROM pg_sleep(0.3)") == 1
    with pytest.raises(TimeoutError):
        await pool.fetchval("SELECT 1 FROM pg_sleep(0.3)", timeout=0.1)
    async with pool.acquire() as conn:
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT 1 FROM pg_sleep(0.3)")
    assert await _settle(pool) == []


async def test_lifetimes_are_jittered_up_to_five_percent_early(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, min_size=2, max_size=2, max_lifetime=100)
    now = asyncio.get_running_loop().time()
    deadlines = list(pool._membership.expires.values())
    assert len(deadlines) >= 6  # two per instance, opened at start
    for deadline in deadlines:
        assert now - 10 + 95 <= deadline <= now + 100
    assert len(set(deadlines)) == len(deadlines)
