"""The instrumentation seam: typed events from the execution path and the membership.

Prometheus, OpenTelemetry, the slow-query log and ``stats()`` listen here; so can
you, with :meth:`picopool.Pool.add_event_listener`. A listener is a plain synchronous
callable that takes one event; it runs inline, so it must be quick and must not
raise (an exception is logged and dropped). With no listener, the execution path
builds no event and reads no clock for one: it tests one attribute per statement.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple, TypeAlias

logger = logging.getLogger("picopool")


class StatementFinished(NamedTuple):
    """A pool-level statement ended (each attempt is one event).

    ``outcome`` is ``"ok"`` or an :class:`~picopool._outcome.Outcome` value
    (``"lost-in-flight"``, ``"caller-timeout"``, ``"statement-error"`` ...);
    ``attempt`` counts from 0 (1 and more are retries); ``reason`` says why the
    statement went where it went (the classifier's verdict, or the hint, role or
    router that decided). ``args`` are the statement's parameters: never log them
    unless the user asked for it.
    """

    instance: str  # the instance's label (name@host:port or host:port)
    role: str  # the instance's role: primary, replica, peer, unknown
    request: str  # what the statement asked for: primary, replica, any, prefer-replica
    reason: str
    method: str  # execute, fetch, fetchval, fetchrow, executemany, fetchmany
    query: str
    args: tuple[Any, ...]
    outcome: str
    duration: float  # seconds on the connection (not counting the checkout)
    attempt: int


class AcquireFinished(NamedTuple):
    """A checkout from an instance's sub-pool ended: ``waited`` seconds, ``ok`` or not."""

    instance: str
    role: str
    request: str
    waited: float
    ok: bool


class ConnectionOpened(NamedTuple):
    instance: str


class ConnectionClosed(NamedTuple):
    """A connection of a sub-pool ended; ``lost``: not by picopool's or asyncpg's choice."""

    instance: str
    lost: bool


class BreakerChanged(NamedTuple):
    instance: str
    state: str  # closed, open, unresponsive
    error: str | None


class TopologyChanged(NamedTuple):
    version: int
    instances: tuple[tuple[str, str], ...]  # (label, role)


class RefreshFailed(NamedTuple):
    error: str


class ResetDone(NamedTuple):
    """A connection went back to its sub-pool: ``elided`` if its reset was skipped."""

    instance: str
    elided: bool


Event: TypeAlias = (StatementFinished | AcquireFinished | ConnectionOpened | ConnectionClosed
                    | BreakerChanged | TopologyChanged | RefreshFailed | ResetDone)
Listener: TypeAlias = Callable[[Event], None]


class Events:
    """The listeners of one pool.

    Rare events (connections, breakers, topology) go through :meth:`emit`, to the
    pool's own metrics (the *sink*) and to every listener. The per-statement events
    go through :meth:`notify`, to the listeners only, behind ``if events.on:``: the
    pool's metrics get those figures from the executor directly, without an event.
    """

    __slots__ = ("_listeners", "on", "sink")

    def __init__(self) -> None:
        self._listeners: tuple[Listener, ...] = ()
        self.on = False  # whether anyone but the pool's own metrics listens
        self.sink: Listener | None = None

    def add(self, listener: Listener) -> None:
        self._listeners = (*self._listeners, listener)
        self.on = True

    def remove(self, listener: Listener) -> None:
        self._listeners = tuple(x for x in self._listeners if x != listener)
        self.on = bool(self._listeners)

    def emit(self, event: Event) -> None:
        """A rare event: the pool's metrics, then every listener."""
        if self.sink is not None:
            self.sink(event)
        self.notify(event)

    def notify(self, event: Event) -> None:
        """A per-statement event: every listener (the caller checked ``on``)."""
        for listener in self._listeners:
            try:
                listener(event)
            except Exception:  # a listener's bug must not break a statement
                logger.exception("picopool event listener %r failed", listener)
