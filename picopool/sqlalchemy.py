"""SQLAlchemy 2 (asyncio) over a picopool pool: ``pip install picopool[sqlalchemy]``.

    from sqlalchemy.ext.asyncio import async_sessionmaker
    from picopool.sqlalchemy import RoutingSession, create_engines

    pool = await picopool.create_pool(dsn)
    engines = create_engines(pool)              # one AsyncEngine per role
    Session = async_sessionmaker(sync_session_class=RoutingSession,
                                 info=engines.session_info(), expire_on_commit=False)

    async with Session() as session:            # only reads: a replica
        items = (await session.scalars(select(Item))).all()
    async with Session() as session, session.begin():
        session.add(Item(name="apple"))         # a flush: the primary from here on

Each engine uses SQLAlchemy's asyncpg dialect with ``async_creator=`` and
``NullPool``: a checkout takes a connection from picopool (an instance of the
engine's role, chosen by the pool's strategy) and SQLAlchemy's ``close()``
gives it back to picopool instead of closing it. So picopool does the pooling,
the balancing and the failover; SQLAlchemy does the ORM.

Two per-checkout costs that ``NullPool`` would otherwise bring are paid once per
physical connection instead: preparing statements (SQLAlchemy's cache lives as
long as one checkout; picopool prepares through asyncpg's per-connection
statement cache) and the JSON/JSONB codecs the dialect installs on connect
(else two catalog queries per checkout, which also empty asyncpg's cache).

Read-your-writes across sessions and requests uses picopool's own scope::

    async with pool.read_your_writes(token) as scope:
        async with Session() as session, session.begin():
            session.add(Item(name="pear"))
    token = scope.token()                       # the next request's reads see the pear
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

try:
    from sqlalchemy import Delete, Insert, TextClause, Update
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
    from sqlalchemy.orm import Mapper, Session
    from sqlalchemy.pool import NullPool
    from sqlalchemy.sql import Select
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError("picopool.sqlalchemy needs SQLAlchemy 2: "
                      "pip install 'picopool[sqlalchemy]'") from exc

from ._pool import Pool
from ._routing import RoleRequest, parse_role
from ._sql import is_write

__all__ = ["Engines", "RoutingSession", "create_engine", "create_engines"]

# Per raw asyncpg connection, the codecs SQLAlchemy's dialect has installed on it
# (dropped with the connection when picopool closes it).
_codecs: weakref.WeakKeyDictionary[Any, set[tuple[Any, ...]]] = weakref.WeakKeyDictionary()


class _Checkout:
    """What SQLAlchemy's dialect sees as its asyncpg connection.

    It forwards everything to picopool's checked-out connection, except that
    ``close()`` returns it to picopool, ``prepare()`` uses asyncpg's statement
    cache and ``set_type_codec()`` is done once per physical connection.
    """

    def __init__(self, pool: Pool, connection: Any, group: object) -> None:
        self._picopool = pool
        self._proxy = connection
        self._raw = connection._con
        self._group = group
        self._released = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._proxy, name)

    def __repr__(self) -> str:
        return f"<picopool.sqlalchemy checkout of {self._proxy!r}>"

    async def prepare(self, query: str, *, name: str | None = None,
                      timeout: float | None = None, record_class: Any = None) -> Any:
        """Prepare through asyncpg's statement cache, which outlives a checkout.

        SQLAlchemy keeps its prepared statements per DBAPI connection, and with
        NullPool that is one checkout: without this every statement would be
        parsed again on every checkout. asyncpg's own per-connection cache (the
        one ``fetch()`` uses, ``statement_cache_size``) keeps them instead.
        """
        if name is not None:  # the user's prepared_statement_name_func: as asked
            return await self._proxy.prepare(query, name=name, timeout=timeout,
                                             record_class=record_class)
        return await self._proxy._prepare(query, timeout=timeout, use_cache=True,
                                          record_class=record_class)

    def is_closed(self) -> bool:
        """asyncpg gives a lost connection back to its pool by itself: that is closed too."""
        return self._proxy._con is None or bool(self._raw.is_closed())

    async def set_type_codec(self, typename: str, *, schema: str = "public",
                             **options: Any) -> None:
        """Install a codec once per physical connection (per group of engines).

        The dialect installs its JSON/JSONB codecs on every new DBAPI connection,
        which with NullPool is every checkout: two catalog queries each time,
        and asyncpg drops its statement cache whenever a codec is set.
        """
        key = (id(self._group), typename, schema, options.get("format", "text"))
        done = _codecs.setdefault(self._raw, set())
        if key in done:
            return
        await self._proxy.set_type_codec(typename, schema=schema, **options)
        done.add(key)

    async def close(self, *, timeout: float | None = None) -> None:
        """Give the connection back to picopool (SQLAlchemy's NullPool "closes" it)."""
        if self._released:
            return
        self._released = True
        await self._picopool.release(self._proxy, timeout=timeout)

    def terminate(self) -> None:
        """Close the physical connection at once; picopool then forgets it."""
        if self._raw is not None:
            self._raw.terminate()
        if self._released:
            return
        self._released = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # garbage collection outside the loop
            return
        task = loop.create_task(self._picopool.release(self._proxy))
        _releasing.add(task)
        task.add_done_callback(_releasing.discard)


_releasing: set[asyncio.Task[None]] = set()


def _engine(pool: Pool, request: RoleRequest, group: object, kwargs: Mapping[str, Any],
            timeout: float | None) -> AsyncEngine:
    async def creator() -> _Checkout:
        connection = await pool._acquire_routed(request, timeout)
        return _Checkout(pool, connection, group)

    options = dict(kwargs)
    for reserved in ("poolclass", "async_creator", "creator", "pool"):
        if reserved in options:
            raise TypeError(f"picopool.sqlalchemy engines set {reserved}= themselves")
    engine = create_async_engine("postgresql+asyncpg://", async_creator=creator,
                                 poolclass=NullPool, **options)
    return engine


def create_engine(pool: Pool, role: str = "primary", *, timeout: float | None = None,
                  **engine_kwargs: Any) -> AsyncEngine:
    """An ``AsyncEngine`` whose connections are *pool*'s, on instances of *role*.

    *role* is ``"primary"``, ``"replica"``, ``"any"`` or ``"prefer-replica"``
    (``"read"``: wherever the pool sends reads). Reads inside
    ``pool.read_your_writes()`` go to an instance that has the scope's writes.
    *engine_kwargs* go to :func:`sqlalchemy.ext.asyncio.create_async_engine`
    (``echo=``, ``execution_options=``...); the pool class is always ``NullPool``.
    """
    request = pool._read_role(None) if role == "read" else parse_role(role, RoleRequest.PRIMARY)
    return _engine(pool, request, object(), engine_kwargs, timeout)


@dataclass(frozen=True)
class Engines:
    """One engine per role over the same pool: ``primary`` for writes, ``read`` for reads."""

    primary: AsyncEngine
    read: AsyncEngine

    def session_info(self) -> dict[str, Any]:
        """``info=`` for a :class:`RoutingSession` session maker."""
        return {_INFO_KEY: self}

    async def dispose(self) -> None:
        """Dispose both engines (the pool itself stays open)."""
        await self.primary.dispose()
        await self.read.dispose()


def create_engines(pool: Pool, *, timeout: float | None = None,
                   **engine_kwargs: Any) -> Engines:
    """The primary's engine and the read engine (where the pool sends reads)."""
    group = object()  # the engines share the dialect setup, so also the codecs
    return Engines(
        primary=_engine(pool, RoleRequest.PRIMARY, group, engine_kwargs, timeout),
        read=_engine(pool, pool._read_role(None), group, engine_kwargs, timeout),
    )


_INFO_KEY = "picopool.engines"


class RoutingSession(Session):
    """A session that reads from replicas until it writes, then uses the primary.

    Give it the engines through ``info=engines.session_info()``. A session goes
    to the primary, for the rest of its life (until ``close()``), as soon as it
    flushes, executes an INSERT/UPDATE/DELETE, a ``SELECT ... FOR UPDATE``, a
    ``text()`` statement that picopool's classifier calls a write, or a
    statement run with ``bind_arguments={"role": "primary"}``. So its reads
    after a write see that write. Reads before it stay in their own read-only
    transaction on a replica.
    """

    _picopool_primary = False

    def get_bind(self, mapper: Any = None, clause: Any = None, *, role: str | None = None,
                 **kw: Any) -> Engine | Connection:
        engines: Engines | None = self.info.get(_INFO_KEY)
        if engines is None:
            return super().get_bind(mapper, clause=clause, **kw)
        if not self._picopool_primary and (
            role == "primary" or self._flushing or _writes(mapper, clause)
        ):
            self._picopool_primary = True
        if self._picopool_primary:
            return engines.primary.sync_engine
        return engines.read.sync_engine

    def close(self) -> None:
        super().close()
        self._picopool_primary = False


def _writes(mapper: Mapper[Any] | None, clause: Any) -> bool:
    if clause is None:
        return mapper is None  # session.connection(): the caller may do anything
    if isinstance(clause, Insert | Update | Delete):
        return True
    if isinstance(clause, Select):
        return clause._for_update_arg is not None
    if isinstance(clause, TextClause):
        return is_write(clause.text)
    return True  # anything else (DDL, ...) goes to the primary
