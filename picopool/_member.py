"""One instance's asyncpg sub-pool, with its counters and health."""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Coroutine
from typing import Any

import asyncpg.connection
import asyncpg.pool

from ._eager import shielded
from ._errors import PoolClosedError
from ._outcome import is_connection_error, rejected_before_sending
from ._topology import Instance

__all__ = ["Member", "is_connection_error", "no_reset", "rejected_before_sending"]


async def no_reset(connection: Any) -> None:
    """The sub-pools' reset callback when neither the user's nor the provider's
    replaces it: nothing more.

    asyncpg rolls back an open transaction and drops listeners before calling
    it; picopool runs (or, where provably unneeded, skips) the reset query
    itself before releasing (see ``Executor.release``).
    """


def _knows_asyncpg_internals(version: str) -> bool:
    """Whether asyncpg's pool is one whose internals :meth:`Member.take` and
    :meth:`Member.give_back` were checked against (0.30 to 0.32), with the
    shape they rely on. Any other asyncpg always takes its own way instead:
    correct, only slower."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        return False
    if not (0, 30) <= (major, minor) <= (0, 32):
        return False
    holder = getattr(asyncpg.pool, "PoolConnectionHolder", None)
    return (
        callable(getattr(asyncpg.pool, "PoolConnectionProxy", None))
        and {"_con", "_pool", "_proxy", "_max_queries", "_setup", "_in_use",
         "_inactive_callback", "_timeout", "_generation"} <= _slots(holder)
        and all(callable(getattr(holder, name, None)) for name in (
            "_maybe_cancel_inactive_callback", "_setup_inactive_callback", "_release"))
        and {"_queue", "_generation", "_reset", "_closing", "_initialized", "_initializing",
             "_closed", "_loop", "_maxsize"} <= _slots(asyncpg.pool.Pool)
        and {"_protocol", "_top_xact", "_listeners", "_log_listeners"}
        <= _slots(asyncpg.connection.Connection)
    )


def _slots(cls: Any) -> set[str]:
    return set(getattr(cls, "__slots__", ()))


_FAST = _knows_asyncpg_internals(asyncpg.__version__)
_Proxy: Any = getattr(asyncpg.pool, "PoolConnectionProxy", None)


class Member:
    """Holds the sub-pool of one instance.

    The sub-pool is created lazily and (re)initialised on demand, so a
    member whose server is down costs nothing until its breaker lets a
    probe through.
    """

    __slots__ = (
        "_init_task",
        "_make_pool",
        "acquiring",
        "confirmed",
        "failures",
        "inflight",
        "instance",
        "interrupted",
        "label",
        "last_error",
        "open_until",
        "pool",
        "probing",
        "reserved",
        "role_name",
        "rtt",
        "rtt_at",
        "running",
        "served",
        "unresponsive",
    )

    def __init__(self, instance: Instance, make_pool: Any) -> None:
        self.instance = instance
        self.label = instance.label  # how events name it; kept in step by the membership
        self.role_name = instance.role.value
        self._make_pool = make_pool  # (Instance) -> un-initialised asyncpg.Pool
        self.pool: Any = None
        self._init_task: asyncio.Task[Any] | None = None
        self.served = 0
        self.failures = 0
        self.last_error: str | None = None
        self.open_until = 0.0  # monotonic time before which the breaker is open
        self.probing = False  # a half-open breaker lets one request through at a time
        # Work on this instance now, for the liveness watch: a connection the user
        # holds (asyncpg's proxy) -> when it was checked out; a pool-level
        # statement's connection -> when it was sent; a task -> when it began to
        # acquire.
        self.inflight: dict[Any, float] = {}
        self.running: dict[Any, float] = {}
        self.acquiring: dict[asyncio.Task[Any], float] = {}
        self.interrupted: set[asyncio.Task[Any]] = set()  # acquirers cut off by the watch
        self.unresponsive = False  # the liveness watch got no answer: no traffic until one
        # Connections promised to granted waiters (max_waiting=): counted as in use.
        self.reserved = 0
        # Readiness (readiness_check=True): False until a connection succeeded and the
        # instance's role was confirmed; no user traffic until then.
        self.confirmed = True
        # Moving average (alpha 0.2) of pool-level statements' round trips (seconds)
        # and when it was last updated: what LeastLatency balances on
        # (strategies.LatencySample). The executor updates it on each success.
        self.rtt = 0.0
        self.rtt_at = 0.0

    @property
    def ready(self) -> bool:
        pool = self.pool
        return (pool is not None and pool._initialized and not pool._initializing
                and not pool._closed)

    async def ensure_ready(self) -> Any:
        """The initialised sub-pool, creating or re-creating it if needed."""
        if self.ready and not self.pool.is_closing():
            return self.pool
        if self._init_task is None or self._init_task.done():
            if self.pool is not None and (self.pool.is_closing() or self.pool._closed):
                self.pool = None
            if self.pool is None:
                self.pool = self._make_pool(self.instance)
            # A task, so that a cancelled waiter does not abort the initialisation.
            self._init_task = asyncio.ensure_future(self._initialise(self.pool))
        task = self._init_task
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if (current is not None and current.cancelling()) or not task.cancelled():
                raise  # the caller's own cancellation
            # close() or a drain stopped the start-up: not the caller's cancellation.
            raise PoolClosedError(
                f"the sub-pool of {self.instance.label} was closed while starting") from None
        return self.pool

    async def _initialise(self, pool: Any) -> None:
        try:
            await pool
        except BaseException:
            if self.pool is pool:
                self.pool = None  # asyncpg marks a pool whose init failed as closed
            # asyncpg >= 0.31 terminates what a failed start-up had opened; 0.30
            # leaves those connections open.
            for holder in getattr(pool, "_holders", ()):
                with contextlib.suppress(Exception):
                    holder.terminate()
            raise

    def take(self, timeout: float | None = None) -> Any:
        """A free connection of the ready sub-pool, checked out at once, or None
        if that would mean waiting (none free, callers already waiting for one,
        a connection to open or a ``setup=`` to run): then ``pool.acquire()``.

        This is asyncpg's own acquire for the case where it never waits, done
        without its five coroutines: the holder ends up as ``acquire()`` leaves it.
        """
        if not _FAST:
            return None
        pool = self.pool
        queue = pool._queue
        if not queue._queue or queue._getters or pool._closing:
            return None
        holder = queue.get_nowait()  # asyncpg's queue: its choice of holder
        raw = holder._con
        if raw is None or raw.is_closed() or holder._generation != pool._generation \
                or holder._setup is not None:
            queue.put_nowait(holder)  # asyncpg's acquire reconnects it
            return None
        holder._maybe_cancel_inactive_callback()
        holder._proxy = proxy = _Proxy(holder, raw)
        holder._in_use = pool._loop.create_future()
        holder._timeout = timeout  # acquire()'s, the default for release() as in asyncpg
        return proxy

    def give_back(self, connection: Any,
                  timeout: float | None = None) -> Coroutine[Any, Any, None] | None:
        """Start returning *connection* to its sub-pool (asyncpg's
        ``Pool.release``): None if that is done, else the rest to await.

        A release that has nothing to wait for (no transaction to roll back, no
        reset callback of the user's, no cancellation still in progress, no
        connection to close) is done here, as asyncpg's own release would do it
        without its coroutines. The rest runs under a shield made only then
        (see :mod:`picopool._eager`).
        """
        raw = connection._con
        if raw is None:
            return None  # released already (asyncpg releases a connection it terminates)
        holder = connection._holder
        pool = holder._pool
        pool._check_init()  # a closed sub-pool raises, as asyncpg's release does
        raw._on_release()
        if _FAST and pool._reset is no_reset and holder._in_use is not None:
            protocol = raw._protocol
            if not raw.is_closed() and protocol.queries_count < holder._max_queries \
                    and holder._generation == pool._generation \
                    and not protocol._is_cancelling() \
                    and not protocol.is_in_transaction() and raw._top_xact is None:
                holder._timeout = None
                raw._listeners.clear()
                raw._log_listeners.clear()
                holder._release()
                holder._setup_inactive_callback()
                return None
        return shielded(holder.release(holder._timeout if timeout is None else timeout))

    async def release(self, connection: Any, timeout: float | None = None) -> None:
        """Give a checked-out connection back to its sub-pool (:meth:`give_back`)."""
        rest = self.give_back(connection, timeout)
        if rest is not None:
            await rest
        if self.acquiring:
            # Tasks wait for a connection here, and one was just woken for this one:
            # let it run before this task can take the connection back
            # (asyncio.Queue lets a newcomer barge in, and the woken waiter would
            # queue again at the back). asyncpg's release task gives waiters the
            # same turn.
            await asyncio.sleep(0)

    def record_success(self) -> None:
        self.failures = 0
        self.open_until = 0.0

    def record_failure(self, error: str, *, base_delay: float = 0.5, max_delay: float = 10.0,
                       threshold: int = 1) -> None:
        """Count a connection-level failure; open the breaker with jittered backoff."""
        self.failures += 1
        self.last_error = error
        if self.failures >= threshold:
            delay = min(max_delay, base_delay * 2 ** (self.failures - threshold))
            self.open_until = time.monotonic() + delay * random.uniform(0.5, 1.0)

    @property
    def breaker_state(self) -> str:
        if self.failures == 0:
            return "closed"
        return "open" if time.monotonic() < self.open_until else "half-open"

    def in_use(self) -> int:
        """Connections checked out: O(1) from the sub-pool's queue of free holders
        (asyncpg's own get_size()/get_idle_size() walk every holder)."""
        pool = self.pool
        if _FAST:  # read by every load-aware pick: `ready` and the two numbers, inline
            if pool is None or not pool._initialized or pool._initializing or pool._closed:
                return 0
            return pool._maxsize - len(pool._queue._queue)  # type: ignore[no-any-return]
        if pool is None or not self.ready:
            return 0
        queue = getattr(pool, "_queue", None)
        if queue is not None:
            return int(pool.get_max_size() - queue.qsize())
        return int(pool.get_size() - pool.get_idle_size())

    def idle(self) -> int:
        pool = self.pool
        return int(pool.get_idle_size()) if pool is not None and self.ready else 0

    def size(self) -> int:
        pool = self.pool
        return int(pool.get_size()) if pool is not None and self.ready else 0

    async def close(self, drain_timeout: float) -> None:
        """Wait for checked-out connections to come back, then close; terminate on timeout."""
        task, self._init_task = self._init_task, None
        if task is not None and not task.done():
            task.cancel()  # asyncpg terminates what a failed start-up had opened
            await asyncio.gather(task, return_exceptions=True)
        pool = self.pool
        if pool is None:
            return
        if not self.ready:
            if not pool._initializing:
                pool.terminate()
            return
        try:
            await asyncio.wait_for(asyncio.shield(pool.close()), drain_timeout)
        except (Exception, asyncio.CancelledError):
            pool.terminate()
            raise

    def terminate(self) -> None:
        """Terminate every connection now; never raises.

        A sub-pool still starting cannot be terminated by asyncpg ("pool is being
        initialized"): its start-up task is cancelled instead, and asyncpg's failed
        initialisation terminates the connections it had opened.
        """
        task, self._init_task = self._init_task, None
        if task is not None and not task.done():
            task.cancel()
        pool = self.pool
        if pool is not None and not pool._initializing:
            with contextlib.suppress(Exception):  # never stop the caller's loop over members
                pool.terminate()
        for connection in [*self.inflight, *self.running]:
            if connection._con is not None:
                connection._con.terminate()

    def __repr__(self) -> str:
        return (
            f"<Member {self.instance.label} {self.instance.role.value} "
            f"size={self.size()} in_use={self.in_use()} breaker={self.breaker_state}>"
        )
