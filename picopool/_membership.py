"""The cluster's instances and their sub-pools, kept in step with discovery."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from ._dsn import asyncpg_dsn
from ._errors import NoAvailableInstanceError, TopologyError, describe_error
from ._member import Member, is_connection_error
from ._service import ServiceConnections
from ._sql_probes import DEALLOCATE_SQL_PREPARED, ELISION_SAFE_QUERY, REPLICA_LAG_QUERY
from ._topology import Address, Instance, Topology, plan_reconcile
from ._wal import parse_lsn
from .discovery import DiscoveryProvider, detect_provider

logger = logging.getLogger("picopool")

# Error-triggered refreshes come no closer together than this.
_MIN_REFRESH_GAP = 0.05


class Membership:
    """One :class:`Member` (an asyncpg sub-pool) per instance the discovery reports.

    A refresh asks the provider, reconciles the members with the pure
    :func:`plan_reconcile` (new instances join, vanished ones drain, a role
    change expires connections), then measures replica lag and whether reset
    elision is sound. Two background tasks, owned here and stopped by
    :meth:`aclose` / :meth:`terminate`, keep it fresh: the poller (every
    ``refresh_interval`` and whenever an error asks) and the idle health checker.

    The pool routes over :attr:`members` and :attr:`topology`; whenever who may
    serve changes, :attr:`health_epoch` moves so that its caches follow.
    """

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
        health_check_interval: float | None,
        connect_timeout: float,
        drain_timeout: float,
        check_elision: bool,
        user_reset: Callable[[Any], Any] | None,
    ) -> None:
        self.dsn = dsn  # the user's, as given: mask it wherever it is shown
        self._connect_kwargs = connect_kwargs
        self._pool_options = pool_options  # asyncpg.create_pool's, per instance
        self.seeds = tuple(seeds)
        self.provider = provider
        self.service = ServiceConnections(
            dsn=dsn, connect_kwargs=connect_kwargs, seeds=self.seeds, service_dsn=service_dsn,
            current=lambda: self.topology, connect_timeout=connect_timeout,
        )
        self._refresh_interval = refresh_interval
        self._health_check_interval = health_check_interval
        self._connect_timeout = connect_timeout
        self._drain_timeout = drain_timeout
        self._check_elision = check_elision
        self._user_reset = user_reset
        self._provider_reset: Callable[[Any], Any] | None = None
        # Raw connections whose last statement provably left no session state:
        # their release skips asyncpg's reset round trip.
        self.skip_reset: set[Any] = set()
        # Raw connections whose reset must also drop SQL-level prepared statements.
        self.deep_reset: set[Any] = set()

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
        self._background: list[asyncio.Task[None]] = []
        self._refresh_lock = asyncio.Lock()
        self._refreshed = asyncio.Event()  # set after each refresh attempt, then replaced
        self._wakeup = asyncio.Event()
        self._closing = False

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
        self._background.append(asyncio.ensure_future(self._poll()))
        if self._health_check_interval is not None:
            self._background.append(asyncio.ensure_future(self._check_health()))

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
        if members and len(attempts) == len(members):
            raise NoAvailableInstanceError("no instance of the cluster is reachable", attempts)

    async def aclose(self) -> None:
        """Stop the background tasks, then drain and close every sub-pool."""
        self._closing = True
        tasks, self._background = self._background, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.service.aclose()
        members, self.members = list(self.members.values()), {}
        for member in members:
            self.drain(member)
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.provider is not None:
            await self.provider.aclose()

    def terminate(self) -> None:
        """Terminate every connection and task at once."""
        self._closing = True
        for task in (*self._background, *self.tasks):
            task.cancel()
        for member in list(self.members.values()):
            member.terminate()
        self.members.clear()
        self.service.terminate()
        if self.provider is not None:
            self.provider.terminate()

    def drain(self, member: Member) -> None:
        """Close *member*'s sub-pool once its checked-out connections come back."""
        async def drain() -> None:
            try:
                await member.close(self._drain_timeout)
            except Exception as exc:
                logger.warning("closing sub-pool of %s: %s", member.instance.label,
                               describe_error(exc))

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
        self.health_changed()
        logger.warning("instance %s failed: %s", member.instance.label, error)
        self.request_refresh()

    def mark_demoted(self, member: Member) -> None:
        """A former primary: stop writing to it at once and learn the new one."""
        self.demoted.add(member.instance.id)
        self.health_changed()
        if member.pool is not None:
            self.spawn(member.pool.expire_connections())
        self.request_refresh()

    def request_refresh(self) -> asyncio.Event:
        """Ask the poller for a refresh now; the event is set when one finishes."""
        event = self._refreshed
        self._wakeup.set()
        return event

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
            member = self.members.pop(member_id)
            logger.info("instance %s left the topology; draining", member.instance.label)
            self.drain(member)
        for instance in plan.add:
            logger.info("instance %s joined as %s", instance.label, instance.role.value)
            self.members[instance.id] = Member(instance, self._make_sub_pool)
        for member_id in plan.expire:
            self.replay_lsn.pop(member_id, None)
            member = self.members[member_id]
            logger.info("instance %s changed role %s -> %s; expiring its connections",
                        member.instance.label, member.instance.role.value,
                        next(i.role.value for i in plan.keep if i.id == member_id))
            if member.pool is not None:
                await member.pool.expire_connections()
        for instance in plan.keep:
            self.members[instance.id].instance = instance
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
            async with asyncio.timeout(self._connect_timeout):
                conn = await self.service.service_connection()
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
                async with asyncio.timeout(self._connect_timeout):
                    conn = await self.service.connection(instance.address)
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
        options["reset"] = self._reset_connection
        return asyncpg.create_pool(asyncpg_dsn(self.dsn), **options,
                                   **self._instance_connect_kwargs(instance))

    async def _reset_connection(self, connection: Any) -> None:
        """The sub-pools' reset: skipped where provably unneeded (asyncpg has
        already rolled back any open transaction and dropped listeners)."""
        if connection in self.skip_reset:
            self.skip_reset.discard(connection)
            return
        if self._user_reset is not None:
            await self._user_reset(connection)
        elif self._provider_reset is not None:
            await self._provider_reset(connection)
        else:
            query = connection.get_reset_query()
            if connection in self.deep_reset:
                # asyncpg's reset keeps SQL-level PREPAREd statements; drop them too
                # (its own protocol-level statements have from_sql = false).
                query = f"{query};{DEALLOCATE_SQL_PREPARED}" if query else DEALLOCATE_SQL_PREPARED
            if query:
                await connection.execute(query)

    @staticmethod
    async def release_quietly(member: Member, connection: Any) -> None:
        """Release after a failure; the release's own error (the connection is
        terminated then) is only logged. A cancellation of the caller is not
        swallowed: asyncpg's release is shielded, so it completes anyway."""
        try:
            await member.pool.release(connection)
        except (Exception, asyncio.CancelledError) as exc:
            task = asyncio.current_task()
            if isinstance(exc, asyncio.CancelledError) and task is not None \
                    and task.cancelling():
                raise
            logger.debug("release after a failure: %s", describe_error(exc))

    def _instance_connect_kwargs(self, instance: Instance) -> dict[str, Any]:
        """The user's connect kwargs, pointed at one instance."""
        kwargs = dict(self._connect_kwargs)
        kwargs.update(host=instance.address.host, port=instance.address.port)
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

    # -- background tasks --------------------------------------------------------------

    async def _poll(self) -> None:
        """Refresh on every interval (if set) and whenever an error asks for it."""
        failures = 0
        while not self._closing:
            delay = self._refresh_interval
            if failures and delay is not None:
                delay = min(30.0, delay * 2 ** min(failures, 6)) * random.uniform(0.5, 1.0)
            try:
                async with asyncio.timeout(delay):
                    await self._wakeup.wait()
            except TimeoutError:
                pass
            self._wakeup.clear()
            if self._closing:
                return
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
            else:
                await asyncio.sleep(_MIN_REFRESH_GAP)

    async def _check_health(self) -> None:
        """Every ``health_check_interval``, ping the idle connections of every instance.

        A task of its own, so it runs with the poller off and a frozen instance
        (each ping waits up to the connect timeout) never delays a refresh.
        """
        interval = self._health_check_interval
        assert interval is not None
        while not self._closing:
            await asyncio.sleep(interval * random.uniform(0.9, 1.1))
            members = [m for m in self.members.values() if m.ready]
            results = await asyncio.gather(
                *(self._check_idle_connections(m) for m in members), return_exceptions=True)
            for member, result in zip(members, results, strict=True):
                if isinstance(result, Exception):
                    logger.warning("idle health check of %s failed: %s",
                                   member.instance.label, describe_error(result))

    async def _check_idle_connections(self, member: Member) -> None:
        """Ping one instance's idle connections so a dead one is found before a user gets it.

        Takes each idle connection briefly (never waiting for a busy pool) and
        runs ``SELECT 1`` with the connect timeout. One that fails is terminated
        (a silent network failure would otherwise hang its release) and marks its
        instance as failed.
        """
        pool = member.pool
        if pool is None or pool.is_closing():
            return
        taken: list[Any] = []  # hold them all: the sub-pool hands out LIFO
        try:
            for _ in range(pool.get_idle_size()):
                try:
                    taken.append(await pool.acquire(timeout=0.01))
                except (TimeoutError, asyncpg.InterfaceError):
                    break  # the pool got busy: users are checking connections for us
            failures = await asyncio.gather(*(self._ping(c) for c in taken))
            failure = next((f for f in failures if f is not None), None)
            if failure is not None:
                self.note_failure(member, failure)
        finally:
            cancelled: asyncio.CancelledError | None = None
            for connection in taken:  # every one, even if cancelled half-way
                raw = connection._con
                if raw is not None and not raw.is_closed():
                    self.skip_reset.add(raw)  # a ping leaves no session state
                try:
                    await self.release_quietly(member, connection)
                except asyncio.CancelledError as exc:
                    cancelled = exc
                finally:
                    self.skip_reset.discard(raw)
            if cancelled is not None:
                raise cancelled

    async def _ping(self, connection: Any) -> BaseException | None:
        """The connection-level error a ping ran into, if any; a broken connection
        is terminated here."""
        try:
            await connection.fetchval("SELECT 1", timeout=self._connect_timeout)
        except (Exception, asyncio.CancelledError) as exc:
            if connection._con is not None:
                connection._con.terminate()  # cut short, it could hang its release
            if isinstance(exc, asyncio.CancelledError):
                raise
            return exc if is_connection_error(exc) else None
        return None
