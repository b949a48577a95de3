"""A small task-list CLI on picopool.

    python examples/crud                    # scripted demo on an embedded local cluster
    python examples/crud add "buy milk"     # one command (PICOPOOL_DSN, or an embedded cluster)
    python examples/crud list | update ID TITLE [--done] | remove ID
    PICODATA_CONNECTION_URL=postgres://... python examples/crud picodata

With ``PICOPOOL_DSN`` unset it starts a primary and two streaming replicas on
loopback (``picopool.cluster``) and stops them on exit, so commands other than
the demo start from an empty list. Every statement prints the instance that
served it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator, Sequence
from typing import Any

import asyncpg

import picopool
from picopool.cluster import LocalCluster
from picopool.strategies import RoundRobin

SCHEMA = """CREATE TABLE IF NOT EXISTS tasks (
    id serial PRIMARY KEY,
    title text NOT NULL,
    done boolean NOT NULL DEFAULT false
)"""


@contextlib.asynccontextmanager
async def open_pool(dsn: str | None) -> AsyncIterator[picopool.Pool]:
    cluster: LocalCluster | None = None
    if dsn is None:
        print("PICOPOOL_DSN is not set: starting an embedded cluster (1 primary, 2 replicas)")
        cluster = LocalCluster(replicas=2)
        await asyncio.to_thread(cluster.start)
        dsn = cluster.dsn
    try:
        async with picopool.create_pool(dsn, strategy=RoundRobin(), min_size=1,
                                        max_size=4, read_your_writes=True) as pool:
            print(f"connected: {pool!r}")
            await pool.execute(SCHEMA)
            yield pool
    finally:
        if cluster is not None:
            await asyncio.to_thread(cluster.stop)
            print("embedded cluster stopped")


async def served(pool: picopool.Pool, method: str, query: str, *args: Any) -> Any:
    """Run one statement and print which instance served it."""
    before = {s.id: s.served for s in pool.stats().instances}
    result = await getattr(pool, method)(query, *args)
    for stats in pool.stats().instances:
        if stats.served > before.get(stats.id, 0):
            print(f"  [{stats.role:7} {stats.address}] {query.split()[0]} ...")
    return result


async def add(pool: picopool.Pool, title: str) -> int:
    task_id: int = await served(
        pool, "fetchval", "INSERT INTO tasks (title) VALUES ($1) RETURNING id", title)
    print(f"added task {task_id}: {title}")
    return task_id


async def list_tasks(pool: picopool.Pool) -> None:
    rows = await served(pool, "fetch", "SELECT id, title, done FROM tasks ORDER BY id")
    if not rows:
        print("no tasks")
    for row in rows:
        print(f"  {row['id']:>3} [{'x' if row['done'] else ' '}] {row['title']}")


async def update(pool: picopool.Pool, task_id: int, title: str | None, done: bool) -> None:
    status = await served(
        pool, "execute",
        "UPDATE tasks SET title = coalesce($2, title), done = $3 WHERE id = $1",
        task_id, title, done)
    print(f"updated task {task_id}" if status != "UPDATE 0" else f"no task {task_id}")


async def remove(pool: picopool.Pool, task_id: int) -> None:
    status = await served(pool, "execute", "DELETE FROM tasks WHERE id = $1", task_id)
    print(f"removed task {task_id}" if status != "DELETE 0" else f"no task {task_id}")


async def demo(pool: picopool.Pool) -> None:
    print("\n-- add three tasks (writes go to the primary)")
    ids = [await add(pool, title) for title in ("write docs", "ship 0.1", "celebrate")]
    print("\n-- list them (reads go to replicas that have replayed our writes)")
    await list_tasks(pool)
    await list_tasks(pool)
    print("\n-- finish one, rename one, remove one")
    await update(pool, ids[0], None, True)
    await update(pool, ids[1], "ship 0.1.0", False)
    await remove(pool, ids[2])
    await list_tasks(pool)
    print("\n-- a transaction is pinned to the primary")
    async with pool.transaction() as conn:
        port = await conn.fetchval("SELECT inet_server_port()")
        await conn.execute("UPDATE tasks SET done = true")
        print(f"  [primary 127.0.0.1:{port}] UPDATE in a transaction")
    await list_tasks(pool)
    print("\n" + "\n".join(
        f"{s.role:7} {s.address}: served {s.served}" for s in pool.stats().instances))


async def picodata(url: str) -> None:
    """picodata-go's example flow: discover the cluster, balance, query items."""
    async with picopool.create_pool(url, strategy=RoundRobin()) as pool:
        print(f"connected: {pool!r}")
        await pool.execute("CREATE TABLE IF NOT EXISTS items "
                           "(id INTEGER PRIMARY KEY, name TEXT, stock INTEGER)")
        with contextlib.suppress(asyncpg.UniqueViolationError):
            await pool.execute("INSERT INTO items VALUES ($1, $2, $3)", 1, "apple", 10)
        for row in await pool.fetch("SELECT id, name, stock FROM items"):
            print(f"  {row['id']} {row['name']} {row['stock']}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="crud", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("demo", help="the scripted demo (the default)")
    commands.add_parser("add", help="add a task").add_argument("title")
    commands.add_parser("list", help="list tasks")
    upd = commands.add_parser("update", help="rename a task or mark it done")
    upd.add_argument("id", type=int)
    upd.add_argument("title", nargs="?")
    upd.add_argument("--done", action="store_true")
    commands.add_parser("remove", help="remove a task").add_argument("id", type=int)
    commands.add_parser("picodata", help="the picodata-go example (PICODATA_CONNECTION_URL)")
    return parser.parse_args(argv)


async def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    if args.command == "picodata":
        await picodata(os.environ["PICODATA_CONNECTION_URL"])
        return 0
    async with open_pool(os.environ.get("PICOPOOL_DSN")) as pool:
        if args.command in (None, "demo"):
            await demo(pool)
        elif args.command == "add":
            await add(pool, args.title)
        elif args.command == "list":
            await list_tasks(pool)
        elif args.command == "update":
            await update(pool, args.id, args.title, args.done)
        elif args.command == "remove":
            await remove(pool, args.id)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(sys.argv[1:])))
