"""picopool's Pool: asyncpg's Pool API over every instance of a cluster."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import (
    AsyncIterator,
    Callable,
    Collection,
    Generator,
    Iterable,
    Iterator,
    Sequence,
)
from contextlib import asynccontextmanager, contextmanager
from types import MappingProxyType, TracebackType
from typing import Any

import asyncpg

from ._address_map import AddressMap, address_mapper
from ._admission import AdmissionStats, RateLimit
from ._cache_reads import ReadCache, cached_call
from ._catalog import FunctionCatalog
from ._dsn import asyncpg_dsn, mask_dsn, seed_addresses
from ._errors import (
    ConfigurationError,
    NotReadyError,
    PoolClosedError,
)
from ._events import Listener
from ._execute import Executor, Reset, causal_scope, route_scope
from ._member import Member
from ._membership import Membership
from ._metrics import Metrics
from ._routing import (
    ReadWriteSplit,
    RoleRequest,
    RoutingPolicy,
    parse_role,
    read_request,
)
from ._slowlog import SlowQueryLog
from ._stats import InstanceStats, Latency, PoolStats, RoleStats
from ._topology import Role, Topology
from ._wal import CausalScope, format_causal_token, parse_causal_token
from .discovery import DiscoveryProvider
from .strategies import BalanceStrategy, RoundRobin

logger = logging.getLogger("picopool")



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
        policy: RoutingPolicy,
        check_function_volatility: bool,
        max_replica_lag_bytes: int | None,
        max_replica_lag_seconds: float | None,
        read_your_writes: bool,
        causal_wait: float,
        max_retries: int,
        health_check_interval: float | None,
        pool_options: dict[str, Any],
        connect_kwargs: dict[str, Any],
        slow_query_threshold: float | None = None,
        log_parameters: bool = False,
        max_waiting: int | None = None,
        rate_limit: RateLimit | None = None,
        max_lifetime: float | None = None,
        readiness_check: bool = False,
        statement_timeout: float | None = None,
        cache: ReadCache | None = None,
    ) -> None:
        if topology_refresh_interval is not None and topology_refresh_interval <= 0:
            raise ConfigurationError("topology_refresh_interval must be positive or None")
        if health_check_interval is not None and health_check_interval <= 0:
            raise ConfigurationError("health_check_interval must be positive or None")
        if strategy is not None and not isinstance(strategy, BalanceStrategy):
            raise ConfigurationError(f"strategy {strategy!r} has no pick() method")
        _check_sizes(pool_options)
        max_size = pool_options["max_size"]
        self._pool_options = pool_options
        self._strategy: BalanceStrategy = strategy or RoundRobin()
        self._failover_timeout = failover_timeout
        asyncpg_dsn(dsn)  # a DSN asyncpg cannot read fails here, not at first connect
        user_reset = pool_options.pop("reset", None)
        self._membership = Membership(
            dsn=dsn, connect_kwargs=connect_kwargs, pool_options=pool_options,
            seeds=seed_addresses(dsn, connect_kwargs), provider=discovery,
            service_dsn=service_dsn, refresh_interval=topology_refresh_interval,
            connect_timeout=connect_timeout, health_check_interval=health_check_interval,
            drain_timeout=drain_timeout, check_elision=policy.elide_reset,
            user_reset=user_reset, max_lifetime=_positive("max_lifetime", max_lifetime),
            readiness_check=readiness_check,
        )
        self._catalog = FunctionCatalog(self._membership.service, timeout=connect_timeout)
        self._executor = Executor(
            self._membership, strategy=self._strategy, policy=policy, catalog=self._catalog,
            check_function_volatility=check_function_volatility,
            failover_timeout=failover_timeout, max_retries=max_retries,
            max_size=max_size, max_lag_bytes=max_replica_lag_bytes,
            max_lag_seconds=max_replica_lag_seconds, read_your_writes=read_your_writes,
            causal_wait=causal_wait,
            # the user's setup= or reset= may carry session state: never skip the reset
            elision_allowed=pool_options.get("setup") is None and user_reset is None,
            check_idle_after=health_check_interval, check_timeout=connect_timeout,
            check_open=self._check_open,
            max_waiting=_at_least_zero("max_waiting", max_waiting),
            rate_limit=rate_limit,
            statement_timeout=_positive("statement_timeout", statement_timeout),
            max_lifetime=max_lifetime,
        )
        self._checked_out: dict[Any, Member] = {}
        # stats(), Prometheus and OpenTelemetry read what this listener adds up.
        # The pool's own metrics: fed directly by the executor, and by rare events.
        self._metrics = Metrics(self._waiting)
        self._membership.events.sink = self._metrics
        self._executor.metrics = self._metrics
        if slow_query_threshold is not None:
            if slow_query_threshold < 0:
                raise ConfigurationError("slow_query_threshold must be >= 0 or None")
            self._membership.events.add(
                SlowQueryLog(slow_query_threshold, log_parameters=log_parameters))
        self._initialized = False
        self._initializing = False
        self._closing = False
        self._closed = False
        self._policy = policy
        if cache is not None and not isinstance(cache, ReadCache):
            raise ConfigurationError(f"cache must be a picopool.ReadCache, not {cache!r}")
        self._cache = cache

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
            await self._membership.start()
        except (Exception, asyncio.CancelledError):
            self.terminate()
            raise
        finally:
            self._initializing = False
        self._initialized = True
        return self

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
            await self._catalog.aclose()
            self._executor.wake_waiters()
            await self._membership.aclose()
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
        self._membership.terminate()
        self._executor.wake_waiters()

    def is_closing(self) -> bool:
        return self._closing

    def _check_open(self) -> None:
        if self._closing:
            raise PoolClosedError("pool is closing")
        if not self._initialized:
            if self._initializing:  # asyncpg's words
                raise asyncpg.InterfaceError(
                    "pool is being initialized, but not yet ready: likely there is a race "
                    "between creating a pool and using it")
            raise asyncpg.InterfaceError("pool is not initialized")

    # -- topology ----------------------------------------------------------------------

    @property
    def topology(self) -> Topology | None:
        """The current topology snapshot."""
        return self._membership.topology

    async def refresh_topology(self) -> Topology:
        """Ask the discovery provider now and reconcile the sub-pools."""
        if self._closing:
            raise PoolClosedError("pool is closing")
        return await self._membership.refresh()

    # -- asyncpg's Pool API -------------------------------------------------------------

    def acquire(self, *, timeout: float | None = None,
                role: str | None = None) -> _AcquireContext:
        """Acquire a connection: ``async with pool.acquire() as conn`` or ``await``.

        ``role`` is ``"primary"`` (the default), ``"replica"``, ``"any"`` or
        ``"prefer-replica"``. Such connections always get asyncpg's full reset.
        """
        return _AcquireContext(self, timeout, parse_role(role, RoleRequest.PRIMARY))

    async def _acquire(self, timeout: float | None, request: RoleRequest) -> Any:
        self._check_open()
        if self._executor.rate_limiter is not None:
            await self._executor.rate_limiter.acquire(timeout)
        started = time.monotonic()
        member, connection = await self._executor.acquire(request, timeout)
        self._checked_out[connection] = member
        self._metrics.acquired(member.label, member.role_name, time.monotonic() - started, True)
        return connection

    async def release(self, connection: Any, *, timeout: float | None = None) -> None:
        """Return a connection acquired with :meth:`acquire` to its sub-pool.

        As in asyncpg, releasing a connection that is already back in the pool
        (released twice, or released inside ``async with pool.acquire()``) does
        nothing, and a connection of another pool raises ``InterfaceError``.
        """
        member = self._checked_out.pop(connection, None)
        if member is None:
            if self._released_here(connection):
                return  # already released: asyncpg does nothing either
            raise asyncpg.InterfaceError(
                f"Pool.release(): connection {connection!r} is not a member of this pool")
        member.served += 1
        raw = connection._con  # None once asyncpg released a lost connection itself
        broken = raw is None or raw.is_closed()
        if broken:  # it broke in the user's hands: the instance may be gone
            self._membership.request_refresh()
        scope = causal_scope.get()
        executor = self._executor
        try:
            if (scope is not None or executor.read_your_writes) \
                    and member.instance.role.writable \
                    and not broken and not self._membership.symmetric:
                await executor.record_write_position(raw, scope)
        finally:
            # acquire()d connections always get asyncpg's full reset
            self._metrics.reset(member.label, not self._membership.picopool_resets)
            await executor.release_shielded(member, connection, Reset.FULL, timeout=timeout)

    def _released_here(self, connection: Any) -> bool:
        """A connection proxy of one of the sub-pools, already given back."""
        holder = getattr(connection, "_holder", None)
        if type(connection) is not asyncpg.pool.PoolConnectionProxy or holder is None \
                or connection._con is not None:
            return False
        return any(m.pool is holder._pool for m in self._membership.members.values())

    async def execute(self, query: str, *args: Any, timeout: float | None = None,
                      role: str | None = None) -> str:
        if self._cache is not None:
            return await cached_call(  # type: ignore[no-any-return]
                self._executor, self._cache, "execute", query, args, {"timeout": timeout},
                role, None)
        result: str = await self._executor.run("execute", query, args, {"timeout": timeout}, role)
        return result

    async def executemany(self, command: str, args: Iterable[Sequence[Any]], *,
                          timeout: float | None = None, role: str | None = None) -> None:
        if self._cache is not None:
            await cached_call(self._executor, self._cache, "executemany", command, (args,),
                              {"timeout": timeout}, role, None)
            return
        await self._executor.run("executemany", command, (args,), {"timeout": timeout}, role)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None,
                    record_class: Any = None, role: str | None = None,
                    cache_ttl: float | None = None) -> list[Any]:
        """asyncpg's ``fetch``; ``cache_ttl=`` seconds overrides the read cache's TTL
        for this call (``0``: not cached)."""
        if self._cache is not None:
            return await cached_call(  # type: ignore[no-any-return]
                self._executor, self._cache, "fetch", query, args,
                {"timeout": timeout, "record_class": record_class}, role, cache_ttl)
        result: list[Any] = await self._executor.run(
            "fetch", query, args, {"timeout": timeout, "record_class": record_class}, role)
        return result

    async def fetchval(self, query: str, *args: Any, column: int = 0,
                       timeout: float | None = None, role: str | None = None,
                       cache_ttl: float | None = None) -> Any:
        if self._cache is not None:
            return await cached_call(self._executor, self._cache, "fetchval", query, args,
                                     {"column": column, "timeout": timeout}, role, cache_ttl)
        return await self._executor.run(
            "fetchval", query, args, {"column": column, "timeout": timeout}, role)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None,
                       record_class: Any = None, role: str | None = None,
                       cache_ttl: float | None = None) -> Any:
        if self._cache is not None:
            return await cached_call(
                self._executor, self._cache, "fetchrow", query, args,
                {"timeout": timeout, "record_class": record_class}, role, cache_ttl)
        return await self._executor.run(
            "fetchrow", query, args, {"timeout": timeout, "record_class": record_class}, role)

    async def fetchmany(self, query: str, args: Iterable[Sequence[Any]], *,
                        timeout: float | None = None, record_class: Any = None,
                        role: str | None = None) -> list[Any]:
        if self._cache is not None:
            return await cached_call(  # type: ignore[no-any-return]
                self._executor, self._cache, "fetchmany", query, (args,),
                {"timeout": timeout, "record_class": record_class}, role, None)
        result: list[Any] = await self._executor.run(
            "fetchmany", query, (args,), {"timeout": timeout, "record_class": record_class},
            role)
        return result

    async def copy_from_table(self, table_name: str, *, output: Any, columns: Any = None,
                              schema_name: str | None = None, timeout: float | None = None,
                              format: Any = None, oids: Any = None, delimiter: Any = None,
                              null: Any = None, header: Any = None, quote: Any = None,
                              escape: Any = None, force_quote: Any = None, encoding: Any = None,
                              role: str | None = None) -> str:
        """COPY a table out; a read, so it may run on a replica."""
        async with self._connection_for(self._read_role(role)) as con:
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
        """COPY a query's result out; routed like the query itself."""
        decision = await self._executor.decide(query, role, None)
        async with self._connection_for(decision.request) as con:
            result: str = await con.copy_from_query(
                decision.query, *args, output=output, timeout=timeout, format=format,
                oids=oids, delimiter=delimiter, null=null, header=header, quote=quote,
                escape=escape, force_quote=force_quote, encoding=encoding)
            return result

    async def copy_to_table(self, table_name: str, *, source: Any, columns: Any = None,
                            schema_name: str | None = None, timeout: float | None = None,
                            format: Any = None, oids: Any = None, freeze: Any = None,
                            delimiter: Any = None, null: Any = None, header: Any = None,
                            quote: Any = None, escape: Any = None, force_quote: Any = None,
                            force_not_null: Any = None, force_null: Any = None,
                            encoding: Any = None, where: Any = None) -> str:
        async with self._connection_for(RoleRequest.PRIMARY) as con:
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
        async with self._connection_for(RoleRequest.PRIMARY) as con:
            result: str = await con.copy_records_to_table(
                table_name, records=records, columns=columns, schema_name=schema_name,
                timeout=timeout, where=where)
            return result

    def _read_role(self, role: str | None) -> RoleRequest:
        scoped = route_scope.get()
        if role is not None:
            return parse_role(role, RoleRequest.PRIMARY)
        if scoped is not None:
            return scoped
        return read_request(self._policy, self._membership.symmetric)

    async def _acquire_routed(self, request: RoleRequest, timeout: float | None) -> Any:
        """Check out a connection for *request*, honouring read-your-writes."""
        self._check_open()
        if self._executor.rate_limiter is not None:
            await self._executor.rate_limiter.acquire(timeout)
        started = time.monotonic()
        member, connection = await self._executor.acquire_routed(request, timeout)
        self._checked_out[connection] = member
        self._metrics.acquired(member.label, member.role_name, time.monotonic() - started, True)
        return connection

    @asynccontextmanager
    async def _connection_for(self, request: RoleRequest) -> AsyncIterator[Any]:
        """A connection for one pool-level call (COPY); released with a full reset."""
        connection = await self._acquire_routed(request, None)
        try:
            yield connection
        finally:
            await self.release(connection)

    # -- extensions: transactions, hints, read-your-writes --------------------------------

    @asynccontextmanager
    async def transaction(self, *, isolation: str | None = None, readonly: bool = False,
                          deferrable: bool = False, role: str | None = None,
                          timeout: float | None = None) -> AsyncIterator[Any]:
        """``async with pool.transaction() as conn``: a transaction on the primary.

        ``readonly=True`` may run on a replica (per the pool's read/write split).
        """
        default = (read_request(self._policy, self._membership.symmetric) if readonly
                   else RoleRequest.PRIMARY)
        request = parse_role(role, default) if role is not None else default
        connection = await self._acquire_routed(request, timeout)
        try:
            async with connection.transaction(isolation=isolation, readonly=readonly,
                                              deferrable=deferrable):
                yield connection
        finally:
            await self.release(connection)

    @contextmanager
    def route(self, role: str) -> Iterator[None]:
        """``with pool.route("primary"):`` sends this task's statements to *role*."""
        token = route_scope.set(parse_role(role, RoleRequest.PRIMARY))
        try:
            yield
        finally:
            route_scope.reset(token)

    @asynccontextmanager
    async def read_your_writes(self, token: str | None = None) -> AsyncIterator[CausalScope]:
        """Within this scope, reads see every write made in it (and *token*'s).

        Reads go to a replica whose replay position has reached the last write,
        waiting up to ``causal_wait`` seconds for one, else to the primary.
        ``scope.token()`` exports the position for the next request.
        """
        scope = CausalScope(parse_causal_token(token) if token else 0)
        outer = causal_scope.get()
        if outer is not None:
            scope.lsn = max(scope.lsn, outer.lsn)
        reset = causal_scope.set(scope)
        try:
            yield scope
        finally:
            causal_scope.reset(reset)
            if outer is not None:
                outer.lsn = max(outer.lsn, scope.lsn)

    async def wait_ready(self, *, primary: bool = True, replicas: int = 0,
                         timeout: float | None = None) -> None:
        """Wait until the pool can serve: a ready primary (if *primary*) and at least
        *replicas* ready replicas (peers count as both in a symmetric cluster).

        Ready: its sub-pool started, its breaker closed, answering the liveness
        watch, and with ``readiness_check=True`` its role confirmed on a
        connection. Starts the sub-pools of instances not started yet.
        :class:`NotReadyError` (a ``TimeoutError``) after *timeout* seconds.
        """
        self._check_open()
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        membership = self._membership
        while True:
            have_primary, have_replicas = False, 0
            for member in list(membership.members.values()):
                role = member.instance.role
                if member.ready and member.failures == 0 and not member.unresponsive \
                        and member.confirmed:
                    if role.writable:
                        have_primary = True
                    if role is not Role.PRIMARY:
                        have_replicas += 1
                elif not member.ready and member.open_until <= time.monotonic() \
                        and (member._init_task is None or member._init_task.done()):
                    membership.spawn(_quiet_start(member))
            if (have_primary or not primary) and have_replicas >= replicas:
                return
            if deadline is not None and loop.time() >= deadline:
                raise NotReadyError(
                    f"not ready after {timeout:g} s: "
                    f"{'a primary' if primary and not have_primary else 'the primary ready'}, "
                    f"{have_replicas} of {replicas} replicas ready")
            self._check_open()
            await asyncio.sleep(0.05)

    def invalidate_cache(self, tables: Iterable[str] | None = None) -> int:
        """Drop read-cache entries that read any of *tables* (None: all); how many."""
        if self._cache is None:
            return 0
        return self._cache.invalidate(tables)

    def add_event_listener(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every :mod:`picopool.events` event from now on.

        Listeners run inline: quick, synchronous, never blocking. One that raises is
        logged and the statement goes on.
        """
        self._membership.events.add(listener)

    def remove_event_listener(self, listener: Listener) -> None:
        self._membership.events.remove(listener)

    def causal_token(self) -> str:
        """The WAL position of the last write seen in this task's scope (or pool-wide)."""
        scope = causal_scope.get()
        return format_causal_token(scope.lsn if scope is not None else self._executor.pool_lsn)

    async def expire_connections(self) -> None:
        """Expire every connection of every sub-pool (closed on their next release)."""
        for member in list(self._membership.members.values()):
            if member.pool is not None:
                await member.pool.expire_connections()

    def set_connect_args(self, dsn: str | None = None, **connect_kwargs: Any) -> None:
        """New connection arguments for connections opened from now on."""
        self._membership.set_connect_args(dsn, connect_kwargs)

    def _sum(self, getter: Callable[[Any], int]) -> int:
        return sum(getter(m.pool) for m in self._membership.members.values() if m.ready)

    def get_size(self) -> int:
        return self._sum(lambda p: p.get_size())

    def get_idle_size(self) -> int:
        return self._sum(lambda p: p.get_idle_size())

    def get_min_size(self) -> int:
        return int(self._pool_options["min_size"]) * len(self._membership.members)

    def get_max_size(self) -> int:
        return int(self._pool_options["max_size"]) * len(self._membership.members)

    def get_init_size(self) -> int:
        init = self._pool_options.get("init_size")
        per_instance = self._pool_options["min_size"] if init is None else init
        return int(per_instance) * len(self._membership.members)

    # -- observability ------------------------------------------------------------------

    def _waiting(self) -> int:
        return sum(len(m.acquiring) for m in list(self._membership.members.values()))

    def stats(self) -> PoolStats:
        # Consistent across threads: a Prometheus scrape or an OpenTelemetry export
        # reads from its own thread while statements go on (see picopool._metrics).
        with self._metrics.lock:
            self._metrics.fold()
            return self._stats()

    def _stats(self) -> PoolStats:
        membership = self._membership
        topology = membership.topology
        metrics = self._metrics
        now = time.monotonic()
        instances = []
        roles: dict[str, list[float]] = {}  # role -> [statements, errors, acquires, wait]
        for m in list(metrics.instances.values()):
            for (role, outcome), count in list(m.statements.items()):
                totals = roles.setdefault(role, [0, 0, 0, 0.0])
                totals[0] += count
                if outcome != "ok":
                    totals[1] += count
            for role, histogram in list(m.acquire_wait.items()):
                totals = roles.setdefault(role, [0, 0, 0, 0.0])
                totals[2] += histogram.count
                totals[3] += histogram.sum
        for member in membership.members.values():
            i = member.instance
            m = metrics.instance(i.label)
            outcomes: dict[str, int] = {}
            for (_, outcome), count in list(m.statements.items()):
                outcomes[outcome] = outcomes.get(outcome, 0) + count
            lag_bytes, lag_seconds = membership.lag.get(i.id, (None, None))
            instances.append(InstanceStats(
                id=i.id, name=i.name, address=str(i.address), role=i.role.value,
                size=member.size(), idle=member.idle(), in_use=member.in_use(),
                served=member.served, failures=member.failures,
                breaker="unresponsive" if member.unresponsive else member.breaker_state,
                last_error=member.last_error,
                latency=Latency(*m.latency(now)), statements=MappingProxyType(outcomes),
                waiters=len(member.acquiring),
                acquires=sum(h.count for h in list(m.acquire_wait.values())),
                acquire_wait=sum(h.sum for h in list(m.acquire_wait.values())),
                acquire_wait_max=m.acquire_wait_max,
                connections_opened=m.connections_opened, connections_lost=m.connections_lost,
                resets_elided=m.resets_elided, resets_performed=m.resets_performed,
                lag_bytes=lag_bytes, lag_seconds=lag_seconds, label=i.label,
            ))
        return PoolStats(
            topology_version=topology.version if topology else 0,
            provider=membership.provider.name if membership.provider else "undetected",
            refreshes=membership.refreshes,
            refresh_failures=membership.refresh_failures,
            last_refresh_error=membership.last_refresh_error,
            acquire_errors=membership.failures_noted,
            retries=self._executor.retries,
            elision_safe=membership.elision_safe,
            instances=tuple(instances),
            draining=len(membership.tasks),
            admission=self._admission_stats(),
            cache=self._cache.stats() if self._cache is not None else None,
            retries_by_outcome=MappingProxyType(dict(metrics.retries)),
            waiters=self._waiting(),
            waiters_max=metrics.waiters_max,
            roles=tuple(RoleStats(role, int(t[0]), int(t[1]), int(t[2]), t[3])
                        for role, t in sorted(roles.items())),
        )

    def _admission_stats(self) -> AdmissionStats:
        executor = self._executor
        queue, limiter = executor.admission, executor.rate_limiter
        return AdmissionStats(
            waiting=queue.waiting if queue else 0,
            max_waiting=queue.max_waiting if queue else None,
            granted=queue.granted if queue else 0,
            rejected=queue.rejected if queue else 0,
            wait_seconds=queue.waited_total if queue else 0.0,
            rate_limited=limiter.limited if limiter else 0,
            rate_waited=limiter.waited if limiter else 0,
            lifetime_closed=executor.lifetime_closed,
            not_ready=tuple(m.instance.label for m in self._membership.members.values()
                            if not m.confirmed),
        )

    def __repr__(self) -> str:
        membership = self._membership
        state = ("closed" if self._closed else "closing" if self._closing
                 else "ready" if self._initialized else "new")
        members = ", ".join(
            f"{m.instance.label} {m.instance.role.value} {m.in_use()}/{m.size()}"
            for m in membership.members.values()
        )
        version = membership.topology.version if membership.topology else 0
        provider = membership.provider.name if membership.provider else None
        # No DSN (host=/port= keywords, PGHOST): show the hosts instead of dsn=''
        source = (f"dsn={mask_dsn(membership.dsn)!r}" if membership.dsn
                  else f"hosts={','.join(map(str, membership.seeds))}")
        return (f"<picopool.Pool {state} {source} provider={provider} "
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
    read_write_split: str = "replicas",
    fallback_to_primary: bool = True,
    write_reserve: int | None = None,
    write_functions: Collection[str] = (),
    check_function_volatility: bool = False,
    router: Callable[[str, str], str | None] | None = None,
    rewrite: Callable[[str], str] | None = None,
    max_replica_lag_bytes: int | None = None,
    max_replica_lag_seconds: float | None = None,
    read_your_writes: bool = False,
    causal_wait: float = 0.5,
    max_retries: int = 3,
    health_check_interval: float | None = 30.0,
    elide_reset: bool = True,
    address_map: AddressMap | None = None,
    slow_query_threshold: float | None = None,
    log_parameters: bool = False,
    max_waiting: int | None = None,
    rate_limit: RateLimit | None = None,
    max_lifetime: float | None = None,
    readiness_check: bool = False,
    statement_timeout: float | None = None,
    cache: ReadCache | None = None,
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

    Routing: ``read_write_split`` is ``"replicas"``, ``"prefer_replicas"``,
    ``"include_primary"`` or ``"off"``; ``fallback_to_primary`` sends reads to the
    primary when no replica can serve; ``write_reserve`` is how many of the
    primary's connections ``"prefer_replicas"`` keeps from spilled reads for writes
    (default a quarter of ``max_size``, at least one; ``0`` lets reads take them
    all, and writes then wait behind reads); ``write_functions`` names functions
    that write;
    ``check_function_volatility`` asks pg_proc about user functions; ``router``
    and ``rewrite`` are user hooks. Replicas behind ``max_replica_lag_bytes`` /
    ``max_replica_lag_seconds`` get no reads. ``read_your_writes=True`` makes
    every read see every earlier write through this pool, waiting up to
    ``causal_wait`` seconds for a replica. ``elide_reset`` skips asyncpg's reset
    query after pool-level statements that provably leave no session state.
    ``health_check_interval``: every instance is pinged this often in the background
    (on a connection of its own), and a connection idle for longer is pinged before
    it is handed out (``None``: neither).

    Observability: statements that take ``slow_query_threshold`` seconds or more
    are logged to the ``picopool.slow`` logger, with their parameters only if
    ``log_parameters``.

    Admission control (all off by default): ``max_waiting`` bounds the callers
    waiting for a connection (``TooManyWaitersError`` beyond it) and serves them
    first-come first-served across instances; ``rate_limit=RateLimit(...)`` is a
    token bucket over calls; ``max_lifetime`` closes connections older than that
    (minus up to 5% jitter) on release; ``readiness_check`` keeps new and
    recovering instances out of traffic until a connection succeeded and their
    role was confirmed; ``statement_timeout`` is the ``timeout=`` of pool-level
    calls that pass none; ``cache=ReadCache(...)`` caches eligible reads.
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
    try:
        split = ReadWriteSplit(read_write_split)
    except ValueError:
        raise ConfigurationError(
            f"read_write_split must be one of {[m.value for m in ReadWriteSplit]}"
        ) from None
    if write_reserve is not None:
        if isinstance(write_reserve, bool) or not isinstance(write_reserve, int) \
                or write_reserve < 0:
            raise ConfigurationError(
                f"write_reserve must be None or an int >= 0, not {write_reserve!r}")
        if split is not ReadWriteSplit.PREFER_REPLICAS:
            raise ConfigurationError(
                "write_reserve applies to read_write_split='prefer_replicas' only")
    policy = RoutingPolicy(
        split=split, fallback_to_primary=fallback_to_primary, write_reserve=write_reserve,
        # calls are matched by their last name part, as the classifier reports them
        write_functions=frozenset(f.lower().rsplit(".", 1)[-1] for f in write_functions),
        router=router, rewrite=rewrite, elide_reset=elide_reset,
    )
    pool = Pool(
        dsn, strategy=strategy, discovery=discovery,
        topology_refresh_interval=topology_refresh_interval, service_dsn=service_dsn,
        failover_timeout=failover_timeout, drain_timeout=drain_timeout,
        connect_timeout=connect_timeout, policy=policy,
        check_function_volatility=check_function_volatility,
        max_replica_lag_bytes=max_replica_lag_bytes,
        max_replica_lag_seconds=max_replica_lag_seconds,
        read_your_writes=read_your_writes, causal_wait=causal_wait, max_retries=max_retries,
        health_check_interval=health_check_interval, pool_options=pool_options,
        connect_kwargs=connect_kwargs, slow_query_threshold=slow_query_threshold,
        log_parameters=log_parameters, max_waiting=max_waiting, rate_limit=rate_limit,
        max_lifetime=max_lifetime, readiness_check=readiness_check,
        statement_timeout=statement_timeout, cache=cache,
    )
    pool._membership.address_map = address_mapper(address_map)  # sub-pools connect there
    return pool


def _check_sizes(options: dict[str, Any]) -> None:
    """asyncpg's size checks, with asyncpg's messages (ConfigurationError is a ValueError)."""
    min_size, max_size = options["min_size"], options["max_size"]
    init_size = options.get("init_size")
    if max_size <= 0:
        raise ConfigurationError("max_size is expected to be greater than zero")
    if min_size < 0:
        raise ConfigurationError("min_size is expected to be greater or equal to zero")
    if min_size > max_size:
        raise ConfigurationError("min_size is greater than max_size")
    if init_size is not None:
        if init_size < 0:
            raise ConfigurationError("init_size is expected to be greater or equal to zero")
        if init_size < min_size:
            raise ConfigurationError("init_size is smaller than min_size")
        if init_size > max_size:
            raise ConfigurationError("init_size is greater than max_size")
    if options["max_queries"] <= 0:
        raise ConfigurationError("max_queries is expected to be greater than zero")
    if options["max_inactive_connection_lifetime"] < 0:
        raise ConfigurationError(
            "max_inactive_connection_lifetime is expected to be greater or equal to zero")


def _positive(name: str, value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise ConfigurationError(f"{name} must be positive or None")
    return value


def _at_least_zero(name: str, value: int | None) -> int | None:
    if value is not None and value < 0:
        raise ConfigurationError(f"{name} must be >= 0 or None")
    return value


async def _quiet_start(member: Member) -> None:
    """Start *member*'s sub-pool (wait_ready); a failure is the breaker's business."""
    try:
        await member.ensure_ready()
    except Exception as exc:
        logger.debug("starting %s: %s", member.instance.label, exc)
