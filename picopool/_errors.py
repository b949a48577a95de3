"""picopool's exception tree.

Every error derives from :class:`asyncpg.InterfaceError`, so code that already
catches asyncpg's client-side errors keeps working unchanged::

    asyncpg.InterfaceError
    └── PicopoolError
        ├── ConfigurationError (also ValueError)   bad DSN or arguments
        ├── PoolClosedError                        the pool is closing or closed
        ├── TopologyError                          discovery failed or returned garbage
        ├── NoAvailableInstanceError               no instance could serve the request
        ├── TooManyWaitersError                    max_waiting callers wait already
        ├── RateLimitedError                       over the rate limit (block=False, or
        │                                          a wait longer than the call's timeout)
        └── NotReadyError (also TimeoutError)      wait_ready() timed out
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg


class PicopoolError(asyncpg.InterfaceError):  # type: ignore[misc]
    """Base class of every error raised by picopool itself."""


class ConfigurationError(PicopoolError, ValueError):
    """The DSN or the arguments given to picopool are invalid."""


class PoolClosedError(PicopoolError):
    """The pool is closing or closed."""


class TopologyError(PicopoolError):
    """Discovery could not produce a usable topology."""


class NoAvailableInstanceError(PicopoolError):
    """No instance of the cluster could serve the request.

    ``attempts`` holds ``(instance, reason)`` pairs for each instance tried,
    with passwords already masked.
    """

    def __init__(self, message: str, attempts: Iterable[tuple[str, str]] = ()) -> None:
        self.attempts: tuple[tuple[str, str], ...] = tuple(attempts)
        if self.attempts:
            tried = "; ".join(f"{instance}: {reason}" for instance, reason in self.attempts)
            message = f"{message} (tried {tried})"
        super().__init__(message)


class TooManyWaitersError(PicopoolError):
    """``max_waiting`` callers already wait for a connection: refused at once."""


class RateLimitedError(PicopoolError):
    """Over the pool's rate limit: ``RateLimit(block=False)``, or the wait for a
    token would outlast the call's timeout."""


class NotReadyError(PicopoolError, TimeoutError):
    """``Pool.wait_ready()`` ran out of time; the message says what was missing."""


def describe_error(exc: BaseException) -> str:
    """A one-line ``Type: message`` summary for error reports."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
