"""One statement's whole life: decide, acquire, run, classify the outcome, retry, release.

:class:`Executor` is the one place that decides a statement's fate. Follow a
pool-level statement through :meth:`Executor.run`:

1. **decide** where it goes (:func:`picopool._routing.decide`, cached);
2. **acquire** a connection from an instance that may serve it
   (:meth:`Executor.acquire`: the strategy picks among the candidates; failures
   here happen before anything was sent, so another instance is always safe);
3. **run** it on the raw asyncpg connection;
4. on failure, **classify** the outcome once (:mod:`picopool._outcome`), settle the
   connection (terminate a broken one) and the instance (breaker, refresh), and
   apply the **retry rule**;
5. **release** the connection with an explicit reset decision
   (:meth:`Executor.release`): skipped where provably unneeded, asyncpg's
   full reset otherwise.
"""

from __future__ import annotations

import asyncio
import contextvars
import enum
import logging
import random
import sys
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from typing import Any

from ._admission import RateLimit, RateLimiter, WaitQueue
from ._cache import StatementCache
from ._catalog import FunctionCatalog
from ._errors import NoAvailableInstanceError, PoolClosedError, describe_error
from ._events import AcquireFinished, Events, ResetDone, StatementFinished
from ._member import Member
from ._membership import Membership
from ._metrics import Metrics
from ._outcome import Outcome, Phase, classify_failure, confirm_read_only, may_retry
from ._routing import (
    Decision,
    ReadWriteSplit,
    RoleRequest,
    RoutingPolicy,
    decide,
    parse_role,
    select,
    spill,
)
from ._sql import classify
from ._sql_probes import DEALLOCATE_SQL_PREPARED
from ._topology import Instance, Role
from ._wal import CausalScope, parse_lsn
from .strategies import BalanceStrategy, Candidate

logger = logging.getLogger("picopool")

route_scope: contextvars.ContextVar[RoleRequest | None] = contextvars.ContextVar(
    "picopool_route", default=None)
causal_scope: contextvars.ContextVar[CausalScope | None] = contextvars.ContextVar(
    "picopool_causal", default=None)

_now = time.monotonic

if sys.version_info >= (3, 12):
    _current_task: Callable[[], asyncio.Task[Any]] = asyncio.current_task  # type: ignore[assignment]
else:  # asyncio.current_task is pure Python before 3.12: this is what it does
    from asyncio.tasks import _current_tasks  # type: ignore[attr-defined]

    def _current_task() -> asyncio.Task[Any]:
        """The running task (statements always run in one)."""
        task: asyncio.Task[Any] = _current_tasks.get(asyncio.get_running_loop())
        return task

_NOTHING_EXCLUDED: frozenset[str] = frozenset()
_NEVER = float("inf")
_BATCH_METHODS = frozenset({"executemany", "fetchmany"})


class Reset(enum.Enum):
    """What a connection needs before another user may have it."""

    NONE = "none"  # provably no session state left: skip the round trip
    FULL = "full"  # asyncpg's reset (rollback, unlock, close cursors, unlisten, RESET ALL)
    DEEP = "deep"  # the full reset, and drop SQL-level PREPAREd statements too


class Executor:
    """Runs statements over the membership's sub-pools; see the module docstring."""

    def __init__(
        self,
        membership: Membership,
        *,
        strategy: BalanceStrategy,
        policy: RoutingPolicy,
        catalog: FunctionCatalog,
        check_function_volatility: bool,
        failover_timeout: float,
        max_retries: int,
        max_size: int,
        max_lag_bytes: int | None,
        max_lag_seconds: float | None,
        read_your_writes: bool,
        causal_wait: float,
        elision_allowed: bool,
        check_idle_after: float | None,
        check_timeout: float,
        check_open: Callable[[], None],
        max_waiting: int | None = None,
        rate_limit: RateLimit | None = None,
        statement_timeout: float | None = None,
        max_lifetime: float | None = None,
    ) -> None:
        self._membership = membership
        self._events: Events = membership.events
        self._strategy = strategy
        self._policy = policy
        self._write_reserve = policy.write_reserve
        self._catalog = catalog
        self._check_volatility = check_function_volatility
        self._failover_timeout = failover_timeout
        self._max_retries = max_retries
        self._max_size = max_size
        self._max_lag_bytes = max_lag_bytes
        self._max_lag_seconds = max_lag_seconds
        self.read_your_writes = read_your_writes
        self._causal_wait = causal_wait
        # Skipping the reset is sound only if nothing of the user's runs on checkout
        # (setup=) or replaces the reset (reset=): either may carry session state.
        self._elision_allowed = elision_allowed and policy.elide_reset
        self._check_idle_after = check_idle_after
        self._check_timeout = check_timeout
        self._check_open = check_open
        # Bounded by entries and by the bytes of the statements it keeps.
        self.decisions: StatementCache[tuple[Any, ...], Decision] = StatementCache()
        self._decisions_cacheable = (policy.router is None and policy.rewrite is None
                                     and not check_function_volatility)
        # Candidates per request, valid while the membership's health epoch stands.
        self._candidate_cache: dict[RoleRequest, list[Candidate]] = {}
        self._cache_epoch = -1
        self._cache_valid_until = _NEVER
        self.pool_lsn = 0
        self.metrics: Metrics | None = None  # the pool's own, fed without events
        self.retries = 0
        self.outcomes: dict[Outcome, int] = {}
        # Admission control (picopool._admission); each is None when turned off.
        self.admission: WaitQueue | None = None
        if max_waiting is not None:
            self.admission = WaitQueue(max_waiting, self._free_member)
            self.admission.closing = lambda: self._membership.closing
        # read_write_split="prefer_replicas": a spilling read that finds every
        # connection it may use taken waits for whichever comes back first (a
        # replica's, or the primary's beyond its write reserve), not in one
        # replica's queue while the others free up. The same queue as max_waiting=
        # (which, when set, queues spilling reads with everything else).
        self.spill_queue: WaitQueue | None = None
        if policy.split is ReadWriteSplit.PREFER_REPLICAS and self.admission is None:
            self.spill_queue = WaitQueue(sys.maxsize, self._free_member)
            self.spill_queue.closing = lambda: self._membership.closing
        self.queues = tuple(q for q in (self.admission, self.spill_queue) if q is not None)
        self.rate_limiter = RateLimiter(rate_limit) if rate_limit is not None else None
        self._statement_timeout = statement_timeout
        self._run_hooks = statement_timeout is not None or rate_limit is not None
        self._max_lifetime = max_lifetime
        # A connection released with no reset goes straight back to its sub-pool
        # unless something else must happen on release.
        self._lean_release = max_lifetime is None and not self.queues
        self.lifetime_closed = 0  # connections closed on release for max_lifetime

    # -- deciding ------------------------------------------------------------------------

    async def decide(self, query: str, role: str | None,
                     default: RoleRequest | None) -> Decision:
        scoped = route_scope.get()
        symmetric = self._membership.symmetric
        key = (query, role, default, scoped, symmetric)
        decision = self.decisions.get(key)
        if decision is not None:
            return decision
        explicit = default if role is None else parse_role(role, RoleRequest.PRIMARY)
        volatile: frozenset[str] = frozenset()
        if self._check_volatility and not symmetric:  # peers serve everything anyway
            volatile = await self._catalog.volatile_user_functions(classify(query).functions)
        decision = decide(query, explicit=explicit, scoped=scoped, policy=self._policy,
                          symmetric=symmetric, strip_comments=symmetric,
                          volatile_functions=volatile)
        # Pure in its inputs unless user hooks or the catalog take part: then no cache.
        if self._decisions_cacheable:
            self.decisions.put(key, decision, len(query))
        return decision

    def provably_read_only(self, decision: Decision) -> bool:
        """The retry rule's test: a read that cannot have written, whatever happened."""
        return (not decision.is_write and not decision.user_routed_to_primary
                and self._catalog.statement_read_only(classify(decision.query)))

    async def _learn_functions(self, decision: Decision) -> None:
        """Before judging a read whose outcome is unknown, ask pg_proc about the
        user functions it calls (a STABLE or IMMUTABLE one cannot write)."""
        if not decision.is_write and not decision.user_routed_to_primary \
                and decision.functions:
            try:
                await self._catalog.learn(decision.functions)
            except Exception as exc:  # unknown stays unknown: not provably read-only
                logger.debug("cannot look up functions: %s", describe_error(exc))

    # -- choosing an instance --------------------------------------------------------------

    def candidates(self, request: RoleRequest, excluded: Collection[str],
                   only: Collection[str] | None) -> list[Candidate]:
        """The instances that may serve *request* now, with their load."""
        membership = self._membership
        topology = membership.topology
        if topology is None:
            return []
        members = membership.members
        now = _now()
        demoted = membership.demoted
        check_lag = request is not RoleRequest.PRIMARY and (
            self._max_lag_bytes is not None or self._max_lag_seconds is not None)
        usable: list[Instance] = []
        for instance in topology.instances:
            member = members.get(instance.id)
            if member is None or member.open_until > now or member.unresponsive \
                    or not member.confirmed \
                    or instance.id in excluded:
                continue
            if only is not None:  # named by a hint or the router: the user's call
                if instance.id not in only and instance.name not in only:
                    continue
            elif check_lag and instance.role is Role.REPLICA and self._lagging(instance):
                continue
            if demoted and instance.id in demoted and instance.role.writable:
                continue  # refused a write as read-only; wait for the refresh
            usable.append(instance)
        max_size = self._max_size
        return [
            Candidate(instance=i, in_use=members[i.id].in_use, idle=members[i.id].idle,
                      max_size=max_size, latency=members[i.id])
            for i in select(request, usable)
        ]

    def cached_candidates(self, request: RoleRequest) -> list[Candidate]:
        """``candidates(request)`` reused until topology or health changes.

        Every event that changes who may serve (a refresh, a failure, a demotion,
        a recovery) bumps the membership's ``health_epoch``; a breaker that
        half-opens with time is caught by ``_cache_valid_until``.
        """
        membership = self._membership
        if self._cache_epoch != membership.health_epoch or (
                self._cache_valid_until is not _NEVER
                and _now() >= self._cache_valid_until):
            self._candidate_cache.clear()
            self._cache_epoch = membership.health_epoch
            self._cache_valid_until = min(
                (m.open_until for m in membership.members.values() if m.open_until),
                default=_NEVER)
        candidates = self._candidate_cache.get(request)
        if candidates is None:
            candidates = self._candidate_cache[request] = self.candidates(
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

    # -- acquiring -------------------------------------------------------------------------

    async def acquire(
        self, request: RoleRequest, timeout: float | None, *,
        instance: str | None = None, only: Collection[str] | None = None,
    ) -> tuple[Member, Any]:
        """Check out a connection that the caller holds (``Pool.acquire``): as
        :meth:`checkout`, registered with the liveness watch while held."""
        member, connection = await self.checkout(request, timeout, instance=instance, only=only)
        member.inflight[connection] = _now()
        return member, connection

    async def checkout(
        self, request: RoleRequest, timeout: float | None,
        instance: str | None = None, only: Collection[str] | None = None,
    ) -> tuple[Member, Any]:
        """Pick an instance and check a connection out of its sub-pool.

        Nothing has been sent when this fails, so moving to another instance (or
        waiting for the topology to change) is always safe. The caller's
        *timeout* running out raises ``TimeoutError``, as asyncpg does.
        """
        if instance is None and only is None and not self._membership.closing:
            if self.admission is not None:
                return await self._acquire_admitted(self.admission, request, timeout)
            if request is RoleRequest.SPILL and self.spill_queue is not None:
                return await self._acquire_admitted(self.spill_queue, request, timeout)
            # The common case, kept lean: a healthy instance and a ready sub-pool.
            candidates = self.cached_candidates(request)
            if request is RoleRequest.SPILL:
                candidates = spill(candidates, None, self._write_reserve)
            if candidates:
                member = self._membership.members[self._strategy.pick(candidates).instance.id]
                if member.failures == 0 and member.ready:
                    started = _now()
                    connection = member.take(timeout)  # a free connection, without waiting
                    if connection is None:
                        acquiring = member.acquiring  # seen by the liveness watch
                        task = _current_task()
                        acquiring[task] = started
                        try:
                            connection = await member.pool.acquire(timeout=timeout)
                        except (Exception, asyncio.CancelledError) as exc:
                            acquiring.pop(task, None)
                            return await self._checkout_failed(member, request, exc,
                                                               started, timeout)
                        del acquiring[task]
                    if self._events.on:
                        self._acquired(member, request, started, True)
                    if self._check_idle_after is not None and self._idle_too_long(
                            connection, started):
                        return await self._checked_or_another(member, connection, request,
                                                              timeout)
                    return member, connection
                # The strategy chose it: the careful path starts there (a half-open
                # breaker's probe, or a sub-pool still to start).
                return await self._acquire_carefully(request, timeout, None, None, set(),
                                                     member)
        return await self._acquire_carefully(request, timeout, instance, only, set())

    async def _checkout_failed(self, member: Member, request: RoleRequest,
                               exc: BaseException, started: float,
                               timeout: float | None) -> tuple[Member, Any]:
        """A lean checkout (the fast path's, or a granted waiter's) failed: raise
        *exc* if it is the caller's to see, or go on with the careful path elsewhere,
        within what is left of *timeout*."""
        self._acquired(member, request, started, False)
        elapsed = _now() - started
        if timeout is not None:  # what is left of the caller's timeout
            timeout = max(0.001, timeout - elapsed)
        outcome = self._acquire_failed(member, exc, timeout, elapsed, None, {})
        if outcome is None:
            raise exc
        return await self._acquire_carefully(request, timeout, None, None, {member.instance.id})

    async def _checked_or_another(self, member: Member, connection: Any, request: RoleRequest,
                                  timeout: float | None) -> tuple[Member, Any]:
        """*connection* sat idle too long: ping it, or go on elsewhere if it is dead."""
        checked = await self._checked(member, connection)
        if checked is not None:
            return member, checked
        return await self._acquire_carefully(request, timeout, None, None, set())

    def _free_member(self, request: RoleRequest) -> Member | None:
        """A member that may serve *request* with a connection neither in use nor
        reserved for a waiter (the strategy picks among them), or None."""
        candidates = self.cached_candidates(request)
        members = self._membership.members

        def taken(candidate: Candidate) -> int:  # promised to a waiter counts too
            return candidate.in_use + members[candidate.instance.id].reserved

        if request is RoleRequest.SPILL:
            candidates = spill(candidates, taken, self._write_reserve)
        free = [c for c in candidates if taken(c) < c.max_size]
        if not free:
            return None
        return members.get(self._strategy.pick(free).instance.id)

    async def _acquire_admitted(self, admission: WaitQueue, request: RoleRequest,
                                timeout: float | None) -> tuple[Member, Any]:
        """Acquire under ``max_waiting``: wait in the role's FIFO queue for a
        reservation on a member with a free connection, then check out from it."""
        if not self.cached_candidates(request):  # nothing can serve: wait for topology
            return await self._acquire_carefully(request, timeout, None, None, set())
        started = _now()
        member = await admission.admit(request, timeout)
        if member is None:  # woken without a grant: the pool is closing
            self._check_open()
            return await self._acquire_carefully(request, timeout, None, None, set())
        if timeout is not None:
            timeout = max(0.001, timeout - (_now() - started))
        checked: Any = None
        try:
            if member.failures == 0 and member.ready:  # lean, as the fast path
                started = _now()
                connection = member.take(timeout)
                if connection is None:
                    task = _current_task()
                    member.acquiring[task] = started
                    try:
                        connection = await member.pool.acquire(timeout=timeout)
                    except (Exception, asyncio.CancelledError) as exc:
                        member.acquiring.pop(task, None)
                        return await self._checkout_failed(member, request, exc,
                                                           started, timeout)
                    member.acquiring.pop(task, None)
                if self._events.on:
                    self._acquired(member, request, started, True)
                checked = connection if self._check_idle_after is None or \
                    not self._idle_too_long(connection, started) \
                    else await self._checked(member, connection)
                if checked is not None:
                    return member, checked
            checked = await self._acquire_carefully(request, timeout, None, None, set(), member)
            return checked  # type: ignore[no-any-return]
        finally:
            member.reserved -= 1
            if checked is None:  # the reservation is free again: someone else's turn
                admission.dispatch()

    async def _acquire_carefully(
        self, request: RoleRequest, timeout: float | None,
        instance: str | None, only: Collection[str] | None, excluded: set[str],
        picked: Member | None = None,
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
        while True:
            candidates = self.candidates(request, excluded, only)
            if request is RoleRequest.SPILL:
                candidates = spill(candidates, None, self._write_reserve)
            if not candidates:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise self.no_instance(request, attempts)
                # Wait for the topology to change (a failover in progress), then try
                # everything once more: breakers may have half-opened too. Waiters
                # share refreshes: the poller spaces the ones they ask for.
                await self._membership.wait_for_refresh(min(remaining, 0.5))
                self._check_open()
                excluded.clear()
                continue
            if picked is not None and any(c.instance.id == picked.instance.id
                                          for c in candidates):
                member = picked
            else:
                member = self._membership.members[self._strategy.pick(candidates).instance.id]
            picked = None
            probing = member.failures > 0  # half-open: this request is the probe
            if probing:
                if member.probing:
                    excluded.add(member.instance.id)
                    continue
                member.probing = True
            wait = max(deadline - loop.time(), 0.001)
            task = _current_task()
            started = loop.time()
            started_at = member.acquiring[task] = _now()
            try:
                pool = member.pool if member.ready else await asyncio.wait_for(
                    member.ensure_ready(), wait)  # shielded inside: only our wait ends
                connection = await pool.acquire(timeout=max(deadline - loop.time(), 0.001))
            except (Exception, asyncio.CancelledError) as exc:
                member.acquiring.pop(task, None)
                member.probing = False
                self._acquired(member, request, started_at, False)
                outcome = self._acquire_failed(member, exc, timeout, loop.time() - started,
                                               wait, attempts)
                if outcome is None:
                    if isinstance(exc, TimeoutError) and not self._exhausted(member):
                        # The budget ran out while connecting: no instance could serve
                        # in time. (Every connection busy is the caller's timeout, as
                        # asyncpg raises it.)
                        attempts.setdefault(member.instance.label, "timed out")
                        raise self.no_instance(request, attempts) from exc
                    raise
                excluded.add(member.instance.id)
                continue
            member.acquiring.pop(task, None)
            member.probing = False
            if self._events.on:
                self._acquired(member, request, started_at, True)
            checked = connection if self._check_idle_after is None or \
                not self._idle_too_long(connection, started_at) \
                else await self._checked(member, connection)
            if checked is None:
                attempts[member.instance.label] = "a dead idle connection"
                excluded.add(member.instance.id)
                continue
            if probing:
                logger.info("instance %s is back", member.instance.label)
            if member.failures:
                self._membership.note_success(member)
            return member, checked

    def _acquire_failed(self, member: Member, exc: BaseException, timeout: float | None,
                        elapsed: float, wait: float | None,
                        attempts: dict[str, str]) -> Outcome | None:
        """Settle a failed checkout: the outcome to move on with, or None to raise *exc*."""
        task = _current_task()
        if isinstance(exc, asyncio.CancelledError):
            if task is None or task not in member.interrupted:
                return None  # the caller's cancellation
            member.interrupted.discard(task)
            if task.uncancel() > 0:
                return None  # ours and the caller's: the caller's wins
            outcome = Outcome.UNRESPONSIVE
        else:
            if self._membership.closing:
                raise PoolClosedError("pool is closing") from exc
            if isinstance(exc, PoolClosedError):
                # The sub-pool was drained while starting: not a fault of the instance.
                attempts[member.instance.label] = describe_error(exc)
                return Outcome.CONNECT_FAILED
            limit = timeout if wait is None else wait
            spent = limit is not None and elapsed >= limit - 0.002
            outcome = classify_failure(exc, Phase.ACQUIRE, budget_spent=spent)
            if outcome is Outcome.CALLER_TIMEOUT or outcome is Outcome.STATEMENT_ERROR:
                return None
        self._count(outcome)
        if outcome is not Outcome.UNRESPONSIVE:  # the watch has noted that one already
            self._membership.note_failure(member, exc)
        attempts[member.instance.label] = describe_error(exc)
        return outcome

    def _acquired(self, member: Member, request: RoleRequest, started: float,
                  ok: bool) -> None:
        """A checkout ended: a failed one is counted here; a successful one by the
        caller (the statement, or Pool.acquire), and told to listeners here."""
        waited = _now() - started
        if not ok and self.metrics is not None:
            self.metrics.acquired(member.label, member.role_name, waited, False)
        if self._events.on:
            self._events.notify(AcquireFinished(
                instance=member.label, role=member.role_name, request=request.value,
                waited=waited, ok=ok))

    def _finished(self, member: Member, decision: Decision, method: str,
                  args: tuple[Any, ...], outcome: str, sent: float, attempt: int) -> None:
        self._events.notify(StatementFinished(
            instance=member.label, role=member.role_name,
            request=decision.request.value,
            reason=decision.reason, method=method, query=decision.query, args=args,
            outcome=outcome, duration=_now() - sent, attempt=attempt))

    def _exhausted(self, member: Member) -> bool:
        """Every connection of *member*'s sub-pool is checked out."""
        return member.ready and member.in_use() >= self._max_size

    def _idle_too_long(self, connection: Any, now: float) -> bool:
        """Whether *connection* sat idle past the health-check interval (checked
        on checkout: a connection that died idle is found before it is used)."""
        last = self._membership.last_used.get(connection._con)
        return last is not None and now - last >= self._check_idle_after  # type: ignore[operator]

    async def _checked(self, member: Member, connection: Any) -> Any:
        """*connection*, pinged first; None (and the connection terminated and
        returned) if it is dead."""
        raw = connection._con
        try:
            await raw.fetchval("SELECT 1", timeout=self._check_timeout)
        except (Exception, asyncio.CancelledError) as exc:
            raw.terminate()  # it could hang its release
            await self.release(member, connection, Reset.NONE, quiet=True)
            if isinstance(exc, asyncio.CancelledError):
                raise
            self._count(Outcome.LOST_IDLE)
            self._membership.note_failure(member, exc)
            return None
        return connection

    def no_instance(self, request: RoleRequest, attempts: dict[str, str]) -> Exception:
        membership = self._membership
        topology = membership.topology
        if not attempts and topology is not None:
            for instance in topology.instances:
                member = membership.members.get(instance.id)
                if member is not None and member.last_error:
                    attempts[instance.label] = f"{member.breaker_state}: {member.last_error}"
        known = "none" if topology is None or not topology.instances else ", ".join(
            f"{i.label} {i.role.value}" for i in topology.instances)
        return NoAvailableInstanceError(
            f"no available instance can serve {request.value} requests "
            f"(topology v{topology.version if topology else 0}: {known})",
            attempts.items(),
        )

    # -- read-your-writes ------------------------------------------------------------------

    def causal_lsn(self, request: RoleRequest) -> int:
        """The WAL position a read must see, in this task's scope or pool-wide."""
        if request is RoleRequest.PRIMARY or self._membership.symmetric:
            return 0
        scope = causal_scope.get()
        if scope is not None:
            return scope.lsn
        return self.pool_lsn if self.read_your_writes else 0

    async def acquire_routed(self, request: RoleRequest,
                             timeout: float | None) -> tuple[Member, Any]:
        """Check out a connection for the caller to hold, honouring read-your-writes."""
        lsn = self.causal_lsn(request)
        if not lsn:
            return await self.acquire(request, timeout)
        member, connection = await self.acquire_caught_up(request, lsn)
        member.inflight[connection] = _now()
        return member, connection

    async def acquire_caught_up(self, request: RoleRequest, lsn: int) -> tuple[Member, Any]:
        """A connection to an instance that has replayed up to *lsn*.

        Replay positions only move forward, so a cached position that has
        reached *lsn* needs no round trip. Otherwise wait on one replica for up
        to ``causal_wait`` seconds, then use the primary. The short waits for a
        replica's connection are picopool's own budget: running out of them says
        nothing about the replica's health.
        """
        if not self.cached_candidates(RoleRequest.REPLICA):
            # No replica can serve now: don't wait for one (nor ask for refreshes).
            return await self.checkout(RoleRequest.PRIMARY, None)
        caught_up = [i for i, position in self._membership.replay_lsn.items()
                     if position >= lsn]
        if caught_up:
            try:
                return await self.checkout(RoleRequest.REPLICA, 0.05, only=caught_up)
            except (NoAvailableInstanceError, TimeoutError):
                pass
        if self._causal_wait > 0:
            try:
                member, connection = await self.checkout(RoleRequest.REPLICA, 0.05)
            except (NoAvailableInstanceError, TimeoutError):
                pass  # no replica free now: the primary always has the write
            else:
                try:
                    caught = await self._wait_replayed(member, connection, lsn)
                except (Exception, asyncio.CancelledError):
                    await self.release(member, connection, Reset.FULL, quiet=True)
                    raise
                if caught:
                    return member, connection
                await self.release(member, connection, Reset.NONE, quiet=True)
        return await self.checkout(RoleRequest.PRIMARY, None)

    async def _wait_replayed(self, member: Member, connection: Any, lsn: int) -> bool:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._causal_wait
        while True:
            position = parse_lsn(await connection._con.fetchval(
                "SELECT pg_last_wal_replay_lsn()::text")) or 0
            self._membership.note_replayed(member.instance.id, position)
            if position >= lsn:
                return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)

    async def record_write_position(self, connection: Any,
                                    scope: CausalScope | None) -> None:
        """Remember the primary's WAL position after a write, for read-your-writes."""
        try:
            lsn = parse_lsn(await connection.fetchval(
                "SELECT pg_current_wal_insert_lsn()::text")) or 0
        except Exception as exc:
            logger.debug("cannot read the WAL position: %s", describe_error(exc))
            return
        if scope is not None:
            scope.lsn = max(scope.lsn, lsn)
        self.pool_lsn = max(self.pool_lsn, lsn)

    def _may_have_written(self, decision: Decision, member: Member) -> bool:
        """A statement sent to the primary that the classifier cannot prove a read.

        Writes the classifier missed (a user routed them with ``role=``, a hint
        or the router) must still move the read-your-writes position.
        """
        if self._membership.symmetric or not member.instance.role.writable:
            return False
        return decision.is_write or decision.request is RoleRequest.PRIMARY \
            or decision.instance is not None

    # -- running ---------------------------------------------------------------------------

    async def run(self, method: str, query: str, positional: tuple[Any, ...],
                  kwargs: dict[str, Any], role: str | None,
                  default: RoleRequest | None = None) -> Any:
        """Route one statement, run it, and retry it where the retry rule allows."""
        symmetric = self._membership.symmetric
        decision = self.decisions.get(
            (query, role, default, route_scope.get(), symmetric)
        ) or await self.decide(query, role, default)
        if self._run_hooks:  # statement_timeout= or rate_limit=: one test when off
            if self._statement_timeout is not None and kwargs.get("timeout") is None:
                kwargs["timeout"] = self._statement_timeout
            if self.rate_limiter is not None:
                await self.rate_limiter.acquire(kwargs.get("timeout"))
        if method in _BATCH_METHODS:
            positional = (_replayable(positional[0]), *positional[1:])
        scope = causal_scope.get()
        tracks_writes = scope is not None or self.read_your_writes
        causal_lsn = 0
        if tracks_writes and not decision.is_write and not symmetric \
                and decision.instance is None and decision.request is not RoleRequest.PRIMARY:
            causal_lsn = scope.lsn if scope is not None else self.pool_lsn
        attempt = 0
        failures: list[tuple[str, str]] = []
        while True:
            asked = _now()
            if causal_lsn:
                member, connection = await self.acquire_caught_up(decision.request, causal_lsn)
            else:
                member, connection = await self.checkout(decision.request, None,
                                                         decision.instance)
            running = member.running
            running[connection] = sent = _now()
            try:
                # The raw connection: we hold the proxy, so skip its per-call checks.
                result = await getattr(connection._con, method)(
                    decision.query, *positional, **kwargs)
                now = _now()
                rtt = member.rtt  # the round-trip moving average (alpha 0.2)
                member.rtt = now - sent if rtt == 0.0 else rtt + 0.2 * (now - sent - rtt)
                member.rtt_at = now
                if tracks_writes and self._may_have_written(decision, member):
                    await self.record_write_position(connection._con, scope)
                del running[connection]
            except (Exception, asyncio.CancelledError) as exc:
                running.pop(connection, None)
                failure = "caller-timeout" if isinstance(exc, asyncio.CancelledError) \
                    else classify_failure(exc, Phase.RUN).value
                if self.metrics is not None:
                    now = _now()
                    self.metrics.statement(member.label, member.role_name, failure,
                                           now - sent, attempt, now)
                if self._events.on:
                    self._finished(member, decision, method, positional, failure, sent, attempt)
                outcome = await self._failed(member, connection, exc)
                if outcome.may_have_run and outcome.retryable:
                    await self._learn_functions(decision)
                if not may_retry(outcome, provably_read_only=self.provably_read_only(decision)):
                    raise
                failures.append((member.instance.label, describe_error(exc)))
                if attempt >= self._max_retries:
                    tries = attempt + 1
                    raise NoAvailableInstanceError(
                        f"gave up on a {'write' if decision.is_write else 'read'} after "
                        f"{tries} attempt{'s' if tries > 1 else ''}", failures) from exc
                attempt += 1
                self.retries += 1
                await asyncio.sleep(min(1.0, 0.05 * 2 ** attempt) * random.uniform(0.5, 1.5))
                continue
            member.served += 1
            events_on = self._events.on
            if events_on:
                self._finished(member, decision, method, positional, "ok", sent, attempt)
            elide = decision.elide_reset and self._elision_allowed \
                and self._membership.elision_safe
            metrics = self.metrics
            if metrics is not None:
                elided = elide or not self._membership.picopool_resets
                if attempt:
                    metrics.statement(member.label, member.role_name, "ok", now - sent,
                                      attempt, now)
                    metrics.acquired(member.label, member.role_name, sent - asked, True)
                    metrics.reset(member.label, elided)
                else:
                    metrics.served(member.label, member.role_name, now - sent, now,
                                   sent - asked, elided)
            if elide and self._lean_release and not events_on:
                # Nothing to run on it, nothing to tell: straight back to its sub-pool.
                if self._check_idle_after is not None:
                    self._membership.last_used[connection._con] = now
                try:
                    await member.release(connection)
                except Exception as exc:  # the statement's result stands
                    logger.debug("release: %s", describe_error(exc))
                return result
            await self.release(member, connection,
                               Reset.NONE if elide else Reset.DEEP
                               if decision.leaves_session_state else Reset.FULL, quiet=True)
            return result

    async def _failed(self, member: Member, connection: Any, exc: BaseException) -> Outcome:
        """Classify a failed run, settle its connection and instance; the outcome.

        A cancellation is re-raised once the connection is back in its sub-pool.
        """
        raw = connection._con  # None once asyncpg released a lost connection itself
        if isinstance(exc, asyncio.CancelledError):
            outcome = Outcome.CALLER_TIMEOUT
        else:
            outcome = classify_failure(exc, Phase.RUN)
            if outcome is Outcome.READ_ONLY and member.instance.role.writable \
                    and not self._membership.symmetric:
                in_recovery = await self._in_recovery(raw)
                outcome = confirm_read_only(
                    in_recovery=in_recovery,
                    still_primary=in_recovery or await self._membership.still_primary(member))
            elif outcome is Outcome.LOST_IN_FLIGHT and member.unresponsive:
                outcome = Outcome.UNRESPONSIVE
        self._count(outcome)
        if raw is not None and outcome.instance_at_fault:
            raw.terminate()  # never hand a broken connection to the next user
        await self.release(member, connection, Reset.DEEP, quiet=True)
        if outcome is Outcome.DEMOTED:
            logger.warning("instance %s refused a write as read-only and is in recovery: "
                           "demoted, or not promoted yet; refreshing the topology",
                           member.instance.label)
            member.last_error = describe_error(exc)
            self._membership.mark_demoted(member)
        elif outcome.instance_at_fault and outcome is not Outcome.UNRESPONSIVE:
            self._membership.note_failure(member, exc)
        elif outcome.refresh:
            self._membership.request_refresh()
        if isinstance(exc, asyncio.CancelledError):
            raise exc
        return outcome

    async def _in_recovery(self, raw: Any) -> bool | None:
        """Ask the instance that refused a write whether it is in recovery."""
        if raw is None or raw.is_closed():
            return None
        try:
            return bool(await raw.fetchval("SELECT pg_is_in_recovery()",
                                           timeout=self._check_timeout))
        except Exception as exc:
            logger.debug("cannot confirm a demotion: %s", describe_error(exc))
            self._membership.request_refresh()
            return None

    def _count(self, outcome: Outcome) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    # -- releasing -------------------------------------------------------------------------

    async def release_shielded(self, member: Member, connection: Any, reset: Reset, *,
                               timeout: float | None = None) -> None:
        """:meth:`release` in a task of its own, as asyncpg releases: a cancelled
        caller does not stop it, and work the caller's task scheduled before (an
        abandoned async generator closing its transaction) runs first."""
        task = asyncio.ensure_future(self.release(member, connection, reset, timeout=timeout))
        task.add_done_callback(_retrieve)
        await asyncio.shield(task)

    async def release(self, member: Member, connection: Any, reset: Reset, *,
                      timeout: float | None = None, quiet: bool = False) -> None:
        """Reset *connection* as *reset* says, then return it to its sub-pool.

        picopool runs asyncpg's reset itself, so that the decision travels with
        the checkout; the sub-pool's own reset callback is the user's ``reset=``
        (never skipped) or the provider's. A reset that fails terminates the
        connection. *quiet*: a failure is logged, not raised (the statement's
        result stands); a cancellation is always raised.
        """
        member.inflight.pop(connection, None)
        member.running.pop(connection, None)
        raw = connection._con
        if raw is None:
            self._dispatch()
            return  # asyncpg has released it already (it was terminated)
        if self._max_lifetime is not None and self._expired(raw):
            await self._close_expired(member, connection, raw, timeout)
            return
        if self._events.on:
            self._events.notify(ResetDone(
                instance=member.label,
                elided=reset is Reset.NONE or not self._membership.picopool_resets))
        if self._check_idle_after is not None:
            self._membership.last_used[raw] = _now()
        if reset is not Reset.NONE and self._membership.picopool_resets \
                and not raw.is_closed():
            try:
                # As asyncpg's release does first: resources of the user's (a
                # transaction an abandoned async generator still holds) see the
                # connection as released, and leave it alone.
                raw._on_release()
                await _reset(raw, reset, timeout)
            except (Exception, asyncio.CancelledError) as exc:
                raw.terminate()
                await _release_closed(member, connection)
                self._dispatch()
                if quiet and not isinstance(exc, asyncio.CancelledError):
                    logger.debug("reset failed: %s", describe_error(exc))
                    return
                raise
        try:
            await member.release(connection, timeout)
        except (Exception, asyncio.CancelledError) as exc:
            if not quiet or isinstance(exc, asyncio.CancelledError):
                raise
            logger.debug("release: %s", describe_error(exc))
        finally:
            self._dispatch()

    def _dispatch(self) -> None:
        """A connection came back: the waiter queues may grant it."""
        for queue in self.queues:
            queue.dispatch()

    def wake_waiters(self) -> None:
        """The pool is closing: every queued caller looks again (and gives up)."""
        for queue in self.queues:
            queue.wake_all()

    def _expired(self, raw: Any) -> bool:
        """Whether *raw* has outlived ``max_lifetime`` (its jittered deadline)."""
        deadline = self._membership.expires.get(raw)
        return deadline is not None and _now() >= deadline

    async def _close_expired(self, member: Member, connection: Any, raw: Any,
                             timeout: float | None) -> None:
        """Close a connection past ``max_lifetime`` instead of resetting it; its
        sub-pool opens a fresh one when next needed. Never mid-use: on release."""
        self.lifetime_closed += 1
        try:
            await raw.close(timeout=timeout if timeout is not None else self._check_timeout)
        except (Exception, asyncio.CancelledError) as exc:
            raw.terminate()
            if isinstance(exc, asyncio.CancelledError):
                await _release_closed(member, connection)
                raise
        try:
            await _release_closed(member, connection)
        finally:
            self._dispatch()


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A shielded release whose caller was cancelled: its error is only logged."""
    if not task.cancelled() and task.exception() is not None:
        logger.debug("release: %s", describe_error(task.exception()))  # type: ignore[arg-type]


async def _reset(raw: Any, reset: Reset, timeout: float | None) -> None:
    """asyncpg's own reset (it waits for a cancelled query to finish first)."""
    protocol = raw._protocol
    if protocol._is_cancelling():  # asyncpg < 0.32 does not wait by itself
        try:
            await protocol._wait_for_cancellation(timeout)
        except TypeError:
            await protocol._wait_for_cancellation()
        if raw.is_closed():  # the cancellation ended it: nothing to reset (as asyncpg)
            return
    await raw.reset(timeout=timeout)
    if reset is Reset.DEEP:
        await raw.execute(DEALLOCATE_SQL_PREPARED, timeout=timeout)


async def _release_closed(member: Member, connection: Any) -> None:
    """Give a terminated connection's holder back (asyncpg usually already has)."""
    try:
        await member.release(connection)
    except Exception as exc:
        logger.debug("release after a failed reset: %s", describe_error(exc))


def _replayable(rows: Iterable[Sequence[Any]]) -> Iterable[Sequence[Any]]:
    """A batch's arguments that a retry can send again: a one-shot iterator
    (a generator) is read into a list first, or a retry would send nothing."""
    if isinstance(rows, Sequence):
        return rows
    return list(rows)
