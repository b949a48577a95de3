"""Admission control and the read cache: what they cost and what they buy.

    python bench/admission.py [--rounds 5] [--seconds 2]

1. **Cache hit cost.** ``pool.fetchval`` of a cached read, per call, against the
   same call with the cache off on a stand-in sub-pool (no server round trip on
   either side, as in bench/routing_cost.py); interleaved rounds, median and IQR.
2. **Wait fairness under 4x overload.** A primary and two replicas, one
   connection per instance; 8 callers per connection (4x the connections... of
   reads: 2 replicas x 1 connection, 8 callers) loop on reads of random length
   (``pg_sleep`` of 0-4 ms). Each call's wait for a connection is timed. Without
   ``max_waiting`` every sub-pool keeps its own queue (asyncpg's) and round-robin
   assigns callers to queues blindly; with it, one FIFO queue per role serves
   callers in arrival order across sub-pools. Reported: p50, p99 and max wait, and
   the max/median ratio; interleaved rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from benchlib import StandInSubPool, ratios, spread

import picopool
from picopool.cluster import LocalCluster
from picopool.discovery import Static

QUERY = "SELECT 1"


async def _per_call(pool: picopool.Pool, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await pool.fetchval(QUERY)
    return (time.perf_counter() - started) / calls * 1e6


async def cache_hit_cost(cluster: LocalCluster, rounds: int, calls: int) -> None:
    pools = {}
    for name, cache in (("no cache", None), ("cache hit", picopool.ReadCache(ttl=3600))):
        pool = await picopool.create_pool(
            cluster.primary.dsn, discovery=Static(), min_size=1, max_size=1,
            topology_refresh_interval=None, health_check_interval=None, cache=cache)
        for member in pool._membership.members.values():
            member.pool = StandInSubPool()
        pools[name] = pool
    try:
        figures: dict[str, list[float]] = {name: [] for name in pools}
        for pool in pools.values():
            await _per_call(pool, calls // 10)  # warm up (and fill the cache)
        for number in range(rounds):
            order = list(pools) if number % 2 == 0 else list(reversed(pools))
            for name in order:
                figures[name].append(await _per_call(pools[name], calls))
        for name, values in figures.items():
            print(f"  {name:10}: {spread(values).fmt()} us per pool.fetchval")
        stats = pools["cache hit"].stats().cache
        assert stats is not None
        print(f"  cache hit / no cache (stand-in, no server): "
              f"{ratios(figures['cache hit'], figures['no cache']).fmt()} "
              f"(hits {stats.hits}, misses {stats.misses})")
    finally:
        for pool in pools.values():
            pool.terminate()


async def _overload_slice(pool: picopool.Pool, callers: int, seconds: float) -> list[float]:
    waits: list[float] = []
    stop = time.perf_counter() + seconds
    rng = random.Random(7)

    async def caller() -> None:
        while time.perf_counter() < stop:
            started = time.perf_counter()
            async with pool.acquire(role="replica") as conn:
                waits.append(time.perf_counter() - started)
                await conn.execute(f"SELECT pg_sleep({rng.uniform(0, 0.004):.4f})")

    await asyncio.gather(*(caller() for _ in range(callers)))
    return waits


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


async def fairness(cluster: LocalCluster, rounds: int, seconds: float) -> None:
    pools = {
        "per-sub-pool queues (asyncpg)": await picopool.create_pool(
            cluster.dsn, min_size=1, max_size=1, topology_refresh_interval=None),
        "max_waiting (one FIFO queue)": await picopool.create_pool(
            cluster.dsn, min_size=1, max_size=1, topology_refresh_interval=None,
            max_waiting=10_000),
    }
    callers = 8  # 2 replicas x 1 connection: 4x overload
    try:
        table: dict[str, dict[str, list[float]]] = {
            name: {"p50": [], "p99": [], "max": [], "ratio": [], "calls": []} for name in pools}
        for pool in pools.values():
            await _overload_slice(pool, callers, 0.3)
        for number in range(rounds):
            order = list(pools) if number % 2 == 0 else list(reversed(pools))
            for name in order:
                waits = await _overload_slice(pools[name], callers, seconds)
                median = _quantile(waits, 0.5)
                row = table[name]
                row["p50"].append(median)
                row["p99"].append(_quantile(waits, 0.99))
                row["max"].append(max(waits))
                row["ratio"].append(max(waits) / median if median > 0 else float("nan"))
                row["calls"].append(len(waits))
        print(f"  4x overload of reads: {callers} callers, 2 replicas x 1 connection; "
              f"wait for a connection (ms), median (IQR) over {rounds} rounds")
        for name, row in table.items():
            print(f"  {name:31}: p50 {spread(row['p50']).fmt(1e3)}  "
                  f"p99 {spread(row['p99']).fmt(1e3)}  max {spread(row['max']).fmt(1e3)}  "
                  f"max/median {spread(row['ratio']).fmt(1, 1)}  "
                  f"calls/slice {spread(row['calls']).fmt(1, 0)}")
    finally:
        for pool in pools.values():
            await pool.close()


async def run(rounds: int, seconds: float, calls: int) -> None:
    cluster = LocalCluster(replicas=2)
    await asyncio.to_thread(cluster.start)
    try:
        print("cache hit cost")
        await cache_hit_cost(cluster, rounds, calls)
        print("wait fairness")
        await fairness(cluster, rounds, seconds)
    finally:
        await asyncio.to_thread(cluster.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--calls", type=int, default=50_000)
    args = parser.parse_args()
    asyncio.run(run(args.rounds, args.seconds, args.calls))


if __name__ == "__main__":
    main()
