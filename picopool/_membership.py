"""The cluster's instances and their sub-pools, kept in step with discovery."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from ._dsn import asyncpg_dsn
from ._errors import NoAvailableInstanceError, PoolClosedError, TopologyError, describe_error
from ._events import (
    BreakerChanged,
    ConnectionClosed,
    ConnectionOpened,
    Events,
    RefreshFailed,
    TopologyChanged,
)
from ._member import Member, no_reset
from ._quietlog import QuietFloor, quiet_sub_pool
from ._service import ServiceConnections
from ._sql_probes import ELISION_SAFE_QUERY, REPLICA_LAG_QUERY
from ._topology import Address, Instance, Role, Topology, plan_reconcile
from ._wal import parse_lsn
from .discovery import DiscoveryProvider, detect_provider

logger = logging.getLogger("picopool")

# Refreshes asked for by errors and waiting requests come no closer together than
# this; while they keep finding nothing new, the gap doubles up to the maximum.
_MIN_REFRESH_GAP = 0.05
_MAX_DEMAND_GAP = 0.5
# The liveness watch: how often it looks, how long work may sit on an instance
# before it asks the instance whether it is alive, and how long it waits for an answer.
_WATCH_INTERVAL = 0.5
_STALL_AFTER = 0.5
_PROBE_TIMEOUT = 1.5
# A pool-level statement whose backend has been idle this long, while the client
# still waits for its reply, was lost on the way (a half-open connection).
_OVERDUE = 1.5
_OVERDUE_QUERY = (
    "SELECT pid FROM pg_stat_activity WHERE pid = ANY($1::int[]) "
    "AND state = 'idle' AND now() - state_change > make_interval(secs => $2)")


class Membership:
    """One :class:`Member` (an asyncpg sub-pool) per instance the discovery reports.

    A refresh asks the provider, reconciles the members with the pure
    :func:`plan_reconcile` (new instances join, vanished ones drain, a role
    change expires connections), then measures replica lag and whether reset
    elision is sound. Two background tasks, owned here and stopped by
    :meth:`aclose` / :meth:`terminate`, keep it fresh: the poller (every
    ``refresh_interval``, and whenever an error or a waiting request asks, spaced
    out while such refreshes find nothing new) and the liveness watch (an
    instance with work stuck on it is asked whether it is alive; no answer within
    the probe timeout takes it out of service and cuts the work stuck on it).

    The pool routes over :attr:`members` and :attr:`topology`; whenever who may
    serve changes, :attr:`health_epoch` moves so that its caches follow.
    """

    #: Where each instance's sub-pool connects (create_pool's address_map=), or None.
    address_map: Callable[[Address], tuple[str, int]] | None = None

    def __init__(
        self,
        *,
        dsn: str | None,
        connect_kwargs: dict[str, Any],
        pool_options: dict[str, Any],
        seeds: Sequence[Address],
        provider: DiscoveryProvider | None,
        service_dsn: str | None,
        refresh_interval: float | None,
        connect_timeout: float,
        health_check_interval: float | None,
        drain_timeout: float,
        check_elision: bool,
        user_reset: Callable[[Any], Any] | None,
        probe_timeout: float = _PROBE_TIMEOUT,
        max_lifetime: float | None = None,
        readiness_check: bool = False,
    ) -> None:
        self.dsn = dsn  # the user's, as given: mask it wherever it is shown
        self.events = Events()
        self.quiet = QuietFloor()  # one warning per unreachable instance, not tracebacks
        self._connect_kwargs = connect_kwargs
        self._pool_options = pool_options  # asyncpg.create_pool's, per instance
        self.seeds = tuple(seeds)
        self.provider = provider
        self.service = ServiceConnections(
            dsn=dsn, connect_kwargs=connect_kwargs, seeds=self.seeds, service_dsn=service_dsn,
            current=lambda: self.topology, connect_timeout=connect_timeout,
            connect=pool_options.get("connect"),
        )
        self._refresh_interval = refresh_interval
        self._probe_timeout = probe_timeout
        self._health_check_interval = health_check_interval
        self._connect_timeout = connect_timeout
        self._drain_timeout = drain_timeout
        self._check_elision = check_elision
        self._user_reset = user_reset
        self._provider_reset: Callable[[Any], Any] | None = None
        # Whether picopool runs asyncpg's reset itself on release (the executor
        # decides per checkout); not when the user's reset= or the provider's
        # replaces it: the sub-pools then call that one on every release.
        self.picopool_resets = user_reset is None

        self.topology: Topology | None = None
        self.symmetric = False  # every instance serves everything (Picodata)
        self.members: dict[str, Member] = {}
        self.health_epoch = 0
        # Replicas' lag (bytes, seconds) and highest replay position seen, by instance id.
        self.lag: dict[str, tuple[int | None, float | None]] = {}
        self.replay_lsn: dict[str, int] = {}
        # Instances that refused a write as read-only: no writes until the next refresh.
        self.demoted: set[str] = set()
        # Whether the database has nothing that could change session state behind a
        # statement's back (triggers, views, defaults, policies, suspicious functions).
        # Checked on every refresh; until then, and on any doubt, every release resets.
        self.elision_safe = False
        self.refreshes = 0
        self.refresh_failures = 0
        self.last_refresh_error: str | None = None
        self.failures_noted = 0
        self.tasks: set[asyncio.Task[Any]] = set()  # draining sub-pools, expiring connections
        # Members that left the topology while their sub-pools drain: the liveness
        # watch still cuts work stuck on them (a drain waits for it to come back).
        self.draining: set[Member] = set()
        self._background: list[asyncio.Task[None]] = []
        self._refresh_lock = asyncio.Lock()
        self._refreshed = asyncio.Event()  # set after each refresh attempt, then replaced
        self._wakeup = asyncio.Event()
        # Primaries that refused a write as read-only and that a refresh still named as
        # the primary: their 25006 is the user's (a frozen role), until this time.
        self._read_only_primary: dict[str, float] = {}
        self._liveness: dict[str, Any] = {}  # instance id -> the watch's own connection
        self.closing = False
        # max_lifetime: raw connection -> the (jittered) time to close it on release.
        self._max_lifetime = max_lifetime
        self.expires: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        # Raw connection -> when it was last released (the checkout check pings one
        # idle for longer than the health-check interval); dropped when it closes.
        self.last_used: dict[Any, float] = {}
        # Readiness: new and recovering instances get no traffic until confirmed.
        self.readiness_check = readiness_check

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Discover, open every sub-pool, then start the background tasks.

        Fails only if discovery finds nothing or no instance at all is reachable.
        """
        if self.provider is None:
            self.provider = await detect_provider(self.service)
        topology = await self.refresh()
        if not topology.instances:
            raise NoAvailableInstanceError(
                f"{self.provider.name} discovery found no usable instance "
                f"(seeds: {', '.join(map(str, self.seeds))})")
        await self._warm_up()
        if self.readiness_check:
            await asyncio.gather(*(self.confirm(m) for m in list(self.members.values())
                                   if not m.confirmed))
        if self.closing:  # closed or terminated while starting: start nothing
            raise PoolClosedError("the pool was closed while starting")
        self._background.append(asyncio.ensure_future(self._poll()))
        self._background.append(asyncio.ensure_future(self._watch()))
        if self.readiness_check:
            self._background.append(asyncio.ensure_future(self._confirm_loop()))

    async def _warm_up(self) -> None:
        members = list(self.members.values())
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
        if self.closing:  # closed or terminated while starting: not the cluster's fault
            raise PoolClosedError("the pool was closed while starting")
        if members and len(attempts) == len(members):
            raise NoAvailableInstanceError("no instance of the cluster is reachable", attempts)

    async def aclose(self) -> None:
        """Stop the background tasks, then drain and close every sub-pool."""
        self.closing = True
        tasks, self._background = self._background, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.service.aclose()
        self._close_liveness()
        members, self.members = list(self.members.values()), {}
        for member in members:
            self.drain(member)
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.provider is not None:
            await self.provider.aclose()

    def terminate(self) -> None:
        """Terminate every connection and task at once; never raises half-way."""
        self.closing = True
        for task in (*self._background, *self.tasks):
            task.cancel()
        for member in list(self.members.values()):
            member.terminate()
        self.members.clear()
        self._close_liveness()
        self.service.terminate()
        if self.provider is not None:
            self.provider.terminate()

    def _close_liveness(self) -> None:
        connections, self._liveness = list(self._liveness.values()), {}
        for connection in connections:
            connection.terminate()

    def drain(self, member: Member) -> None:
        """Close *member*'s sub-pool once its checked-out connections come back.

        An instance that stopped answering is terminated at once: its work was
        cut already, and a graceful close would wait for answers that never come.
        """
        if member.unresponsive:
            member.terminate()
            return

        async def drain() -> None:
            try:
                await member.close(self._drain_timeout)
            except Exception as exc:
                logger.warning("closing sub-pool of %s: %s", member.instance.label,
                               describe_error(exc))
            finally:
                self.draining.discard(member)

        self.draining.add(member)
        self.spawn(drain())

    def spawn(self, coro: Any) -> None:
        """Run *coro* as a task that :meth:`aclose` waits for and :meth:`terminate` cancels."""
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    # -- health ------------------------------------------------------------------------

    def health_changed(self) -> None:
        self.health_epoch += 1

    def note_failure(self, member: Member, exc: BaseException) -> None:
        """A connection-level failure of *member*: open its breaker and refresh soon."""
        self.failures_noted += 1
        error = describe_error(exc)
        member.record_failure(error)
        if self.readiness_check:
            member.confirmed = False  # recovering: no traffic until confirmed again
        self.health_changed()
        self.events.emit(BreakerChanged(member.instance.label, "open", error))
        logger.warning("instance %s failed: %s", member.instance.label, error)
        self.request_refresh()

    def note_success(self, member: Member) -> None:
        """*member* served again after failures: close its breaker."""
        member.record_success()
        self.health_changed()
        self.events.emit(BreakerChanged(member.instance.label, "closed", None))

    def mark_demoted(self, member: Member) -> None:
        """A former primary: stop writing to it at once and learn the new one."""
        self.demoted.add(member.instance.id)
        self.health_changed()
        if member.pool is not None:
            self.spawn(member.pool.expire_connections())
        self.request_refresh()

    async def still_primary(self, member: Member) -> bool:
        """After *member* refused a write as read-only while not in recovery: does
        the cluster still name it the primary? Then the refusal is the user's own (a
        role or database with ``default_transaction_read_only``), not a demotion.

        Asks discovery once, then trusts the answer for a while, so that a frozen
        primary costs one refresh, not one per statement. When discovery cannot
        answer, the refusal goes to the user too (never a guess that retries).
        """
        instance_id = member.instance.id
        if self._read_only_primary.get(instance_id, 0.0) > time.monotonic():
            return True
        try:
            async with asyncio.timeout(self._connect_timeout):
                topology = await self.refresh()
        except Exception as exc:
            logger.debug("cannot confirm a demotion: %s", describe_error(exc))
            return True
        primary = topology.primary
        if primary is None or primary.id != instance_id:
            return False
        ttl = self._refresh_interval if self._refresh_interval is not None else 5.0
        self._read_only_primary[instance_id] = time.monotonic() + max(1.0, ttl)
        return True

    def request_refresh(self) -> asyncio.Event:
        """Ask the poller for a refresh soon; the event is set when one finishes.

        Requests coalesce: all those made before a refresh starts are served by it,
        and the poller spaces such refreshes out while they find nothing new.
        """
        event = self._refreshed
        self._wakeup.set()
        return event

    async def wait_for_refresh(self, timeout: float) -> None:
        """Ask for a refresh and wait up to *timeout* for the next one to finish."""
        event = self.request_refresh()
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
        except TimeoutError:
            pass

    # -- refreshing --------------------------------------------------------------------

    async def refresh(self) -> Topology:
        """Ask the discovery provider now and reconcile the sub-pools."""
        async with self._refresh_lock:
            try:
                topology = await self._discover_and_reconcile()
                self.demoted.clear()
                if self._check_elision and not topology.symmetric:
                    self.elision_safe = await self._check_elision_safe()
                if topology.replicas and not topology.symmetric:
                    await self.measure_lag(topology)
                return topology
            finally:
                self.health_changed()  # membership, roles and lag may all have moved
                self._refreshed.set()
                self._refreshed = asyncio.Event()

    async def _discover_and_reconcile(self) -> Topology:
        provider = self.provider
        assert provider is not None
        self.refreshes += 1
        try:
            discovered = await provider.discover(self.service)
        except (Exception, asyncio.CancelledError) as exc:
            self.refresh_failures += 1
            self.last_refresh_error = describe_error(exc)
            self.events.emit(RefreshFailed(self.last_refresh_error))
            if isinstance(exc, asyncio.CancelledError | TopologyError):
                raise
            raise TopologyError(
                f"{provider.name} discovery failed: {describe_error(exc)}"
            ) from exc
        self.last_refresh_error = None
        plan = plan_reconcile({k: m.instance for k, m in self.members.items()},
                              discovered.instances)
        previous = self.topology
        for member_id in plan.remove:
            self.replay_lsn.pop(member_id, None)
            liveness = self._liveness.pop(member_id, None)
            if liveness is not None:
                liveness.terminate()
            member = self.members.pop(member_id)
            logger.info("instance %s left the topology; draining", member.instance.label)
            self.drain(member)
        for instance in plan.add:
            logger.info("instance %s joined as %s", instance.label, instance.role.value)
            self.members[instance.id] = Member(instance, self._make_sub_pool)
            if self.readiness_check:
                self.members[instance.id].confirmed = False
        for member_id in plan.expire:
            self.replay_lsn.pop(member_id, None)
            member = self.members[member_id]
            logger.info("instance %s changed role %s -> %s; expiring its connections",
                        member.instance.label, member.instance.role.value,
                        next(i.role.value for i in plan.keep if i.id == member_id))
            if self.readiness_check:
                member.confirmed = False  # its new role must be confirmed first
            if member.pool is not None:
                await member.pool.expire_connections()
        for instance in plan.keep:
            kept = self.members[instance.id]
            kept.instance, kept.label = instance, instance.label
            kept.role_name = instance.role.value
        instances = tuple(self.members[i.id].instance for i in (*plan.keep, *plan.add))
        unchanged = (
            previous is not None
            and previous.instances == instances
            and previous.symmetric == discovered.symmetric
            and previous.service_address == self.service.service_address()
        )
        self.symmetric = discovered.symmetric
        if not unchanged:
            self.topology = Topology(
                version=(previous.version + 1) if previous else 1,
                instances=instances,
                provider=provider.name,
                symmetric=discovered.symmetric,
                service_address=self.service.service_address(),
            )
            self.events.emit(TopologyChanged(self.topology.version, tuple(
                    (i.label, i.role.value) for i in instances)))
        self.service.forget_except({i.address for i in instances})
        # Published now, while the lag measurement may still be running: routing
        # must see the new membership at once, not after the whole refresh.
        self.health_changed()
        assert self.topology is not None
        return self.topology

    async def _check_elision_safe(self) -> bool:
        """Ask the catalog whether skipping the reset is sound in this database.

        The classifier sees only the statement's text. A trigger, a view, a column
        default, a policy or an event trigger could call set_config() or take an
        advisory lock behind it, so any sign of that turns reset elision off.
        """
        try:
            async with asyncio.timeout(self._connect_timeout), \
                    self.service.service_session() as conn:
                return bool(await conn.fetchval(ELISION_SAFE_QUERY))
        except Exception as exc:
            self.service.discard()
            logger.debug("cannot check whether reset elision is safe: %s", describe_error(exc))
            return False

    async def measure_lag(self, topology: Topology) -> None:
        """Each replica's lag behind the primary, in bytes and seconds.

        Uses the discovery probe connections, so it costs one small query per
        instance per refresh. Failures leave the lag unknown (reads allowed).
        """
        primary = topology.primary
        if primary is None:
            return

        async def ask(instance: Instance, query: str) -> Any:
            try:
                async with asyncio.timeout(self._connect_timeout), \
                        self.service.probe_session(instance.address) as conn:
                    return await conn.fetchrow(query)
            except Exception as exc:
                self.service.discard(instance.address)
                logger.debug("lag probe of %s failed: %s", instance.label, describe_error(exc))
                return None

        replicas = topology.replicas
        rows = await asyncio.gather(
            ask(primary, "SELECT pg_current_wal_lsn()::text"),
            *(ask(r, REPLICA_LAG_QUERY) for r in replicas),
        )
        head = parse_lsn(rows[0][0]) if rows[0] is not None else None
        lag: dict[str, tuple[int | None, float | None]] = {}
        for replica, row in zip(replicas, rows[1:], strict=True):
            if row is None:
                continue
            replayed = parse_lsn(row[0]) or 0
            self.note_replayed(replica.id, replayed)
            lag_bytes = max(0, head - replayed) if head is not None and row[0] else None
            lag[replica.id] = (lag_bytes, float(row[1]) if row[1] is not None else None)
        self.lag = lag

    def note_replayed(self, instance_id: str, lsn: int) -> None:
        """Replay positions only move forward: keep the highest one seen."""
        self.replay_lsn[instance_id] = max(lsn, self.replay_lsn.get(instance_id, 0))

    def _make_sub_pool(self, instance: Instance) -> Any:
        options = dict(self._pool_options)
        assert self.provider is not None
        provider_options = dict(self.provider.sub_pool_options())
        self._provider_reset = provider_options.pop("reset", None)
        options.update(provider_options)
        # asyncpg always rolls back and drops listeners first; then this callback.
        # Without one of the user's or the provider's, picopool runs asyncpg's
        # reset itself before releasing (see Executor.release).
        options["reset"] = self._user_reset or self._provider_reset or no_reset
        options["init"] = self._connection_opened(instance, options.get("init"))
        self.picopool_resets = self._user_reset is None and self._provider_reset is None
        pool = asyncpg.create_pool(asyncpg_dsn(self.dsn), **options,
                                   **self._instance_connect_kwargs(instance))
        quiet_sub_pool(pool, self.quiet, instance.label)
        return pool

    def _connection_opened(self, instance: Instance,
                           user_init: Callable[[Any], Any] | None) -> Callable[[Any], Any]:
        """The sub-pool's ``init=``: tell the listeners, then run the user's own."""
        label = instance.label
        events = self.events
        lifetime, expires = self._max_lifetime, self.expires
        quiet = self.quiet
        last_used = self.last_used

        def closed(connection: Any) -> None:
            last_used.pop(connection, None)
            events.emit(ConnectionClosed(label, lost=False))

        async def init(connection: Any) -> None:
            connection.add_termination_listener(closed)
            if lifetime is not None:  # psycopg_pool's jitter: up to 5% early
                expires[connection] = time.monotonic() + lifetime * random.uniform(0.95, 1.0)
            quiet.recovered(label)
            events.emit(ConnectionOpened(label))
            if user_init is not None:
                await user_init(connection)

        return init

    def _instance_connect_kwargs(self, instance: Instance) -> dict[str, Any]:
        """The user's connect kwargs, pointed at one instance."""
        kwargs = dict(self._connect_kwargs)
        address = instance.address
        host, port = (address.host, address.port) if self.address_map is None \
            else self.address_map(address)
        kwargs.update(host=host, port=port)
        kwargs.setdefault("target_session_attrs", "any")
        kwargs.setdefault("timeout", self._connect_timeout)
        return kwargs

    def set_connect_args(self, dsn: str | None, connect_kwargs: dict[str, Any]) -> None:
        """New connection arguments for every connection opened from now on."""
        self.dsn = dsn  # the user's, as given: mask it wherever it is shown
        self._connect_kwargs = connect_kwargs
        self.service.set_connect_args(dsn, connect_kwargs)
        for member in self.members.values():
            if member.pool is not None:
                member.pool.set_connect_args(
                    asyncpg_dsn(dsn), **self._instance_connect_kwargs(member.instance))

    # -- readiness ---------------------------------------------------------------------

    async def confirm(self, member: Member) -> bool:
        """Readiness: check a connection out of *member*'s sub-pool and confirm the
        instance's role on it (``pg_is_in_recovery()`` against the topology's role).
        Only then does it receive user traffic."""
        instance = member.instance
        try:
            async with asyncio.timeout(self._connect_timeout):
                pool = await member.ensure_ready()
                async with pool.acquire() as connection:
                    if self.symmetric or instance.role in (Role.PEER, Role.UNKNOWN):
                        await connection.fetchval("SELECT 1")
                        in_recovery = None
                    else:
                        in_recovery = bool(await connection.fetchval(
                            "SELECT pg_is_in_recovery()"))
        except Exception as exc:
            member.record_failure(describe_error(exc))
            logger.debug("instance %s not ready: %s", instance.label, describe_error(exc))
            return False
        if self.members.get(instance.id) is not member or member.instance.role is not \
                instance.role:
            return False  # left, or changed role meanwhile: confirm again
        expected = instance.role
        if in_recovery is not None and in_recovery != (expected is Role.REPLICA):
            member.last_error = (f"role not confirmed: discovery says {expected.value}, "
                                 f"pg_is_in_recovery() says {in_recovery}")
            logger.info("instance %s: %s", instance.label, member.last_error)
            self.request_refresh()
            return False
        member.confirmed = True
        if member.failures:
            self.note_success(member)
        else:
            self.health_changed()
        logger.info("instance %s is ready as %s", instance.label, expected.value)
        return True

    async def _confirm_loop(self) -> None:
        """Confirm unconfirmed members, each when its breaker allows another try."""
        while not self.closing:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            pending = [m for m in self.members.values()
                       if not m.confirmed and not m.unresponsive and m.open_until <= now]
            if pending:
                await asyncio.gather(*(self.confirm(m) for m in pending))

    # -- background tasks --------------------------------------------------------------

    async def _poll(self) -> None:
        """Refresh on every interval (if set) and whenever an error or a waiting
        request asks; asked-for refreshes are spaced out while they find nothing new."""
        failures = 0
        gap = _MIN_REFRESH_GAP
        while not self.closing:
            delay = self._refresh_interval
            if failures and delay is not None:
                delay = min(30.0, delay * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0)
            asked = False
            try:
                async with asyncio.timeout(delay):
                    await self._wakeup.wait()
                asked = True
            except TimeoutError:
                pass
            self._wakeup.clear()  # every request made so far is served by this refresh
            if self.closing:
                return
            before = self.topology
            try:
                await self.refresh()
                failures = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                failures += 1
                logger.warning("topology refresh failed (keeping the last good topology): %s",
                               describe_error(exc))
                # Back off even if errors keep asking for refreshes: discovery is down.
                await asyncio.sleep(min(5.0, 0.1 * 2 ** min(failures, 6)) * random.uniform(0.5, 1))
                continue
            if not asked or self.topology is not before:
                gap = _MIN_REFRESH_GAP  # something changed: the next request is answered soon
            else:
                gap = min(_MAX_DEMAND_GAP, gap * 2)
            await asyncio.sleep(gap)

    async def _watch(self) -> None:
        """The liveness watch: every ``_WATCH_INTERVAL``, ask each instance that has
        work stuck on it (a statement or a checkout waiting longer than
        ``_STALL_AFTER``), and each one out of service, whether it is alive; every
        ``health_check_interval``, ask every instance (a silent failure is found
        without user traffic). It pings on a connection of its own, never on the
        sub-pools' connections: no ``setup``, no reset, no idle timer touched."""
        interval = self._health_check_interval
        tick = _WATCH_INTERVAL if interval is None else min(_WATCH_INTERVAL, interval)
        last_round = time.monotonic()
        while not self.closing:
            await asyncio.sleep(tick)
            now = time.monotonic()
            everyone = interval is not None and now - last_round >= interval
            if everyone:
                last_round = now
            suspects = [
                m for m in self.members.values()
                if everyone or m.unresponsive or _stuck(m, now)
            ] + [m for m in self.draining if not m.unresponsive and _stuck(m, now)]
            if suspects:
                await asyncio.gather(*(self._check_alive(m) for m in suspects))

    async def _check_alive(self, member: Member) -> None:
        """Ping *member*'s instance on the watch's own connection; no answer within
        the probe timeout is an answer: take it out of service. A member that left
        the topology (draining) is pinged on a connection of the moment."""
        instance = member.instance
        kept: Any = None
        try:
            async with asyncio.timeout(self._probe_timeout):
                current = self.members.get(instance.id) is member
                connection = self._liveness.get(instance.id) if current else None
                if connection is None or connection.is_closed():
                    connection = await self.service._open(instance.address)
                    if self.closing:
                        connection.terminate()
                        return
                    if self.members.get(instance.id) is member:
                        self._liveness[instance.id] = connection
                    else:
                        kept = connection  # not the member's to keep: closed below
                await connection.fetchval("SELECT 1")
                overdue = self._overdue(member)
                if overdue:
                    await self._cut_lost(member, connection, overdue)
        except Exception as exc:
            stale = self._liveness.pop(instance.id, None) \
                if self.members.get(instance.id) is member else None
            if stale is not None:
                stale.terminate()
            if isinstance(exc, TimeoutError):
                exc = TimeoutError(f"no answer within {self._probe_timeout:g} s")
            if not member.unresponsive and (self.members.get(instance.id) is member
                                            or member in self.draining):
                self.mark_unresponsive(member, exc)
            return
        finally:
            if kept is not None:
                kept.terminate()
        if member.unresponsive:
            member.unresponsive = False
            logger.warning("instance %s answers again", instance.label)
            self.health_changed()
            self.events.emit(BreakerChanged(instance.label, "answers", None))

    @staticmethod
    def _overdue(member: Member) -> dict[int, Any]:
        """Statements waiting for a reply for longer than ``_OVERDUE``, by backend pid."""
        now = time.monotonic()
        overdue = {}
        for connection, started in list(member.running.items()):
            raw = connection._con
            if raw is not None and now - started > _OVERDUE:
                overdue[raw.get_server_pid()] = connection
        return overdue

    async def _cut_lost(self, member: Member, probe: Any, overdue: dict[int, Any]) -> None:
        """The instance answers, but some statements' backends have long been idle:
        their query or its reply was lost on a connection that no longer carries
        anything. Cut those connections (no answer is an answer): the executor then
        retries what provably cannot have written and raises the rest."""
        rows = await probe.fetch(_OVERDUE_QUERY, list(overdue), _OVERDUE)
        for row in rows:
            connection = overdue[row[0]]
            raw = connection._con
            if raw is not None and member.running.get(connection) is not None:
                logger.warning("a connection to %s stopped carrying anything (its backend "
                               "has been idle for over %g s while a statement waits): "
                               "cutting it", member.instance.label, _OVERDUE)
                raw.terminate()

    def mark_unresponsive(self, member: Member, exc: BaseException) -> None:
        """Take *member* out of service until the watch hears from it again, and cut
        the work stuck on it: statements in flight see their connection lost (the
        executor retries what provably cannot have written and raises the rest) and
        waiting checkouts move to another instance."""
        member.unresponsive = True
        self.events.emit(BreakerChanged(member.instance.label, "unresponsive",
                                            describe_error(exc)))
        logger.warning("instance %s does not answer (%s): no traffic until it does; "
                       "cutting %d connections in use and %d waiting checkouts",
                       member.instance.label, describe_error(exc),
                       len(member.inflight) + len(member.running), len(member.acquiring))
        self.note_failure(member, exc)
        for task in list(member.acquiring):
            member.interrupted.add(task)
            task.cancel()
        # Every connection goes, idle ones too (each would hang its next user); the
        # sub-pool is started afresh once the instance answers and a request probes it.
        member.terminate()


def _stalled(since: Any, now: float) -> bool:
    return any(now - started > _STALL_AFTER for started in since)


def _stuck(member: Member, now: float) -> bool:
    """Work has waited on *member* for longer than ``_STALL_AFTER``."""
    return (_stalled(member.inflight.values(), now) or _stalled(member.running.values(), now)
            or _stalled(member.acquiring.values(), now))

