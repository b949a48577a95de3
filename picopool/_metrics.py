"""The pool's own metrics: a listener on the instrumentation seam.

Every pool installs one :class:`Metrics` listener. It keeps, per instance, the
counters and duration histograms that ``stats()``, Prometheus and OpenTelemetry
report, and a sliding window of statement durations for percentiles. Its work per
event is a dict lookup, a few integer increments and one bisect: about a
microsecond, next to the 80-240 µs of client CPU an asyncpg round trip costs
(``bench/overhead.py --metrics``).

The window and the percentiles are pure (:class:`SlidingWindow`,
:func:`percentiles`) and tested with hypothesis.
"""

from __future__ import annotations

import asyncio
import math
import time
import weakref
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ._events import (
    AcquireFinished,
    BreakerChanged,
    ConnectionClosed,
    ConnectionOpened,
    Event,
    RefreshFailed,
    ResetDone,
    StatementFinished,
    TopologyChanged,
)

#: Upper bounds (seconds) of the duration histograms' buckets; +Inf is implied.
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

#: The sliding window of statement durations: the last ``WINDOW_SECONDS``, at most
#: ``WINDOW_SAMPLES`` of them per instance.
WINDOW_SECONDS = 60.0
WINDOW_SAMPLES = 2048

#: Outcomes that mean the statement's connection broke under it.
LOST_OUTCOMES = frozenset({"lost-idle", "lost-in-flight", "unresponsive"})


class SlidingWindow:
    """The values added in the last *horizon* seconds, at most *capacity* of them.

    Times must not go backwards (they come from ``time.monotonic()``).
    """

    __slots__ = ("_samples", "horizon")

    def __init__(self, horizon: float = WINDOW_SECONDS, capacity: int = WINDOW_SAMPLES) -> None:
        self.horizon = horizon
        self._samples: deque[tuple[float, float]] = deque(maxlen=capacity)

    def add(self, at: float, value: float) -> None:
        self._samples.append((at, value))

    def values(self, now: float) -> list[float]:
        samples = self._samples
        oldest = now - self.horizon
        while samples and samples[0][0] < oldest:
            samples.popleft()
        return [value for _, value in samples]


def percentiles(values: Iterable[float], quantiles: Sequence[float]) -> list[float | None]:
    """Nearest-rank percentiles: for each q in (0, 1], the smallest value v such
    that at least q of all values are <= v. None for no values."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        return [None for _ in quantiles]
    return [ordered[min(n, max(1, math.ceil(q * n - 1e-9))) - 1] for q in quantiles]


class Histogram:
    """Counts per bucket (not cumulative), their sum and count."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.buckets = [0] * (len(DURATION_BUCKETS) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.buckets[bisect_left(DURATION_BUCKETS, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, count of values <= le)`` for every bound and +Inf, as Prometheus wants."""
        total = 0
        out = []
        for bound, count in zip((*DURATION_BUCKETS, math.inf), self.buckets, strict=True):
            total += count
            out.append((bound, total))
        return out


class InstanceMetrics:
    """What one instance's events added up to, since the pool started."""

    __slots__ = ("acquire_failures", "acquire_wait", "acquire_wait_max", "connections_closed",
                 "connections_lost", "connections_opened", "durations", "label",
                 "resets_elided", "resets_performed", "role", "statements", "window")

    def __init__(self, label: str) -> None:
        self.label = label
        self.role = "unknown"  # as of the last event that said
        self.statements: dict[tuple[str, str], int] = {}  # (role, outcome) -> count
        self.durations: dict[str, Histogram] = {}  # role -> statement durations
        self.acquire_wait: dict[str, Histogram] = {}  # role -> checkout waits
        self.acquire_wait_max = 0.0
        self.acquire_failures = 0
        self.window = SlidingWindow()
        self.connections_opened = 0
        self.connections_closed = 0
        self.connections_lost = 0
        self.resets_elided = 0
        self.resets_performed = 0

    def latency(self, now: float) -> tuple[float | None, float | None, float | None, int]:
        """p50, p95, p99 of the window's statement durations, and how many there are."""
        values = self.window.values(now)
        p50, p95, p99 = percentiles(values, (0.5, 0.95, 0.99))
        return p50, p95, p99, len(values)


class Metrics:
    """The default listener: per-instance counters, histograms and latency windows.

    *waiting* returns the number of tasks checking a connection out now (all
    instances); the high-water mark is sampled whenever a checkout that waited
    (1 ms or more) ends.
    """

    __slots__ = ("__weakref__", "_dispatch", "_failed", "_waiting", "breakers",
                 "instances", "refresh_failures", "retries", "topology_changes",
                 "waiters_max")

    def __init__(self, waiting: Callable[[], int] = lambda: 0) -> None:
        self.instances: dict[str, InstanceMetrics] = {}
        self.retries: dict[str, int] = {}  # the retried attempt's outcome -> count
        self.breakers: dict[str, str] = {}  # label -> last breaker event's state
        self.refresh_failures = 0
        self.topology_changes = 0
        self.waiters_max = 0
        self._waiting = waiting
        # The outcome of a task's last failed attempt, until its retry reports.
        self._failed: weakref.WeakKeyDictionary[asyncio.Task[Any], str] = (
            weakref.WeakKeyDictionary())
        self._dispatch: dict[type[Any], Callable[[Any], None]] = {
            StatementFinished: self._statement,
            AcquireFinished: self._acquire,
            ResetDone: self._reset,
            ConnectionOpened: self._opened,
            ConnectionClosed: self._closed,
            BreakerChanged: self._breaker,
            TopologyChanged: self._topology,
            RefreshFailed: self._refresh_failed,
        }

    def __call__(self, event: Event) -> None:
        handler = self._dispatch.get(type(event))
        if handler is not None:
            handler(event)

    def instance(self, label: str) -> InstanceMetrics:
        metrics = self.instances.get(label)
        if metrics is None:
            metrics = self.instances[label] = InstanceMetrics(label)
        return metrics

    # The executor calls these directly on its hot path (no event is built for the
    # pool's own metrics); the event handlers below map onto them.

    def statement(self, label: str, role: str, outcome: str, duration: float,
                  attempt: int, now: float) -> None:
        """One attempt of a pool-level statement ended (*now*: a monotonic time)."""
        metrics = self.instances.get(label) or self.instance(label)
        metrics.role = role
        _count_statement(metrics, role, outcome, duration, now)
        if attempt or outcome != "ok":
            self._retry_bookkeeping(outcome, attempt)
        if outcome in LOST_OUTCOMES:
            metrics.connections_lost += 1

    def served(self, label: str, role: str, duration: float, now: float, waited: float,
               elided: bool) -> None:
        """A pool-level statement succeeded: :meth:`statement`, :meth:`acquired` and
        :meth:`reset` of a first attempt in one call (the executor's hot path)."""
        metrics = self.instances.get(label) or self.instance(label)
        metrics.role = role
        _count_statement(metrics, role, "ok", duration, now)
        if _count_wait(metrics, role, waited):
            self._sample_waiters()
        if elided:
            metrics.resets_elided += 1
        else:
            metrics.resets_performed += 1

    def _sample_waiters(self) -> None:
        waiting = self._waiting() + 1  # it queued: sample how many queue now (it was one)
        if waiting > self.waiters_max:
            self.waiters_max = waiting

    def _retry_bookkeeping(self, outcome: str, attempt: int) -> None:
        task = asyncio.current_task()
        if task is None:
            return
        if attempt:
            retried = self._failed.pop(task, None)
            if retried is not None:
                self.retries[retried] = self.retries.get(retried, 0) + 1
        if outcome != "ok":
            self._failed[task] = outcome

    def acquired(self, label: str, role: str, waited: float, ok: bool) -> None:
        """A checkout from *label*'s sub-pool ended after *waited* seconds."""
        metrics = self.instances.get(label) or self.instance(label)
        metrics.role = role
        if not ok:
            metrics.acquire_failures += 1
        if _count_wait(metrics, role, waited):
            self._sample_waiters()

    def reset(self, label: str, elided: bool) -> None:
        metrics = self.instances.get(label) or self.instance(label)
        if elided:
            metrics.resets_elided += 1
        else:
            metrics.resets_performed += 1

    def _statement(self, event: StatementFinished) -> None:
        self.statement(event.instance, event.role, event.outcome, event.duration,
                       event.attempt, time.monotonic())

    def _acquire(self, event: AcquireFinished) -> None:
        self.acquired(event.instance, event.role, event.waited, event.ok)

    def _reset(self, event: ResetDone) -> None:
        self.reset(event.instance, event.elided)

    def _opened(self, event: ConnectionOpened) -> None:
        self.instance(event.instance).connections_opened += 1

    def _closed(self, event: ConnectionClosed) -> None:
        metrics = self.instance(event.instance)
        metrics.connections_closed += 1
        if event.lost:
            metrics.connections_lost += 1

    def _breaker(self, event: BreakerChanged) -> None:
        self.breakers[event.instance] = event.state

    def _topology(self, event: TopologyChanged) -> None:
        self.topology_changes += 1
        for label, role in event.instances:
            self.instance(label).role = role

    def _refresh_failed(self, event: RefreshFailed) -> None:
        self.refresh_failures += 1


def _count_statement(metrics: InstanceMetrics, role: str, outcome: str, duration: float,
                     now: float) -> None:
    key = (role, outcome)
    statements = metrics.statements
    statements[key] = statements.get(key, 0) + 1
    histogram = metrics.durations.get(role)
    if histogram is None:
        histogram = metrics.durations[role] = Histogram()
    histogram.observe(duration)
    metrics.window.add(now, duration)


def _count_wait(metrics: InstanceMetrics, role: str, waited: float) -> bool:
    """Count one checkout's wait; whether it queued (then the caller samples waiters)."""
    histogram = metrics.acquire_wait.get(role)
    if histogram is None:
        histogram = metrics.acquire_wait[role] = Histogram()
    histogram.observe(waited)
    if waited > metrics.acquire_wait_max:
        metrics.acquire_wait_max = waited
    return waited >= 0.001
