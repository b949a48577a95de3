"""What a SQLAlchemy session costs per checkout through picopool.sqlalchemy.

    python bench/sqlalchemy_checkout.py [--sessions 2000] [--rounds 5]

One local PostgreSQL instance, a pool with one connection (so every session
checks out the same physical connection) and an ORM read per session
(``session.get(Item, 1)``). With ``NullPool`` every checkout is a new DBAPI
connection for SQLAlchemy, so two things would be redone on each one:

* ``naive``   the dialect's own behaviour: ``prepare()`` with a fresh
              per-connection statement cache (a Parse/Describe round trip per
              statement per checkout) and the JSON/JSONB codecs installed again
              (two catalog queries, and asyncpg's statement cache emptied);
* ``picopool`` picopool.sqlalchemy's: statements prepared through asyncpg's
              per-connection cache, codecs installed once per physical connection.

Printed: round trips (prepare calls and codec set-ups) per session, and
sessions per second (median of interleaved rounds).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from typing import Any

import asyncpg
from sqlalchemy import String, insert, select
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import picopool
from picopool import sqlalchemy as pp_sa
from picopool.cluster import LocalCluster
from picopool.discovery import Static


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "bench_items"
    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(50))


calls = {"prepare": 0, "codec": 0}
_prepare = asyncpg.Connection.prepare
_codec = asyncpg.Connection.set_type_codec


async def counting_prepare(self: Any, query: str, **kw: Any) -> Any:
    calls["prepare"] += 1
    return await _prepare(self, query, **kw)


async def counting_codec(self: Any, typename: str, **kw: Any) -> Any:
    calls["codec"] += 1
    return await _codec(self, typename, **kw)


async def naive_prepare(self: Any, query: str, *, name: str | None = None,
                        timeout: float | None = None, record_class: Any = None) -> Any:
    return await self._proxy.prepare(query, name=name, timeout=timeout,
                                     record_class=record_class)


async def naive_codec(self: Any, typename: str, **kw: Any) -> None:
    await self._proxy.set_type_codec(typename, **kw)


FIXED = (pp_sa._Checkout.prepare, pp_sa._Checkout.set_type_codec)


def use(mode: str) -> None:
    prepare, codec = FIXED if mode == "picopool" else (naive_prepare, naive_codec)
    pp_sa._Checkout.prepare = prepare  # type: ignore[method-assign]
    pp_sa._Checkout.set_type_codec = codec  # type: ignore[method-assign]


async def run(dsn: str, sessions: int, rounds: int) -> None:
    asyncpg.Connection.prepare = counting_prepare
    asyncpg.Connection.set_type_codec = counting_codec
    async with picopool.create_pool(dsn, discovery=Static(), min_size=1, max_size=1) as pool:
        engine = pp_sa.create_engine(pool)
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
            await conn.execute(insert(Item).values(id=1, name="apple"))
        Session = async_sessionmaker(engine, expire_on_commit=False)

        async def one() -> None:
            async with Session() as session:
                await session.execute(select(Item).where(Item.id == 1))

        rates: dict[str, list[float]] = {"naive": [], "picopool": []}
        per_session: dict[str, tuple[float, float]] = {}
        for r in range(rounds):
            for mode in (("naive", "picopool") if r % 2 == 0 else ("picopool", "naive")):
                use(mode)
                await one()  # warm
                calls.update(prepare=0, codec=0)
                started = time.perf_counter()
                for _ in range(sessions):
                    await one()
                rates[mode].append(sessions / (time.perf_counter() - started))
                per_session[mode] = (calls["prepare"] / sessions, calls["codec"] / sessions)
        for mode in ("naive", "picopool"):
            prepares, codecs = per_session[mode]
            print(f"{mode:9} {statistics.median(rates[mode]):8.0f} sessions/s   "
                  f"prepare() {prepares:.2f}/session   set_type_codec() {codecs:.2f}/session")
        await engine.dispose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    with LocalCluster(replicas=0) as cluster:
        asyncio.run(run(cluster.dsn, args.sessions, args.rounds))


if __name__ == "__main__":
    main()
