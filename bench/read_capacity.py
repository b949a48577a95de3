"""I/O-bound read capacity: one instance versus a primary and two replicas.

    python bench/read_capacity.py [--seconds 1.5] [--rounds 6]

Reads are ``SELECT pg_sleep(0.01)`` (10 ms on the server, no CPU), 24 callers,
``max_size=4`` connections per instance, so capacity is bounded by connections,
not by the machine: one instance serves at most 400 reads/s. Alongside the
readers, one writer inserts a row every 5 ms; its latency shows what reads
cost the writes. Contenders, interleaved in rounds (see benchlib):

* ``1 instance``        picopool over the primary alone
* ``replicas``          picopool over the cluster, default split (reads on replicas)
* ``prefer_replicas``   reads spill to the primary while both replicas are saturated,
                        leaving it one connection for writes (the default reserve)
* ``prefer_replicas, write_reserve=0``  the same, but spilled reads may take all four
* ``include_primary``   reads on every instance all the time
* ``hasql``             hasql 0.10, ``master_as_replica_weight=1.0`` (the primary is
                        a replica like the others), greedy balancer
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import benchlib
from benchlib import Spread, ratios, spread

import picopool
from picopool.cluster import LocalCluster
from picopool.discovery import Static, Streaming

READ = "SELECT pg_sleep(0.01)"
WRITE = "INSERT INTO bench_writes (at) VALUES (now())"
SIZE = 4
CALLERS = 24

Op = Callable[[str], Awaitable[object]]


@dataclass(frozen=True, slots=True)
class Round:
    reads: float  # per second
    write_p50: float
    write_p99: float


async def run_slice(read: Op, write: Op, seconds: float) -> Round:
    stop_at = time.perf_counter() + seconds
    done = 0
    writes: list[float] = []

    async def reader() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await read(READ)
            done += 1

    async def writer() -> None:
        while time.perf_counter() < stop_at:
            started = time.perf_counter()
            await write(WRITE)
            writes.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)

    began = time.perf_counter()
    await asyncio.gather(writer(), *(reader() for _ in range(CALLERS)))
    elapsed = time.perf_counter() - began
    writes.sort()
    return Round(done / elapsed, writes[len(writes) // 2],
                 writes[min(len(writes) - 1, int(len(writes) * 0.99))])


def hosts_dsn(password: str, ports: list[int]) -> str:
    hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
    return f"postgres://postgres:{quote(password, safe='')}@{hosts}/postgres"


@contextlib.asynccontextmanager
async def contenders(cluster: LocalCluster,
                     with_hasql: bool = True) -> AsyncIterator[dict[str, tuple[Op, Op]]]:
    options: dict[str, Any] = {"min_size": SIZE, "max_size": SIZE}
    closers: list[Callable[[], Awaitable[None]]] = []
    result: dict[str, tuple[Op, Op]] = {}
    try:
        one = await picopool.create_pool(cluster.primary.dsn, discovery=Static(), **options)
        closers.append(one.close)
        result["1 instance"] = (one.fetchval, one.execute)
        for split in ("replicas", "prefer_replicas", "include_primary"):
            pool = await picopool.create_pool(cluster.dsn, discovery=Streaming(),
                                              read_write_split=split, **options)
            closers.append(pool.close)
            result[split] = (pool.fetchval, pool.execute)
            if split == "prefer_replicas":
                pool = await picopool.create_pool(cluster.dsn, discovery=Streaming(),
                                                  read_write_split=split, write_reserve=0,
                                                  **options)
                closers.append(pool.close)
                result[f"{split}, write_reserve=0"] = (pool.fetchval, pool.execute)
        if with_hasql:
            manager = await _hasql(hosts_dsn(cluster.password, [n.port for n in cluster.nodes]))
            if manager is not None:
                closers.append(manager.close)
                result["hasql"] = _hasql_ops(manager)
        yield result
    finally:
        for close in closers:
            await close()


async def _no_reset(connection: Any) -> None:
    """A reset that sends nothing, as picopool's elided one."""


async def _hasql(dsn: str) -> Any:
    try:
        from hasql.driver.asyncpg import PoolManager
    except ImportError:
        print("  (hasql is not installed: pip install hasql==0.10.0)")
        return None
    manager: Any = PoolManager(  # type: ignore[no-untyped-call]
        dsn, refresh_delay=0.5, acquire_timeout=30, master_as_replica_weight=1.0,
        pool_factory_kwargs={"min_size": SIZE, "max_size": SIZE, "reset": _no_reset})
    await manager.ready(masters_count=1, replicas_count=2, timeout=30)
    return manager


def _hasql_ops(manager: Any) -> tuple[Op, Op]:
    async def read(query: str) -> object:
        async with manager.acquire_replica(master_as_replica_weight=1.0) as connection:
            return await connection.fetchval(query)

    async def write(query: str) -> object:
        async with manager.acquire_master() as connection:
            return await connection.execute(query)
    return read, write


async def measure(cluster: LocalCluster, *, seconds: float, rounds: int,
                  with_hasql: bool = True) -> list[dict[str, Any]]:
    await asyncio.to_thread(cluster.primary.sql,
                            "CREATE TABLE IF NOT EXISTS bench_writes (at timestamptz)")
    await asyncio.to_thread(cluster.wait_replayed)
    async with contenders(cluster, with_hasql) as ops:
        for read, write in ops.values():  # warm up
            await run_slice(read, write, benchlib.WARM_UP)
        names = list(ops)
        results: dict[str, list[Round]] = {name: [] for name in names}
        for number in range(rounds):
            shift = number % len(names)
            for name in names[shift:] + names[:shift]:
                results[name].append(await run_slice(*ops[name], seconds))
    print(f"I/O-bound reads (pg_sleep(0.01)), {CALLERS} callers, max {SIZE} per instance, "
          f"one writer; median (IQR) over {rounds} rounds:", flush=True)
    rows = []
    base = [r.reads for r in results["1 instance"]]
    for name, rounds_ in results.items():
        reads = spread([r.reads for r in rounds_])
        scale: Spread = ratios([r.reads for r in rounds_], base)
        p50 = spread([r.write_p50 for r in rounds_])
        p99 = spread([r.write_p99 for r in rounds_])
        print(f"  {name:<34} {reads.fmt(1, 0):>20} reads/s  vs 1 instance {scale.fmt()}x  "
              f"writes p50 {p50.fmt(1e3)} ms  p99 {p99.fmt(1e3)} ms", flush=True)
        rows.append({"name": name, "reads": reads, "scale": scale, "write_p50": p50,
                     "write_p99": p99})
    return rows


async def main_async(seconds: float, rounds: int) -> None:
    cluster = LocalCluster(replicas=2)
    await asyncio.to_thread(cluster.start)
    try:
        await measure(cluster, seconds=seconds, rounds=rounds)
    finally:
        await asyncio.to_thread(cluster.stop)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.5, help="per slice")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    asyncio.run(main_async(args.seconds, args.rounds))


if __name__ == "__main__":
    main()
