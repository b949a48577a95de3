"""The strategies picopool ships."""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Callable, Sequence

from ._base import Candidate


class RoundRobin:
    """Each candidate in turn. The default.

    The cursor is a plain counter taken modulo the list length, so a list that
    grows or shrinks between calls never fails and stays fair over time.
    """

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        return candidates[next(self._counter) % len(candidates)]

    def __repr__(self) -> str:
        return "RoundRobin()"


class Random:
    """A uniformly random candidate on every call (independent picks)."""

    __slots__ = ("_rng",)

    def __init__(self, seed: int | None = None) -> None:
        self._rng = random.Random(seed)

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        return candidates[self._rng.randrange(len(candidates))]

    def __repr__(self) -> str:
        return "Random()"


class Weighted:
    """Smooth weighted round-robin over ``Instance.weight`` (nginx's algorithm).

    Deterministic and evenly interleaved: weights 5:1:1 give
    ``a a b a c a a`` rather than bursts. Non-positive weights get no work
    unless every candidate has one, in which case picks are uniform.
    """

    __slots__ = ("_current",)

    def __init__(self) -> None:
        self._current: dict[str, float] = {}

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        weighted = [c for c in candidates if c.instance.weight > 0]
        if not weighted:
            weighted = list(candidates)
        weights = [c.instance.weight if c.instance.weight > 0 else 1.0 for c in weighted]
        total = sum(weights)
        best: Candidate | None = None
        best_score = 0.0
        for candidate, weight in zip(weighted, weights, strict=True):
            score = self._current.get(candidate.instance.id, 0.0) + weight
            self._current[candidate.instance.id] = score
            if best is None or score > best_score:
                best, best_score = candidate, score
        assert best is not None
        self._current[best.instance.id] = best_score - total
        if len(self._current) > 4 * len(weighted):  # forget departed instances
            live = {c.instance.id for c in weighted}
            self._current = {k: v for k, v in self._current.items() if k in live}
        return best

    def __repr__(self) -> str:
        return "Weighted()"


class LeastConnections:
    """The candidate with the fewest checked-out connections per unit of weight.

    Ties rotate, so an idle cluster still spreads work.
    """

    __slots__ = ("_counter",)

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        # Each load read once: in_use is read live, and it is the costly part.
        loads = [c.in_use / (c.instance.weight if c.instance.weight > 0 else 1.0)
                 for c in candidates]
        lowest = min(loads)
        tied = [c for c, load in zip(candidates, loads, strict=True) if load == lowest]
        return tied[next(self._counter) % len(tied)]

    def __repr__(self) -> str:
        return "LeastConnections()"


class LeastLatency:
    """Power of two choices over each instance's round-trip time, weighted by load.

    Two distinct candidates are drawn at random; the one with the lower cost
    ``rtt * (1 + in_use / max_size)`` wins (ties go to the first drawn). ``rtt``
    is the instance's moving average of statement round trips
    (:class:`LatencySample`), which already grows when the server is loaded; the
    in-flight requests weigh as the share of the sub-pool they hold, so a fast
    instance takes most of the work until it is about as full as a slower one is
    slow (with ``rtt * (in_use + 1)``, Finagle's weighting, a client whose own
    event loop is busy spilled far more to the slow instance in
    ``bench/latency_skew.py``). An instance not measured yet costs 0, so it is
    tried at once; a candidate with no latency sample at all costs
    ``in_use + 1`` (least connections).

    An estimate that has not been updated for longer than *decay* seconds shrinks
    as ``rtt * decay / age``: an instance that was slow and gets no traffic is
    probed again now and then (after about ``decay * slow / fast`` seconds), so a
    recovery is noticed without sending it a steady share of the work.
    """

    __slots__ = ("_clock", "_decay", "_rng")

    def __init__(self, *, decay: float = 2.0, seed: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if decay <= 0:
            raise ValueError("decay must be positive")
        self._decay = decay
        self._rng = random.Random(seed)
        self._clock = clock

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        count = len(candidates)
        if count == 1:
            return candidates[0]
        rng = self._rng.random
        first = int(rng() * count)
        second = int(rng() * (count - 1))
        if second >= first:
            second += 1
        a, b = candidates[first], candidates[second]
        now = self._clock()
        return a if self._cost(a, now) <= self._cost(b, now) else b

    def cost(self, candidate: Candidate) -> float:
        """The expected wait on *candidate*: its decayed round trip, weighted by load."""
        return self._cost(candidate, self._clock())

    def _cost(self, candidate: Candidate, now: float) -> float:
        sample = candidate.latency
        if sample is None:
            return float(candidate.in_use + 1)  # unmeasured: least connections
        rtt = sample.rtt
        if rtt == 0.0:
            return 0.0  # unmeasured: tried at once
        age = now - sample.rtt_at
        if age > self._decay:
            rtt *= self._decay / age
        return rtt * (1.0 + candidate.in_use / max(candidate.max_size, 1))

    def __repr__(self) -> str:
        return f"LeastLatency(decay={self._decay})"
