"""Admission control: the fair waiter queue (``max_waiting=``) and the rate limit.

**Waiters.** With ``max_waiting`` set, a caller that finds no free connection on
any instance that may serve its role joins one FIFO queue per role request. A
connection coming back to any sub-pool (or any other change, seen by each
waiter's short poll) runs :meth:`WaitQueue.dispatch`, one synchronous decision
function: it grants the oldest waiters, in arrival order, a *reservation* on an
instance with a free connection. A reservation counts as in use, so a newcomer
cannot take the connection from under a granted waiter. The waiter then checks
out from that instance at once.

A waiter that timed out or was cancelled never gets a reservation: its future
is cancelled before it leaves the queue, and a grant skips done futures
(psycopg_pool's stale hand-off rule). One granted and then cancelled before it
could use the grant passes the reservation on (anyio's ``Condition`` rule).

**Rate limit.** :class:`TokenBucket` is a token bucket on a monotonic clock
passed in by the caller (pure, so property tests drive it); :class:`RateLimiter`
keeps one bucket per key and blocks or refuses.
"""

from __future__ import annotations

import asyncio
import contextvars
import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from ._errors import PoolClosedError, RateLimitedError, TooManyWaitersError

__all__ = ["AdmissionStats", "RateLimit", "RateLimiter", "TokenBucket", "WaitQueue"]

# How often a waiter looks again by itself (a new instance, a closed breaker, a
# pool closing): grants on release are immediate, this is only the safety net.
_POLL = 0.1


@dataclass(frozen=True, slots=True)
class AdmissionStats:
    """Admission control's counters, in ``pool.stats().admission``."""

    waiting: int  # callers queued for a connection now (max_waiting=)
    max_waiting: int | None
    granted: int  # queued callers served
    rejected: int  # TooManyWaitersError raised
    wait_seconds: float  # total time served callers spent queued
    rate_limited: int  # RateLimitedError raised
    rate_waited: int  # callers that waited for a token
    lifetime_closed: int  # connections closed on release for max_lifetime
    not_ready: tuple[str, ...] = ()  # readiness_check: instances awaiting confirmation


# -- rate limit --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimit:
    """``per_second`` requests on average, bursts of up to ``burst``.

    ``key``: ``None`` (one bucket for the pool), a callable returning a hashable
    key, or a :class:`contextvars.ContextVar` (e.g. the tenant); one bucket per
    key. ``block=True``: a caller over the limit waits for a token (up to its
    ``timeout=``, else :class:`RateLimitedError` at once); ``block=False``:
    :class:`RateLimitedError` at once.
    """

    per_second: float
    burst: float = 1.0
    key: Callable[[], Hashable] | contextvars.ContextVar[Any] | None = None
    block: bool = True

    def __post_init__(self) -> None:
        from ._errors import ConfigurationError
        if not (self.per_second > 0 and math.isfinite(self.per_second)):
            raise ConfigurationError("RateLimit.per_second must be a positive number")
        if not (self.burst >= 1 and math.isfinite(self.burst)):
            raise ConfigurationError("RateLimit.burst must be at least 1")


class TokenBucket:
    """Holds up to ``burst`` tokens, refilled at ``rate`` per second.

    ``take(now)`` takes one token if there is one (returns 0.0); else it returns how
    long until there is one and takes nothing. ``borrow(now)`` always takes one,
    going into debt, and returns how long the caller must wait for its token;
    ``refund`` gives a borrowed token back (a waiter that gave up). *now* is a
    monotonic clock reading that never goes back.
    """

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> float:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate

    def borrow(self, now: float) -> float:
        self._refill(now)
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0.0 else -self.tokens / self.rate

    def refund(self, now: float) -> None:
        self._refill(now)
        self.tokens = min(self.burst, self.tokens + 1.0)

    def full(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= self.burst


class RateLimiter:
    """One :class:`TokenBucket` per key of a :class:`RateLimit`."""

    __slots__ = ("_buckets", "_key", "limit", "limited", "waited")

    _MAX_KEYS = 10_000  # beyond this, full buckets (same as new ones) are dropped

    def __init__(self, limit: RateLimit) -> None:
        self.limit = limit
        key = limit.key
        if key is None:
            self._key: Callable[[], Hashable] = _no_key
        elif isinstance(key, contextvars.ContextVar):
            self._key = key.get
        else:
            self._key = key
        self._buckets: dict[Hashable, TokenBucket] = {}
        self.limited = 0  # callers refused
        self.waited = 0  # callers that waited for a token

    def _bucket(self, now: float) -> TokenBucket:
        key = self._key()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self._MAX_KEYS:
                self._buckets = {k: b for k, b in self._buckets.items() if not b.full(now)}
            limit = self.limit
            bucket = self._buckets[key] = TokenBucket(limit.per_second, limit.burst, now)
        return bucket

    async def acquire(self, timeout: float | None) -> None:
        """Take a token for this caller's key, waiting for it if ``block``."""
        now = time.monotonic()
        bucket = self._bucket(now)
        if not self.limit.block:
            wait = bucket.take(now)
            if wait:
                self.limited += 1
                raise RateLimitedError(
                    f"over the rate limit of {self.limit.per_second:g}/s "
                    f"(burst {self.limit.burst:g}); a token in {wait:.3f} s")
            return
        wait = bucket.borrow(now)
        if not wait:
            return
        if timeout is not None and wait > timeout:
            bucket.refund(now)
            self.limited += 1
            raise RateLimitedError(
                f"over the rate limit of {self.limit.per_second:g}/s: the next token "
                f"comes in {wait:.3f} s, after this call's timeout of {timeout:g} s")
        self.waited += 1
        try:
            await asyncio.sleep(wait)
        except (Exception, asyncio.CancelledError):
            bucket.refund(time.monotonic())  # the token goes to whoever comes next
            raise


def _no_key() -> Hashable:
    return None


# -- the waiter queue --------------------------------------------------------------


class _Waiter:
    __slots__ = ("future", "request", "seq")

    def __init__(self, request: Any, seq: int, future: asyncio.Future[Any]) -> None:
        self.request = request
        self.seq = seq
        self.future = future  # its grant: a member, or None (look again: closing)


_LOOK_AGAIN: Any = object()


def _look_again(waiter: _Waiter) -> None:
    """A waiter's poll timer: wake it without a grant. It gets a fresh future
    first, so that a grant made before it runs again is not lost."""
    future = waiter.future
    if not future.done():
        waiter.future = future.get_loop().create_future()
        future.set_result(_LOOK_AGAIN)


class WaitQueue:
    """FIFO waiting per role request across every sub-pool; see the module docstring.

    *free_member(request)* returns a member that may serve *request* and has a free,
    unreserved connection now, or None; *no_member(request)* says no instance can
    serve *request* at all (the caller then takes the careful path, which waits
    for the topology). Members carry their reservations in ``member.reserved``.
    """

    __slots__ = ("_free", "_queues", "_seq", "closing", "granted", "max_waiting",
                 "rejected", "waited_total", "waiting")

    def __init__(self, max_waiting: int, free_member: Callable[[Any], Any]) -> None:
        self.max_waiting = max_waiting
        self._free = free_member
        self._queues: dict[Any, deque[_Waiter]] = {}
        self._seq = itertools.count()
        self.waiting = 0  # callers in a queue now
        self.rejected = 0  # TooManyWaitersError raised
        self.granted = 0  # waiters served
        self.waited_total = 0.0  # seconds waited by served waiters
        self.closing: Callable[[], bool] = _never

    def queued(self, request: Any) -> bool:
        queue = self._queues.get(request)
        return bool(queue)

    async def admit(self, request: Any, timeout: float | None) -> Any:
        """A member reserved for this caller (unreserve it once checked out), or
        None when nothing can serve *request* at all. Waits in FIFO order if every
        connection is taken; ``TimeoutError`` after *timeout*."""
        queue = self._queues.get(request)
        if not queue:
            member = self._free(request)
            if member is not None:
                member.reserved += 1
                return member
        if self.waiting >= self.max_waiting:
            self.rejected += 1
            raise TooManyWaitersError(
                f"{self.waiting} callers wait for a connection already (max_waiting="
                f"{self.max_waiting})")
        loop = asyncio.get_running_loop()
        waiter = _Waiter(request, next(self._seq), loop.create_future())
        if queue is None:
            queue = self._queues[request] = deque()
        queue.append(waiter)
        self.waiting += 1
        started = loop.time()
        deadline = None if timeout is None else started + timeout
        try:
            while True:
                if self.closing():
                    raise PoolClosedError("pool is closing")
                poll = _POLL if deadline is None else min(_POLL, deadline - loop.time())
                if poll <= 0:
                    raise TimeoutError
                # The grant itself wakes this task (one turn of the loop, as a
                # waiter of asyncpg's queue); the timer only makes it look again.
                timer = loop.call_later(poll, _look_again, waiter)
                try:
                    granted = await waiter.future
                finally:
                    timer.cancel()
                if granted is not _LOOK_AGAIN:
                    break
                self.dispatch()
        except (Exception, asyncio.CancelledError):
            self._abandon(waiter)
            raise
        self.waited_total += loop.time() - started
        return granted

    def _abandon(self, waiter: _Waiter) -> None:
        """A waiter leaves without its grant: never hand it one; pass one on."""
        future = waiter.future
        if future.done() and not future.cancelled():
            member = future.result()
            if member is not None:
                member.reserved -= 1
            self.dispatch()
            return
        future.cancel()  # a grant skips it from now on
        queue = self._queues.get(waiter.request)
        if queue is not None:
            try:
                queue.remove(waiter)
            except ValueError:
                pass
            else:
                self.waiting -= 1
        self.dispatch()  # it may have stood at the head of its queue

    def dispatch(self) -> None:
        """Grant free connections to the oldest waiters that can use them."""
        if not self.waiting:
            return
        queues = self._queues
        while True:
            heads = [q[0] for q in queues.values() if q]
            if not heads:
                return
            granted = False
            for waiter in sorted(heads, key=_by_arrival):
                queue = queues[waiter.request]
                if waiter.future.done():  # timed out or cancelled: stale, skip it
                    queue.popleft()
                    self.waiting -= 1
                    granted = True
                    break
                member = self._free(waiter.request)
                if member is None:
                    continue
                queue.popleft()
                self.waiting -= 1
                member.reserved += 1
                self.granted += 1
                waiter.future.set_result(member)
                granted = True
                break
            if not granted:
                return

    def wake_all(self) -> None:
        """Let every waiter look again now (the pool is closing)."""
        for queue in self._queues.values():
            for waiter in queue:
                if not waiter.future.done():
                    waiter.future.set_result(None)
            self.waiting -= len(queue)
            queue.clear()

    def __repr__(self) -> str:
        return (f"<WaitQueue waiting={self.waiting}/{self.max_waiting} "
                f"granted={self.granted} rejected={self.rejected}>")


def _by_arrival(waiter: _Waiter) -> int:
    return waiter.seq


def _never() -> bool:
    return False

