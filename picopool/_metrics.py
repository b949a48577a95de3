"""The pool's own metrics: fed by the executor, and a listener on the seam.

Every pool keeps one :class:`Metrics`. It holds, per instance, the counters and
duration histograms that ``stats()``, Prometheus and OpenTelemetry report, and a
sliding window of statement durations for percentiles.

A statement that succeeds at its first attempt (nearly all of them) costs one
tuple appended to its instance's ``pending`` deque: :meth:`Metrics.served`. The
deque is folded into the counters, histograms and window in batches
(:meth:`InstanceMetrics.fold`: a sort and a bisect per bucket, not per value),
every ``FOLD_AT`` statements and before anything is read. Readers may run in
another thread (a Prometheus scrape, an OpenTelemetry export): folding, every
other change to the histograms and window, and reading them hold
:attr:`Metrics.lock`; appending to a deque and taking from its other end are
atomic, so the hot path takes no lock.

The window, the histograms and the percentiles are pure (:class:`SlidingWindow`,
:class:`Histogram`, :func:`percentiles`) and tested with hypothesis.
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
import weakref
from bisect import bisect_left, bisect_right
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

#: Successful statements kept unfolded per instance before a fold.
FOLD_AT = 256

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

    def extend(self, samples: Iterable[tuple[float, float]]) -> None:
        """Add ``(at, value)`` pairs, oldest first."""
        self._samples.extend(samples)

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

    def observe_many(self, values: Sequence[float]) -> None:
        """:meth:`observe` each of *values*: one sort and a bisect per bucket."""
        ordered = sorted(values)
        buckets = self.buckets
        below = 0  # values <= the previous bound
        for index, bound in enumerate(DURATION_BUCKETS):
            upto = bisect_right(ordered, bound, below)
            buckets[index] += upto - below
            below = upto
        buckets[-1] += len(ordered) - below
        self.count += len(ordered)
        self.sum += sum(ordered)

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
                 "connections_lost", "connections_opened", "durations", "label", "pending",
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
        # First-attempt successes not folded yet: (role, at, duration, waited, elided).
        self.pending: deque[tuple[str, float, float, float, bool]] = deque()

    def fold(self) -> None:
        """Add the pending successes to the counters, histograms and window
        (the caller holds :attr:`Metrics.lock`)."""
        queued = self.pending
        if not queued:
            return
        take = queued.popleft  # appends go on at the other end meanwhile
        pending = [take() for _ in range(len(queued))]
        start = 0
        while start < len(pending):  # one run per role (a role changes at a failover)
            role = pending[start][0]
            end = start + 1
            while end < len(pending) and pending[end][0] == role:
                end += 1
            self._fold_role(role, pending[start:end] if start or end < len(pending)
                            else pending)
            start = end

    def _fold_role(self, role: str, samples: list[tuple[str, float, float, float, bool]]
                   ) -> None:
        _, ats, durations, waits, elided = zip(*samples, strict=True)
        count = len(samples)
        self.role = role
        key = (role, "ok")
        self.statements[key] = self.statements.get(key, 0) + count
        histogram = self.durations.get(role)
        if histogram is None:
            histogram = self.durations[role] = Histogram()
        histogram.observe_many(durations)
        self.window.extend(zip(ats, durations, strict=True))
        histogram = self.acquire_wait.get(role)
        if histogram is None:
            histogram = self.acquire_wait[role] = Histogram()
        histogram.observe_many(waits)
        longest = max(waits)
        if longest > self.acquire_wait_max:
            self.acquire_wait_max = longest
        skipped = sum(elided)
        self.resets_elided += skipped
        self.resets_performed += count - skipped

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
                 "instances", "lock", "refresh_failures", "retries", "topology_changes",
                 "waiters_max")

    def __init__(self, waiting: Callable[[], int] = lambda: 0) -> None:
        self.instances: dict[str, InstanceMetrics] = {}
        self.retries: dict[str, int] = {}  # the retried attempt's outcome -> count
        self.breakers: dict[str, str] = {}  # label -> last breaker event's state
        self.refresh_failures = 0
        self.topology_changes = 0
        self.waiters_max = 0
        self._waiting = waiting
        # Held to fold, to change the histograms and windows, and to read them.
        self.lock = threading.RLock()
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
        with self.lock:
            metrics.fold()  # keep the window in time order
            metrics.role = role
            _count_statement(metrics, role, outcome, duration, now)
        if attempt or outcome != "ok":
            self._retry_bookkeeping(outcome, attempt)
        if outcome in LOST_OUTCOMES:
            metrics.connections_lost += 1

    def served(self, label: str, role: str, duration: float, now: float, waited: float,
               elided: bool) -> None:
        """A pool-level statement succeeded at its first attempt: :meth:`statement`,
        :meth:`acquired` and :meth:`reset` in one call, folded later (the
        executor's hot path)."""
        metrics = self.instances.get(label) or self.instance(label)
        pending = metrics.pending
        pending.append((role, now, duration, waited, elided))
        if len(pending) >= FOLD_AT:
            with self.lock:
                metrics.fold()
        if waited >= 0.001:  # it queued: sample the waiters now, not at the fold
            self._sample_waiters()

    def fold(self) -> None:
        """Fold every instance's pending successes (readers do, holding :attr:`lock`)."""
        with self.lock:
            for metrics in list(self.instances.values()):
                metrics.fold()

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
        with self.lock:
            metrics.fold()
            metrics.role = role
            if not ok:
                metrics.acquire_failures += 1
            queued = _count_wait(metrics, role, waited)
        if queued:
            self._sample_waiters()

    def reset(self, label: str, elided: bool) -> None:
        metrics = self.instances.get(label) or self.instance(label)
        with self.lock:
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
