"""The fault-injecting proxy (tests/harness/faultproxy.py), proven with plain asyncpg.

Each fault is checked against a real server: what the client sees, and what the
server ran (counted over a direct connection that bypasses the proxy).
"""

from __future__ import annotations

import asyncio
import gc
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest
from harness.faultproxy import Fault, FaultProxy

from picopool.cluster import LocalCluster, LocalNode

pytestmark = pytest.mark.integration

#: What a client sees when its connection is lost under it.
LOST = (asyncpg.InterfaceError, asyncpg.PostgresConnectionError, OSError)


@pytest.fixture(autouse=True)
def collect_garbage_here() -> Iterator[None]:
    """A socket left open by a test here (client or proxy) fails that test, not a later one."""
    yield
    gc.collect()


@pytest.fixture
async def proxy(cluster: LocalCluster) -> AsyncIterator[FaultProxy]:
    """A proxy in front of the shared cluster's primary."""
    faults = FaultProxy(cluster.primary.host, cluster.primary.port,
                        target_dsn=cluster.primary.dsn)
    await faults.start()
    try:
        yield faults
    finally:
        await faults.aclose()


@pytest.fixture
async def table(cluster: LocalCluster) -> AsyncIterator[str]:
    """A fresh table ``(n int)`` on the primary, dropped afterwards."""
    name = f"fp_{uuid.uuid4().hex[:10]}"
    direct = await asyncpg.connect(cluster.primary.dsn)
    try:
        await direct.execute(f"CREATE TABLE {name} (n int)")
        yield name
        await direct.execute(f"DROP TABLE IF EXISTS {name}")
    finally:
        await direct.close()


@asynccontextmanager
async def client(proxy: FaultProxy, **kwargs: Any) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection through *proxy*, terminated afterwards (it may be cut)."""
    conn = await asyncpg.connect(proxy.dsn(), **kwargs)
    try:
        yield conn
    finally:
        conn.terminate()


async def count(node: LocalNode, table: str) -> int:
    direct = await asyncpg.connect(node.dsn)
    try:
        rows: int = await direct.fetchval(f"SELECT count(*) FROM {table}")
        return rows
    finally:
        await direct.close()


async def backends(node: LocalNode, application_name: str) -> int:
    direct = await asyncpg.connect(node.dsn)
    try:
        found: int = await direct.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            application_name)
        return found
    finally:
        await direct.close()


async def eventually(condition: Any, timeout: float = 5.0) -> None:
    """Wait until the async *condition()* is true."""
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, "condition never became true"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("ssl", [None, False], ids=["ssl-request", "no-ssl"])
async def test_forwards_both_startup_flavours(proxy: FaultProxy, ssl: bool | None) -> None:
    """asyncpg's SSLRequest (answered 'N') and a plain StartupMessage are both relayed,
    and simple and extended queries work through the proxy."""
    kwargs: dict[str, Any] = {} if ssl is None else {"ssl": ssl}
    async with client(proxy, **kwargs) as conn:
        assert await conn.fetchval("SELECT $1::int + 1", 41) == 42
        assert await conn.execute("SELECT 1") == "SELECT 1"
        assert proxy.open_connections == 1
    await eventually(lambda: _is(proxy.open_connections == 0))
    assert proxy.fired == 0


async def _is(value: bool) -> bool:
    return value


async def test_cancel_requests_are_relayed(proxy: FaultProxy) -> None:
    """A query timeout makes asyncpg send a CancelRequest on a fresh connection; it reaches
    the server, so the connection is usable again at once."""
    async with client(proxy) as conn:
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT pg_sleep(5)", timeout=0.3)
        assert await conn.fetchval("SELECT 7") == 7
        assert time.monotonic() - started < 3


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
async def test_cut_before_query_never_runs_it(
    cluster: LocalCluster, proxy: FaultProxy, table: str, extended: bool
) -> None:
    """CUT_BEFORE_QUERY: the client loses its connection and the INSERT never ran."""
    async with client(proxy) as conn:
        assert await conn.fetchval("SELECT 1") == 1  # unmatched: forwarded
        proxy.arm(Fault.CUT_BEFORE_QUERY, match=f"INSERT INTO {table}")
        with pytest.raises(LOST):
            if extended:
                await conn.execute(f"insert into {table} values ($1)", 1)
            else:
                await conn.execute(f"insert into {table} values (1)")
    assert proxy.fired == 1
    assert proxy.armed == 0
    assert await count(cluster.primary, table) == 0
    await eventually(lambda: _is(proxy.open_connections == 0))


@pytest.mark.parametrize("extended", [False, True], ids=["simple", "extended"])
async def test_cut_after_commit_runs_it_but_the_client_loses_the_reply(
    cluster: LocalCluster, proxy: FaultProxy, table: str, extended: bool
) -> None:
    """CUT_AFTER_COMMIT: the INSERT committed, yet the client sees a lost connection."""
    async with client(proxy) as conn:
        proxy.arm(Fault.CUT_AFTER_COMMIT, match=table)
        with pytest.raises(LOST) as raised:
            if extended:
                await conn.fetchval(f"INSERT INTO {table} VALUES ($1) RETURNING n", 1)
            else:
                await conn.execute(f"INSERT INTO {table} VALUES (1)")
        assert isinstance(raised.value, asyncpg.ConnectionDoesNotExistError), raised.value
    assert proxy.fired == 1
    assert await count(cluster.primary, table) == 1


async def test_cut_after_commit_matches_a_cached_statement_run_again(
    cluster: LocalCluster, proxy: FaultProxy, table: str
) -> None:
    """A statement prepared earlier is re-executed with only Bind/Execute/Sync: the proxy
    knows its text from the earlier Parse, so match= still finds it."""
    query = f"INSERT INTO {table} VALUES ($1)"
    async with client(proxy) as conn:
        await conn.execute(query, 1)  # parsed and cached by asyncpg
        explicit = await conn.prepare(query)  # and an explicitly prepared one
        proxy.arm(Fault.CUT_AFTER_COMMIT, match=table)
        with pytest.raises(LOST):
            await conn.execute(query, 2)  # B/E/S only
    assert proxy.fired == 1
    assert await count(cluster.primary, table) == 2
    del explicit

    async with client(proxy) as conn:
        explicit = await conn.prepare(query)  # P/D/S: executes nothing, does not fire
        proxy.arm(Fault.CUT_BEFORE_QUERY, match=table)
        with pytest.raises(LOST):
            await explicit.fetch(3)  # B/E/S only
    assert proxy.fired == 2
    assert await count(cluster.primary, table) == 2


async def test_match_is_selective_and_times_counts(
    cluster: LocalCluster, proxy: FaultProxy, table: str
) -> None:
    """A fault fires only on statements whose text matches, and ``times`` of them."""
    proxy.arm(Fault.CUT_BEFORE_QUERY, match="no_such_statement_text", times=1)
    proxy.arm(Fault.CUT_AFTER_COMMIT, match=f"insert into {table}", times=2)
    for attempt in range(3):
        async with client(proxy) as conn:
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == attempt
            assert await conn.fetchval("SELECT $1::text", "x") == "x"
            if attempt < 2:
                with pytest.raises(LOST):
                    await conn.execute(f"INSERT INTO {table} VALUES ({attempt})")
            else:
                assert await conn.execute(f"INSERT INTO {table} VALUES (2)") == "INSERT 0 1"
    assert proxy.fired == 2
    assert proxy.armed == 1  # the unmatched one is still waiting
    assert await count(cluster.primary, table) == 3


async def test_a_failing_statement_gives_the_after_commit_fault_back(
    proxy: FaultProxy, table: str
) -> None:
    """No CommandComplete (the statement failed): no cut, and the fault stays armed."""
    proxy.arm(Fault.CUT_AFTER_COMMIT, match=table)
    async with client(proxy) as conn:
        with pytest.raises(asyncpg.DataError):
            await conn.execute(f"INSERT INTO {table} VALUES ($1)", "not a number")
        with pytest.raises(asyncpg.InvalidTextRepresentationError):
            await conn.execute(f"INSERT INTO {table} VALUES ('x')")
        assert proxy.fired == 0
        assert proxy.armed == 1
        with pytest.raises(LOST):
            await conn.execute(f"INSERT INTO {table} VALUES (1)")
    assert proxy.fired == 1


async def test_black_hole_times_out_queries_and_connects(proxy: FaultProxy) -> None:
    """BLACK_HOLE: an open connection's query and a new connection both time out; nothing is
    closed; heal() restores normal service for new connections."""
    async with client(proxy) as conn:
        proxy.black_hole()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT 1", timeout=0.5)
        with pytest.raises(TimeoutError):
            await asyncpg.connect(proxy.dsn(), timeout=0.5)
        assert time.monotonic() - started < 3
        assert not conn.is_closed()
        assert proxy.open_connections >= 2  # nothing closed: the held ones are still open
    proxy.heal()
    async with client(proxy) as conn:
        assert await conn.fetchval("SELECT 1") == 1


async def test_black_hole_on_a_matched_query_freezes_that_connection(proxy: FaultProxy) -> None:
    """arm(BLACK_HOLE, match=...) holds the matching query; other connections keep going."""
    async with client(proxy) as frozen, client(proxy) as other:
        proxy.arm(Fault.BLACK_HOLE, match="pg_backend_pid")
        with pytest.raises(TimeoutError):
            await frozen.fetchval("SELECT pg_backend_pid()", timeout=0.5)
        assert proxy.fired == 1
        assert await other.fetchval("SELECT 2") == 2


async def test_delay_connect(proxy: FaultProxy) -> None:
    """delay_connect holds the server's first bytes: a short connect timeout fails, a long
    one waits the delay out; 0 turns it off."""
    proxy.delay_connect(0.8)
    with pytest.raises(TimeoutError):
        await asyncpg.connect(proxy.dsn(), timeout=0.3)
    started = time.monotonic()
    async with client(proxy, timeout=5) as conn:
        assert time.monotonic() - started >= 0.75
        started = time.monotonic()
        assert await conn.fetchval("SELECT 1") == 1  # only the first bytes are late
        assert time.monotonic() - started < 0.5
    started = time.monotonic()
    async with client(proxy, ssl=False, timeout=5):
        assert time.monotonic() - started >= 0.75  # without an SSLRequest too
    proxy.delay_connect(0)
    started = time.monotonic()
    async with client(proxy):
        assert time.monotonic() - started < 0.5


async def test_slow_replies(proxy: FaultProxy) -> None:
    """slow_replies delays every server->client chunk; the statement still runs normally."""
    async with client(proxy) as conn:
        proxy.slow_replies(0.3)
        started = time.monotonic()
        assert await conn.fetchval("SELECT 5") == 5
        assert time.monotonic() - started >= 0.25
        proxy.slow_replies(0)
        started = time.monotonic()
        assert await conn.fetchval("SELECT 6") == 6
        assert time.monotonic() - started < 0.25


async def test_cut_all_closes_idle_connections(cluster: LocalCluster, proxy: FaultProxy) -> None:
    """CUT_IDLE: every open connection is closed; their backends go away; new ones work."""
    name = f"fp_idle_{uuid.uuid4().hex[:8]}"
    settings = {"application_name": name}
    async with client(proxy, server_settings=settings) as first, \
            client(proxy, server_settings=settings) as second:
        assert await backends(cluster.primary, name) == 2
        assert proxy.open_connections == 2
        proxy.cut_all()
        await eventually(lambda: _is(first.is_closed() and second.is_closed()))
        for conn in (first, second):
            with pytest.raises(LOST):
                await conn.fetchval("SELECT 1")
        assert proxy.open_connections == 0
        await eventually(lambda: _zero(backends(cluster.primary, name)))
    async with client(proxy) as conn:
        assert await conn.fetchval("SELECT 1") == 1


async def _zero(found: Any) -> bool:
    return bool(await found == 0)


async def test_aclose_leaves_nothing(cluster: LocalCluster) -> None:
    """aclose() closes the listener, normal, held and black-holed connections, and leaves
    no task and no socket (a ResourceWarning would fail this test at gc.collect())."""
    name = f"fp_close_{uuid.uuid4().hex[:8]}"
    proxy = FaultProxy(cluster.primary.host, cluster.primary.port)
    await proxy.start()
    dsn = proxy.dsn(cluster.primary.dsn)  # the same as target_dsn=
    normal = await asyncpg.connect(dsn, server_settings={"application_name": name})
    held = await asyncpg.connect(dsn, server_settings={"application_name": name})
    proxy.black_hole()
    pending = asyncio.ensure_future(asyncpg.connect(dsn, timeout=10))
    await eventually(lambda: _is(proxy.open_connections == 3))
    await proxy.aclose()
    assert proxy.open_connections == 0
    with pytest.raises(LOST):
        await pending
    for conn in (normal, held):
        with pytest.raises(LOST):
            await conn.fetchval("SELECT 1")
        conn.terminate()
    with pytest.raises(OSError):
        await asyncpg.connect(dsn, timeout=2)
    left = [t for t in asyncio.all_tasks()
            if getattr(t.get_coro(), "__qualname__", "").startswith("FaultProxy")]
    assert left == []
    await eventually(lambda: _zero(backends(cluster.primary, name)))
    gc.collect()
