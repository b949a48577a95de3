"""picopool.sqlalchemy: SQLAlchemy 2 ORM sessions over a real streaming cluster."""

from __future__ import annotations

import asyncio
import contextvars
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from sqlalchemy import String, func, select, text, update
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import picopool
from picopool.cluster import LocalCluster
from picopool.sqlalchemy import Engines, RoutingSession, create_engine, create_engines

pytestmark = pytest.mark.integration

PoolFactory = Callable[..., Awaitable[picopool.Pool]]


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = f"sa_items_{uuid.uuid4().hex[:8]}"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))
    stock: Mapped[int] = mapped_column(default=0)


Sessions = async_sessionmaker[AsyncSession]


def sessionmaker(engines: Engines) -> Sessions:
    return async_sessionmaker(sync_session_class=RoutingSession, info=engines.session_info(),
                              expire_on_commit=False)


async def in_recovery(session: AsyncSession) -> bool:
    return bool(await session.scalar(select(func.pg_is_in_recovery())))


@pytest.fixture
async def sa_pool(cluster: LocalCluster, make_pool: PoolFactory) -> picopool.Pool:
    # full sub-pools from the start: the server backends stay constant
    return await make_pool(cluster.dsn, min_size=2, max_size=2,
                           server_settings={"application_name": "picopool-sa"})


@pytest.fixture
async def engines(sa_pool: picopool.Pool, cluster: LocalCluster) -> AsyncIterator[Engines]:
    made = create_engines(sa_pool)
    async with made.primary.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    await asyncio.to_thread(cluster.wait_replayed)
    try:
        yield made
    finally:
        async with made.primary.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
        await made.dispose()


async def test_reads_go_to_replicas_and_writes_to_the_primary(engines: Engines) -> None:
    Session = sessionmaker(engines)
    async with Session() as session:
        assert await in_recovery(session)  # a session that only reads: a replica
        assert (await session.scalars(select(Item))).all() == []
    async with Session() as session:
        assert await in_recovery(session)  # the read before the write: still a replica
        session.add(Item(id=1, name="apple", stock=3))
        await session.flush()  # the flush moves the session to the primary ...
        assert not await in_recovery(session)
        # ... where its own uncommitted write is visible
        assert (await session.get(Item, 1)) is not None
        await session.commit()
        assert not await in_recovery(session)  # and it stays there
    async with Session() as session, session.begin():
        await session.execute(update(Item).where(Item.id == 1).values(stock=Item.stock - 1))
        assert not await in_recovery(session)
    async with Session() as session:
        await session.execute(select(Item).with_for_update())
        assert not await in_recovery(session)
    async with Session() as session:
        await session.execute(text(f"delete from {Item.__tablename__} where id = 42"))
        assert not await in_recovery(session)
        await session.rollback()
    async with Session() as session:
        assert await session.scalar(text("select 1")) == 1
        assert await in_recovery(session)
        await session.execute(select(func.now()), bind_arguments={"role": "primary"})
        assert not await in_recovery(session)


async def test_one_engine_per_role(sa_pool: picopool.Pool) -> None:
    primary = create_engine(sa_pool, "primary")
    replica = create_engine(sa_pool, "replica")
    try:
        async with primary.connect() as conn:
            assert (await conn.scalar(select(func.pg_is_in_recovery()))) is False
        async with replica.connect() as conn:
            assert (await conn.scalar(select(func.pg_is_in_recovery()))) is True
        with pytest.raises(TypeError, match="poolclass"):
            create_engine(sa_pool, poolclass=None)
    finally:
        await primary.dispose()
        await replica.dispose()


async def backends(cluster: LocalCluster) -> list[int]:
    """Server backends of this test's pool, counted on each server."""
    counts = []
    for node in cluster.nodes:
        con = await asyncpg.connect(node.dsn)
        try:
            counts.append(await con.fetchval(
                "select count(*) from pg_stat_activity where application_name = 'picopool-sa'"))
        finally:
            await con.close()
    return counts


async def replicated(cluster: LocalCluster, query: str, expected: int) -> None:
    """Wait until every replica answers *query* with *expected* (asynchronous replication:
    a new session's reads go to a replica, which may not have replayed the rows yet)."""
    for replica in cluster.replicas:
        con = await asyncpg.connect(replica.dsn)
        try:
            for _ in range(200):
                if await con.fetchval(query) == expected:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"{replica} never replayed: {query}")
        finally:
            await con.close()


async def test_connections_go_back_to_picopool(
    engines: Engines, sa_pool: picopool.Pool, cluster: LocalCluster,
) -> None:
    Session = sessionmaker(engines)
    async with Session() as session, session.begin():
        session.add_all(Item(id=i, name=f"item {i}") for i in range(10, 20))
    await replicated(cluster, f"select count(*) from {Item.__tablename__} where id >= 10", 10)
    before = await backends(cluster)

    async def work(i: int) -> None:
        async with Session() as session:
            assert len((await session.scalars(select(Item))).all()) >= 0
            if i % 3 == 0:
                item = await session.get(Item, 10 + i % 10)
                assert item is not None
                item.stock += 1
                await session.commit()

    for _ in range(5):
        await asyncio.gather(*(work(i) for i in range(8)))
    stats = sa_pool.stats()
    assert [i.in_use for i in stats.instances] == [0] * len(stats.instances)
    after = await backends(cluster)
    # 40 sessions later the servers have the same backends: the pool's (full) sub-pools
    # and picopool's own service and probe connections
    assert after == before, (before, after)


async def test_prepared_statements_survive_checkouts(
    engines: Engines, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """NullPool makes every checkout a new DBAPI connection: statements must not be re-prepared."""
    prepares: list[str] = []
    codecs: list[str] = []
    real_prepare = asyncpg.Connection.prepare
    real_codec = asyncpg.Connection.set_type_codec

    async def counting_prepare(self: Any, query: str, **kw: Any) -> Any:
        prepares.append(query)
        return await real_prepare(self, query, **kw)

    async def counting_codec(self: Any, typename: str, **kw: Any) -> Any:
        codecs.append(typename)
        return await real_codec(self, typename, **kw)

    monkeypatch.setattr(asyncpg.Connection, "prepare", counting_prepare)
    monkeypatch.setattr(asyncpg.Connection, "set_type_codec", counting_codec)
    Session = sessionmaker(engines)
    for _ in range(3):  # warm: each physical connection prepares once
        await asyncio.gather(*(_read(Session) for _ in range(4)))
    prepares.clear()
    codecs.clear()
    for _ in range(20):
        await _read(Session)
    assert prepares == []  # 20 checkouts, no Parse round trip
    assert codecs == []  # and no codec set-up queries


async def _read(Session: Sessions) -> None:
    async with Session() as session:
        assert (await session.scalars(select(Item).where(Item.id == -1))).all() == []


# -- read-your-writes and failover on a private cluster -----------------------------


@pytest.fixture(scope="module")
def lagging_cluster(cluster_factory: Callable[..., LocalCluster]) -> LocalCluster:
    """Synchronous replication (no acknowledged write is lost), replicas applying late."""
    return cluster_factory(2, synchronous=True, apply_delay="400ms")


async def test_read_your_writes_across_sessions(
    lagging_cluster: LocalCluster, make_pool: PoolFactory,
) -> None:
    pool = await make_pool(lagging_cluster.dsn, causal_wait=2.0)
    engines = create_engines(pool)
    Session = sessionmaker(engines)
    try:
        async with engines.primary.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        async with pool.read_your_writes() as scope, Session() as session, session.begin():
            session.add(Item(id=7, name="pear"))  # request 1: a write
        token = scope.token()

        async def next_request(token: str | None) -> Item | None:
            async with pool.read_your_writes(token), Session() as session:
                assert await in_recovery(session)  # served by a replica ...
                return await session.get(Item, 7)

        # request 2, in another context: with the token, the replica has the pear
        found = await asyncio.create_task(next_request(token), context=contextvars.Context())
        assert found is not None and found.name == "pear"
        async with Session() as session, session.begin():
            session.add(Item(id=8, name="plum"))
        async with Session() as session:  # no token: the lagging replica has no plum yet
            assert await session.get(Item, 8) is None
    finally:
        await engines.dispose()


async def test_failover_mid_session_loses_no_acknowledged_write(
    lagging_cluster: LocalCluster, make_pool: PoolFactory,
) -> None:
    for replica in lagging_cluster.replicas:
        replica.set_apply_delay(None)
    pool = await make_pool(lagging_cluster.dsn, topology_refresh_interval=0.2)
    engines = create_engines(pool)
    Session = sessionmaker(engines)
    acknowledged: list[int] = []
    failed = 0
    stop = asyncio.Event()
    progressed = asyncio.Event()

    async def acknowledged_reach(count: int) -> None:
        while len(acknowledged) < count:
            progressed.clear()
            await progressed.wait()

    async def writer() -> None:
        nonlocal failed
        async with Session() as session:  # one session across the failover
            next_id = 1000
            while not stop.is_set():
                next_id += 1
                try:
                    async with session.begin():
                        session.add(Item(id=next_id, name="w"))
                except (DBAPIError, OSError):
                    failed += 1
                    await session.rollback()
                    await asyncio.sleep(0.05)
                    continue
                acknowledged.append(next_id)
                progressed.set()

    try:
        async with engines.primary.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.run_sync(Base.metadata.create_all)
        task = asyncio.create_task(writer())
        await asyncio.wait_for(acknowledged_reach(20), 30)
        await asyncio.to_thread(lagging_cluster.failover)
        seen = len(acknowledged)
        await asyncio.wait_for(acknowledged_reach(seen + 20), 30)  # on the new primary
        stop.set()
        await task
        async with Session() as session:
            assert not await in_recovery(await _primary(session))
            stored = set((await session.scalars(
                select(Item.id).where(Item.id > 1000).execution_options(),
                bind_arguments={"role": "primary"})).all())
        lost = [i for i in acknowledged if i not in stored]
        assert lost == [], f"{len(lost)} acknowledged writes lost ({failed} failed attempts)"
    finally:
        await engines.dispose()


async def _primary(session: AsyncSession) -> AsyncSession:
    await session.execute(select(1), bind_arguments={"role": "primary"})
    return session
