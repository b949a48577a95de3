from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from .._topology import Address, Instance, Topology


class DiscoveryContext(Protocol):
    """What the pool lends a provider during one refresh.

    Connections it hands out are owned by the pool: providers must not close
    them, and should call :meth:`discard` when one breaks.

    The pool's context (``picopool._service.ServiceConnections``) also has
    ``service_session()`` and ``probe_session(address)``: async context managers that
    lend the connection and keep everyone else (the pool's own catalog checks, lag
    probes) off it until the block ends, since a connection runs one query at a
    time.  Providers should go through :func:`service_session` and
    :func:`probe_session` below, which use them when the context has them.
    """

    @property
    def seeds(self) -> tuple[Address, ...]:
        """The instances named by the DSN the pool was created with."""

    @property
    def current(self) -> Topology | None:
        """The last good topology, or None on the first refresh."""

    async def service_connection(self) -> Any:
        """The dedicated service connection (an ``asyncpg.Connection``).

        If it is broken it is reopened, trying the pinned ``service_dsn``, then
        the live instances of the current topology, then the seeds.
        """

    def service_address(self) -> Address | None:
        """The address the service connection is open to, if any."""

    async def connection(self, address: Address) -> Any:
        """A cached probe connection to one instance (for role probes)."""

    def discard(self, address: Address | None = None) -> None:
        """Forget a broken connection (the service connection if *address* is None)."""


@dataclass(frozen=True, slots=True)
class Discovered:
    """A provider's answer to one refresh."""

    instances: tuple[Instance, ...]
    symmetric: bool = False


class DiscoveryProvider(abc.ABC):
    """Finds the instances of a cluster.

    Providers are small: they turn the cluster's own metadata into
    :class:`~picopool.Instance` values. Any failure raises; the pool keeps the
    last good topology and backs off. Garbage entries should be skipped with a
    logged warning, not fail the whole refresh.
    """

    #: shown in logs, reprs and ``Topology.provider``
    name: str = "provider"

    @abc.abstractmethod
    async def discover(self, ctx: DiscoveryContext) -> Discovered:
        """Return the current instances."""

    def sub_pool_options(self) -> Mapping[str, Any]:
        """asyncpg pool options this kind of cluster needs (e.g. a custom reset)."""
        return {}

    async def aclose(self) -> None:  # noqa: B027 - optional hook, nothing to release by default
        """Release anything the provider holds (HTTP clients, monitor connections)."""

    def terminate(self) -> None:  # noqa: B027 - optional hook
        """Drop anything the provider holds at once (``Pool.terminate()``)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


@contextlib.asynccontextmanager
async def service_session(ctx: DiscoveryContext) -> AsyncIterator[Any]:
    """``async with service_session(ctx) as conn``: the service connection, held
    exclusively for the block when *ctx* supports sessions."""
    session = getattr(ctx, "service_session", None)
    if session is None:  # a context of the user's or a test's: no sharing to guard
        yield await ctx.service_connection()
        return
    async with session() as connection:
        yield connection


@contextlib.asynccontextmanager
async def probe_session(ctx: DiscoveryContext, address: Address) -> AsyncIterator[Any]:
    """``async with probe_session(ctx, address) as conn``: the probe connection to
    *address*, held exclusively for the block when *ctx* supports sessions."""
    session = getattr(ctx, "probe_session", None)
    if session is None:
        yield await ctx.connection(address)
        return
    async with session(address) as connection:
        yield connection


def address_id(address: Address) -> str:
    """The identity of an instance known only by its address."""
    return str(address)


def unique_addresses(*groups: Sequence[Address]) -> list[Address]:
    seen: dict[Address, None] = {}
    for group in groups:
        for address in group:
            seen.setdefault(address, None)
    return list(seen)
