"""picopool's Pool: asyncpg's Pool API over every instance of a cluster."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import random
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
from types import TracebackType
from typing import Any

import asyncpg

from ._dsn import asyncpg_dsn, mask_dsn, seed_addresses
from ._errors import (
    ConfigurationError,
    NoAvailableInstanceError,
    PoolClosedError,
    describe_error,
)
from ._member import Member, is_connection_error, rejected_before_sending
from ._membership import Membership
from ._routing import (
    Decision,
    ReadWriteSplit,
    RoleRequest,
    RoutingPolicy,
    decide,
    parse_role,
    read_request,
    select,
)
from ._sql import classify
from ._stats import InstanceStats, PoolStats
from ._topology import Instance, Role, Topology
from ._wal import CausalScope, format_causal_token, parse_causal_token, parse_lsn
from .discovery import DiscoveryProvider
from .strategies import BalanceStrategy, Candidate, RoundRobin

logger = logging.getLogger("picopool")

_route_scope: contextvars.ContextVar[RoleRequest | None] = contextvars.ContextVar(
    "picopool_route", default=None)


_causal_scope: contextvars.ContextVar[CausalScope | None] = contextvars.ContextVar(
    "picopool_causal", default=None)


_DECISION_CACHE_SIZE = 4096
_NOTHING_EXCLUDED: frozenset[str] = frozenset()
_NEVER = float("inf")


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
    ) -> None:
        if topology_refresh_interval is not None and topology_refresh_interval <= 0:
            raise ConfigurationError("topology_refresh_interval must be positive or None")
        if health_check_interval is not None and health_check_interval <= 0:
            raise ConfigurationError("health_check_interval must be positive or None")
        if strategy is not None and not isinstance(strategy, BalanceStrategy):
            raise ConfigurationError(f"strategy {strategy!r} has no pick() method")
        min_size, max_size = pool_options["min_size"], pool_options["max_size"]
        if max_size <= 0 or min_size < 0 or min_size > max_size:
            raise ConfigurationError(f"invalid sizes min_size={min_size} max_size={max_size}")
        self._pool_options = pool_options
        self._strategy: BalanceStrategy = strategy or RoundRobin()
        self._failover_timeout = failover_timeout
        asyncpg_dsn(dsn)  # a DSN asyncpg cannot read fails here, not at first connect
        self._membership = Membership(
            dsn=dsn, connect_kwargs=connect_kwargs, pool_options=pool_options,
            seeds=seed_addresses(dsn, connect_kwargs), provider=discovery,
            service_dsn=service_dsn, refresh_interval=topology_refresh_interval,
            health_check_interval=health_check_interval, connect_timeout=connect_timeout,
            drain_timeout=drain_timeout, check_elision=policy.elide_reset,
            user_reset=pool_options.pop("reset", None),
        )
        self._checked_out: dict[Any, Member] = {}
        self._initialized = False
        self._initializing = False
        self._closing = False
        self._closed = False
        self._retries = 0
        self._policy = policy
        self._decisions: dict[tuple[Any, ...], Decision] = {}
        self._decisions_cacheable = (policy.router is None and policy.rewrite is None
                                     and not check_function_volatility)
        self._check_volatility = check_function_volatility
        self._volatility: dict[str, bool] = {}
        # Candidates per request, valid while the membership's health epoch stands.
        self._candidate_cache: dict[RoleRequest, list[Candidate]] = {}
        self._cache_epoch = -1
        self._cache_valid_until = _NEVER
        self._max_lag_bytes = max_replica_lag_bytes
        self._max_lag_seconds = max_replica_lag_seconds
        self._read_your_writes = read_your_writes
        self._causal_wait = causal_wait
        self._pool_lsn = 0
        self._max_retries = max_retries

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

    def is_closing(self) -> bool:
        return self._closing

    def _check_open(self) -> None:
        if self._closing:
            raise PoolClosedError("pool is closing")
        if not self._initialized:
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

    # -- choosing an instance ----------------------------------------------------------

    def _candidates(self, request: RoleRequest, excluded: Collection[str],
                    only: Collection[str] | None) -> list[Candidate]:
        """The instances that may serve *request* now, with their load (hot path)."""
        topology = self._membership.topology
        if topology is None:
            return []
        members = self._membership.members
        now = time.monotonic()
        demoted = self._membership.demoted
        check_lag = request is not RoleRequest.PRIMARY and (
            self._max_lag_bytes is not None or self._max_lag_seconds is not None)
        usable: list[Instance] = []
        for instance in topology.instances:
            member = members.get(instance.id)
            if member is None or member.open_until > now or instance.id in excluded:
                continue
            if only is not None:  # named by a hint or the router: the user's call
                if instance.id not in only and instance.name not in only:
                    continue
            elif check_lag and instance.role is Role.REPLICA and self._lagging(instance):
                continue
            if demoted and instance.id in demoted and instance.role.writable:
                continue  # refused a write as read-only; wait for the refresh
            usable.append(instance)
        max_size = self._pool_options["max_size"]
        return [
            Candidate(instance=i, in_use=members[i.id].in_use, idle=members[i.id].idle,
                      max_size=max_size)
            for i in select(request, usable)
        ]

    def _cached_candidates(self, request: RoleRequest) -> list[Candidate]:
        """``_candidates(request)`` reused until topology or health changes.

        Every event that changes who may serve (a refresh, a failure, a demotion,
        a recovery) bumps the membership's ``health_epoch``; a breaker that half-opens with time
        is caught by ``_cache_valid_until``.
        """
        if self._cache_epoch != self._membership.health_epoch or (
                self._cache_valid_until is not _NEVER
                and time.monotonic() >= self._cache_valid_until):
            self._candidate_cache.clear()
            self._cache_epoch = self._membership.health_epoch
            self._cache_valid_until = min(
                (m.open_until for m in self._membership.members.values() if m.open_until),
                default=_NEVER)
        candidates = self._candidate_cache.get(request)
        if candidates is None:
            candidates = self._candidate_cache[request] = self._candidates(
                request, _NOTHING_EXCLUDED, None)
        return candidates

    def _lagging(self, instance: Instance) -> bool:
        """Whether a replica is too far behind to serve reads."""
        lag_bytes, lag_seconds = self._membership.lag.get(instance.id, (None, None))
        if lag_bytes is None:
            lag_bytes = instance.lag_bytes
        if lag_seconds is None:
            lag_seconds = instance.lag_seconds
        if self._max_lag_bytes is not None and lag_bytes is not None \
                and lag_bytes > self._max_lag_bytes:
            return True
        return (self._max_lag_seconds is not None and lag_seconds is not None
                and lag_seconds > self._max_lag_seconds)

    async def _acquire_member(
        self, request: RoleRequest, timeout: float | None, *,
        instance: str | None = None, only: Collection[str] | None = None,
    ) -> tuple[Member, Any]:
        """Pick an instance and check a connection out of its sub-pool.

        Connection-level failures here happen before any statement was sent,
        so moving to another instance (or waiting for a refresh) is always safe.
        """
        picked: Member | None = None
        if instance is None and only is None and not self._closing and self._initialized:
            # The common case, kept lean: a healthy instance and a ready sub-pool.
            candidates = self._cached_candidates(request)
            if candidates:
                picked_id = self._strategy.pick(candidates).instance.id
                member = picked = self._membership.members[picked_id]
                if member.failures == 0 and member.ready:
                    started = time.monotonic()
                    try:
                        return member, await member.pool.acquire(timeout=timeout)
                    except (Exception, asyncio.CancelledError) as exc:
                        if isinstance(exc, asyncio.CancelledError) or not (
                                is_connection_error(exc)
                                or isinstance(exc, asyncpg.InterfaceError)):
                            raise
                        if self._exhausted(member, exc, timeout):
                            raise  # every connection is busy: the user's timeout, as in asyncpg
                        self._membership.note_failure(member, exc)  # then the careful path below
                        picked = None
                        if timeout is not None:  # what is left of the caller's timeout
                            timeout = max(0.001, timeout - (time.monotonic() - started))
        return await self._acquire_member_carefully(request, timeout, instance, only, picked)

    async def _acquire_member_carefully(
        self, request: RoleRequest, timeout: float | None,
        instance: str | None, only: Collection[str] | None, picked: Member | None = None,
    ) -> tuple[Member, Any]:
        """Try every eligible instance, half-open breakers one probe at a time, and
        wait for the topology to change when nothing can serve."""
        self._check_open()
        if instance is not None:
            only = (instance,)
            request = RoleRequest.ANY
        loop = asyncio.get_running_loop()
        budget = self._failover_timeout if timeout is None else timeout
        deadline = loop.time() + budget
        attempts: dict[str, str] = {}
        excluded: set[str] = set()
        while True:
            candidates = self._candidates(request, excluded, only)
            if not candidates:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self._no_instance(request, attempts)
                # Wait for the topology to change (a failover in progress), then retry
                # everything once more: breakers may have half-opened too.
                event = self._membership.request_refresh()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), min(remaining, 0.5))
                self._check_open()
                excluded.clear()
                continue
            if picked is not None and any(c.instance.id == picked.instance.id
                                          for c in candidates):
                member = picked  # the strategy already chose it: a half-open breaker's probe
            else:
                member = self._membership.members[self._strategy.pick(candidates).instance.id]
            picked = None
            probing = member.failures > 0  # half-open: this request is the probe
            if probing:
                if member.probing:
                    excluded.add(member.instance.id)
                    continue
                member.probing = True
            wait = None if timeout is None else max(deadline - loop.time(), 0.001)
            try:
                pool = member.pool if member.ready else await asyncio.wait_for(
                    member.ensure_ready(), wait)  # shielded inside: only our wait ends
                connection = await pool.acquire(timeout=wait)
            except (Exception, asyncio.CancelledError) as exc:
                member.probing = False
                if isinstance(exc, asyncio.CancelledError):
                    raise
                if self._closing:
                    raise PoolClosedError("pool is closing") from exc
                if self._exhausted(member, exc, timeout):
                    raise  # every connection is busy: the user's timeout, as in asyncpg
                if not is_connection_error(exc) and not isinstance(exc, asyncpg.InterfaceError):
                    raise
                self._membership.note_failure(member, exc)
                attempts[member.instance.label] = describe_error(exc)
                excluded.add(member.instance.id)
                continue
            member.probing = False
            if probing:
                logger.info("instance %s is back", member.instance.label)
            if member.failures:
                member.record_success()
                self._membership.health_changed()
            return member, connection

    def _exhausted(self, member: Member, exc: BaseException, timeout: float | None) -> bool:
        """A timeout because every connection of the sub-pool is checked out.

        asyncpg raises the same TimeoutError when its acquire times out while
        connecting; that is the instance failing, not the pool being busy.
        """
        return (isinstance(exc, TimeoutError) and timeout is not None and member.ready
                and member.in_use() >= self._pool_options["max_size"])

    async def _acquire_caught_up(self, request: RoleRequest, lsn: int) -> tuple[Member, Any]:
        """A connection to an instance that has replayed up to *lsn*.

        Replay positions only move forward, so a cached position that has
        reached *lsn* needs no round trip. Otherwise wait on one replica for up
        to ``causal_wait`` seconds, then use the primary.
        """
        if not self._cached_candidates(RoleRequest.REPLICA):
            # No replica can serve now: don't wait for one (nor ask for refreshes).
            return await self._acquire_member(RoleRequest.PRIMARY, None)
        caught_up = [i for i, position in self._membership.replay_lsn.items() if position >= lsn]
        if caught_up:
            with contextlib.suppress(NoAvailableInstanceError, TimeoutError):
                return await self._acquire_member(RoleRequest.REPLICA, 0.05, only=caught_up)
        if self._causal_wait > 0:
            try:
                member, connection = await self._acquire_member(RoleRequest.REPLICA, 0.05)
            except (NoAvailableInstanceError, TimeoutError):
                pass  # no replica free now: the primary always has the write
            else:
                try:
                    if await self._wait_replayed(member, connection, lsn):
                        return member, connection
                except (Exception, asyncio.CancelledError):
                    await self._membership.release_quietly(member, connection)
                    raise
                await self._membership.release_quietly(member, connection)
        return await self._acquire_member(RoleRequest.PRIMARY, None)

    async def _wait_replayed(self, member: Member, connection: Any, lsn: int) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._causal_wait
        while True:
            position = parse_lsn(await connection.fetchval(
                "SELECT pg_last_wal_replay_lsn()::text")) or 0
            self._membership.note_replayed(member.instance.id, position)
            if position >= lsn:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)

    def _no_instance(self, request: RoleRequest, attempts: dict[str, str]) -> Exception:
        topology = self._membership.topology
        if not attempts and topology is not None:
            for instance in topology.instances:
                member = self._membership.members.get(instance.id)
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
        ``"prefer-replica"``. Such connections always get asyncpg's full reset.
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
        raw = connection._con  # None once asyncpg released a lost connection itself
        broken = raw is None or raw.is_closed()
        if broken:  # it broke in the user's hands: the instance may be gone
            self._membership.request_refresh()
        scope = _causal_scope.get()
        try:
            if (scope is not None or self._read_your_writes) and member.instance.role.writable \
                    and not broken and not self._membership.symmetric:
                await self._record_write_position(connection, scope)
        finally:
            await member.pool.release(connection, timeout=timeout)

    async def _run(self, method: str, query: str, positional: tuple[Any, ...],
                   kwargs: dict[str, Any], role: str | None,
                   default: RoleRequest | None = None) -> Any:
        """Route one statement, run it, and retry it where that is provably safe."""
        symmetric = self._membership.symmetric
        decision = self._decisions.get(
            (query, role, default, _route_scope.get(), symmetric)
        ) or await self._decide(query, role, default)
        scope = _causal_scope.get()
        causal_lsn = 0
        if (scope is not None or self._read_your_writes) and not decision.is_write \
                and not symmetric and decision.instance is None \
                and decision.request is not RoleRequest.PRIMARY:
            causal_lsn = scope.lsn if scope is not None else (
                self._pool_lsn if self._read_your_writes else 0)
        attempt = 0
        failures: list[tuple[str, str]] = []
        while True:
            if causal_lsn:
                member, connection = await self._acquire_caught_up(decision.request, causal_lsn)
            else:
                member, connection = await self._acquire_member(
                    decision.request, None, instance=decision.instance)
            try:
                # The raw connection: we hold the proxy, so skip its per-call checks.
                result = await getattr(connection._con, method)(
                    decision.query, *positional, **kwargs)
                if (scope is not None or self._read_your_writes) and self._may_have_written(
                        decision, member):
                    await self._record_write_position(connection, scope)
            except (Exception, asyncio.CancelledError) as exc:
                raw = connection._con  # None once asyncpg released a lost connection itself
                if raw is not None:
                    if is_connection_error(exc) or rejected_before_sending(exc):
                        raw.terminate()  # never hand a broken connection to the next user
                    self._membership.deep_reset.add(raw)
                await self._membership.release_quietly(member, connection)
                self._membership.deep_reset.discard(raw)
                if isinstance(exc, asyncio.CancelledError) or self._closing:
                    raise
                if not self._safe_to_retry(member, exc, decision):
                    raise
                failures.append((member.instance.label, describe_error(exc)))
                if attempt >= self._max_retries:
                    tries = attempt + 1
                    raise NoAvailableInstanceError(
                        f"gave up on a {'write' if decision.is_write else 'read'} after "
                        f"{tries} attempt{'s' if tries > 1 else ''}", failures) from exc
                attempt += 1
                self._retries += 1
                await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt) * random.uniform(0.5, 1.5))
                continue
            member.served += 1
            raw = connection._con
            marks: set[Any] | None = None
            if decision.elide_reset and self._membership.elision_safe:
                marks = self._membership.skip_reset
            elif decision.leaves_session_state:
                marks = self._membership.deep_reset
            if marks is None:
                await member.pool.release(connection)
                return result
            marks.add(raw)
            try:
                await member.pool.release(connection)
            finally:
                # Released without a reset (expired, or closed): don't keep the mark.
                marks.discard(raw)
            return result

    def _may_have_written(self, decision: Decision, member: Member) -> bool:
        """A statement sent to the primary that the classifier cannot prove a read.

        Writes the classifier missed (a user routed them with ``role=``, a hint
        or the router) must still move the read-your-writes position.
        """
        if self._membership.symmetric or not member.instance.role.writable:
            return False
        return decision.is_write or decision.request is RoleRequest.PRIMARY \
            or decision.instance is not None

    def _safe_to_retry(self, member: Member, exc: BaseException, decision: Decision) -> bool:
        """Whether a failed statement may run again elsewhere, and note what it says.

        Reads are retried after connection-level failures. Writes are retried only
        when the server provably did not run them: the connection was closed before
        sending, the server refused it (57P03), or the instance is read-only (25006,
        a demoted primary).
        """
        sqlstate = getattr(exc, "sqlstate", None)
        if sqlstate == "25006" and member.instance.role.writable and not self._membership.symmetric:
            logger.warning("instance %s refused a write as read-only: it was demoted, or "
                           "is not promoted yet; refreshing the topology", member.instance.label)
            # Not a breaker failure: a primary still finishing its promotion is healthy,
            # and the demoted set keeps writes off it until the next refresh.
            member.last_error = describe_error(exc)
            self._membership.mark_demoted(member)
            return True
        rejected_locally = rejected_before_sending(exc)
        if not (is_connection_error(exc) or rejected_locally):
            return False
        self._membership.note_failure(member, exc)
        not_sent = rejected_locally or sqlstate == "57P03"
        return not decision.is_write or not_sent

    async def _decide(self, query: str, role: str | None,
                      default: RoleRequest | None) -> Decision:
        scoped = _route_scope.get()
        symmetric = self._membership.symmetric
        key = (query, role, default, scoped, symmetric)
        decision = self._decisions.get(key)
        if decision is not None:
            return decision
        explicit = default if role is None else parse_role(role, RoleRequest.PRIMARY)
        volatile: frozenset[str] = frozenset()
        if self._check_volatility and not symmetric:  # peers serve everything anyway
            volatile = await self._volatile_functions(query)
        decision = decide(query, explicit=explicit, scoped=scoped, policy=self._policy,
                          symmetric=symmetric, strip_comments=symmetric,
                          volatile_functions=volatile)
        # Pure in its inputs unless user hooks or the catalog take part: then no cache.
        if self._decisions_cacheable:
            if len(self._decisions) >= _DECISION_CACHE_SIZE:
                self._decisions.clear()
            self._decisions[key] = decision
        return decision

    async def _volatile_functions(self, query: str) -> frozenset[str]:
        """The user functions *query* calls that pg_proc says are VOLATILE (cached)."""
        names = classify(query).functions
        unknown = [n for n in names if n not in self._volatility]
        if unknown:
            try:
                conn = await self._membership.service.service_connection()
                rows = await conn.fetch(
                    "SELECT lower(p.proname), bool_or(p.provolatile = 'v') FROM pg_proc p "
                    "JOIN pg_namespace n ON n.oid = p.pronamespace "
                    "WHERE lower(p.proname) = ANY($1::text[]) "
                    "AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
                    "GROUP BY lower(p.proname)", unknown)
            except Exception as exc:
                logger.warning("cannot check function volatility: %s", describe_error(exc))
                return frozenset(names)  # when in doubt, the primary
            found = {r[0]: bool(r[1]) for r in rows}
            for name in unknown:
                self._volatility[name] = found.get(name, False)
        return frozenset(n for n in names if self._volatility.get(n))

    async def _record_write_position(self, connection: Any, scope: CausalScope | None) -> None:
        """Remember the primary's WAL position after a write, for read-your-writes."""
        try:
            lsn = parse_lsn(await connection.fetchval(
                "SELECT pg_current_wal_insert_lsn()::text")) or 0
        except (Exception, asyncio.CancelledError) as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            logger.debug("cannot read the WAL position: %s", describe_error(exc))
            return
        if scope is not None:
            scope.lsn = max(scope.lsn, lsn)
        self._pool_lsn = max(self._pool_lsn, lsn)

    async def execute(self, query: str, *args: Any, timeout: float | None = None,
                      role: str | None = None) -> str:
        result: str = await self._run("execute", query, args, {"timeout": timeout}, role)
        return result

    async def executemany(self, command: str, args: Iterable[Sequence[Any]], *,
                          timeout: float | None = None, role: str | None = None) -> None:
        await self._run("executemany", command, (args,), {"timeout": timeout}, role)

    async def fetch(self, query: str, *args: Any, timeout: float | None = None,
                    record_class: Any = None, role: str | None = None) -> list[Any]:
        result: list[Any] = await self._run(
            "fetch", query, args, {"timeout": timeout, "record_class": record_class}, role)
        return result

    async def fetchval(self, query: str, *args: Any, column: int = 0,
                       timeout: float | None = None, role: str | None = None) -> Any:
        return await self._run(
            "fetchval", query, args, {"column": column, "timeout": timeout}, role)

    async def fetchrow(self, query: str, *args: Any, timeout: float | None = None,
                       record_class: Any = None, role: str | None = None) -> Any:
        return await self._run(
            "fetchrow", query, args, {"timeout": timeout, "record_class": record_class}, role)

    async def fetchmany(self, query: str, args: Iterable[Sequence[Any]], *,
                        timeout: float | None = None, record_class: Any = None,
                        role: str | None = None) -> list[Any]:
        result: list[Any] = await self._run(
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
        decision = await self._decide(query, role, None)
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
        scoped = _route_scope.get()
        if role is not None:
            return parse_role(role, RoleRequest.PRIMARY)
        if scoped is not None:
            return scoped
        return read_request(self._policy, self._membership.symmetric)

    def _causal_lsn(self, request: RoleRequest) -> int:
        """The WAL position a read must see, in this task's scope or pool-wide."""
        if request is RoleRequest.PRIMARY or self._membership.symmetric:
            return 0
        scope = _causal_scope.get()
        if scope is not None:
            return scope.lsn
        return self._pool_lsn if self._read_your_writes else 0

    async def _acquire_routed(self, request: RoleRequest, timeout: float | None) -> Any:
        """Check out a connection for *request*, honouring read-your-writes."""
        lsn = self._causal_lsn(request)
        if lsn:
            member, connection = await self._acquire_caught_up(request, lsn)
        else:
            member, connection = await self._acquire_member(request, timeout)
        self._checked_out[connection] = member
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
        token = _route_scope.set(parse_role(role, RoleRequest.PRIMARY))
        try:
            yield
        finally:
            _route_scope.reset(token)

    @asynccontextmanager
    async def read_your_writes(self, token: str | None = None) -> AsyncIterator[CausalScope]:
        """Within this scope, reads see every write made in it (and *token*'s).

        Reads go to a replica whose replay position has reached the last write,
        waiting up to ``causal_wait`` seconds for one, else to the primary.
        ``scope.token()`` exports the position for the next request.
        """
        scope = CausalScope(parse_causal_token(token) if token else 0)
        outer = _causal_scope.get()
        if outer is not None:
            scope.lsn = max(scope.lsn, outer.lsn)
        reset = _causal_scope.set(scope)
        try:
            yield scope
        finally:
            _causal_scope.reset(reset)
            if outer is not None:
                outer.lsn = max(outer.lsn, scope.lsn)

    def causal_token(self) -> str:
        """The WAL position of the last write seen in this task's scope (or pool-wide)."""
        scope = _causal_scope.get()
        return format_causal_token(scope.lsn if scope is not None else self._pool_lsn)

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

    def stats(self) -> PoolStats:
        membership = self._membership
        topology = membership.topology
        instances = []
        for member in membership.members.values():
            i = member.instance
            instances.append(InstanceStats(
                id=i.id, name=i.name, address=str(i.address), role=i.role.value,
                size=member.size(), idle=member.idle(), in_use=member.in_use(),
                served=member.served, failures=member.failures,
                breaker=member.breaker_state, last_error=member.last_error,
            ))
        return PoolStats(
            topology_version=topology.version if topology else 0,
            provider=membership.provider.name if membership.provider else "undetected",
            refreshes=membership.refreshes,
            refresh_failures=membership.refresh_failures,
            last_refresh_error=membership.last_refresh_error,
            acquire_errors=membership.failures_noted,
            retries=self._retries,
            elision_safe=membership.elision_safe,
            instances=tuple(instances),
            draining=len(membership.tasks),
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
        return (f"<picopool.Pool {state} dsn={mask_dsn(membership.dsn)!r} provider={provider} "
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

    Routing: ``read_write_split`` is ``"replicas"``, ``"include_primary"`` or
    ``"off"``; ``fallback_to_primary`` sends reads to the primary when no replica
    can serve; ``write_functions`` names functions that write;
    ``check_function_volatility`` asks pg_proc about user functions; ``router``
    and ``rewrite`` are user hooks. Replicas behind ``max_replica_lag_bytes`` /
    ``max_replica_lag_seconds`` get no reads. ``read_your_writes=True`` makes
    every read see every earlier write through this pool, waiting up to
    ``causal_wait`` seconds for a replica. ``elide_reset`` skips asyncpg's reset
    query after pool-level statements that provably leave no session state.
    ``health_check_interval`` pings idle connections in the background (``None``: off).
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
    policy = RoutingPolicy(
        split=split, fallback_to_primary=fallback_to_primary,
        # calls are matched by their last name part, as the classifier reports them
        write_functions=frozenset(f.lower().rsplit(".", 1)[-1] for f in write_functions),
        router=router, rewrite=rewrite, elide_reset=elide_reset,
    )
    return Pool(
        dsn, strategy=strategy, discovery=discovery,
        topology_refresh_interval=topology_refresh_interval, service_dsn=service_dsn,
        failover_timeout=failover_timeout, drain_timeout=drain_timeout,
        connect_timeout=connect_timeout, policy=policy,
        check_function_volatility=check_function_volatility,
        max_replica_lag_bytes=max_replica_lag_bytes,
        max_replica_lag_seconds=max_replica_lag_seconds,
        read_your_writes=read_your_writes, causal_wait=causal_wait, max_retries=max_retries,
        health_check_interval=health_check_interval, pool_options=pool_options,
        connect_kwargs=connect_kwargs,
    )

