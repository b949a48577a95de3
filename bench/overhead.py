"""Throughput of ``pool.fetchval('SELECT $1::int')``: picopool versus bare asyncpg.

    python bench/overhead.py [--seconds 0.5] [--rounds 30]

Starts one local PostgreSQL instance, then measures side by side, in one run,
at concurrency 1, 8 and 32:

* ``asyncpg``             bare ``asyncpg.create_pool``
* ``asyncpg-noreset``     bare asyncpg with a no-op ``reset=``: the client's own limit,
                          which ``picopool+elide`` is compared with (target >= 0.97)
* ``picopool``            picopool with asyncpg's reset on every release (``elide_reset=False``):
                          the routing layer's own overhead (target ratio >= 0.97)
* ``picopool+elide``      picopool's default, skipping the reset round trip where
                          the statement provably leaves no session state (target >= 1.6x)

Rounds interleave the three in short slices, rotating who goes first, so that
machine noise hits them alike. Each round gives a ratio to the asyncpg slice
next to it; the figure printed is the median of those paired ratios, with
their interquartile range, and the median q/s. The client's CPU time per
query (this process only, so the server's share of the two cores does not
blur it) is printed too: it is the steadier measure of what the routing layer
itself costs.
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
                     seconds: float) -> tuple[float, float]:
    """Queries per second, and client CPU microseconds per query."""
    done = 0
    stop_at = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await fetchval(QUERY, 1)
            done += 1

    started, cpu_started = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    cpu = time.process_time() - cpu_started
    return done / (time.perf_counter() - started), cpu / max(done, 1) * 1e6


async def run(seconds: float, rounds: int) -> None:
    cluster = LocalCluster(replicas=0)
    await asyncio.to_thread(cluster.start)
    try:
        dsn = cluster.primary.dsn
        for concurrency in (1, 8, 32):
            size = concurrency
            bare = await asyncpg.create_pool(dsn, min_size=size, max_size=size)
            noreset = await asyncpg.create_pool(dsn, min_size=size, max_size=size,
                                                reset=_no_reset)
            plain = await picopool.create_pool(
                dsn, discovery=Static(), min_size=size, max_size=size, elide_reset=False)
            elide = await picopool.create_pool(
                dsn, discovery=Static(), min_size=size, max_size=size)
            contenders = {"asyncpg": bare, "asyncpg-noreset": noreset, "picopool": plain,
                          "picopool+elide": elide}
            results: dict[str, list[float]] = {name: [] for name in contenders}
            cpu: dict[str, list[float]] = {name: [] for name in contenders}
            for pool in contenders.values():  # warm up
                await throughput(pool.fetchval, concurrency, 0.3)
            names = list(contenders)
            for round_number in range(rounds):
                shift = round_number % len(names)  # rotate who goes first
                for name in names[shift:] + names[:shift]:
                    rate, cpu_us = await throughput(contenders[name].fetchval, concurrency,
                                                    seconds)
                    results[name].append(rate)
                    cpu[name].append(cpu_us)
            for pool in contenders.values():
                await pool.close()
            print(f"concurrency {concurrency:>2}:", flush=True)
            for name, qps in results.items():
                # picopool+elide skips the reset: compare it with asyncpg that does too
                base = "asyncpg-noreset" if name == "picopool+elide" else "asyncpg"
                ratios = [q / b for q, b in zip(qps, results[base], strict=True)]
                low, _, high = statistics.quantiles(ratios, n=4)
                cpu_ratios = [c / b for c, b in zip(cpu[name], cpu[base], strict=True)]
                print(f"  {name:<15} {statistics.median(qps):7.0f} q/s  "
                      f"vs {base:<15} {statistics.median(ratios):.3f}x "
                      f"(IQR {low:.3f}-{high:.3f})  "
                      f"client CPU {statistics.median(cpu[name]):5.1f} us/query "
                      f"({statistics.median(cpu_ratios):.3f}x)", flush=True)
    finally:
        await asyncio.to_thread(cluster.stop)


async def _no_reset(connection: Any) -> None:
    """asyncpg's reset callback that sends nothing (it still rolls back and unlistens)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=0.5, help="per slice")
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.rounds))


if __name__ == "__main__":
    main()
