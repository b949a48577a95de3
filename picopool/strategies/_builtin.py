"""The strategies picopool ships."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

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
        def load(candidate: Candidate) -> float:
            weight = candidate.instance.weight if candidate.instance.weight > 0 else 1.0
            return candidate.in_use / weight

        lowest = min(load(c) for c in candidates)
        tied = [c for c in candidates if load(c) == lowest]
        return tied[next(self._counter) % len(tied)]

    def __repr__(self) -> str:
        return "LeastConnections()"
