"""Property tests of the balance strategies (pure: no servers)."""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from picopool import Address, Instance, Role
from picopool.strategies import (
    BalanceStrategy,
    Candidate,
    LeastConnections,
    Random,
    RoundRobin,
    Weighted,
)


def candidate(index: int, *, weight: float = 1.0, in_use: int = 0) -> Candidate:
    instance = Instance(id=f"i{index}", address=Address(f"10.0.0.{index + 1}", 5432),
                        role=Role.REPLICA, weight=weight)
    return Candidate(instance=instance, in_use=in_use, max_size=10)


def candidates(n: int) -> list[Candidate]:
    return [candidate(i) for i in range(n)]


def pick_counts(strategy: BalanceStrategy, pool: Sequence[Candidate], picks: int) -> Counter[str]:
    return Counter(strategy.pick(pool).instance.id for _ in range(picks))


ALL_STRATEGIES: list[Callable[[], BalanceStrategy]] = [
    RoundRobin, lambda: Random(seed=7), Weighted, LeastConnections]


@pytest.mark.parametrize("make", ALL_STRATEGIES)
def test_builtins_satisfy_the_protocol(make: Callable[[], BalanceStrategy]) -> None:
    assert isinstance(make(), BalanceStrategy)


# -- RoundRobin --------------------------------------------------------------------


@given(st.integers(min_value=1, max_value=8), st.integers(min_value=1, max_value=20),
       st.lists(st.integers(min_value=1, max_value=8), max_size=10))
def test_round_robin_is_fair(n: int, k: int, warm_up: list[int]) -> None:
    strategy = RoundRobin()
    for size in warm_up:  # earlier calls on other lists do not skew a full cycle
        strategy.pick(candidates(size))
    pool = candidates(n)
    counts = pick_counts(strategy, pool, k * n)
    assert counts == {c.instance.id: k for c in pool}


@given(st.integers(min_value=1, max_value=8), st.integers(min_value=0, max_value=50))
def test_round_robin_counts_differ_by_at_most_one(n: int, picks: int) -> None:
    pool = candidates(n)
    counts = pick_counts(RoundRobin(), pool, picks)
    values = [counts[c.instance.id] for c in pool]
    assert max(values) - min(values) <= 1


def test_round_robin_order() -> None:
    pool = candidates(3)
    strategy = RoundRobin()
    assert [strategy.pick(pool).instance.id for _ in range(7)] == [
        "i0", "i1", "i2", "i0", "i1", "i2", "i0"]


# -- Random ------------------------------------------------------------------------


@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=2, max_value=6))
def test_random_is_roughly_uniform(seed: int, n: int) -> None:
    pool = candidates(n)
    picks = 1500 * n
    counts = pick_counts(Random(seed=seed), pool, picks)
    expected = picks / n
    chi_square = sum((counts[c.instance.id] - expected) ** 2 / expected for c in pool)
    # df <= 5: P(chi^2 > 40) < 1e-6, so this never flakes yet catches real bias.
    assert chi_square < 40, counts
    assert all(abs(counts[c.instance.id] - expected) < 0.1 * expected for c in pool), counts


@given(st.integers(min_value=0, max_value=2**32), st.integers(min_value=2, max_value=6))
def test_random_does_not_repeat_systematically(seed: int, n: int) -> None:
    pool = candidates(n)
    strategy = Random(seed=seed)
    sequence = [strategy.pick(pool).instance.id for _ in range(3000)]
    repeats = sum(a == b for a, b in itertools.pairwise(sequence)) / (len(sequence) - 1)
    # Independent picks repeat the previous one with probability 1/n.
    assert abs(repeats - 1 / n) < 0.06, repeats


def test_random_is_reproducible_with_a_seed() -> None:
    pool = candidates(5)
    a, b = Random(seed=42), Random(seed=42)
    assert [a.pick(pool) for _ in range(50)] == [b.pick(pool) for _ in range(50)]


# -- Weighted ----------------------------------------------------------------------


@given(st.lists(st.integers(min_value=1, max_value=6), min_size=1, max_size=6),
       st.integers(min_value=1, max_value=3))
def test_weighted_is_exact_over_full_cycles(weights: list[int], cycles: int) -> None:
    pool = [candidate(i, weight=w) for i, w in enumerate(weights)]
    strategy = Weighted()
    for _ in range(cycles):
        counts = pick_counts(strategy, pool, sum(weights))
        assert counts == {c.instance.id: int(c.instance.weight) for c in pool}


@given(st.lists(st.floats(min_value=0.1, max_value=5.0), min_size=1, max_size=5))
def test_weighted_honours_fractional_weights(weights: list[float]) -> None:
    pool = [candidate(i, weight=w) for i, w in enumerate(weights)]
    picks = 2000
    counts = pick_counts(Weighted(), pool, picks)
    total = sum(weights)
    for c in pool:
        share = counts[c.instance.id] / picks
        assert abs(share - c.instance.weight / total) < 0.01 + len(pool) / picks, counts


def test_weighted_interleaves_smoothly() -> None:
    pool = [candidate(0, weight=5), candidate(1, weight=1), candidate(2, weight=1)]
    strategy = Weighted()
    assert [strategy.pick(pool).instance.id for _ in range(7)] == [
        "i0", "i0", "i1", "i0", "i2", "i0", "i0"]


@given(st.lists(st.sampled_from([0.0, -1.0, 1.0, 2.0]), min_size=1, max_size=6))
def test_weighted_skips_non_positive_weights(weights: list[float]) -> None:
    pool = [candidate(i, weight=w) for i, w in enumerate(weights)]
    counts = pick_counts(Weighted(), pool, 60)
    if any(w > 0 for w in weights):
        assert all(counts[c.instance.id] == 0 for c in pool if c.instance.weight <= 0)
    else:  # all non-positive: uniform
        assert set(counts) == {c.instance.id for c in pool}


# -- LeastConnections --------------------------------------------------------------


@given(st.lists(st.integers(min_value=0, max_value=5), min_size=1, max_size=8))
def test_least_connections_picks_the_least_loaded(loads: list[int]) -> None:
    pool = [candidate(i, in_use=load) for i, load in enumerate(loads)]
    strategy = LeastConnections()
    lowest = min(loads)
    tied = {c.instance.id for c in pool if c.in_use == lowest}
    picked = [strategy.pick(pool).instance.id for _ in range(len(tied))]
    assert set(picked) == tied  # every tie gets its turn, and only ties are picked


@given(st.lists(st.tuples(st.integers(min_value=0, max_value=6),
                          st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0])), min_size=1, max_size=8))
def test_least_connections_weighs_load(specs: list[tuple[int, float]]) -> None:
    pool = [candidate(i, in_use=load, weight=w) for i, (load, w) in enumerate(specs)]

    def load(c: Candidate) -> float:
        return c.in_use / (c.instance.weight if c.instance.weight > 0 else 1.0)

    picked = LeastConnections().pick(pool)
    assert load(picked) == min(load(c) for c in pool)


# -- changing candidate lists ------------------------------------------------------

UNIVERSE = [candidate(i, weight=float(1 + i % 3), in_use=i % 4) for i in range(8)]


@pytest.mark.parametrize("make", ALL_STRATEGIES)
@given(lists=st.lists(st.permutations(UNIVERSE).flatmap(
    lambda order: st.integers(min_value=1, max_value=len(order)).map(lambda n: order[:n])),
    min_size=1, max_size=30))
def test_changing_candidate_lists_never_fail(make: Callable[[], BalanceStrategy],
                                             lists: list[list[Candidate]]) -> None:
    strategy = make()
    for current in lists:
        for _ in range(3):
            picked = strategy.pick(current)
            assert any(picked is c for c in current)


def test_shrinking_list_after_many_picks() -> None:
    strategies: list[BalanceStrategy] = [RoundRobin(), Random(seed=1), Weighted(),
                                         LeastConnections()]
    rng = random.Random(5)
    for strategy in strategies:
        for size in [8, 7, 3, 1, 5, 2, 8]:
            pool = rng.sample(UNIVERSE, size)
            for _ in range(11):
                assert strategy.pick(pool) in pool


# -- user-defined strategies -------------------------------------------------------


class PickLast:
    """Duck-typed: no inheritance, just a pick() method."""

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        return candidates[-1]


def test_user_strategy_satisfies_the_protocol() -> None:
    assert isinstance(PickLast(), BalanceStrategy)
    assert not isinstance(object(), BalanceStrategy)
    pool = candidates(3)
    assert PickLast().pick(pool) is pool[-1]
