"""A small web service on picopool: raw queries and SQLAlchemy, over a whole cluster.

    DATABASE_URL=postgres://app:secret@h1:5432,h2:5432,h3:5432/app \
        uvicorn app:app --app-dir examples/fastapi

* one pool per process, opened and closed by the app's lifespan;
* a dependency hands the pool (and a SQLAlchemy session) to the routes;
* writes go to the primary, reads to replicas; a write's read-your-writes token
  travels to the client in a cookie, so the client's next request sees its write
  even when a lagging replica serves it;
* ``/healthz`` reports the topology as picopool sees it.

Tested over real HTTP under uvicorn, with a replica killed mid-test:
tests/test_example_fastapi.py.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from sqlalchemy import String, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

import picopool
from picopool.sqlalchemy import RoutingSession, create_engines

COOKIE = "pp-position"  # the read-your-writes token


class Base(DeclarativeBase):
    pass


class Item(Base):
    __tablename__ = "items"

    id: Mapped[int] = mapped_column(primary_key=True)
    name: Mapped[str] = mapped_column(String(100))


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with picopool.create_pool(os.environ["DATABASE_URL"], min_size=1,
                                    max_size=int(os.environ.get("POOL_SIZE", "5"))) as pool:
        await pool.execute(
            "CREATE TABLE IF NOT EXISTS items (id serial PRIMARY KEY, name varchar(100) NOT NULL)")
        engines = create_engines(pool)
        app.state.pool = pool
        app.state.sessions = async_sessionmaker(
            sync_session_class=RoutingSession, info=engines.session_info(),
            expire_on_commit=False)
        yield
        await engines.dispose()


app = FastAPI(lifespan=lifespan)


def get_pool(request: Request) -> picopool.Pool:
    pool: picopool.Pool = request.app.state.pool
    return pool


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    async with request.app.state.sessions() as session:
        yield session


Pool = Annotated[picopool.Pool, Depends(get_pool)]
Session = Annotated[AsyncSession, Depends(get_session)]


@app.get("/healthz")
async def healthz(pool: Pool) -> JSONResponse:
    """The topology and what each instance served; 503 without a primary."""
    topology = pool.topology
    stats = {i.id: i for i in pool.stats().instances}
    instances = [
        {"address": str(i.address), "role": i.role.value,
         "served": stats[i.id].served if i.id in stats else 0}
        for i in (topology.instances if topology else ())
    ]
    healthy = any(i["role"] == "primary" for i in instances)
    return JSONResponse(
        {"status": "ok" if healthy else "degraded",
         "topology": topology.version if topology else 0, "instances": instances},
        status_code=200 if healthy else 503)


# -- raw picopool --------------------------------------------------------------------


@app.post("/items", status_code=201)
async def add_item(name: str, pool: Pool, response: Response) -> dict[str, Any]:
    async with pool.read_your_writes() as scope:
        item_id = await pool.fetchval(
            "INSERT INTO items (name) VALUES ($1) RETURNING id", name)  # the primary
    response.set_cookie(COOKIE, scope.token())
    return {"id": item_id, "name": name}


@app.get("/items")
async def list_items(pool: Pool, request: Request) -> list[dict[str, Any]]:
    async with pool.read_your_writes(request.cookies.get(COOKIE)):
        rows = await pool.fetch("SELECT id, name FROM items ORDER BY id")  # a replica
    return [dict(r) for r in rows]


# -- SQLAlchemy ----------------------------------------------------------------------


@app.post("/orm/items", status_code=201)
async def orm_add_item(name: str, pool: Pool, session: Session,
                       response: Response) -> dict[str, Any]:
    async with pool.read_your_writes() as scope:
        item = Item(name=name)
        session.add(item)
        await session.commit()  # the flush sends the session to the primary
        await session.close()  # the connection goes back (and the write position is read)
    response.set_cookie(COOKIE, scope.token())
    return {"id": item.id, "name": item.name}


@app.get("/orm/items")
async def orm_list_items(pool: Pool, session: Session,
                         request: Request) -> list[dict[str, Any]]:
    async with pool.read_your_writes(request.cookies.get(COOKIE)):
        for attempt in (1, 2):
            try:
                items = (await session.scalars(select(Item).order_by(Item.id))).all()
                break
            except DBAPIError as exc:
                # A read-only session may run again: the replica it was on died under it
                # (picopool retries pool-level reads itself; a session is the app's own).
                await close_after_reading(session)
                if attempt == 2 or not exc.connection_invalidated:
                    raise
        await close_after_reading(session)
    return [{"id": i.id, "name": i.name} for i in items]


async def close_after_reading(session: AsyncSession) -> None:
    """Close a session that has only read. If its replica died since the read,
    closing it (a rollback) fails on the dead connection, but there is nothing to
    roll back: the rows are read, so that is no error."""
    try:
        await session.close()
    except DBAPIError as exc:
        if not exc.connection_invalidated:
            raise
