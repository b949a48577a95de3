"""Throughput of ``pool.fetchval('SELECT $1::int')``: picopool versus bare asyncpg.

    python bench/overhead.py [--seconds 2] [--rounds 3]

Starts one local PostgreSQL instance, then measures side by side, in one run,
at concurrency 1, 8 and 32:

* ``asyncpg``             bare ``asyncpg.create_pool``
* ``picopool``            picopool with asyncpg's reset on every release (``elide_reset=False``):
                          the routing layer's own overhead (target ratio >= 0.97)
* ``picopool+elide``      picopool's default, skipping the reset round trip where
                          the statement provably leaves no session state (target >= 1.6x)

Rounds interleave the three so that machine noise hits them alike. Each
round gives a ratio to the asyncpg run next to it; the figure printed is the
median of those paired ratios (and the median q/s).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

import picopool
from picopool.cluster import LocalCluster
from picopool.discovery import Static

QUERY = "SELECT $1::int"


async def throughput(fetchval: Callable[..., Awaitable[Any]], concurrency: int,
                     seconds: float) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await fetchval(QUERY, 1)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done / (time.perf_counter() - started)


async def run(seconds: float, rounds: int) -> None:
    cluster = LocalCluster(replicas=0)
    await asyncio.to_thread(cluster.start)
    try:
        dsn = cluster.primary.dsn
        for concurrency in (1, 8, 32):
            size = concurrency
            bare = await asyncpg.create_pool(dsn, min_size=size, max_size=size)
            plain = await picopool.create_pool(
                dsn, discovery=Static(), min_size=size, max_size=size, elide_reset=False)
            elide = await picopool.create_pool(
                dsn, discovery=Static(), min_size=size, max_size=size)
            contenders = {"asyncpg": bare, "picopool": plain, "picopool+elide": elide}
            results: dict[str, list[float]] = {name: [] for name in contenders}
            for pool in contenders.values():  # warm up
                await throughput(pool.fetchval, concurrency, 0.3)
            names = list(contenders)
            for round_number in range(rounds):
                shift = round_number % len(names)  # rotate who goes first
                for name in names[shift:] + names[:shift]:
                    qps = await throughput(contenders[name].fetchval, concurrency, seconds)
                    results[name].append(qps)
            for pool in contenders.values():
                await pool.close()
            base = results["asyncpg"]
            line = " | ".join(
                f"{name} {statistics.median(qps):8.0f} q/s "
                f"({statistics.median(q / b for q, b in zip(qps, base, strict=True)):.3f}x)"
                for name, qps in results.items()
            )
            print(f"concurrency {concurrency:>2}: {line}", flush=True)
    finally:
        await asyncio.to_thread(cluster.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.rounds))


if __name__ == "__main__":
    main()
