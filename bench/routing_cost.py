"""picopool's own CPU cost per pool-level statement, with the server taken out.

    python bench/routing_cost.py [--calls 200000] [--rounds 5]

Starts one local PostgreSQL instance and a picopool pool over it, then swaps
the instance's asyncpg sub-pool for a stand-in whose acquire, fetchval and
release return at once. ``pool.fetchval`` then costs only picopool's own work
(the route decision, picking the instance, the retry frame); the same three
calls made directly on the stand-in are subtracted. Compare the result with
the client CPU per query that ``bench/overhead.py`` prints for bare asyncpg.
Each figure is the best of --rounds rounds.

The stand-in is checked out through its ``acquire``, so these figures leave out
what picopool saves by taking a free connection without asyncpg's acquire and
release coroutines (``Member.take``, ``Member.give_back``). The last line
measures that part on its own: a checkout and release with nothing run, on
the real sub-pool, through asyncpg's pool and through picopool's member.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

from benchlib import StandInSubPool

import picopool
from picopool.cluster import LocalCluster
from picopool.discovery import Static

QUERY = "SELECT $1::int"


async def per_call(calls: int, step: Any) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await step()
    return (time.perf_counter() - started) / calls * 1e6


async def run(calls: int, rounds: int) -> None:
    cluster = LocalCluster(replicas=0)
    await asyncio.to_thread(cluster.start)
    try:
        for elide in (False, True):
            await measure(cluster, calls, rounds, elide)
        await checkout_cycle(cluster, calls, rounds)
    finally:
        await asyncio.to_thread(cluster.stop)


async def measure(cluster: LocalCluster, calls: int, rounds: int, elide: bool) -> None:
    """With the reset (made by picopool, elide=False) or without (elide=True): the
    direct calls then make the same reset call, or none, as asyncpg's release would."""
    pool = await picopool.create_pool(
        cluster.primary.dsn, discovery=Static(), min_size=1, max_size=1,
        elide_reset=elide, topology_refresh_interval=None, health_check_interval=None)
    stand_in = StandInSubPool()
    members = list(pool._membership.members.values())
    real = [m.pool for m in members]
    for member in members:
        member.pool = stand_in

    async def through_picopool() -> None:
        await pool.fetchval(QUERY, 1)

    async def direct() -> None:
        connection = await stand_in.acquire()
        await connection._con.fetchval(QUERY, 1)
        if not elide:
            await connection._con.reset()
        await stand_in.release(connection)

    try:
        ours = min([await per_call(calls, through_picopool) for _ in range(rounds)])
        bare = min([await per_call(calls, direct) for _ in range(rounds)])
    finally:
        for member, sub_pool in zip(members, real, strict=True):
            member.pool = sub_pool
        await pool.close()
    print(f"{'reset elided' if elide else 'with reset  '}: pool.fetchval through "
          f"picopool: {ours:.2f} us; the same calls made directly: {bare:.2f} us; "
          f"picopool's own cost: {ours - bare:.2f} us per statement")


async def checkout_cycle(cluster: LocalCluster, calls: int, rounds: int) -> None:
    """A connection checked out and given back, nothing run on it: asyncpg's
    ``acquire``/``release`` against picopool's ``take``/``give_back``."""
    pool = await picopool.create_pool(
        cluster.primary.dsn, discovery=Static(), min_size=1, max_size=1,
        topology_refresh_interval=None, health_check_interval=None)
    [member] = pool._membership.members.values()
    sub_pool = member.pool

    async def asyncpg_cycle() -> None:
        await sub_pool.release(await sub_pool.acquire())

    async def picopool_cycle() -> None:
        connection = member.take()
        rest = member.give_back(connection)
        if rest is not None:
            await rest

    try:
        theirs = min([await per_call(calls, asyncpg_cycle) for _ in range(rounds)])
        ours = min([await per_call(calls, picopool_cycle) for _ in range(rounds)])
    finally:
        await pool.close()
    print(f"checkout and release, nothing run: asyncpg's pool {theirs:.2f} us; "
          f"picopool's member {ours:.2f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(run(args.calls, args.rounds))


if __name__ == "__main__":
    main()
