"""picopool's Pool: asyncpg's Pool API over every instance of a cluster."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Generator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import asyncpg

from ._dsn import mask_dsn, seed_addresses
from ._errors import (
    ConfigurationError,
    NoAvailableInstanceError,
    PoolClosedError,
    TopologyError,
    describe_error,
)
from ._member import Member, is_connection_error
from ._routing import RoleRequest, eligible, parse_role
from ._service import ServiceConnections
from ._topology import Instance, Topology, plan_reconcile
from .discovery import DiscoveryProvider, detect_provider
from .strategies import BalanceStrategy, Candidate, RoundRobin

logger = logging.getLogger("picopool")

#: What ``asyncpg.create_pool`` takes besides connect kwargs; forwarded per instance.
_POOL_OPTIONS = (
    "init_size", "min_size", "max_size", "max_queries", "max_inactive_connection_lifetime",
    "connect", "setup", "init", "reset", "connection_class", "record_class",
)


@dataclass(frozen=True, slots=True)
class InstanceStats:
    id: str
    name: str | None
    address: str
    role: str
    size: int
    idle: int
    in_use: int
    served: int
    failures: int
    breaker: str
    last_error: str | None


@dataclass(frozen=True, slots=True)
class PoolStats:
    topology_version: int
    provider: str
    refreshes: int
    refresh_failures: int
    last_refresh_error: str | None
    acquire_errors: int
    instances: tuple[InstanceStats, ...]
    draining: int


class Pool:
    """A pool of connections to every instance of a cluster.

    Same public API as :class:`asyncpg.Pool`; extensions are keyword-only.
    Create it with :func:`picopool.create_pool`.
    """

    def __init__(
        self,
        dsn: str | None,
        *,
        strategy: BalanceStrategy | None,
        discovery: DiscoveryProvider | None,
        topology_refresh_interval: float | None,
        service_dsn: str | None,
        failover_timeout: float,
        drain_timeout: float,
        connect_timeout: float,
        pool_options: dict[str, Any],
        connect_kwargs: dict[str, Any],
    ) -> None:
        if topology_refresh_interval is not None and topology_refresh_interval <= 0:
            raise ConfigurationError("topology_refresh_interval must be positive or None")
        if strategy is not None and not isinstance(strategy, BalanceStrategy):
            raise ConfigurationError(f"strategy {strategy!r} has no pick() method")
        min_size, max_size = pool_options["min_size"], pool_options["max_size"]
        if max_size <= 0 or min_size < 0 or min_size > max_size:
            raise ConfigurationError(f"invalid sizes min_size={min_size} max_size={max_size}")
        self._dsn = dsn
        self._connect_kwargs = connect_kwargs
        self._pool_options = pool_options
        self._strategy: BalanceStrategy = strategy or RoundRobin()
        self._provider = discovery
        self._refresh_interval = topology_refresh_interval
        self._failover_timeout = failover_timeout
        self._drain_timeout = drain_timeout
        self._connect_timeout = connect_timeout
        self._seeds = tuple(seed_addresses(dsn, connect_kwargs))
        self._service = ServiceConnections(
            dsn=dsn, connect_kwargs=connect_kwargs, seeds=self._seeds, service_dsn=service_dsn,
            current=lambda: self._topology, connect_timeout=connect_timeout,
        )
        self._topology: Topology | None = None
        self._members: dict[str, Member] = {}
        self._checked_out: dict[Any, Member] = {}
        self._draining: set[asyncio.Task[None]] = set()
        self._refresh_lock = asyncio.Lock()
        self._refreshed = asyncio.Event()  # set after each refresh attempt, then replaced
        self._wakeup = asyncio.Event()
        self._poller: asyncio.Task[None] | None = None
        self._initialized = False
        self._initializing = False
        self._closing = False
        self._closed = False
        self._refreshes = 0
        self._refresh_failures = 0
        self._last_refresh_error: str | None = None
        self._acquire_errors = 0

    # -- lifecycle ---------------------------------------------------------------------

    async def _async__init__(self) -> Pool:
        if self._initialized:
            return self
        if self._initializing:
            raise asyncpg.InterfaceError("pool is being initialized in another task")
        if self._closed:
            raise PoolClosedError("pool is closed")
        self._initializing = True
        try:
            if self._provider is None:
                self._provider = await detect_provider(self._service)
            await self.refresh_topology()
            await self._warm_up()
            self._poller = asyncio.ensure_future(self._poll())
        except (Exception, asyncio.CancelledError):
            self.terminate()
            raise
        finally:
            self._initializing = False
        self._initialized = True
        return self

    async def _warm_up(self) -> None:
        """Initialise every sub-pool; fail only if no instance at all is reachable."""
        members = list(self._members.values())
        results = await asyncio.gather(
            *(m.ensure_ready() for m in members), return_exceptions=True
        )
        attempts = []
        for member, result in zip(members, results, strict=True):
            if isinstance(result, BaseException):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                member.record_failure(describe_error(result))
                attempts.append((member.instance.label, describe_error(result)))
                logger.warning("instance %s unavailable at start: %s",
                               member.instance.label, describe_error(result))
        if members and len(attempts) == len(members):
            raise NoAvailableInstanceError("no instance of the cluster is reachable", attempts)

    def __await__(self) -> Generator[Any, None, Pool]:
        return self._async__init__().__await__()

    async def __aenter__(self) -> Pool:
        await self._async__init__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    async def close(self) -> None:
        """Gracefully close every sub-pool, waiting for checked-out connections."""
        if self._closed:
            return
        self._closing = True
        try:
            await self._stop_poller()
            await self._service.aclose()
            members, self._members = list(self._members.values()), {}
            for member in members:
                self._drain(member)
            if self._draining:
                await asyncio.gather(*self._draining, return_exceptions=True)
            if self._provider is not None:
                await self._provider.aclose()
        except (Exception, asyncio.CancelledError):
            self.terminate()
            raise
        finally:
            self._closed = True

    def terminate(self) -> None:
        """Terminate every connection and background task at once."""
        if self._closed:
            return
        self._closing = True
        self._closed = True
        if self._poller is not None:
            self._poller.cancel()
        for task in list(self._draining):
            task.cancel()
        for member in list(self._members.values()):
            member.terminate()
        self._members.clear()
        self._service.terminate()

    def is_closing(self) -> bool:
        return self._closing

    async def _stop_poller(self) -> None:
        poller, self._poller = self._poller, None
        if poller is not None and not poller.done():
            poller.cancel()
            await asyncio.gather(poller, return_exceptions=True)

    def _drain(self, member: Member) -> None:
        async def drain() -> None:
            try:
                await member.close(self._drain_timeout)
            except Exception as exc:
                logger.warning("closing sub-pool of %s: %s", member.instance.label,
                               describe_error(exc))

        task = asyncio.ensure_future(drain())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    def _check_open(self) -> None:
        if self._closing:
            raise PoolClosedError("pool is closing")
        if not self._initialized:
            raise asyncpg.InterfaceError("pool is not initialized")

    # -- topology ----------------------------------------------------------------------

    @property
    def topology(self) -> Topology | None:
        """The current topology snapshot."""
        return self._topology

    async def refresh_topology(self) -> Topology:
        """Ask the discovery provider now and reconcile the sub-pools."""
        async with self._refresh_lock:
            try:
                return await self._refresh()
            finally:
                self._refreshed.set()
                self._refreshed = asyncio.Event()

    async def _refresh(self) -> Topology:
        provider = self._provider
        assert provider is not None
        self._refreshes += 1
        try:
            discovered = await provider.discover(self._service)
        except (Exception, asyncio.CancelledError) as exc:
            self._refresh_failures += 1
            self._last_refresh_error = describe_error(exc)
            if isinstance(exc, asyncio.CancelledError | TopologyError):
                raise
            raise TopologyError(
                f"{provider.name} discovery failed: {describe_error(exc)}"
            ) from exc
        self._last_refresh_error = None
        plan = plan_reconcile({k: m.instance for k, m in self._members.items()},
                              discovered.instances)
        previous = self._topology
        for member_id in plan.remove:
            member = self._members.pop(member_id)
            logger.info("instance %s left the topology; draining", member.instance.label)
            self._drain(member)
        for instance in plan.add:
            logger.info("instance %s joined as %s", instance.label, instance.role.value)
            self._members[instance.id] = Member(instance, self._make_sub_pool)
        for member_id in plan.expire:
            member = self._members[member_id]
            logger.info("instance %s changed role %s -> %s; expiring its connections",
                        member.instance.label, member.instance.role.value,
                        next(i.role.value for i in plan.keep if i.id == member_id))
            if member.pool is not None:
                await member.pool.expire_connections()
        for instance in plan.keep:
            self._members[instance.id].instance = instance
        instances = tuple(self._members[i.id].instance for i in (*plan.keep, *plan.add))
        unchanged = (
            previous is not None
            and previous.instances == instances
            and previous.symmetric == discovered.symmetric
        )
        if not unchanged:
            self._topology = Topology(
                version=(previous.version + 1) if previous else 1,
                instances=instances,
                provider=provider.name,
                symmetric=discovered.symmetric,
                service_address=self._service.service_address(),
            )
        self._service.forget_except({i.address for i in instances})
        assert self._topology is not None
        return self._topology

    def _make_sub_pool(self, instance: Instance) -> Any:
        options = dict(self._pool_options)
        assert self._provider is not None
        options.update(self._provider.sub_pool_options())
        kwargs = dict(self._connect_kwargs)
        kwargs.update(host=instance.address.host, port=instance.address.port)
        kwargs.setdefault("target_session_attrs", "any")
        kwargs.setdefault("timeout", self._connect_timeout)
        return asyncpg.create_pool(self._dsn, **options, **kwargs)

    async def _poll(self) -> None:
        """Refresh on every interval (if set) and whenever an error asks for it."""
        failures = 0
        while not self._closing:
            delay = self._refresh_interval
            if failures:
                base = self._refresh_interval or 1.0
                delay = min(30.0, base * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0)
            try:
                async with asyncio.timeout(delay):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            if self._closing:
                return
            try:
                await self.refresh_topology()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                logger.warning("topology refresh failed (keeping the last good topology): %s",
                               describe_error(exc))

    def _request_refresh(self) -> asyncio.Event:
        """Ask the poller for a refresh now; the event is set when one finishes."""
        event = self._refreshed
        self._wakeup.set()
        return event

    # -- choosing an instance ----------------------------------------------------------

    def _candidates(self, request: RoleRequest, excluded: set[str]) -> list[Candidate]:
        topology = self._topology
        if topology is None:
            return []
        now = time.monotonic()
        members = self._members
        chosen = eligible(topology, request,
                          lambda i: i.id not in excluded and members[i.id].available(now))
        return [
            Candidate(instance=i, in_use=members[i.id].in_use(), idle=members[i.id].idle(),
                      max_size=self._pool_options["max_size"])
            for i in chosen
        ]

    async def _acquire_member(self, request: RoleRequest,
                              timeout: float | None) -> tuple[Member, Any]:
        """Pick an instance and check a connection out of its sub-pool.

        Connection-level failures here happen before any statement was sent,
        so moving to another instance (or waiting for a refresh) is always safe.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        budget = self._failover_timeout if timeout is None else timeout
        deadline = loop.time() + budget
        attempts: dict[str, str] = {}
        excluded: set[str] = set()
        while True:
            candidates = self._candidates(request, excluded)
            if not candidates:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._no_instance(request, attempts)
                # Wait for the topology to change (a failover in progress), then retry
                # everything once more: breakers may have half-opened too.
                event = self._request_refresh()
                try:
                    await asyncio.wait_for(event.wait(), min(remaining, 1.0))
                except TimeoutError:
                    pass
                self._check_open()
                excluded.clear()
                continue
            member = self._members[self._strategy.pick(candidates).instance.id]
            remaining = None if timeout is None else max(deadline - loop.time(), 0.001)
            try:
                pool = await member.ensure_ready()
                connection = await pool.acquire(timeout=remaining)
            except (Exception, asyncio.CancelledError) as exc:
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if self._closing:
                    raise PoolClosedError("pool is closing") from exc
                if isinstance(exc, TimeoutError) and timeout is not None:
                    raise  # the user's acquire timeout, as asyncpg raises it
                if not is_connection_error(exc) and not isinstance(
                    exc, asyncpg.InterfaceError
                ):
                    raise
                self._note_failure(member, exc)
                attempts[member.instance.label] = describe_error(exc)
                excluded.add(member.instance.id)
                continue
            member.record_success()
            return member, connection

    def _note_failure(self, member: Member, exc: BaseException) -> None:
        self._acquire_errors += 1
        error = describe_error(exc)
        member.record_failure(error)
        logger.warning("instance %s failed: %s", member.instance.label, error)
        self._request_refresh()

    def _no_instance(self, request: RoleRequest, attempts: dict[str, str]) -> Exception:
        topology = self._topology
        if not attempts and topology is not None:
            for instance in topology.instances:
                member = self._members.get(instance.id)
                if member is not None and member.last_error:
                    attempts[instance.label] = f"{member.breaker_state}: {member.last_error}"
        known = "none" if topology is None or not topology.instances else ", ".join(
            f"{i.label} {i.role.value}" for i in topology.instances)
        return NoAvailableInstanceError(
            f"no available instance can serve {request.value} requests "
            f"(topology v{topology.version if topology else 0}: {known})",
            attempts.items(),
        )

    # -- asyncpg's Pool API -------------------------------------------------------------

    def acquire(self, *, timeout: float | None = None,
                role: str | None = None) -> _AcquireContext:
        """Acquire a connection: ``async with pool.acquire() as conn`` or ``await``.

        ``role`` is ``"primary"`` (the default), ``"replica"``, ``"any"`` or
        ``"prefer-replica"``.
        """
        return _AcquireContext(self, timeout, parse_role(role, RoleRequest.PRIMARY))

    async def _acquire(self, timeout: float | None, request: RoleRequest) -> Any:
        member, connection = await self._acquire_member(request, timeout)
        self._checked_out[connection] = member
        return connection

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        """Return a connection acquired with :meth:`acquire` to its sub-pool."""
        member = self._checked_out.pop(connection, None)
        if member is None:
            raise asyncpg.InterfaceError(
                f"Pool.release() received invalid connection: {connection!r} was not "
                "acquired from this pool"
            )
        member.served += 1
        await member.pool.release(connection, timeout=timeout)

    @asynccontextmanager
    async def _connection_for(self, request: RoleRequest,
                              timeout: float | None) -> AsyncIterator[Any]:
        member, connection = await self._acquire_member(request, timeout)
        try:
            yield connection
        finally:
            member.served += 1
            await member.pool.release(connection)

    async def execute(self, query: str, *args: Any, timeout: float | None = None,
                      role: str | None = None) -> str:
        async with self._connection_for(parse_role(role, RoleRequest.PRIMARY), None) as con:
            result: str = await con.execute(query, *args, timeout=timeout)
            return result

    async def executemany(self, command: str, args: Iterable[Sequence[Any]], *,
                          timeout: float | None = None, role: str | None = None) -> None:
        async with self._connection_for(parse_role(role, RoleRequest.PRIMARY), None) as con:
            await con.executemany(command, args, timeout=timeout)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None,
                    record_class: Any = None, role: str | None = None) -> list[Any]:
        async with self._connection_for(parse_role(role, RoleRequest.PRIMARY), None) as con:
            result: list[Any] = await con.fetch(
                query, *args, timeout=timeout, record_class=record_class)
            return result

    async def fetchval(self, query: str, *args: Any, column: int = 0,
                       timeout: float | None = None, role: str | None = None) -> Any:
        async with self._connection_for(parse_role(role, RoleRequest.PRIMARY), None) as con:
            return await con.fetchval(query, *args, column=column, timeout=timeout)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None,
                       record_class: Any = None, role: str | None = None) -> Any:
        async with self._connection_for(parse_role(role, RoleRequest.PRIMARY), None) as con:
            return await con.fetchrow(query, *args, timeout=timeout, record_class=record_class)

    async def fetchmany(self, query: str, args: Iterable[Sequence[Any]], *,
                        timeout: float | None = None, record_class: Any = None,
                        role: str | None = None) -> list[Any]:
        async with self._connection_for(parse_role(role, RoleRequest.PRIMARY), None) as con:
            result: list[Any] = await con.fetchmany(
                query, args, timeout=timeout, record_class=record_class)
            return result

    async def copy_from_table(self, table_name: str, *, output: Any, columns: Any = None,
                              schema_name: str | None = None, timeout: float | None = None,
                              format: Any = None, oids: Any = None, delimiter: Any = None,
                              null: Any = None, header: Any = None, quote: Any = None,
                              escape: Any = None, force_quote: Any = None, encoding: Any = None,
                              role: str | None = None) -> str:
        async with self._connection_for(parse_role(role, RoleRequest.PRIMARY), None) as con:
            result: str = await con.copy_from_table(
                table_name, output=output, columns=columns, schema_name=schema_name,
                timeout=timeout, format=format, oids=oids, delimiter=delimiter, null=null,
                header=header, quote=quote, escape=escape, force_quote=force_quote,
                encoding=encoding)
            return result

    async def copy_from_query(self, query: str, *args: Any, output: Any,
                              timeout: float | None = None, format: Any = None,
                              oids: Any = None, delimiter: Any = None, null: Any = None,
                              header: Any = None, quote: Any = None, escape: Any = None,
                              force_quote: Any = None, encoding: Any = None,
                              role: str | None = None) -> str:
        async with self._connection_for(parse_role(role, RoleRequest.PRIMARY), None) as con:
            result: str = await con.copy_from_query(
                query, *args, output=output, timeout=timeout, format=format, oids=oids,
                delimiter=delimiter, null=null, header=header, quote=quote, escape=escape,
                force_quote=force_quote, encoding=encoding)
            return result

    async def copy_to_table(self, table_name: str, *, source: Any, columns: Any = None,
                            schema_name: str | None = None, timeout: float | None = None,
                            format: Any = None, oids: Any = None, freeze: Any = None,
                            delimiter: Any = None, null: Any = None, header: Any = None,
                            quote: Any = None, escape: Any = None, force_quote: Any = None,
                            force_not_null: Any = None, force_null: Any = None,
                            encoding: Any = None, where: Any = None) -> str:
        async with self._connection_for(RoleRequest.PRIMARY, None) as con:
            result: str = await con.copy_to_table(
                table_name, source=source, columns=columns, schema_name=schema_name,
                timeout=timeout, format=format, oids=oids, freeze=freeze, delimiter=delimiter,
                null=null, header=header, quote=quote, escape=escape, force_quote=force_quote,
                force_not_null=force_not_null, force_null=force_null, encoding=encoding,
                where=where)
            return result

    async def copy_records_to_table(self, table_name: str, *, records: Any, columns: Any = None,
                                    schema_name: str | None = None,
                                    timeout: float | None = None, where: Any = None) -> str:
        async with self._connection_for(RoleRequest.PRIMARY, None) as con:
            result: str = await con.copy_records_to_table(
                table_name, records=records, columns=columns, schema_name=schema_name,
                timeout=timeout, where=where)
            return result

    async def expire_connections(self) -> None:
        """Expire every connection of every sub-pool (closed on their next release)."""
        for member in list(self._members.values()):
            if member.pool is not None:
                await member.pool.expire_connections()

    def set_connect_args(self, dsn: str | None = None, **connect_kwargs: Any) -> None:
        """New connection arguments for connections opened from now on."""
        self._dsn = dsn
        self._connect_kwargs = connect_kwargs
        self._service.set_connect_args(dsn, connect_kwargs)
        for member in self._members.values():
            if member.pool is not None:
                kwargs = dict(connect_kwargs)
                kwargs.update(host=member.instance.address.host,
                              port=member.instance.address.port)
                kwargs.setdefault("target_session_attrs", "any")
                member.pool.set_connect_args(dsn, **kwargs)

    def _sum(self, getter: Callable[[Any], int]) -> int:
        return sum(getter(m.pool) for m in self._members.values() if m.ready)

    def get_size(self) -> int:
        return self._sum(lambda p: p.get_size())

    def get_idle_size(self) -> int:
        return self._sum(lambda p: p.get_idle_size())

    def get_min_size(self) -> int:
        return int(self._pool_options["min_size"]) * len(self._members)

    def get_max_size(self) -> int:
        return int(self._pool_options["max_size"]) * len(self._members)

    def get_init_size(self) -> int:
        init = self._pool_options.get("init_size")
        per_instance = self._pool_options["min_size"] if init is None else init
        return int(per_instance) * len(self._members)

    # -- observability ------------------------------------------------------------------

    def stats(self) -> PoolStats:
        topology = self._topology
        instances = []
        for member in self._members.values():
            i = member.instance
            instances.append(InstanceStats(
                id=i.id, name=i.name, address=str(i.address), role=i.role.value,
                size=member.size(), idle=member.idle(), in_use=member.in_use(),
                served=member.served, failures=member.failures,
                breaker=member.breaker_state, last_error=member.last_error,
            ))
        return PoolStats(
            topology_version=topology.version if topology else 0,
            provider=self._provider.name if self._provider else "undetected",
            refreshes=self._refreshes,
            refresh_failures=self._refresh_failures,
            last_refresh_error=self._last_refresh_error,
            acquire_errors=self._acquire_errors,
            instances=tuple(instances),
            draining=len(self._draining),
        )

    def __repr__(self) -> str:
        state = ("closed" if self._closed else "closing" if self._closing
                 else "ready" if self._initialized else "new")
        members = ", ".join(
            f"{m.instance.label} {m.instance.role.value} {m.in_use()}/{m.size()}"
            for m in self._members.values()
        )
        version = self._topology.version if self._topology else 0
        return (f"<picopool.Pool {state} dsn={mask_dsn(self._dsn)!r} "
                f"provider={self._provider.name if self._provider else None} "
                f"topology=v{version} [{members}]>")


class _AcquireContext:
    """Both awaitable and an async context manager, like asyncpg's."""

    __slots__ = ("_connection", "_done", "_pool", "_request", "_timeout")

    def __init__(self, pool: Pool, timeout: float | None, request: RoleRequest) -> None:
        self._pool = pool
        self._timeout = timeout
        self._request = request
        self._connection: Any = None
        self._done = False

    async def __aenter__(self) -> Any:
        if self._connection is not None or self._done:
            raise asyncpg.InterfaceError("a connection is already acquired")
        self._connection = await self._pool._acquire(self._timeout, self._request)
        return self._connection

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        self._done = True
        connection, self._connection = self._connection, None
        await self._pool.release(connection)

    def __await__(self) -> Generator[Any, None, Any]:
        self._done = True
        return self._pool._acquire(self._timeout, self._request).__await__()


def create_pool(
    dsn: str | None = None,
    *,
    strategy: BalanceStrategy | None = None,
    discovery: DiscoveryProvider | None = None,
    topology_refresh_interval: float | None = 1.0,
    service_dsn: str | None = None,
    failover_timeout: float = 10.0,
    drain_timeout: float = 30.0,
    connect_timeout: float = 5.0,
    init_size: int | None = None,
    min_size: int = 10,
    max_size: int = 10,
    max_queries: int = 50000,
    max_inactive_connection_lifetime: float = 300.0,
    connect: Callable[..., Any] | None = None,
    setup: Callable[..., Any] | None = None,
    init: Callable[..., Any] | None = None,
    reset: Callable[..., Any] | None = None,
    connection_class: type[Any] = asyncpg.Connection,
    record_class: type[Any] = asyncpg.Record,
    **connect_kwargs: Any,
) -> Pool:
    """Create a cluster-aware pool; ``await`` it (or ``async with``) to start it.

    Takes everything :func:`asyncpg.create_pool` takes; sizes apply per instance.
    ``discovery`` defaults to auto-detection from the service connection.
    ``topology_refresh_interval=None`` turns the background poller off.
    ``failover_timeout`` bounds how long a request waits for an instance to
    serve it when none is available and no ``timeout`` was given.
    """
    if dsn is not None and not isinstance(dsn, str):
        raise ConfigurationError("dsn must be a string")
    pool_options: dict[str, Any] = dict(
        min_size=min_size, max_size=max_size, max_queries=max_queries,
        max_inactive_connection_lifetime=max_inactive_connection_lifetime,
        connect=connect, setup=setup, init=init, reset=reset,
        connection_class=connection_class, record_class=record_class,
    )
    if init_size is not None:
        pool_options["init_size"] = init_size
    connect_kwargs.pop("loop", None)
    return Pool(
        dsn, strategy=strategy, discovery=discovery,
        topology_refresh_interval=topology_refresh_interval, service_dsn=service_dsn,
        failover_timeout=failover_timeout, drain_timeout=drain_timeout,
        connect_timeout=connect_timeout, pool_options=pool_options,
        connect_kwargs=connect_kwargs,
    )


RoleName = Literal["primary", "replica", "any", "prefer-replica"]
