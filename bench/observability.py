"""The cost of instrumentation: ``pool.fetchval('SELECT $1::int')`` at concurrency 8.

    python bench/observability.py [--seconds 0.5] [--rounds 30] [--concurrency 8]

One local PostgreSQL instance, three picopool pools over it, measured side by side in
interleaved rounds (benchlib):

* ``bare``         the pool's own metrics switched off (what stats() reads, fed by the
                   executor directly): the execution path records nothing
* ``default``      picopool's default: the metrics that stats() reads
* ``prometheus``   the default plus ``picopool.prometheus.register()``, its registry
                   rendered (as a scrape would) every second by a thread

Printed: q/s medians, the paired ratios against ``default`` and ``bare`` (median and
IQR), and the client's CPU per query (the steadier measure of picopool's own cost).
"""

from __future__ import annotations

import argparse
import asyncio
import threading

import benchlib
from prometheus_client import CollectorRegistry, generate_latest

import picopool
import picopool.prometheus
from picopool.cluster import LocalCluster
from picopool.discovery import Static

QUERY = "SELECT $1::int"


async def run(seconds: float, rounds: int, concurrency: int) -> None:
    cluster = LocalCluster(replicas=0)
    await asyncio.to_thread(cluster.start)
    stop = threading.Event()
    try:
        dsn = cluster.primary.dsn
        size = concurrency
        pools = {name: await picopool.create_pool(dsn, discovery=Static(), min_size=size,
                                                  max_size=size)
                 for name in ("bare", "default", "prometheus")}
        bare = pools["bare"]
        bare._executor.metrics = None
        bare._membership.events.sink = None
        registry = CollectorRegistry()
        picopool.prometheus.register(pools["prometheus"], registry)
        scrapes = 0

        def scraper() -> None:
            nonlocal scrapes
            while not stop.wait(1.0):
                generate_latest(registry)
                scrapes += 1

        thread = threading.Thread(target=scraper, daemon=True)
        thread.start()
        contenders = {name: (lambda p=pool: p.fetchval(QUERY, 1)) for name, pool in pools.items()}
        results = await benchlib.interleave(contenders, concurrency=concurrency,
                                            seconds=seconds, rounds=rounds)
        stop.set()
        thread.join()
        rates = {name: [s.rate for s in slices] for name, slices in results.items()}
        print(f"concurrency {concurrency}, {rounds} rounds of {seconds:g} s slices, "
              f"{scrapes} scrapes of {len(generate_latest(registry))} bytes")
        for name, slices in results.items():
            cpu = benchlib.spread([s.cpu_us for s in slices])
            print(f"  {name:<11} {benchlib.spread(rates[name]).fmt(1, 0)} q/s   "
                  f"cpu/query {cpu.fmt(1, 1)} us   "
                  f"vs default {benchlib.ratios(rates[name], rates['default']).fmt(1, 3)}   "
                  f"vs bare {benchlib.ratios(rates[name], rates['bare']).fmt(1, 3)}")
        for pool in pools.values():
            await pool.close()
    finally:
        stop.set()
        await asyncio.to_thread(cluster.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=0.5)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(run(args.seconds, args.rounds, args.concurrency))


if __name__ == "__main__":
    main()
