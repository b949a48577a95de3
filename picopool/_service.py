"""Connections the pool keeps for discovery, apart from the sub-pools.

The *service connection* reads cluster metadata; *probe connections* check
one instance each (for role probes). Both are opened lazily, reused across
refreshes, and never handed to users.

One connection runs one query at a time (asyncpg raises "another operation is in
progress" otherwise, and a collision can break the connection), while discovery,
the reset-elision catalog check, the function catalog and lag probes all share
these.  So every use goes through a *session*: ``async with
service.service_session() as conn`` (or ``probe_session(address)``) holds the
connection's lock for the whole exchange.  The lock is re-entrant within one
task, so a provider that calls a helper that opens the session again does not
deadlock.  ``service_connection()`` and ``connection(address)`` still return the
bare connections, for callers that already hold the session.

Connections are opened with the user's ``connect=`` hook when there is one (as
asyncpg's pool calls it: the DSN positionally, then ``loop``,
``connection_class``, ``record_class`` and the connect keyword arguments), so a
hook that injects a password or token applies here too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import asyncpg

from ._dsn import asyncpg_dsn, mask_dsn
from ._errors import TopologyError, describe_error
from ._topology import Address, Topology

logger = logging.getLogger("picopool.discovery")


class _TaskLock:
    """An asyncio lock that the task holding it may take again."""

    __slots__ = ("_depth", "_lock", "_owner")

    def __init__(self) -> None:
        self._lock = asyncio.Lock()
        self._owner: asyncio.Task[Any] | None = None
        self._depth = 0

    def locked(self) -> bool:
        return self._lock.locked()

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        task = asyncio.current_task()
        if task is not None and self._owner is task:
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
            return
        async with self._lock:
            self._owner, self._depth = task, 1
            try:
                yield
            finally:
                self._owner, self._depth = None, 0


class ServiceConnections:
    """Implements :class:`picopool.discovery.DiscoveryContext` for the pool."""

    def __init__(
        self,
        *,
        dsn: str | None,
        connect_kwargs: Mapping[str, Any],
        seeds: tuple[Address, ...],
        service_dsn: str | None,
        current: Callable[[], Topology | None],
        connect_timeout: float,
        connect: Callable[..., Awaitable[Any]] | None = None,
    ) -> None:
        self._dsn = dsn
        self._connect = connect
        self._connect_kwargs = dict(connect_kwargs)
        self._seeds = seeds
        self._service_dsn = service_dsn
        self._current = current
        self._connect_timeout = connect_timeout
        self._service: Any = None
        self._service_address: Address | None = None
        self._probes: dict[Address, Any] = {}
        self._closed = False
        self._service_lock = _TaskLock()
        self._probe_locks: dict[Address, _TaskLock] = {}

    @property
    def seeds(self) -> tuple[Address, ...]:
        return self._seeds

    @property
    def current(self) -> Topology | None:
        return self._current()

    def set_connect_args(self, dsn: str | None, connect_kwargs: Mapping[str, Any]) -> None:
        self._dsn = dsn
        self._connect_kwargs = dict(connect_kwargs)

    def service_address(self) -> Address | None:
        return self._service_address

    async def _open(self, address: Address | None) -> Any:
        if self._closed:
            raise TopologyError("pool is closing")
        kwargs = dict(self._connect_kwargs)
        kwargs.pop("target_session_attrs", None)
        kwargs.setdefault("timeout", self._connect_timeout)
        if address is None:  # the pinned service DSN
            dsn = asyncpg_dsn(self._service_dsn)
        else:
            dsn = asyncpg_dsn(self._dsn)
            kwargs.update(host=address.host, port=address.port)
        if self._connect is None:
            return await asyncpg.connect(dsn, **kwargs)
        # The user's hook, called as asyncpg.Pool calls it.
        return await self._connect(
            dsn, loop=asyncio.get_running_loop(), connection_class=asyncpg.Connection,
            record_class=asyncpg.Record, **kwargs,
        )

    def _service_candidates(self) -> list[Address]:
        """Where to look for metadata: the last service instance, live instances, seeds."""
        current = self._current()
        live = [i.address for i in current.instances] if current else []
        ordered: dict[Address, None] = {}
        if self._service_address is not None:
            ordered[self._service_address] = None
        for address in (*live, *self._seeds):
            ordered.setdefault(address, None)
        return list(ordered)

    @contextlib.asynccontextmanager
    async def service_session(self) -> AsyncIterator[Any]:
        """``async with service.service_session() as conn``: the service connection,
        (re)opened if needed, used by no one else until the block ends.

        Raises :class:`TopologyError` when no instance takes a connection.  A block
        left by cancellation discards the connection: a query cancelled half-way may
        leave it busy for the next holder.
        """
        async with self._service_lock.hold():
            connection = await self.service_connection()
            try:
                yield connection
            except asyncio.CancelledError:
                if self._service is connection:
                    self.discard()
                raise

    @contextlib.asynccontextmanager
    async def probe_session(self, address: Address) -> AsyncIterator[Any]:
        """``async with service.probe_session(address) as conn``: the probe connection
        to *address*, used by no one else until the block ends (as service_session)."""
        lock = self._probe_locks.get(address)
        if lock is None:
            lock = self._probe_locks[address] = _TaskLock()
        async with lock.hold():
            connection = await self.connection(address)
            try:
                yield connection
            except asyncio.CancelledError:
                if self._probes.get(address) is connection:
                    self.discard(address)
                raise

    async def service_connection(self) -> Any:
        """The service connection, (re)opened if needed.  Use it only while holding
        :meth:`service_session` (or prefer that): two concurrent queries on it fail."""
        if self._service is not None and not self._service.is_closed():
            return self._service
        self.discard()
        if self._service_dsn is not None:
            try:
                self._service = await self._open(None)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                raise TopologyError(
                    f"cannot open the service connection to {mask_dsn(self._service_dsn)}: "
                    f"{describe_error(exc)}"
                ) from exc
            return self._service
        failures: list[str] = []
        for address in self._service_candidates():
            try:
                connection = await self._open(address)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                failures.append(f"{address}: {describe_error(exc)}")
                continue
            if self._service_address not in (None, address):
                logger.info("service connection moved from %s to %s",
                            self._service_address, address)
            self._service, self._service_address = connection, address
            return connection
        raise TopologyError("cannot open a service connection (tried " + "; ".join(failures) + ")")

    async def connection(self, address: Address) -> Any:
        """The probe connection to *address*, opened if needed.  Use it only while
        holding :meth:`probe_session` for that address (or prefer that)."""
        connection = self._probes.get(address)
        if connection is not None and not connection.is_closed():
            return connection
        connection = await self._open(address)
        if self._closed:
            connection.terminate()
            raise TopologyError("pool is closing")
        self._probes[address] = connection
        return connection

    def discard(self, address: Address | None = None) -> None:
        if address is None:
            connection, self._service = self._service, None
        else:
            connection = self._probes.pop(address, None)
        if connection is not None:
            connection.terminate()

    def forget_except(self, keep: set[Address]) -> None:
        """Drop probe connections to addresses discovery no longer reports."""
        for address in [a for a in self._probes if a not in keep and a not in self._seeds]:
            self.discard(address)
        for address in [a for a in self._probe_locks if a not in keep and a not in self._seeds]:
            if address not in self._probes and not self._probe_locks[address].locked():
                del self._probe_locks[address]

    async def aclose(self) -> None:
        self._closed = True
        connections = [c for c in (self._service, *self._probes.values()) if c is not None]
        self._service = None
        self._probes.clear()
        for index, connection in enumerate(connections):
            try:
                await asyncio.shield(connection.close(timeout=2))
            except asyncio.CancelledError:
                for rest in connections[index:]:
                    rest.terminate()
                raise
            except Exception:
                connection.terminate()

    def terminate(self) -> None:
        self._closed = True
        for connection in (self._service, *self._probes.values()):
            if connection is not None:
                connection.terminate()
        self._service = None
        self._probes.clear()
