"""Property tests (no server): the token bucket against an exact reference model,
the read cache's size accounting, LRU eviction and invalidation against a model,
and the write-target / read-names rule the invalidation relies on."""

from __future__ import annotations

from collections import OrderedDict
from fractions import Fraction
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from picopool._admission import TokenBucket
from picopool._cache_reads import _MISS, ReadCache, _measure, read_tables, write_targets

# -- token bucket -------------------------------------------------------------------


class BucketModel:
    """The token bucket in exact arithmetic: the specification."""

    def __init__(self, rate: int, burst: int) -> None:
        self.rate, self.burst = Fraction(rate), Fraction(burst)
        self.tokens, self.stamp = Fraction(burst), Fraction(0)

    def refill(self, now: Fraction) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: Fraction) -> Fraction:
        self.refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return Fraction(0)
        return (1 - self.tokens) / self.rate

    def borrow(self, now: Fraction) -> Fraction:
        self.refill(now)
        self.tokens -= 1
        return Fraction(0) if self.tokens >= 0 else -self.tokens / self.rate

    def refund(self, now: Fraction) -> None:
        self.refill(now)
        self.tokens = min(self.burst, self.tokens + 1)


_OPS = st.lists(st.tuples(st.sampled_from(["take", "borrow", "refund"]),
                          st.integers(0, 400_000)), max_size=60)


@given(rate=st.integers(1, 1000), burst=st.integers(1, 20), ops=_OPS)
def test_token_bucket_matches_the_reference_model(rate: int, burst: int,
                                                  ops: list[tuple[str, int]]) -> None:
    model = BucketModel(rate, burst)
    bucket = TokenBucket(float(rate), float(burst), 0.0)
    micros = 0
    for op, step in ops:
        micros += step
        exact, now = Fraction(micros, 1_000_000), micros / 1_000_000
        near_edge = abs(min(model.burst, model.tokens + (exact - model.stamp) * model.rate
                            if exact > model.stamp else model.tokens) - 1) < Fraction(1, 10**6)
        if op == "take":
            expected, got = model.take(exact), bucket.take(now)
            if not near_edge:
                assert (expected == 0) == (got == 0.0)
                assert abs(float(expected) - got) < 1e-6
        elif op == "borrow":
            expected, got = model.borrow(exact), bucket.borrow(now)
            assert abs(float(expected) - got) < 1e-6
        else:
            model.refund(exact)
            bucket.refund(now)
        if near_edge:  # resynchronise after a decision rounding may have flipped
            model.tokens = Fraction(bucket.tokens)
        assert abs(float(model.tokens) - bucket.tokens) < 1e-6
        assert bucket.tokens <= burst


@given(rate=st.integers(1, 100), burst=st.integers(1, 10),
       steps=st.lists(st.integers(0, 200_000), min_size=1, max_size=80))
def test_token_bucket_never_grants_more_than_burst_plus_rate_times_window(
        rate: int, burst: int, steps: list[int]) -> None:
    bucket = TokenBucket(float(rate), float(burst), 0.0)
    granted: list[float] = []
    now = 0.0
    for step in steps:
        now += step / 1_000_000
        if bucket.take(now) == 0.0:
            granted.append(now)
    for i, start in enumerate(granted):
        for j in range(i, len(granted)):
            assert j - i + 1 <= burst + rate * (granted[j] - start) + 1e-6


# -- read cache ---------------------------------------------------------------------

_TABLES = ["a", "b", "c"]
_CACHE_OPS = st.lists(st.one_of(
    st.tuples(st.just("put"), st.integers(0, 7), st.integers(0, 300),
              st.frozensets(st.sampled_from(_TABLES), max_size=2), st.booleans()),
    st.tuples(st.just("get"), st.integers(0, 7)),
    st.tuples(st.just("invalidate"), st.none() | st.frozensets(st.sampled_from(_TABLES))),
    st.tuples(st.just("tick"), st.integers(0, 3)),
), max_size=80)


def _size(key: Any, value: Any) -> int:
    return _measure(value)[0] + _measure(key)[0] + 64


@given(max_bytes=st.integers(200, 3000), ops=_CACHE_OPS)
def test_read_cache_accounting_eviction_and_invalidation_match_a_model(
        max_bytes: int, ops: list[tuple[Any, ...]]) -> None:
    cache = ReadCache(ttl=2, max_bytes=max_bytes)
    model: OrderedDict[Any, tuple[Any, float, frozenset[str], int]] = OrderedDict()
    now = 0.0
    evictions = 0
    for op in ops:
        if op[0] == "put":
            _, k, length, tables, stale = op
            key, value = ("q", k), "x" * length
            epoch = cache.epoch - 1 if stale else cache.epoch
            cache.put(key, value, 2.0, epoch, tables, now)
            size = _size(key, value)
            if not stale and size <= max_bytes:
                model.pop(key, None)
                while model and sum(e[3] for e in model.values()) + size > max_bytes:
                    model.popitem(last=False)
                    evictions += 1
                model[key] = (value, now + 2.0, tables, size)
        elif op[0] == "get":
            key = ("q", op[1])
            got = cache.get(key, now)
            entry = model.get(key)
            if entry is not None and entry[1] <= now:
                del model[key]
                entry = None
            if entry is None:
                assert got is _MISS
            else:
                model.move_to_end(key)
                assert got == entry[0]
        elif op[0] == "invalidate":
            tables = op[1]
            cache.invalidate(tables)
            for key in [k for k, e in model.items() if tables is None or e[2] & tables]:
                del model[key]
        else:
            now += op[1]
        # accounting: bytes are the sum of the live entries, never over the bound
        assert cache.bytes == sum(e[3] for e in model.values())
        assert cache.bytes <= max_bytes
        assert len(cache) == len(model) and cache.evictions == evictions
        assert list(cache._entries) == list(model)
        for table, keys in cache._tables.items():
            assert keys and all(table in cache._entries[k].tables for k in keys)


# -- what a write invalidates --------------------------------------------------------

_NAMES = st.sampled_from(["items", "orders", "public.items", '"Items"', "stock"])


@given(target=_NAMES, other=_NAMES)
def test_a_write_names_its_target_and_a_read_of_it_mentions_it(target: str,
                                                               other: str) -> None:
    last = target.rsplit(".", 1)[-1].strip('"').lower()
    for write in (f"INSERT INTO {target} VALUES (1)",
                  f"UPDATE {target} SET x = 1 WHERE id = 2",
                  f"DELETE FROM {target} WHERE id = 1",
                  f"TRUNCATE {other}, {target}",
                  f"WITH d AS (DELETE FROM {target} RETURNING *) SELECT * FROM d"):
        targets = write_targets(write)
        assert targets is not None and last in targets, write
    for read in (f"SELECT * FROM {target}", f"SELECT * FROM {other} JOIN {target} USING (id)",
                 f"SELECT (SELECT count(*) FROM {target})", f"TABLE {target}"):
        names = read_tables(read)
        assert names is not None and last in names, read


def test_writes_with_unknown_targets_invalidate_everything() -> None:
    for write in ("CREATE TABLE t (id int)", "CALL p()", "DO $$ BEGIN END $$",
                  "SELECT my_function()", "INSERT INTO t VALUES (f())",
                  "UPDATE a SET x = 1; DELETE FROM b"):
        assert write_targets(write) is None, write
    assert write_targets("INSERT INTO t VALUES (nextval('s'))") == frozenset({"t"})
