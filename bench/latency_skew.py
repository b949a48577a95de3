"""Reads over two replicas, one of them 5 ms farther away: which balancer copes.

    python bench/latency_skew.py [--seconds 1.0] [--rounds 8] [--concurrency 8]

Starts a primary and two streaming replicas, and a delay proxy (its own
process, ``bench/delayproxy.py``) in front of the second replica that adds
5 ms to every round trip. Each contender reads ``SELECT $1::int`` from both
replicas, *concurrency* callers, ``max_size`` = *concurrency* per replica:

* ``RoundRobin``, ``LeastConnections``, ``LeastLatency``  picopool's strategies
* ``hasql``    hasql 0.10's ``RandomWeightedBalancerPolicy`` (inverse latency of
               its health checks), with a no-op ``reset=`` so that it, like
               picopool's elided reset, makes one round trip per statement
* ``oracle``   picopool with a strategy that always picks the fast replica

then the same without the delay (``equal``), where LeastLatency must do no
worse than RoundRobin. Rounds interleave the contenders (see benchlib).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any
from urllib.parse import quote

from benchlib import Call, Slice, interleave, ratios, spread
from delayproxy import DelayProxy

import picopool
from picopool.cluster import LocalCluster
from picopool.discovery import Static
from picopool.strategies import (
    BalanceStrategy,
    Candidate,
    LeastConnections,
    LeastLatency,
    RoundRobin,
)

QUERY = "SELECT $1::int"
DELAY = 0.005


class Oracle:
    """Knows which replica is fast: always picks it."""

    def __init__(self, port: int) -> None:
        self._port = port

    def pick(self, candidates: Sequence[Candidate]) -> Candidate:
        for candidate in candidates:
            if candidate.instance.address.port == self._port:
                return candidate
        return candidates[0]


def hosts_dsn(password: str, ports: Sequence[int]) -> str:
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    return f"postgres://postgres:{quote(password, safe='')}@{hosts}/postgres"


@contextlib.asynccontextmanager
async def contenders(password: str, ports: Sequence[int], size: int,
                     with_hasql: bool = True) -> AsyncIterator[dict[str, Call]]:
    """A pool per contender over the replicas at *ports* (the first is the fast one)."""
    dsn = hosts_dsn(password, ports)
    strategies: dict[str, BalanceStrategy] = {
        "RoundRobin": RoundRobin(), "LeastConnections": LeastConnections(),
        "LeastLatency": LeastLatency(), "oracle": Oracle(ports[0])}
    pools: list[Any] = []
    calls: dict[str, Call] = {}
    try:
        for name, strategy in strategies.items():
            pool = await picopool.create_pool(dsn, discovery=Static(), strategy=strategy,
                                              min_size=size, max_size=size)
            pools.append(pool)
            calls[name] = _fetch(pool)
        if with_hasql:
            manager = await _hasql(dsn, size)
            if manager is not None:
                pools.append(manager)
                calls["hasql"] = _hasql_fetch(manager)
        yield calls
    finally:
        for pool in pools:
            await pool.close()


def _fetch(pool: picopool.Pool) -> Call:
    async def call() -> object:
        return await pool.fetchval(QUERY, 1)
    return call


async def _no_reset(connection: Any) -> None:
    """A reset that sends nothing (asyncpg still rolls back what is open)."""


async def _hasql(dsn: str, size: int) -> Any:
    try:
        from hasql.balancer_policy import RandomWeightedBalancerPolicy
        from hasql.driver.asyncpg import PoolManager
    except ImportError:
        print("  (hasql is not installed: pip install hasql==0.10.0)")
        return None
    manager: Any = PoolManager(  # type: ignore[no-untyped-call]
        dsn,
        balancer_policy=RandomWeightedBalancerPolicy, refresh_delay=0.5, acquire_timeout=10,
        pool_factory_kwargs={"min_size": size, "max_size": size, "reset": _no_reset})
    await manager.ready(masters_count=0, replicas_count=2, timeout=30)
    return manager


def _hasql_fetch(manager: Any) -> Call:
    async def call() -> object:
        async with manager.acquire_replica(fallback_master=False) as connection:
            return await connection.fetchval(QUERY, 1)
    return call


def report(title: str, results: dict[str, list[Slice]], base: str) -> list[dict[str, Any]]:
    """Print one table; the rows, for BENCHMARKS.md."""
    print(title, flush=True)
    rows = []
    for name, slices in results.items():
        rate = spread([s.rate for s in slices])
        p50 = spread([s.p50 for s in slices])
        p99 = spread([s.p99 for s in slices])
        p99_vs = ratios([s.p99 for s in slices], [s.p99 for s in results[base]])
        rate_vs = ratios([s.rate for s in slices], [s.rate for s in results[base]])
        print(f"  {name:<17} {rate.fmt(1, 0):>22} q/s  p50 {p50.fmt(1e3)} ms  "
              f"p99 {p99.fmt(1e3)} ms  vs {base}: p99 {p99_vs.fmt()}x  "
              f"q/s {rate_vs.fmt()}x", flush=True)
        rows.append({"name": name, "rate": rate, "p50": p50, "p99": p99,
                     "p99_vs": p99_vs, "rate_vs": rate_vs})
    return rows


async def measure(cluster: LocalCluster, *, seconds: float, rounds: int, concurrency: int,
                  with_hasql: bool = True) -> dict[str, list[dict[str, Any]]]:
    fast, slow = cluster.replicas[:2]
    tables: dict[str, list[dict[str, Any]]] = {}
    with DelayProxy(slow.host, slow.port, DELAY) as proxy:
        async with contenders(cluster.password, [fast.port, proxy.port], concurrency,
                              with_hasql) as calls:
            results = await interleave(calls, concurrency=concurrency, seconds=seconds,
                                       rounds=rounds)
        tables["skewed"] = report(
            f"one replica +{DELAY * 1e3:.0f} ms, {concurrency} callers "
            f"(median (IQR) over {rounds} rounds):", results, "oracle")
    async with contenders(cluster.password, [fast.port, slow.port], concurrency,
                          with_hasql) as calls:
        calls.pop("oracle")
        results = await interleave(calls, concurrency=concurrency, seconds=seconds,
                                   rounds=rounds)
    tables["equal"] = report(f"equal replicas, {concurrency} callers:", results, "RoundRobin")
    return tables


async def main_async(seconds: float, rounds: int, concurrency: int) -> None:
    cluster = LocalCluster(replicas=2)
    await asyncio.to_thread(cluster.start)
    try:
        await measure(cluster, seconds=seconds, rounds=rounds, concurrency=concurrency)
    finally:
        await asyncio.to_thread(cluster.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="per slice")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main_async(args.seconds, args.rounds, args.concurrency))


if __name__ == "__main__":
    main()
