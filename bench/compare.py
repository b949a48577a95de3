"""picopool next to asyncpg, hasql, pgbouncer and pgpool-II, in one process, interleaved.

    python bench/compare.py [--seconds 1.0] [--rounds 8] [--output BENCHMARKS.md]
    python bench/compare.py --smoke      # ~12 s end to end, writes to a temp dir

Starts everything it needs: a primary and two streaming replicas
(``LocalCluster``), a pgbouncer (transaction mode) in front of the primary, a
pgpool-II (streaming mode, statement-level load balancing) over the three, a
delay proxy for the latency-skew scenario. Three workloads:

1. **point reads** ``SELECT $1::int`` at 8 and 32 callers, ``max_size`` = callers
   per instance: asyncpg (with and without its reset query), picopool on 1 and
   on 3 instances, hasql 0.10 over the 3 (replica reads), asyncpg through
   pgbouncer (``statement_cache_size=0``: pgbouncer 1.18) and through pgpool-II;
2. **I/O-bound read capacity** (``bench/read_capacity.py``);
3. **latency skew** (``bench/latency_skew.py``).

Every figure is a median over interleaved rounds with its interquartile range;
ratios are per-round ratios against a baseline measured in the same round.
Writes a Markdown report and PNG charts (matplotlib) next to it. The machine's
load average is recorded before and after: other work on the same cores
widens the IQRs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import platform
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import benchlib
import latency_skew
import read_capacity
from benchlib import Call, Slice, Spread, interleave, ratios, spread
from poolers import PgBouncer, PgPool

import picopool
from picopool.cluster import LocalCluster
from picopool.discovery import Static, Streaming

QUERY = "SELECT $1::int"


async def _no_reset(connection: Any) -> None:
    """asyncpg's reset callback that sends nothing."""


@contextlib.asynccontextmanager
async def point_contenders(cluster: LocalCluster, bouncer: PgBouncer | None,
                           pgpool: PgPool | None, size: int) -> AsyncIterator[dict[str, Call]]:
    primary = cluster.primary
    password = cluster.password
    calls: dict[str, Call] = {}
    closers: list[Any] = []

    def add(name: str, pool: Any) -> None:
        closers.append(pool)

        async def call() -> object:
            return await pool.fetchval(QUERY, 1)
        calls[name] = call

    try:
        add("asyncpg", await asyncpg.create_pool(primary.dsn, min_size=size, max_size=size))
        add("asyncpg, no-op reset", await asyncpg.create_pool(
            primary.dsn, min_size=size, max_size=size, reset=_no_reset))
        add("picopool, 1 instance", await picopool.create_pool(
            primary.dsn, discovery=Static(), min_size=size, max_size=size))
        add("picopool, 3 instances", await picopool.create_pool(
            cluster.dsn, discovery=Streaming(), min_size=size, max_size=size))
        manager = await _hasql(cluster, size)
        if manager is not None:
            closers.append(manager)

            async def hasql_call() -> object:
                async with manager.acquire_replica(fallback_master=True) as connection:
                    return await connection.fetchval(QUERY, 1)
            calls["hasql, 3 instances"] = hasql_call
        for name, daemon, extra in (("asyncpg via pgbouncer", bouncer,
                                     {"statement_cache_size": 0}),
                                    ("asyncpg via pgpool-II", pgpool, {})):
            if daemon is None:
                continue
            try:
                add(name, await asyncpg.create_pool(
                    host="127.0.0.1", port=daemon.port, user="postgres", password=password,
                    database="postgres", min_size=size, max_size=size, **extra))
            except (OSError, asyncpg.PostgresError) as exc:  # reported, not fatal
                print(f"  ({name} could not start: {exc!r})", flush=True)
        yield calls
    finally:
        for pool in closers:
            await pool.close()


async def _hasql(cluster: LocalCluster, size: int) -> Any:
    try:
        from hasql.driver.asyncpg import PoolManager
    except ImportError:
        print("  (hasql is not installed: pip install hasql==0.10.0)")
        return None
    dsn = latency_skew.hosts_dsn(cluster.password, [n.port for n in cluster.nodes])
    manager: Any = PoolManager(  # type: ignore[no-untyped-call]
        dsn, refresh_delay=0.5, acquire_timeout=10,
        pool_factory_kwargs={"min_size": size, "max_size": size})
    await manager.ready(masters_count=1, replicas_count=2, timeout=30)
    return manager


def point_report(concurrency: int, results: dict[str, list[Slice]]) -> list[dict[str, Any]]:
    print(f"point reads, {concurrency} callers (median (IQR)):", flush=True)
    rows = []
    for name, slices in results.items():
        rate = spread([s.rate for s in slices])
        base = "asyncpg, no-op reset" if name.startswith("picopool") else "asyncpg"
        versus = ratios([s.rate for s in slices], [s.rate for s in results[base]])
        p99 = spread([s.p99 for s in slices])
        cpu = spread([s.cpu_us for s in slices])
        print(f"  {name:<24} {rate.fmt(1, 0):>24} q/s  vs {base}: {versus.fmt(1, 3)}x  "
              f"p99 {p99.fmt(1e3)} ms  client CPU {cpu.fmt(1, 0)} us/query", flush=True)
        rows.append({"name": name, "rate": rate, "base": base, "versus": versus, "p99": p99,
                     "cpu": cpu})
    return rows


# -- the report ----------------------------------------------------------------------


def _chart(path: Path, title: str, rows: list[dict[str, Any]], key: str, label: str,
           scale: float = 1.0) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    spreads: list[Spread] = [r[key] for r in rows]
    medians = [s.median * scale for s in spreads]
    errors = [[(s.median - s.q1) * scale for s in spreads],
              [(s.q3 - s.median) * scale for s in spreads]]
    figure, axes = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.2))
    colours = ["#d62728" if n.startswith(("picopool", "prefer_replicas"))
               or n == "LeastLatency" else "#7f7f7f" for n in names]
    axes.barh(names, medians, xerr=errors, color=colours, capsize=3)
    axes.invert_yaxis()
    axes.set_xlabel(label)
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)


def write_report(output: Path, sections: dict[str, Any], meta: dict[str, str]) -> None:
    # In the repository, next to the documentation that shows them (docs/benchmarks.md).
    charts = output.parent / "docs" / "charts" if output.name == "BENCHMARKS.md" \
        else output.parent / "charts"
    charts.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(charts, output.parent)
    lines = ["# Benchmarks", "",
             "Generated by `python bench/compare.py` (the whole run is one process; every "
             "contender is measured in interleaved rounds, the order rotated each round). "
             "Figures are medians over rounds, with the interquartile range in brackets; a "
             "ratio is the median of per-round ratios against the baseline measured in the "
             "same round.", "",
             f"Machine: {meta['machine']}. Rounds: {meta['rounds']} x {meta['seconds']} s "
             f"slices. Load average (1 min) before / after: {meta['load']} — on a 2-core "
             "machine shared with other work, absolute figures move a lot between runs; "
             "the interleaved ratios much less.", ""]
    for concurrency, rows in sections["point"].items():
        image = f"point-{concurrency}.png"
        _chart(charts / image, f"SELECT $1::int, {concurrency} callers", rows, "rate",
               "queries per second (median, IQR)")
        lines += [f"## Point reads, {concurrency} callers", "",
                  f"![point reads, {concurrency} callers]({relative}/{image})", "",
                  "| contender | q/s | vs | ratio | p99 ms | client CPU µs/query |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['name']} | {r['rate'].fmt(1, 0)} | {r['base']} | "
                  f"{r['versus'].fmt(1, 3)} | {r['p99'].fmt(1e3)} | {r['cpu'].fmt(1, 0)} |"
                  for r in rows]
        lines.append("")
    rows = sections["capacity"]
    _chart(charts / "read-capacity.png", "pg_sleep(0.01) reads, 24 callers, max 4 per instance",
           rows, "reads", "reads per second (median, IQR)")
    lines += ["## I/O-bound read capacity", "",
              "`SELECT pg_sleep(0.01)` from 24 callers, `max_size=4` per instance, one writer "
              "inserting every 5 ms alongside.", "",
              f"![read capacity]({relative}/read-capacity.png)", "",
              "| contender | reads/s | vs 1 instance | write p50 ms | write p99 ms |",
              "| --- | --- | --- | --- | --- |"]
    lines += [f"| {r['name']} | {r['reads'].fmt(1, 0)} | {r['scale'].fmt()} | "
              f"{r['write_p50'].fmt(1e3)} | {r['write_p99'].fmt(1e3)} |" for r in rows]
    lines.append("")
    for scenario, title in (("skewed", "one of two replicas 5 ms farther"),
                            ("equal", "two equal replicas")):
        rows = sections["skew"][scenario]
        image = f"latency-{scenario}.png"
        _chart(charts / image, f"SELECT $1::int over {title}: p99", rows, "p99",
               "p99 latency, ms (median, IQR)", 1e3)
        base = "oracle" if scenario == "skewed" else "RoundRobin"
        lines += [f"## Latency-aware balancing: {title}", "",
                  f"![{scenario}]({relative}/{image})", "",
                  f"| strategy | q/s | p50 ms | p99 ms | p99 vs {base} | q/s vs {base} |",
                  "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {r['name']} | {r['rate'].fmt(1, 0)} | {r['p50'].fmt(1e3)} | "
                  f"{r['p99'].fmt(1e3)} | {r['p99_vs'].fmt()} | {r['rate_vs'].fmt()} |"
                  for r in rows]
        lines.append("")
    output.write_text("\n".join(lines))
    print(f"wrote {output} and {charts}/*.png", flush=True)


def _import_pyplot() -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot


def _stop_daemons(*daemons: PgBouncer | PgPool | None) -> None:
    for daemon in daemons:
        if daemon is not None:
            daemon.stop()


async def run(seconds: float, rounds: int, concurrencies: list[int], output: Path) -> None:
    load_before = os.getloadavg()[0]
    # Every contender's pool is open at once: 32 callers x 7 contenders per server.
    cluster = LocalCluster(replicas=2, settings={"max_connections": "500"})
    # matplotlib loads while the servers start (a second of the smoke run).
    charting = asyncio.ensure_future(asyncio.to_thread(_import_pyplot))
    await asyncio.to_thread(cluster.start)
    bouncer: PgBouncer | None = None
    pgpool: PgPool | None = None
    stopping: asyncio.Future[None] | None = None
    try:
        try:
            bouncer = PgBouncer(cluster.primary, cluster.password, pool_size=32).start()
        except (OSError, RuntimeError) as exc:
            print(f"  (no pgbouncer: {exc})")
        try:
            pgpool = PgPool(cluster).start()
        except (OSError, RuntimeError) as exc:
            print(f"  (no pgpool-II: {exc})")
        sections: dict[str, Any] = {"point": {}}
        for concurrency in concurrencies:
            async with point_contenders(cluster, bouncer, pgpool, concurrency) as calls:
                results = await interleave(calls, concurrency=concurrency, seconds=seconds,
                                           rounds=rounds)
            sections["point"][concurrency] = point_report(concurrency, results)
        # Only the point reads use the poolers: they stop (pgpool-II takes about 2 s)
        # while the rest runs.
        stopping = asyncio.ensure_future(asyncio.to_thread(_stop_daemons, bouncer, pgpool))
        sections["capacity"] = await read_capacity.measure(
            cluster, seconds=seconds if benchlib.WARM_UP < 0.2 else max(seconds, 1.0),
            rounds=rounds)
        sections["skew"] = await latency_skew.measure(
            cluster, seconds=seconds, rounds=rounds, concurrency=8)
    finally:
        if stopping is None:
            await asyncio.to_thread(_stop_daemons, bouncer, pgpool)
        else:
            await stopping
        await asyncio.to_thread(cluster.stop)
        await charting
    meta = {"machine": f"{os.cpu_count()} cores, {platform.platform(terse=True)}, "
                       f"Python {platform.python_version()}, asyncpg {asyncpg.__version__}",
            "rounds": str(rounds), "seconds": f"{seconds:g}",
            "load": f"{load_before:.1f} / {os.getloadavg()[0]:.1f}"}
    write_report(output, sections, meta)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=1.0, help="per slice")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--output", type=Path, default=None,
                        help="the report (default: BENCHMARKS.md at the repository's root)")
    parser.add_argument("--smoke", action="store_true",
                        help="a quick run that only proves the bench works (figures are "
                             "meaningless), written to a temp dir unless --output is given")
    args = parser.parse_args()
    concurrencies = [8, 32]
    if args.smoke:
        args.seconds, args.rounds, concurrencies = 0.1, 1, [8]
        benchlib.WARM_UP = 0.05
        if args.output is None:
            args.output = Path(tempfile.mkdtemp(prefix="picopool-bench-")) / "report.md"
    if args.output is None:
        args.output = Path(__file__).resolve().parent.parent / "BENCHMARKS.md"
    started = time.monotonic()
    asyncio.run(run(args.seconds, args.rounds, concurrencies, args.output))
    print(f"done in {time.monotonic() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
