"""Connections the pool keeps for discovery, apart from the sub-pools.

The *service connection* reads cluster metadata; *probe connections* check
one instance each (for role probes). Both are opened lazily, reused across
refreshes, and never handed to users.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any

import asyncpg

from ._dsn import asyncpg_dsn, mask_dsn
from ._errors import TopologyError, describe_error
from ._topology import Address, Topology

logger = logging.getLogger("picopool.discovery")


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
    ) -> None:
        self._dsn = dsn
        self._connect_kwargs = dict(connect_kwargs)
        self._seeds = seeds
        self._service_dsn = service_dsn
        self._current = current
        self._connect_timeout = connect_timeout
        self._service: Any = None
        self._service_address: Address | None = None
        self._probes: dict[Address, Any] = {}
        self._closed = False

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
            return await asyncpg.connect(asyncpg_dsn(self._service_dsn), **kwargs)
        kwargs.update(host=address.host, port=address.port)
        return await asyncpg.connect(asyncpg_dsn(self._dsn), **kwargs)

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

    async def service_connection(self) -> Any:
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
