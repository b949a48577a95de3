"""Property tests of the balance strategies (pure: no servers)."""

from __future__ import annotations

import asyncio
import itertools
import random
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from conftest import PoolFactory
from hypothesis import given, settings
from hypothesis import strategies as st

import picopool
from picopool import Address, Instance, Role
from picopool._routing import spill, write_reserve_for
from picopool.cluster import LocalCluster
from picopool.strategies import (
    BalanceStrategy,
    Candidate,
    LeastConnections,
    LeastLatency,
    Random,
    RoundRobin,
    Weighted,
)


class Sample:
    """A LatencySample that tests set by hand."""

    def __init__(self, rtt: float = 0.0, rtt_at: float = 0.0) -> None:
        self.rtt = rtt
        self.rtt_at = rtt_at


def candidate(index: int, *, weight: float = 1.0, in_use: int = 0,
              rtt: float | None = None, rtt_at: float = 0.0) -> Candidate:
    instance = Instance(id=f"i{index}", address=Address(f"10.0.0.{index + 1}", 5432),
                        role=Role.REPLICA, weight=weight)
    latency = None if rtt is None else Sample(rtt, rtt_at)
    return Candidate(instance=instance, in_use=in_use, max_size=10, latency=latency)


def candidates(n: int) -> list[Candidate]:
    return [candidate(i) for i in range(n)]


def pick_counts(strategy: BalanceStrategy, pool: Sequence[Candidate], picks: int) -> Counter[str]:
    return Counter(strategy.pick(pool).instance.id for _ in range(picks))


ALL_STRATEGIES: list[Callable[[], BalanceStrategy]] = [
    RoundRobin, lambda: Random(seed=7), Weighted, LeastConnections, lambda: LeastLatency(seed=3)]


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


# -- LeastLatency ------------------------------------------------------------------

NOW = 100.0
latencies = st.floats(min_value=0.0, max_value=0.05)
loads = st.integers(min_value=0, max_value=12)


def fixed_clock() -> float:
    return NOW


def cost(c: Candidate) -> float:
    return LeastLatency(clock=fixed_clock).cost(c)


@given(st.lists(st.tuples(latencies, loads), min_size=2, max_size=2), st.integers(0, 2**32))
def test_least_latency_between_two_takes_the_cheaper(specs: list[tuple[float, int]],
                                                     seed: int) -> None:
    # With two candidates both are always drawn: the cheaper one wins every time.
    pool = [candidate(i, rtt=rtt, in_use=load, rtt_at=NOW) for i, (rtt, load) in
            enumerate(specs)]
    strategy = LeastLatency(seed=seed, clock=fixed_clock)
    cheapest = min(cost(c) for c in pool)
    for _ in range(20):
        assert cost(strategy.pick(pool)) == cheapest


@given(st.lists(st.tuples(latencies, loads), min_size=2, max_size=8), st.integers(0, 2**32))
def test_least_latency_never_picks_the_single_most_expensive(
        specs: list[tuple[float, int]], seed: int) -> None:
    pool = [candidate(i, rtt=rtt, in_use=load, rtt_at=NOW) for i, (rtt, load) in
            enumerate(specs)]
    costs = [cost(c) for c in pool]
    strategy = LeastLatency(seed=seed, clock=fixed_clock)
    picked = [strategy.pick(pool) for _ in range(50)]
    highest = max(costs)
    if costs.count(highest) == 1:  # power of two choices: the worst always loses its duel
        worst = pool[costs.index(highest)]
        assert all(p is not worst for p in picked)


@settings(max_examples=25)
@given(st.integers(min_value=2, max_value=6), st.integers(0, 2**32))
def test_least_latency_spreads_over_equal_instances(n: int, seed: int) -> None:
    pool = [candidate(i, rtt=0.001, rtt_at=NOW) for i in range(n)]
    picks = 600 * n
    counts = pick_counts(LeastLatency(seed=seed, clock=fixed_clock), pool, picks)
    # Ties go to the first drawn, which is uniform: every instance gets its share.
    assert all(abs(counts[c.instance.id] - picks / n) < 0.2 * picks / n for c in pool), counts


@given(st.floats(min_value=0.0001, max_value=0.002), st.floats(min_value=2.0, max_value=50.0),
       st.integers(min_value=0, max_value=12))
def test_least_latency_prefers_the_fast_until_its_queue_costs_more(
        fast: float, slowdown: float, in_flight: int) -> None:
    slow = fast * slowdown
    pool = [candidate(0, rtt=fast, in_use=in_flight, rtt_at=NOW),
            candidate(1, rtt=slow, in_use=0, rtt_at=NOW)]
    picked = LeastLatency(clock=fixed_clock).pick(pool)
    queued, alone = cost(pool[0]), cost(pool[1])
    if queued != alone:  # a tie goes to whichever was drawn first
        assert picked.instance.id == ("i0" if queued < alone else "i1")


@given(latencies.filter(lambda x: x > 0), loads)
def test_least_latency_tries_an_unmeasured_instance_first(rtt: float, load: int) -> None:
    pool = [candidate(0, rtt=rtt, in_use=0, rtt_at=NOW), candidate(1, rtt=0.0, in_use=load)]
    assert LeastLatency(clock=fixed_clock).pick(pool).instance.id == "i1"


@given(st.floats(min_value=0.0002, max_value=0.001), st.floats(min_value=3.0, max_value=30.0),
       st.floats(min_value=0.5, max_value=5.0))
def test_least_latency_probes_a_stale_slow_instance_again(fast: float, slowdown: float,
                                                          decay: float) -> None:
    # The slow instance's estimate is not refreshed while it gets no traffic; it
    # shrinks with age, so it is tried again after about decay * slowdown seconds.
    now = [NOW]
    slow = Sample(fast * slowdown, NOW)
    pool = [candidate(0, rtt=fast, in_use=0, rtt_at=NOW),
            Candidate(instance=candidate(1).instance, latency=slow)]
    strategy = LeastLatency(decay=decay, clock=lambda: now[0])
    fresh = pool[0].latency
    assert isinstance(fresh, Sample)
    waited = 0.0
    while strategy.pick(pool).instance.id == "i0":
        waited += 0.05
        now[0] = NOW + waited
        fresh.rtt_at = now[0]  # the fast one stays busy and measured
        assert waited < decay * slowdown + 0.1
    assert waited >= min(decay, decay * slowdown) - 0.1


def test_least_latency_rejects_a_non_positive_decay() -> None:
    with pytest.raises(ValueError, match="decay"):
        LeastLatency(decay=0)


def test_least_latency_without_samples_is_least_connections() -> None:
    pool = [candidate(0, in_use=3), candidate(1, in_use=1), candidate(2, in_use=2)]
    strategy = LeastLatency(seed=9)
    assert all(strategy.pick(pool).instance.id != "i0" for _ in range(50))


# -- changing candidate lists ------------------------------------------------------

UNIVERSE = [candidate(i, weight=float(1 + i % 3), in_use=i % 4,
                      rtt=None if i % 3 == 0 else 0.001 * (i % 5), rtt_at=1.0)
            for i in range(8)]


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
                                         LeastConnections(), LeastLatency(seed=1)]
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


# -- read_write_split="prefer_replicas": spill() --------------------------------------


def member_of(index: int, role: Role, in_use: int, max_size: int) -> Candidate:
    instance = Instance(id=f"n{index}", address=Address("10.0.1.1", 5432 + index), role=role)
    return Candidate(instance=instance, in_use=in_use, max_size=max_size)


@given(st.integers(min_value=1, max_value=12), st.integers(min_value=0, max_value=12),
       st.lists(st.integers(min_value=0, max_value=12), max_size=4),
       st.none() | st.integers(min_value=0, max_value=14))
def test_spill_uses_the_primary_only_when_every_replica_is_saturated(
        max_size: int, primary_in_use: int, replica_in_use: list[int],
        write_reserve: int | None) -> None:
    primary_in_use = min(primary_in_use, max_size)
    pool = [member_of(0, Role.PRIMARY, primary_in_use, max_size)] + [
        member_of(i + 1, Role.REPLICA, min(load, max_size), max_size)
        for i, load in enumerate(replica_in_use)]
    chosen = spill(pool, None, write_reserve)
    replicas = pool[1:]
    free = [c for c in replicas if c.in_use < max_size]
    reserve = max(1, max_size // 4) if write_reserve is None else write_reserve
    assert chosen  # never empty
    if not replicas:
        assert chosen == pool  # no replica: the primary, as fallback_to_primary does
    elif free:
        assert chosen == free  # the primary is kept for writes
    elif primary_in_use < max_size - reserve:
        assert chosen == [pool[0]]  # every replica is saturated: spill
    else:
        assert chosen == replicas  # the primary's reserve is for writes: wait for a replica


@given(st.integers(min_value=1, max_value=64))
def test_the_default_write_reserve_is_a_quarter_of_the_primary_and_never_none(
        max_size: int) -> None:
    reserve = write_reserve_for(max_size)
    assert 1 <= reserve <= max_size
    assert reserve == max(1, max_size // 4)


@given(st.integers(min_value=1, max_value=12), st.integers(min_value=0, max_value=12),
       st.integers(min_value=0, max_value=12), st.none() | st.integers(0, 14))
def test_spill_counts_connections_promised_to_waiters_against_the_reserve(
        max_size: int, in_use: int, promised: int, write_reserve: int | None) -> None:
    """The waiter queue promises connections before they are checked out: the
    primary's write reserve holds whether a connection is in use or promised."""
    in_use = min(in_use, max_size)
    promised = min(promised, max_size - in_use)
    primary = member_of(0, Role.PRIMARY, in_use, max_size)
    replica = member_of(1, Role.REPLICA, max_size, max_size)  # saturated
    taken = {primary.instance.id: in_use + promised, replica.instance.id: max_size}
    chosen = spill([primary, replica], lambda c: taken[c.instance.id], write_reserve)
    reserve = max(1, max_size // 4) if write_reserve is None else write_reserve
    assert chosen == ([primary] if in_use + promised < max_size - reserve else [replica])


def test_spill_over_peers_or_unprobed_instances_uses_them_all() -> None:
    pool = [member_of(i, role, 5, 5) for i, role in enumerate([Role.PEER, Role.UNKNOWN])]
    assert spill(pool) == pool


@pytest.mark.integration
async def test_prefer_replicas_spills_reads_to_the_primary_only_under_saturation(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, read_write_split="prefer_replicas", min_size=2,
                           max_size=2, strategy=LeastConnections())
    query = "SELECT pg_is_in_recovery()"
    assert await pool.fetchval(query) is True  # replicas have room: a replica
    held = [await pool.acquire(role="replica") for _ in range(4)]  # both replicas full
    try:
        assert {await c.fetchval("SELECT inet_server_port()") for c in held} == {
            n.port for n in cluster.replicas}
        assert await pool.fetchval(query) is False  # every replica saturated: the primary
        async with pool.acquire(role="primary"):  # the primary's reserve is for writes
            with pytest.raises(TimeoutError):  # so a read waits for a replica
                await asyncio.wait_for(pool.fetchval(query), 0.3)
            await pool.execute("SELECT 1 /* picopool: role=primary */")  # writes still get in
        await pool.release(held.pop())
        assert await pool.fetchval(query) is True  # a replica has room again
    finally:
        for connection in held:
            await pool.release(connection)


@pytest.mark.integration
@pytest.mark.parametrize("write_reserve", [0, 2])
async def test_write_reserve_sets_how_many_primary_connections_spilled_reads_leave(
        cluster: LocalCluster, make_pool: PoolFactory, write_reserve: int) -> None:
    """Replicas saturated: spilled reads take the primary's connections up to
    ``max_size - write_reserve``, and the next read waits for a replica."""
    pool = await make_pool(cluster.dsn, read_write_split="prefer_replicas", min_size=3,
                           max_size=3, write_reserve=write_reserve)
    slow = [asyncio.create_task(pool.fetchval("SELECT pg_sleep(3)")) for _ in range(6)]
    try:
        await asyncio.sleep(0.5)  # both replicas saturated
        spilled = [asyncio.create_task(pool.fetchval(
            "SELECT inet_server_port() FROM pg_sleep(1)")) for _ in range(3)]
        await asyncio.sleep(0.5)
        primary, = [m for m in pool._membership.members.values() if m.instance.role.writable]
        assert primary.in_use() == 3 - write_reserve  # reads on the primary, the rest waits
        with pytest.raises(TimeoutError):  # every connection a read may take is busy
            await asyncio.wait_for(pool.fetchval("SELECT 1"), 0.2)
        if write_reserve:  # writes find their reserve free
            await asyncio.wait_for(pool.execute("SELECT 1 /* picopool: role=primary */"), 0.2)
        # The replicas stay busy: the reads that waited follow on the primary.
        assert set(await asyncio.gather(*spilled)) == {cluster.primary.port}
    finally:
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)


@pytest.mark.parametrize("bad", [-1, 1.5, "1", True])
async def test_write_reserve_must_be_a_count(bad: object) -> None:
    with pytest.raises(picopool.ConfigurationError, match="write_reserve"):
        picopool.create_pool("postgres://u@127.0.0.1:1/db", read_write_split="prefer_replicas",
                             write_reserve=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("split", ["replicas", "include_primary", "off"])
async def test_write_reserve_is_refused_where_reads_never_spill(split: str) -> None:
    with pytest.raises(picopool.ConfigurationError, match="prefer_replicas"):
        picopool.create_pool("postgres://u@127.0.0.1:1/db", read_write_split=split,
                             write_reserve=1)


@pytest.mark.integration
async def test_a_spilling_read_takes_whichever_connection_frees_first(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    """Every connection a read may use is busy: it waits for the first to come
    back, on any instance, not in the queue of the one replica it happened to
    pick (which, here, stays busy for 3 s)."""
    pool = await make_pool(cluster.dsn, read_write_split="prefer_replicas", min_size=2,
                           max_size=2)
    # The primary's reserve is one of its two connections: one read may spill there.
    slow = [asyncio.create_task(pool.fetchval("SELECT pg_sleep(3)")) for _ in range(4)]
    await asyncio.sleep(0.5)  # both replicas saturated
    short = asyncio.create_task(pool.fetchval("SELECT pg_sleep(0.3), inet_server_port()"))
    await asyncio.sleep(0.1)
    loop = asyncio.get_running_loop()
    started = loop.time()
    port = await pool.fetchval("SELECT inet_server_port()")  # waits: all five are taken
    waited = loop.time() - started
    try:
        assert port == cluster.primary.port  # the connection that came back first
        assert waited < 1.5  # not the 2.4 s left on the replicas
        assert await short is None
    finally:
        for task in slow:
            task.cancel()
        await asyncio.gather(*slow, return_exceptions=True)


@pytest.mark.integration
async def test_least_latency_learns_each_replicas_round_trip(
        cluster: LocalCluster, make_pool: PoolFactory) -> None:
    pool = await make_pool(cluster.dsn, strategy=LeastLatency(), min_size=1, max_size=2)
    ports = {await pool.fetchval("SELECT inet_server_port()") for _ in range(40)}
    assert ports <= {n.port for n in cluster.replicas} and ports  # reads stay on replicas
    replicas = [m for m in pool._membership.members.values()
                if m.instance.role is Role.REPLICA]
    # An unmeasured replica costs nothing, so each was tried and measured at once.
    assert replicas and all(m.rtt > 0 and m.rtt_at > 0 for m in replicas)
    primary = [m for m in pool._membership.members.values() if m.instance.role.writable]
    await pool.execute("SELECT 1 /* picopool: role=primary */")
    assert all(m.rtt > 0 for m in primary)
