"""Failover under load on real clusters: no acknowledged write lost, writes resume.

Scenarios: plain streaming replication (``LocalCluster``, synchronous quorum
commit), Patroni + etcd in ``synchronous_mode`` (crash of the leader, planned
switchover) and pg_auto_failover (crash of the primary). Each one runs a
:class:`load.MixedLoad` through one picopool pool, causes the failover, then
checks on the new primary *directly* (asyncpg, not the pool) that every
acknowledged id is there, and that writes resumed through the same pool.

Recovery times are printed and appended as JSON lines to
``/tmp/picopool-failover-times.jsonl`` (``$PICOPOOL_FAILOVER_TIMES`` overrides;
``run`` groups the lines of one pytest run):

* ``visible_to_first_write_s``: from the moment the new primary was visible to
  the source of truth (the promoted node answers ``pg_is_in_recovery() = false``,
  Patroni's ``/cluster`` lists the new leader ``running``, the monitor's
  ``get_primary()`` names the new node) to the first write acknowledged through
  picopool at or after that moment;
* ``visible_to_direct_write_s``: the same for a write sent straight to the new
  primary (no pool), the cluster's own share (e.g. a commit waiting for the
  synchronous standby to reconnect); ``first_write_after_direct_s`` is
  picopool's share on top of it;
* ``max_write_gap_s``: the longest pause between two acknowledged writes, the
  outage as the application saw it.

The asynchronous-replication scenario only reports how many acknowledged writes
were lost: with asynchronous replication that is allowed to be more than zero.

The HA scenarios need ``.ci/install-servers.sh`` (etcd, Patroni venv, pg_auto_failover).
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import json
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from harness._process import HarnessUnavailable
from harness.autofailover import AutoFailoverCluster
from harness.patroni import PatroniCluster
from load import CREATE_TABLE, INSERT, LoadReport, MixedLoad

import picopool
from picopool.cluster import LocalCluster, LocalNode
from picopool.discovery import AutoFailover, Patroni, Static

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]
ClusterFactory = Callable[..., LocalCluster]
T = TypeVar("T")

TIMES_FILE = Path(os.environ.get("PICOPOOL_FAILOVER_TIMES", "/tmp/picopool-failover-times.jsonl"))
# tmpfs starts a LocalCluster about 3x faster than a disk.
FAST_DIR = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None
RUN_ID = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")


#: Pool options for the failover scenarios: notice changes fast, enough connections.
FAILOVER_POOL: dict[str, Any] = {
    "topology_refresh_interval": 0.2,
    "min_size": 1,
    "max_size": 4,
    "failover_timeout": 10.0,
    "connect_timeout": 2.0,
}


# -- recording -------------------------------------------------------------------------


def record(scenario: str, **values: Any) -> dict[str, Any]:
    """Print one result line and append it to the JSONL file for the lead."""
    line: dict[str, Any] = {
        "scenario": scenario,
        "run": RUN_ID,
        "at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    line.update({k: round(v, 3) if isinstance(v, float) else v for k, v in values.items()})
    text = json.dumps(line, sort_keys=False)
    print(f"\n[failover] {text}")
    with TIMES_FILE.open("a") as out:
        out.write(text + "\n")
    return line


# -- direct checks ---------------------------------------------------------------------


async def ids_present(dsn: str, ids: list[int]) -> set[int]:
    """The ids among *ids* stored on the server at *dsn* (a direct connection, no pool)."""
    connection = await asyncpg.connect(dsn, timeout=5)
    try:
        rows = await connection.fetch("SELECT id FROM acked WHERE id = ANY($1::bigint[])", ids)
    finally:
        await connection.close()
    return {int(row[0]) for row in rows}


async def is_writable(dsn: str) -> bool:
    connection = await asyncpg.connect(dsn, timeout=2)
    try:
        return bool(await connection.fetchval("SELECT NOT pg_is_in_recovery()"))
    finally:
        await connection.close()


async def poll_until(
    probe: Callable[[], Awaitable[T | None]], timeout: float, what: str, interval: float = 0.02
) -> tuple[float, T]:
    """Call *probe* until it returns something; return (monotonic time seen, the value)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            found = await probe()
        except Exception as exc:  # the thing polled is itself failing over
            last_error = exc
            found = None
        if found is not None:
            return time.monotonic(), found
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what} not seen within {timeout} s (last error: {last_error})")
        await asyncio.sleep(interval)


def lsn(text: str) -> int:
    high, _, low = text.partition("/")
    return (int(high, 16) << 32) + int(low, 16)


def most_advanced(replicas: list[LocalNode]) -> LocalNode:
    """The running replica that received the most WAL: promoting it loses nothing flushed."""
    positions = {
        r: lsn(r.sql("SELECT pg_last_wal_receive_lsn()")) for r in replicas if r.is_running()
    }
    return max(positions, key=lambda r: positions[r])


async def first_direct_write(dsn: str, timeout: float) -> float:
    """When a write straight to *dsn* (no pool) is first acknowledged: the cluster's own
    availability, to tell picopool's share of the outage from the database's (e.g. a
    commit waiting for a synchronous standby to reconnect)."""
    deadline = time.monotonic() + timeout
    probe_id = -(time.time_ns() // 1000)  # negative: never collides with the load's ids
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            connection = await asyncpg.connect(dsn, timeout=2)
        except Exception as exc:
            last_error = exc
            await asyncio.sleep(0.01)
            continue
        try:
            await connection.execute(
                INSERT, probe_id, timeout=max(0.1, deadline - time.monotonic())
            )
            return time.monotonic()
        except asyncpg.UniqueViolationError:  # an earlier attempt committed after all
            return time.monotonic()
        except Exception as exc:
            last_error = exc
        finally:
            connection.terminate()
        await asyncio.sleep(0.01)
    raise AssertionError(f"no direct write to {dsn} within {timeout} s: {last_error}")


@dataclass
class Timeline:
    """Monotonic instants of one failover (see the module docstring)."""

    kill: float  # the fault was started
    visible: float  # the source of truth names the new primary
    writable: float  # the new primary answers pg_is_in_recovery() = false
    direct_write: float  # a write straight to the new primary was acknowledged
    killed: float | None = None  # the old primary was verifiably dead (crash scenarios)


async def watch_new_primary(
    visible: Callable[[], Awaitable[T | None]],
    dsn_of: Callable[[T], str],
    what: str,
    t_kill: float,
    timeout: float = 60,
    interval: float = 0.02,
) -> tuple[T, Timeline]:
    """Poll the source of truth until it names the new primary, then time when that node
    is writable and when a direct write to it is acknowledged."""
    t_visible, found = await poll_until(visible, timeout, what, interval)
    dsn = dsn_of(found)

    async def writable() -> bool | None:
        return True if await is_writable(dsn) else None

    t_writable, _ = await poll_until(writable, timeout, f"{what} writable", 0.01)
    t_direct = await first_direct_write(dsn, timeout)
    return found, Timeline(t_kill, t_visible, t_writable, t_direct)


async def fail_over_under_load(
    pool: picopool.Pool,
    fail_over: Callable[[], Awaitable[tuple[T, Timeline]]],
    *,
    timeout: float,
    readers: int = 2,
    warmup_writes: int = 50,
    settle: float = 1.0,
) -> tuple[T, Timeline, LoadReport]:
    """Run a :class:`MixedLoad` through *pool*, call *fail_over* once writes flow, and stop
    the load *settle* s after writes resumed; return *fail_over*'s result and the report.

    Writes must flow within *timeout* s and resume within twice that after the new
    primary was visible; the load runs 4 * *timeout* s at most.
    """
    load = MixedLoad(pool, writers=4, readers=readers, max_duration=4 * timeout).start()
    try:
        await load.wait_for_write_after(load.report.started, timeout, count=warmup_writes)
        await asyncio.sleep(1.0)
        new, timeline = await fail_over()
        await load.wait_for_write_after(timeline.visible, 2 * timeout, count=20)
        await asyncio.sleep(settle)
    finally:
        report = await load.stop()
    return new, timeline, report


async def check_failover(
    scenario: str,
    *,
    provider: str,
    report: LoadReport,
    new_primary_dsn: str,
    timeline: Timeline,
    must_lose_nothing: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """Assert (or report) lost writes and resumed writes; record the timings."""
    acked = report.acked
    assert acked, f"no write was acknowledged at all: {report.summary()}"
    present = await ids_present(new_primary_dsn, acked + report.unknown_ids)
    lost = sorted(set(acked) - present)
    t_kill, t_visible, t_killed = timeline.kill, timeline.visible, timeline.killed
    after_kill = report.writes_between(t_kill, float("inf"))
    first = report.first_write_after(t_visible)
    first_after_killed = report.first_write_after(t_killed) if t_killed is not None else None
    around = [w.at for w in report.writes if w.at >= t_kill - 1.0]
    samples: dict[str, str] = {}
    for error in report.write_errors + report.read_errors:
        samples.setdefault(f"{error.kind}:{error.type}", error.message[:160])
    line = record(
        scenario,
        provider=provider,
        kill_to_visible_s=t_visible - t_kill,
        visible_to_writable_s=timeline.writable - t_visible,
        visible_to_direct_write_s=timeline.direct_write - t_visible,
        visible_to_first_write_s=(first.at - t_visible) if first else None,
        # picopool's own share: its first write after the one sent straight to the node
        first_write_after_direct_s=(first.at - timeline.direct_write) if first else None,
        killed_to_first_write_s=(
            first_after_killed.at - t_killed
            if first_after_killed is not None and t_killed is not None
            else None
        ),
        max_write_gap_s=max((b - a for a, b in itertools.pairwise(around)), default=None),
        acked_writes=len(acked),
        acked_after_kill=len(after_kill),
        lost_acked_writes=len(lost),
        failed_writes=len(report.write_errors),
        failed_writes_committed=len(set(report.unknown_ids) & present),
        reads_ok=report.reads_ok,
        reads_failed=report.reads_failed,
        errors=report.errors_by_type(),
        error_samples=samples,
        **extra,
    )
    if must_lose_nothing:
        assert not lost, f"{len(lost)} acknowledged writes missing on the new primary: {lost[:20]}"
    assert first is not None, "writes did not resume through the pool after the failover"
    return line


async def write_once_more(pool: picopool.Pool, dsn: str) -> None:
    """One more write through the same pool, found on the primary at *dsn*."""
    new_id = time.time_ns() // 1000 + 10**14  # far above the load's ids
    await pool.execute(INSERT, new_id)
    assert await ids_present(dsn, [new_id]) == {new_id}


def address_of(pool: picopool.Pool) -> str | None:
    topology = pool.topology
    primary = topology.primary if topology is not None else None
    return str(primary.address) if primary is not None else None


async def wait_pool_primary(pool: picopool.Pool, address: str, timeout: float = 10) -> None:
    async def seen() -> bool | None:
        return True if address_of(pool) == address else None

    await poll_until(seen, timeout, f"the pool's topology naming {address} primary")


# -- plain streaming replication -------------------------------------------------------


def start_local(cluster_factory: ClusterFactory, **options: Any) -> LocalCluster:
    cluster = cluster_factory(2, base_dir=FAST_DIR, **options)
    cluster.primary.sql(CREATE_TABLE)
    cluster.wait_replayed()
    return cluster


async def kill_and_promote(cluster: LocalCluster) -> tuple[LocalNode, Timeline]:
    """kill -9 the primary, promote the most advanced replica, repoint the other.

    For plain streaming the source of truth is the node itself: the new primary
    is visible once it answers ``pg_is_in_recovery() = false`` (polled meanwhile).
    """
    old = cluster.primary
    t_kill = time.monotonic()
    await asyncio.to_thread(old.kill)
    t_killed = time.monotonic()
    target = await asyncio.to_thread(most_advanced, cluster.replicas)
    connection = await asyncpg.connect(target.dsn, timeout=5)
    try:

        async def promoted() -> bool | None:
            return True if await connection.fetchval("SELECT NOT pg_is_in_recovery()") else None

        watcher = asyncio.ensure_future(
            watch_new_primary(
                promoted, lambda _: target.dsn, f"{target.name} promoted", t_kill, interval=0.01
            )
        )
        try:
            await asyncio.to_thread(cluster.failover, target)  # promote + repoint the rest
            _, timeline = await watcher
        finally:
            watcher.cancel()
            await asyncio.gather(watcher, return_exceptions=True)
    finally:
        await connection.close()
    timeline.killed = t_killed
    return target, timeline


async def test_streaming_sync_failover_under_load(
    cluster_factory: ClusterFactory, make_pool: PoolFactory
) -> None:
    cluster = start_local(cluster_factory, synchronous=True)
    pool = await make_pool(cluster.dsn, **FAILOVER_POOL)  # discovery auto-detected
    assert pool.stats().provider == "streaming"
    new, timeline, report = await fail_over_under_load(
        pool, lambda: kill_and_promote(cluster), timeout=10
    )
    await check_failover(
        "streaming-sync-kill-primary",
        provider="streaming",
        report=report,
        new_primary_dsn=new.dsn,
        timeline=timeline,
    )
    await wait_pool_primary(pool, f"{new.host}:{new.port}")
    await write_once_more(pool, new.dsn)
    await pool.close()
    cluster.stop()


@pytest.mark.parametrize("local_commit", ["on", "off"])
async def test_streaming_async_failover_reports_lost_writes(
    cluster_factory: ClusterFactory, make_pool: PoolFactory, local_commit: str
) -> None:
    """Asynchronous replication: acknowledged writes may be lost; count them for the README."""
    cluster = start_local(
        cluster_factory, synchronous=False, settings={"synchronous_commit": local_commit}
    )
    pool = await make_pool(cluster.dsn, **FAILOVER_POOL)
    new, timeline, report = await fail_over_under_load(
        pool,
        lambda: kill_and_promote(cluster),
        timeout=10,
        readers=0,
        warmup_writes=200,
        settle=0.5,
    )
    await check_failover(
        f"streaming-async-kill-primary (synchronous_commit={local_commit})",
        provider="streaming",
        report=report,
        new_primary_dsn=new.dsn,
        timeline=timeline,
        must_lose_nothing=False,
        replication="asynchronous",
        synchronous_commit=local_commit,
    )
    await write_once_more(pool, new.dsn)
    await pool.close()
    cluster.stop()


async def test_replica_kill_no_failed_reads(
    cluster_factory: ClusterFactory, make_pool: PoolFactory
) -> None:
    """Reads that hit a killed replica are retried elsewhere: none fails."""
    cluster = start_local(cluster_factory, synchronous=True)
    pool = await make_pool(cluster.dsn, **FAILOVER_POOL)
    victim = cluster.replicas[0]
    load = MixedLoad(pool, writers=0, readers=6, max_duration=30).start()
    try:
        await load.wait_for_reads(200, 10)
        t_kill = time.monotonic()
        await asyncio.to_thread(victim.kill)
        await asyncio.sleep(2.0)
    finally:
        report = await load.stop()
    reads_after = [r for r in report.reads if r.ok and r.started >= t_kill]
    record(
        "streaming-kill-replica-reads",
        provider="streaming",
        reads_ok=report.reads_ok,
        reads_failed=report.reads_failed,
        reads_after_kill=len(reads_after),
        errors=report.errors_by_type(),
    )
    assert not report.read_errors, report.read_errors[:5]
    assert len(reads_after) > 50
    await pool.close()
    cluster.stop()


def breaker_view(pool: picopool.Pool, address: str) -> picopool.InstanceStats | None:
    return next((i for i in pool.stats().instances if i.address == address), None)


async def test_circuit_breaker_visible(
    cluster_factory: ClusterFactory, make_pool: PoolFactory
) -> None:
    """After a replica dies, stats() shows its breaker open (or it left the topology)."""
    cluster = start_local(cluster_factory, synchronous=True)
    replicas = [f"{r.host}:{r.port}" for r in cluster.replicas]
    streaming = await make_pool(cluster.dsn, **FAILOVER_POOL)
    # A static topology keeps the dead instance listed, so its breaker must show.
    static = await make_pool(cluster.dsn, **{**FAILOVER_POOL, "discovery": Static(replicas)})
    victim, victim_address = cluster.replicas[0], replicas[0]
    loads = [
        MixedLoad(p, writers=0, readers=4, read_query="select 1", max_duration=30).start()
        for p in (streaming, static)
    ]
    try:
        for load in loads:
            await load.wait_for_reads(50, 10)
        t_kill = time.monotonic()
        await asyncio.to_thread(victim.kill)

        async def static_breaker_open() -> picopool.InstanceStats | None:
            seen = breaker_view(static, victim_address)
            return seen if seen is not None and seen.failures > 0 else None

        t_open, seen = await poll_until(static_breaker_open, 10, "the static pool's breaker")
        assert seen.breaker in {"open", "half-open"}
        assert seen.last_error
        await asyncio.sleep(1.5)  # reads keep succeeding on the other replica
    finally:
        reports = [await load.stop() for load in loads]
    after_streaming = breaker_view(streaming, victim_address)
    after_static = breaker_view(static, victim_address)
    record(
        "breaker-after-replica-kill",
        kill_to_breaker_open_s=t_open - t_kill,
        static_breaker=after_static.breaker if after_static else None,
        static_failures=after_static.failures if after_static else None,
        streaming_view=(
            "left the topology"
            if after_streaming is None
            else f"{after_streaming.breaker} failures={after_streaming.failures}"
        ),
        reads_failed=[r.reads_failed for r in reports],
    )
    assert after_static is not None and after_static.failures > 0
    assert after_streaming is None or after_streaming.failures > 0
    for report in reports:
        assert not report.read_errors, report.read_errors[:5]
        assert [r for r in report.reads if r.ok and r.started > t_kill + 1.0], (
            "reads did not keep succeeding after the kill"
        )
    for pool in (streaming, static):
        await pool.close()
    cluster.stop()


async def test_demoted_primary_write_moves_to_new_primary(
    cluster_factory: ClusterFactory, make_pool: PoolFactory
) -> None:
    """A write refused as read-only (25006) refreshes the topology and lands once elsewhere.

    The old primary turns read-only and a replica is promoted while the pool's
    topology (no background polling) still names the old one: the write gets
    25006, which proves the server did not run it, so it is retried on the new
    primary after one refresh.
    """
    cluster = start_local(cluster_factory, synchronous=False)
    old, new = cluster.primary, cluster.replicas[0]
    pool = await make_pool(
        cluster.dsn,
        **{**FAILOVER_POOL, "topology_refresh_interval": None, "health_check_interval": None},
    )
    # Two connections pooled to the old primary; remember their server PIDs.
    async with pool.acquire() as first, pool.acquire() as second:
        pooled = {await c.fetchval("SELECT pg_backend_pid()") for c in (first, second)}
    old_address, new_address = f"{old.host}:{old.port}", f"{new.host}:{new.port}"
    assert address_of(pool) == old_address
    await asyncio.to_thread(old.set_parameter, "default_transaction_read_only", "on")
    await asyncio.to_thread(new.promote)
    assert address_of(pool) == old_address, "the topology must not know yet"
    refreshes = pool.stats().refreshes
    new_id = 424242
    started = time.monotonic()
    await pool.execute(INSERT, new_id)
    elapsed = time.monotonic() - started
    refreshed = pool.stats().refreshes - refreshes
    # The server's own log proves the write reached the old primary and was refused.
    refused = "cannot execute INSERT in a read-only transaction"
    assert refused in old.log_file.read_text(errors="replace"), (
        "the write never hit the old primary"
    )
    assert address_of(pool) == new_address
    # Landed exactly once, on the new primary; the old one refused it.
    assert await ids_present(new.dsn, [new_id]) == {new_id}
    assert await ids_present(old.dsn, [new_id]) == set()
    # The pool no longer counts the old primary as one, and the connections it
    # pooled there are closed (expired at the 25006, then drained).
    old_view = breaker_view(pool, old_address)
    assert old_view is None or old_view.role != "primary"

    async def pooled_connections_closed() -> bool | None:
        connection = await asyncpg.connect(old.dsn, timeout=5)
        try:
            alive = await connection.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1::int[])", list(pooled)
            )
        finally:
            await connection.close()
        return True if alive == 0 else None

    t_closed, _ = await poll_until(
        pooled_connections_closed, 10, "the old primary's pooled connections closed", 0.05
    )
    record(
        "streaming-demotion-25006",
        provider="streaming",
        write_s=elapsed,
        refreshes_during_write=refreshed,
        old_primary_view=None if old_view is None else f"{old_view.role} {old_view.breaker}",
        write_to_old_connections_closed_s=t_closed - started,
    )
    assert elapsed < 3.0
    assert 1 <= refreshed <= 2, f"{refreshed} refreshes to learn the new primary"
    await pool.close()
    cluster.stop()


async def test_read_only_refusal_does_not_trip_the_breaker(
    cluster_factory: ClusterFactory, make_pool: PoolFactory
) -> None:
    """A primary that refuses writes for a moment takes them again at once when it can.

    25006 is what a Patroni leader answers while its promotion finishes; it says
    nothing about the instance's health, so it must not open the breaker.
    """
    cluster = cluster_factory(1, base_dir=FAST_DIR)
    primary = cluster.primary
    primary.sql(CREATE_TABLE)
    pool = await make_pool(cluster.dsn, **FAILOVER_POOL)
    load = MixedLoad(pool, writers=4, readers=0, max_duration=30).start()
    try:
        await load.wait_for_write_after(load.report.started, 10, count=50)
        await asyncio.to_thread(primary.set_parameter, "default_transaction_read_only", "on")
        await asyncio.sleep(0.3)
        await asyncio.to_thread(primary.set_parameter, "default_transaction_read_only", None)
        t_writable = time.monotonic()
        first = await load.wait_for_write_after(t_writable, 20)
    finally:
        report = await load.stop()
    resume = first.at - t_writable
    record(
        "read-only-window-resume",
        provider="streaming",
        writable_to_first_write_s=resume,
        failed_writes=len(report.write_errors),
        errors=report.errors_by_type(),
    )
    await pool.close()
    cluster.stop()
    assert resume < 1.0, f"writes resumed {resume:.2f} s after the primary took them again"


async def test_no_retry_inside_acquire(
    cluster_factory: ClusterFactory, make_pool: PoolFactory
) -> None:
    """A statement on an acquired connection is never retried: the user sees the error."""
    cluster = start_local(cluster_factory, synchronous=True)
    pool = await make_pool(cluster.dsn, **FAILOVER_POOL)
    old = cluster.primary
    new_id = 777
    caught: BaseException | None = None
    async with pool.acquire() as connection:
        statement = asyncio.ensure_future(
            connection.execute("INSERT INTO acked(id) SELECT $1 FROM pg_sleep(30)", new_id)
        )
        await asyncio.sleep(0.3)
        assert not statement.done()
        new = await asyncio.to_thread(cluster.failover)  # kills the primary mid-statement
        try:
            await asyncio.wait_for(statement, 10)
        except Exception as exc:
            caught = exc
    assert caught is not None, "the statement survived the death of its server"
    assert isinstance(caught, asyncpg.PostgresError | asyncpg.InterfaceError | OSError)
    assert not isinstance(caught, picopool.PicopoolError), "picopool intervened inside acquire()"
    # Not retried anywhere: the new primary never saw it.
    assert await ids_present(new.dsn, [new_id]) == set()
    # The pool still follows the topology and serves writes.
    await wait_pool_primary(pool, f"{new.host}:{new.port}")
    await write_once_more(pool, new.dsn)
    record("acquire-no-retry", error=type(caught).__name__, old=old.name, new=new.name)
    await pool.close()
    cluster.stop()


# -- Patroni + etcd --------------------------------------------------------------------


def healthy_or_skip(request: pytest.FixtureRequest, fixture: str) -> Any:
    """The value of the conftest's *fixture* (a healthy HA cluster shared by the session);
    skipped if the HA tools are not installed."""
    try:
        return request.getfixturevalue(fixture)
    except HarnessUnavailable as exc:
        pytest.skip(f"{fixture}: HA harness unavailable: {exc}")


@pytest.fixture
def patroni(request: pytest.FixtureRequest) -> PatroniCluster:
    """The session's Patroni cluster: 3 nodes, synchronous_mode."""
    cluster: PatroniCluster = healthy_or_skip(request, "patroni_healthy")
    return cluster


def patroni_leader_running(cluster: PatroniCluster, old: str) -> str | None:
    """The new leader once /cluster lists it as ``leader`` and ``running``."""
    for member in cluster.members():
        if (
            member.get("role") == "leader"
            and member.get("state") == "running"
            and member.get("name") != old
        ):
            return str(member["name"])
    return None


async def patroni_failover(
    make_pool: PoolFactory,
    cluster: PatroniCluster,
    scenario: str,
    fault: Callable[[], Any],
    *,
    fault_kills: bool,
) -> str:
    """Cause *fault* under load through a Patroni pool and check the failover, which must
    promote the sync standby; return the old leader's name."""
    pool = await make_pool(
        cluster.dsn, **{**FAILOVER_POOL, "discovery": Patroni(urls=cluster.rest_urls)}
    )
    await pool.execute(CREATE_TABLE)
    old = cluster.leader_name()
    sync = cluster.sync_standby_name()
    assert old is not None and sync is not None

    def run_fault() -> float:
        fault()
        return time.monotonic()

    async def visible() -> str | None:
        return await asyncio.to_thread(patroni_leader_running, cluster, old)

    async def fail_over() -> tuple[str, Timeline]:
        t_kill = time.monotonic()
        fault_done = asyncio.ensure_future(asyncio.to_thread(run_fault))
        try:
            new, timeline = await watch_new_primary(
                visible, lambda name: cluster.node(name).dsn, "a new Patroni leader", t_kill
            )
            fault_finished = await fault_done
        finally:  # a thread cannot be cancelled: wait for it
            await asyncio.gather(fault_done, return_exceptions=True)
        timeline.killed = fault_finished if fault_kills else None
        return new, timeline

    new, timeline, report = await fail_over_under_load(pool, fail_over, timeout=15)
    node = cluster.node(new)
    await check_failover(
        scenario,
        provider="patroni",
        report=report,
        new_primary_dsn=node.dsn,
        timeline=timeline,
        old=old,
        new=new,
    )
    await wait_pool_primary(pool, f"127.0.0.1:{node.pg_port}")
    await write_once_more(pool, node.dsn)
    assert new == sync, "synchronous_mode must promote the sync standby"
    return old


@pytest.mark.ha
async def test_patroni_kill_leader(patroni: PatroniCluster, make_pool: PoolFactory) -> None:
    old = await patroni_failover(
        make_pool, patroni, "patroni-kill-leader", patroni.kill_leader, fault_kills=True
    )
    started = time.monotonic()
    await asyncio.to_thread(patroni.restart_node, old)
    await asyncio.to_thread(patroni.wait_replicas_streaming)
    record("patroni-restart-killed-node", seconds=time.monotonic() - started, node=old)


@pytest.mark.ha
async def test_patroni_switchover(patroni: PatroniCluster, make_pool: PoolFactory) -> None:
    await patroni_failover(
        make_pool, patroni, "patroni-switchover", patroni.switchover, fault_kills=False
    )


# -- pg_auto_failover ------------------------------------------------------------------


@pytest.fixture
def autofailover(request: pytest.FixtureRequest) -> AutoFailoverCluster:
    """The session's pg_auto_failover formation: a monitor and 3 nodes."""
    cluster: AutoFailoverCluster = healthy_or_skip(request, "autofailover_healthy")
    return cluster


@pytest.mark.ha
async def test_autofailover_kill_primary(
    autofailover: AutoFailoverCluster, make_pool: PoolFactory
) -> None:
    cluster = autofailover
    pool = await make_pool(
        cluster.dsn, **{**FAILOVER_POOL, "discovery": AutoFailover(cluster.monitor_dsn)}
    )
    await pool.execute(CREATE_TABLE)
    old = cluster.primary_node()
    sync_names = cluster.sql(old.name, "SHOW synchronous_standby_names")
    assert sync_names, "pg_auto_failover should replicate synchronously with two secondaries"

    async def visible() -> str | None:
        name = await asyncio.to_thread(cluster.primary_name)
        return name if name is not None and name != old.name else None

    async def kill_primary() -> tuple[str, Timeline]:
        t_kill = time.monotonic()
        await asyncio.to_thread(cluster.kill_primary)
        t_killed = time.monotonic()
        new_name, timeline = await watch_new_primary(
            visible,
            lambda name: cluster.node(name).dsn,
            "a new pg_auto_failover primary",
            t_kill,
            interval=0.05,
        )
        timeline.killed = t_killed
        return new_name, timeline

    new_name, timeline, report = await fail_over_under_load(pool, kill_primary, timeout=15)
    new = cluster.node(new_name)
    await check_failover(
        "pg_auto_failover-kill-primary",
        provider="pg_auto_failover",
        report=report,
        new_primary_dsn=new.dsn,
        timeline=timeline,
        old=old.name,
        new=new_name,
        synchronous_standby_names=sync_names,
    )
    await wait_pool_primary(pool, f"127.0.0.1:{new.port}")
    await write_once_more(pool, new.dsn)


# -- a FATAL that reaches an idle pooled connection before the close ------------------


class LingeringProxy:
    """A TCP proxy whose client side closes *linger* seconds after the server side did.

    Makes a race of real crashes deterministic: the server's last message
    (FATAL) reaches the client at once, the end of the connection only later.
    """

    def __init__(self, host: str, port: int, linger: float) -> None:
        self._target = (host, port)
        self._linger = linger
        self._server: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()
        self.port = 0

    async def start(self) -> LingeringProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._handlers.add(task)
        task.add_done_callback(self._handlers.discard)

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection(*self._target)
        try:
            await asyncio.gather(
                self._pump(client_r, server_w, 0.0), self._pump(server_r, client_w, self._linger)
            )
        finally:
            for writer in (client_w, server_w):
                writer.close()

    @staticmethod
    async def _pump(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, linger: float
    ) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        await asyncio.sleep(linger)
        writer.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._handlers):
            task.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)


@pytest.mark.parametrize("statement", ["read", "write"])
async def test_fatal_on_idle_pooled_connection_is_retried(
    cluster_factory: ClusterFactory, make_pool: PoolFactory, statement: str
) -> None:
    cluster = cluster_factory(0, base_dir=FAST_DIR)
    cluster.primary.sql(CREATE_TABLE)
    proxy = await LingeringProxy(cluster.primary.host, cluster.primary.port, 2.0).start()
    try:
        pool = await make_pool(
            cluster.primary.dsn_at(port=proxy.port),
            discovery=Static(),
            min_size=1,
            max_size=1,
            topology_refresh_interval=None,
        )
        pid = await pool.fetchval("SELECT pg_backend_pid()")
        direct = await asyncpg.connect(cluster.primary.dsn, timeout=5)
        try:  # the backend sends FATAL 57P01 and exits; the proxy delays the close
            await direct.fetchval("SELECT pg_terminate_backend($1)", pid)
        finally:
            await direct.close()
        await asyncio.sleep(0.3)
        if statement == "read":
            assert await pool.fetchval("SELECT 41 + 1") == 42
        else:  # nothing was sent, so the write is provably safe to retry
            await pool.execute(INSERT, 31337)
            assert await ids_present(cluster.primary.dsn, [31337]) == {31337}
        await pool.close()
    finally:
        await proxy.close()
        cluster.stop()
