"""One instance's asyncpg sub-pool, with its counters and health."""

from __future__ import annotations

import asyncio
import random
import time
from typing import Any

import asyncpg

from ._topology import Instance


class Member:
    """Holds the sub-pool of one instance.

    The sub-pool is created lazily and (re)initialised on demand, so a
    member whose server is down costs nothing until its breaker lets a
    probe through.
    """

    __slots__ = (
        "_init_task",
        "_make_pool",
        "failures",
        "instance",
        "last_error",
        "open_until",
        "pool",
        "probing",
        "served",
    )

    def __init__(self, instance: Instance, make_pool: Any) -> None:
        self.instance = instance
        self._make_pool = make_pool  # (Instance) -> un-initialised asyncpg.Pool
        self.pool: Any = None
        self._init_task: asyncio.Task[Any] | None = None
        self.served = 0
        self.failures = 0
        self.last_error: str | None = None
        self.open_until = 0.0  # monotonic time before which the breaker is open
        self.probing = False  # a half-open breaker lets one request through at a time

    @property
    def ready(self) -> bool:
        pool = self.pool
        return pool is not None and pool._initialized and not pool._initializing

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
        await asyncio.shield(self._init_task)
        return self.pool

    async def _initialise(self, pool: Any) -> None:
        try:
            await pool
        except BaseException:
            if self.pool is pool:
                self.pool = None  # asyncpg marks a pool whose init failed as closed
            raise

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
            task.cancel()
        pool = self.pool
        if pool is None:
            return
        if not self.ready:
            pool.terminate()
            return
        try:
            await asyncio.wait_for(asyncio.shield(pool.close()), drain_timeout)
        except (Exception, asyncio.CancelledError):
            pool.terminate()
            raise

    def terminate(self) -> None:
        task, self._init_task = self._init_task, None
        if task is not None and not task.done():
            task.cancel()
        if self.pool is not None:
            self.pool.terminate()

    def __repr__(self) -> str:
        return (
            f"<Member {self.instance.label} {self.instance.role.value} "
            f"size={self.size()} in_use={self.in_use()} breaker={self.breaker_state}>"
        )


def is_connection_error(exc: BaseException) -> bool:
    """Errors that say the instance (not the statement) is the problem."""
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return True
    if _broken_protocol(exc):  # a FATAL (shutdown) arrived on an idle connection
        return True
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError | asyncpg.ConnectionFailureError):
        return True
    if isinstance(exc, asyncpg.InterfaceError) and "connection" in str(exc).lower() and (
        "closed" in str(exc).lower() or "lost" in str(exc).lower()
    ):
        return True
    sqlstate = getattr(exc, "sqlstate", None)
    return sqlstate in {"57P01", "57P02", "57P03", "08000", "08003", "08006", "08001", "08004"}


def rejected_before_sending(exc: BaseException) -> bool:
    """asyncpg refused the statement locally: the server never saw it.

    "connection is closed" comes from the check before sending; "cannot switch
    to state" means the server's FATAL arrived on an idle pooled connection
    before the socket closed, and asyncpg rejects the next statement.
    """
    if isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc):
        return True
    return _broken_protocol(exc)


def _broken_protocol(exc: BaseException) -> bool:
    """asyncpg's protocol is stuck in its error or failed state: the server sent a
    FATAL error (such as a shutdown's 57P01) to an idle connection whose socket has
    not closed yet. Misuse (two operations at once) raises a different error."""
    return isinstance(exc, asyncpg.InternalClientError) and str(exc).startswith(
        "cannot switch to state")
