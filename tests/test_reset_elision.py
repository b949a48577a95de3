"""Reset elision: a pool-level statement that provably leaves no session state skips
asyncpg's reset query on release; anything else must leave the next user a clean session.

Every pool here has exactly one connection per instance, so the next statement on
an instance reuses the connection the previous one left behind. Whether the reset
query was really sent is observed on the server: the connection class appends a
marker to the reset query that counts itself in a table on the primary.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest

import picopool
import picopool._member
from picopool.cluster import LocalCluster, LocalNode

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]

S = "h6_reset"  # this module's schema on the shared cluster
CLEAN_DB = "h6_clean"

SETUP = f"""
drop schema if exists {S} cascade;
create schema {S};
create table {S}.resets (n int not null);
insert into {S}.resets values (0);
create function {S}.set_work_mem() returns int language plpgsql as $$
begin
  perform set_config('work_mem', '3MB', false);
  return 1;
end $$;
create table {S}.trig_t (id int);
create function {S}.trig_fn() returns trigger language plpgsql as $$
begin
  perform set_config('work_mem', '5MB', false);
  return new;
end $$;
create trigger trig before insert on {S}.trig_t for each row execute function {S}.trig_fn();
create function {S}.view_fn() returns int language plpgsql as $$
begin
  perform set_config('work_mem', '6MB', false);
  return 1;
end $$;
create view {S}.v as select {S}.view_fn() as x;
"""

# Counts the resets that reach the primary; a no-op on replicas (read-only).
MARKER = (f"DO $$BEGIN IF NOT pg_is_in_recovery() THEN UPDATE {S}.resets SET n = n + 1; "
          "END IF; END$$;")


class MarkedConnection(asyncpg.Connection):  # type: ignore[misc]
    """asyncpg's reset query plus the counting marker."""

    def get_reset_query(self) -> str:
        return f"{super().get_reset_query()}\n{MARKER}"


STATE = """select current_setting('work_mem') as work_mem,
    (select count(*) from pg_locks
      where locktype = 'advisory' and pid = pg_backend_pid()) as advisory_locks,
    (select count(*) from pg_listening_channels()) as channels,
    (select count(*) from pg_cursors where name like 'h6%') as cursors,
    (select count(*) from pg_prepared_statements where name like 'h6%') as prepared,
    pg_backend_pid() as pid, inet_server_port() as port
    /* {hint} */"""


@dataclass(frozen=True)
class Database:
    """One database of the shared cluster, seen the way these tests use it."""

    cluster: LocalCluster
    name: str

    @property
    def dsn(self) -> str:
        return self.cluster.dsn.rsplit("/", 1)[0] + "/" + self.name

    @property
    def primary(self) -> LocalNode:
        return self.cluster.primary

    @property
    def replicas(self) -> list[LocalNode]:
        return self.cluster.replicas

    def sql(self, query: str) -> str:
        return self.cluster.primary.sql(query, database=self.name)


@pytest.fixture(scope="module")
def shared(cluster: LocalCluster) -> Iterator[Database]:
    """The cluster's main database, with functions, a trigger and a view that change
    session state behind a statement's back: reset elision must turn itself off."""
    cluster.primary.sql(SETUP)
    cluster.wait_replayed()
    try:
        yield Database(cluster, "postgres")
    finally:
        cluster.primary.sql(f"drop schema if exists {S} cascade")


@pytest.fixture(scope="module")
def clean_db(cluster: LocalCluster) -> Iterator[Database]:
    """A database with nothing that could change session state: elision is on."""
    cluster.primary.sql(f"drop database if exists {CLEAN_DB}")
    cluster.primary.sql(f"create database {CLEAN_DB}")
    database = Database(cluster, CLEAN_DB)
    database.sql(f"create schema {S}; create table {S}.resets (n int not null); "
                 f"insert into {S}.resets values (0); create table {S}.plain_t (id int)")
    cluster.wait_replayed()
    try:
        yield database
    finally:
        cluster.primary.sql(f"drop database if exists {CLEAN_DB} with (force)")


async def one_per_instance(make_pool: PoolFactory, database: Database,
                           **options: Any) -> picopool.Pool:
    return await make_pool(database.dsn, min_size=1, max_size=1, health_check_interval=None,
                           connection_class=MarkedConnection, **options)


async def resets(database: Database) -> int:
    return int(await asyncio.to_thread(database.sql, f"select n from {S}.resets"))


async def state_on(pool: picopool.Pool, port: int) -> dict[str, Any]:
    """The session state of the one connection to the instance at *port*."""
    hint = f"picopool: instance=127.0.0.1:{port}"
    row = await pool.fetchrow(STATE.replace("{hint}", hint))
    assert row["port"] == port
    return dict(row)


def clean(baseline: dict[str, Any]) -> dict[str, Any]:
    return {"work_mem": baseline["work_mem"], "advisory_locks": 0, "channels": 0,
            "cursors": 0, "prepared": 0, "pid": baseline["pid"], "port": baseline["port"]}


# -- elision happens, and only where it may -----------------------------------------


async def test_reset_elided_after_a_plain_select(
    clean_db: Database, make_pool: PoolFactory
) -> None:
    pool = await one_per_instance(make_pool, clean_db)
    start = await resets(clean_db)
    for value in range(5):
        assert await pool.fetchval("select $1::int", value, role="primary") == value
    await pool.fetch("show work_mem", role="primary")
    await pool.execute(f"update {S}.plain_t set id = id where false")  # DML, no functions
    assert await resets(clean_db) == start  # not one reset query reached the server

    # a statement that may leave state: the full reset
    await pool.execute("set work_mem = '1MB'")
    assert await resets(clean_db) == start + 1
    # acquire() always gets the full reset, even when nothing happened
    async with pool.acquire() as con:
        await con.fetchval("select 1")
    assert await resets(clean_db) == start + 2
    async with pool.acquire():
        pass
    assert await resets(clean_db) == start + 3
    async with pool.transaction() as con:
        await con.fetchval("select 1")
    assert await resets(clean_db) == start + 4
    con = await pool.acquire()
    await pool.release(con)
    assert await resets(clean_db) == start + 5
    # COPY goes through a checked-out connection: full reset
    await pool.copy_from_query("select 1", output=io.BytesIO(), role="primary")
    assert await resets(clean_db) == start + 6
    # a failed statement: full reset
    with pytest.raises(asyncpg.DivisionByZeroError):
        await pool.fetchval("select 1 / $1::int", 0, role="primary")
    assert await resets(clean_db) == start + 7
    # and elision resumes afterwards
    await pool.fetchval("select $1::int", 1, role="primary")
    assert await resets(clean_db) == start + 7


async def test_an_elided_release_makes_no_task_and_survives_cancellation(
    clean_db: Database, make_pool: PoolFactory
) -> None:
    """With nothing to reset, the connection goes back to its sub-pool at once:
    asyncpg's release would make a task per statement (its shield); picopool
    makes one only when the release has to wait."""
    pool = await one_per_instance(make_pool, clean_db, topology_refresh_interval=None)
    loop = asyncio.get_running_loop()
    made = 0
    original = loop.create_task

    def counting(coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        nonlocal made
        made += 1
        return original(coro, **kwargs)

    await pool.fetchval("select 1", role="primary")
    loop.create_task = counting  # type: ignore[method-assign]
    try:
        for value in range(50):
            assert await pool.fetchval("select $1::int", value, role="primary") == value
    finally:
        loop.create_task = original  # type: ignore[method-assign]
    assert made < 5  # background work only; asyncpg's own release made 50

    # A release that waits (the reset query after a session change) still finishes
    # when its caller is cancelled mid-release: the one connection comes back clean.
    start = await resets(clean_db)
    for _ in range(5):
        task = asyncio.create_task(pool.execute("set work_mem = '2MB'", role="primary"))
        await asyncio.sleep(0.002)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert await pool.fetchval("show work_mem", role="primary") != "2MB"
    assert await resets(clean_db) > start
    stats = pool.stats()
    assert sum(i.in_use for i in stats.instances) == 0


class AsyncpgCalls:
    """Counts calls into asyncpg's own acquire and release coroutines."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.acquires = self.releases = 0
        acquire, release = asyncpg.pool.Pool._acquire, asyncpg.pool.PoolConnectionHolder.release

        async def counted_acquire(pool: Any, timeout: float | None) -> Any:
            self.acquires += 1
            return await acquire(pool, timeout)

        async def counted_release(holder: Any, timeout: float | None) -> None:
            self.releases += 1
            await release(holder, timeout)

        monkeypatch.setattr(asyncpg.pool.Pool, "_acquire", counted_acquire)
        monkeypatch.setattr(asyncpg.pool.PoolConnectionHolder, "release", counted_release)


def primary_sub_pool(pool: picopool.Pool) -> Any:
    return next(m.pool for m in pool._membership.members.values()
                if m.instance.role.writable)


async def test_a_free_connection_is_taken_and_returned_without_asyncpgs_coroutines(
    clean_db: Database, make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A statement that finds a live connection free, and leaves nothing to undo,
    checks it out and back in without asyncpg's five acquire coroutines and its
    release's four: the holder ends in the state asyncpg's own would leave."""
    pool = await one_per_instance(make_pool, clean_db, topology_refresh_interval=None)
    pid = await pool.fetchval("select pg_backend_pid()", role="primary")
    calls = AsyncpgCalls(monkeypatch)
    for value in range(50):
        assert await pool.fetchval("select $1::int", value, role="primary") == value
    assert (calls.acquires, calls.releases) == (0, 0)
    sub_pool = primary_sub_pool(pool)
    [holder] = sub_pool._holders
    assert sub_pool.get_idle_size() == sub_pool.get_size() == 1
    assert holder._in_use is None and holder._proxy is None and holder._timeout is None
    assert holder._inactive_callback is not None  # max_inactive_connection_lifetime
    assert await pool.fetchval("select pg_backend_pid()", role="primary") == pid

    # A connection that died while idle: asyncpg's acquire opens a new one.
    holder._con.terminate()
    assert await pool.fetchval("select pg_backend_pid()", role="primary") != pid
    assert calls.acquires == 1

    # The session changed: picopool's reset runs, then the connection goes back.
    start = await resets(clean_db)
    await pool.execute("set work_mem = '3MB'", role="primary")
    assert await resets(clean_db) == start + 1
    assert await pool.fetchval("show work_mem", role="primary") != "3MB"


def test_the_shortcut_is_kept_to_the_asyncpg_versions_it_was_checked_against(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    known = picopool._member._knows_asyncpg_internals
    assert known(asyncpg.__version__) is picopool._member._FAST
    assert known("0.30.0") and known("0.32.1")
    for version in ("0.29.0", "0.33.0", "1.0.0", "dev", ""):
        assert not known(version)

    class Reshaped:  # a holder without the slots the shortcut relies on
        __slots__ = ("_con", "_pool")

    monkeypatch.setattr(asyncpg.pool, "PoolConnectionHolder", Reshaped)
    assert not known("0.32.0")
    monkeypatch.delattr(asyncpg.pool, "PoolConnectionHolder")
    assert not known("0.32.0")


async def test_without_the_shortcut_asyncpg_takes_and_releases(
    clean_db: Database, make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(picopool._member, "_FAST", False)
    pool = await one_per_instance(make_pool, clean_db, topology_refresh_interval=None)
    calls = AsyncpgCalls(monkeypatch)
    for value in range(5):
        assert await pool.fetchval("select $1::int", value, role="primary") == value
    assert (calls.acquires, calls.releases) == (5, 5)
    assert sum(i.in_use for i in pool.stats().instances) == 0


@pytest.mark.parametrize("fast", [True, False], ids=["shortcut", "asyncpg-api"])
async def test_in_use_counts_what_asyncpg_counts(
    clean_db: Database, make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch, fast: bool
) -> None:
    """Load-aware strategies read ``in_use`` on every pick: read from asyncpg's
    internals or through its API, it is what asyncpg's own sizes say."""
    monkeypatch.setattr(picopool._member, "_FAST", fast)
    pool = await make_pool(clean_db.dsn, min_size=1, max_size=3, health_check_interval=None,
                           topology_refresh_interval=None)
    member = next(m for m in pool._membership.members.values() if m.instance.role.writable)
    sub_pool = member.pool
    held = []
    for count in range(1, 4):
        held.append(await pool.acquire(role="primary"))
        assert member.in_use() == sub_pool.get_size() - sub_pool.get_idle_size() == count
    for count in range(2, -1, -1):
        await pool.release(held.pop())
        assert member.in_use() == sub_pool.get_size() - sub_pool.get_idle_size() == count
    await sub_pool.close()
    assert member.in_use() == 0  # a closed sub-pool has nothing in use


async def test_releases_that_must_wait_go_through_asyncpg(
    clean_db: Database, make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reset callback of the user's runs on every release, and a connection
    past max_queries is closed: both are asyncpg's own release."""
    reset_calls = 0

    async def user_reset(connection: Any) -> None:
        nonlocal reset_calls
        reset_calls += 1

    pool = await one_per_instance(make_pool, clean_db, topology_refresh_interval=None,
                                  reset=user_reset)
    await pool.fetchval("select 1", role="primary")
    calls, reset_calls = AsyncpgCalls(monkeypatch), 0
    for value in range(5):
        assert await pool.fetchval("select $1::int", value, role="primary") == value
    assert reset_calls == calls.releases == 5
    assert calls.acquires == 0

    pool = await one_per_instance(make_pool, clean_db, topology_refresh_interval=None,
                                  max_queries=3)
    pids = [await pool.fetchval("select pg_backend_pid()", role="primary")
            for _ in range(7)]
    assert len(set(pids)) == 3  # a new connection after every third query
    assert sum(i.in_use for i in pool.stats().instances) == 0


async def test_a_connection_left_in_a_transaction_is_rolled_back_by_asyncpg(
    clean_db: Database, make_pool: PoolFactory
) -> None:
    """give_back leaves a connection still in a transaction to asyncpg's release,
    which rolls it back before anyone else gets it."""
    pool = await one_per_instance(make_pool, clean_db, topology_refresh_interval=None)
    await pool.fetchval("select 1", role="primary")
    member = next(m for m in pool._membership.members.values() if m.instance.role.writable)
    connection = member.take()
    assert connection is not None and member.take() is None  # the only one is taken
    await connection._con.execute(f"begin; insert into {S}.plain_t values (1)")
    rest = member.give_back(connection)
    assert rest is not None
    await rest
    assert await pool.fetchval(f"select count(*) from {S}.plain_t", role="primary") == 0
    assert sum(i.in_use for i in pool.stats().instances) == 0


async def test_elide_reset_false_always_resets(
    clean_db: Database, make_pool: PoolFactory
) -> None:
    pool = await one_per_instance(make_pool, clean_db, elide_reset=False)
    start = await resets(clean_db)
    for value in range(3):
        await pool.fetchval("select $1::int", value, role="primary")
    assert await resets(clean_db) == start + 3


# -- whatever the statement did, the next user gets a clean session ------------------

STATE_CHANGES = [
    "set work_mem = '1MB'",
    "select set_config('work_mem', '2MB', false)",
    "select pg_advisory_lock(1)",
    "select pg_try_advisory_lock(2)",
    "listen h6_ch",
    "declare h6_c cursor with hold for select 1",
    f"select {S}.set_work_mem()",
    f"select * from {S}.set_work_mem()",
    "set work_mem = '1MB'; select 1",
]


@pytest.fixture(params=["clean_db", "shared"])
def database(request: pytest.FixtureRequest) -> Database:
    """Both: where reset elision is on (the classifier decides) and where it is off."""
    found: Database = request.getfixturevalue(request.param)
    return found


@pytest.mark.parametrize("statement", STATE_CHANGES)
async def test_next_user_on_the_primary_is_clean(
    database: Database, make_pool: PoolFactory, statement: str
) -> None:
    shared = database
    pool = await one_per_instance(make_pool, shared)
    baseline = await state_on(pool, shared.primary.port)
    assert baseline == clean(baseline)
    # whatever happened (an error, too), the next user must find a clean session
    with contextlib.suppress(asyncpg.PostgresError):
        await pool.execute(statement, role="primary")
    assert await state_on(pool, shared.primary.port) == clean(baseline)
    # without the hint, through routing: SET and friends are writes
    assert await pool.fetchval("select current_setting('work_mem')",
                               role="primary") == baseline["work_mem"]


async def test_the_check_sees_a_dirty_session(
    clean_db: Database, make_pool: PoolFactory
) -> None:
    """Control: with a user reset that does nothing, the state does reach the next user."""

    async def no_reset(connection: Any) -> None:
        return None

    pool = await one_per_instance(make_pool, clean_db, reset=no_reset)
    baseline = await state_on(pool, clean_db.primary.port)
    await pool.execute("set work_mem = '1MB'; select pg_advisory_lock(1); listen h6_ch")
    dirty = await state_on(pool, clean_db.primary.port)
    assert dirty == {**clean(baseline), "work_mem": "1MB", "advisory_locks": 1, "channels": 1}
    async with pool.acquire() as con:  # a real reset, for whoever uses the cluster next
        await con.execute(con.get_reset_query())


@pytest.mark.parametrize("statement", [
    "set work_mem = '1MB'",
    "select set_config('work_mem', '2MB', false)",
    "select pg_advisory_lock(1)",
    "listen h6_ch",
])
async def test_state_changes_are_routed_to_the_primary(
    clean_db: Database, make_pool: PoolFactory, statement: str
) -> None:
    pool = await one_per_instance(make_pool, clean_db)
    baseline = await state_on(pool, clean_db.primary.port)
    before = {s.address: s.served for s in pool.stats().instances}
    await pool.execute(statement)
    after = {s.address: s.served for s in pool.stats().instances}
    assert [a for a in after if after[a] != before[a]] == [f"127.0.0.1:{clean_db.primary.port}"]
    assert await state_on(pool, clean_db.primary.port) == clean(baseline)


async def test_elision_turns_off_where_the_catalog_could_change_state(
    shared: Database, make_pool: PoolFactory
) -> None:
    """This database has a trigger and a view that call set_config(): no elision."""
    pool = await one_per_instance(make_pool, shared)
    start = await resets(shared)
    for value in range(3):
        await pool.fetchval("select $1::int", value, role="primary")
    assert await resets(shared) == start + 3


async def test_user_function_on_a_replica_leaves_no_state(
    shared: Database, make_pool: PoolFactory
) -> None:
    """A user function is a read (a replica runs it), but may set state: full reset."""
    pool = await one_per_instance(make_pool, shared)
    baselines = {r.port: await state_on(pool, r.port) for r in shared.replicas}
    for _ in range(4):  # round robin over both replicas
        row = await pool.fetchrow(f"select {S}.set_work_mem(), inet_server_port() as port,"
                                  " current_setting('work_mem') as work_mem")
        assert row["work_mem"] == "3MB"
        assert await state_on(pool, row["port"]) == clean(baselines[row["port"]])


async def test_prepared_statement_does_not_survive(
    clean_db: Database, make_pool: PoolFactory
) -> None:
    pool = await one_per_instance(make_pool, clean_db)
    baseline = await state_on(pool, clean_db.primary.port)
    await pool.execute("prepare h6_p as select 1")
    assert await state_on(pool, clean_db.primary.port) == clean(baseline)


@pytest.mark.parametrize("statement", [
    pytest.param(f"insert into {S}.trig_t values (1) returning 1", id="trigger"),
    pytest.param(f"select x from {S}.v", id="view"),
])
async def test_catalog_state_change_does_not_leak(
    shared: Database, make_pool: PoolFactory, statement: str
) -> None:
    """A trigger or a view whose function calls set_config()."""
    pool = await one_per_instance(make_pool, shared)
    baseline = await state_on(pool, shared.primary.port)
    assert await pool.fetchval(statement, role="primary") == 1
    assert await state_on(pool, shared.primary.port) == clean(baseline)


async def test_skip_reset_does_not_hold_closed_connections(
    clean_db: Database, make_pool: PoolFactory
) -> None:
    """Connections asyncpg closes instead of resetting (max_queries) leave no mark behind."""
    pool = await one_per_instance(make_pool, clean_db, max_queries=2)
    start = await resets(clean_db)
    for value in range(20):
        assert await pool.fetchval("select $1::int", value, role="primary") == value
    assert await resets(clean_db) == start  # closed, never reset
    await pool.execute("set work_mem = '1MB'", role="primary")
    assert await pool.fetchval("select current_setting('work_mem')", role="primary") != "1MB"
