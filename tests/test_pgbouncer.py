"""picopool through a real pgbouncer beside every instance (transaction pooling).

Discovery, the service connection and the liveness watch talk to the servers;
``address_map=`` sends the sub-pools' connections to the bouncer beside each
one. Debian 12 ships pgbouncer 1.18, which predates protocol-level prepared
statements in transaction mode (1.21's ``max_prepared_statements``), so asyncpg
runs with ``statement_cache_size=0`` (unnamed statements, parsed per call).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import ClusterFactory, PoolFactory

import picopool
from picopool import Address
from picopool.cluster import LocalCluster, LocalNode

pytestmark = pytest.mark.integration

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class PgBouncer:
    """One pgbouncer in transaction mode in front of one server."""

    def __init__(self, node: LocalNode, password: str, *, pool_size: int = 2) -> None:
        self.node = node
        self.port = free_port()
        self.password = password
        self.directory = Path(tempfile.mkdtemp(prefix="picopool-pgbouncer-"))
        config = self.directory / "pgbouncer.ini"
        config.write_text(f"""[databases]
* = host={node.host} port={node.port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.directory}/userlist.txt
admin_users = postgres
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 200
server_login_retry = 1
server_connect_timeout = 2
query_wait_timeout = 10
logfile = {self.directory}/pgbouncer.log
pidfile = {self.directory}/pgbouncer.pid
""")
        (self.directory / "userlist.txt").write_text(f'"postgres" "{password}"\n')
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> PgBouncer:
        command = [PGBOUNCER, str(self.directory / "pgbouncer.ini")]
        if os.geteuid() == 0:  # pgbouncer refuses to run as root
            shutil.chown(self.directory, "postgres")
            for path in self.directory.iterdir():
                shutil.chown(path, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"pgbouncer did not start: {self.log()}")

    def log(self) -> str:
        path = self.directory / "pgbouncer.log"
        return path.read_text() if path.exists() else ""

    def show(self, what: str) -> list[dict[str, str]]:
        """``SHOW <what>`` on the admin console (simple protocol only: psql)."""
        output = subprocess.run(
            ["psql", "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d",
             "pgbouncer", "-A", "-F", "\t", "-P", "footer=off", "-c", f"SHOW {what}"],
            env={**os.environ, "PGPASSWORD": self.password}, check=True,
            capture_output=True, text=True, timeout=10).stdout.splitlines()
        header = output[0].split("\t")
        return [dict(zip(header, line.split("\t"), strict=True)) for line in output[1:]]

    def queries(self) -> int:
        """Queries pgbouncer has forwarded to the server so far."""
        return sum(int(row["total_query_count"]) for row in self.show("STATS")
                   if row["database"] == "postgres")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)


@pytest.fixture(scope="module")
def bounced(cluster_factory: ClusterFactory) -> Iterator[tuple[LocalCluster, dict[int, PgBouncer]]]:
    """A primary and two synchronous streaming replicas, each with its own pgbouncer
    (two, so that the promoted replica still has a synchronous standby)."""
    if not os.path.exists(PGBOUNCER):
        pytest.skip("pgbouncer is not installed (bash .ci/install-servers.sh)")
    cluster = cluster_factory(replicas=2, synchronous=True)
    bouncers = {node.port: PgBouncer(node, cluster.password).start() for node in cluster.nodes}
    try:
        yield cluster, bouncers
    finally:
        for bouncer in bouncers.values():
            bouncer.stop()


def mapping(bouncers: dict[int, PgBouncer]) -> dict[str, tuple[str, int]]:
    return {f"127.0.0.1:{port}": ("127.0.0.1", b.port) for port, b in bouncers.items()}


async def test_address_map_accepts_a_mapping_or_a_callable() -> None:
    from picopool._address_map import address_mapper
    table = address_mapper({"10.0.0.1:5432": "10.0.0.1:6432", Address("h", 1): ("b", 2)})
    assert table is not None
    assert table(Address("10.0.0.1", 5432)) == ("10.0.0.1", 6432)
    assert table(Address("h", 1)) == ("b", 2)
    assert table(Address("10.0.0.2", 5432)) == ("10.0.0.2", 5432)  # unmapped: itself
    offset = address_mapper(lambda a: (a.host, a.port + 1000))
    assert offset is not None and offset(Address("x", 5432)) == ("x", 6432)
    assert address_mapper(None) is None
    with pytest.raises(picopool.ConfigurationError):
        address_mapper(42)  # type: ignore[arg-type]


async def test_statements_go_through_the_bouncers(
        bounced: tuple[LocalCluster, dict[int, PgBouncer]], make_pool: PoolFactory) -> None:
    cluster, bouncers = bounced
    pool = await make_pool(cluster.dsn, address_map=mapping(bouncers),
                           statement_cache_size=0, min_size=4, max_size=4)
    await pool.execute("CREATE TABLE IF NOT EXISTS bounced (id int, note text)")
    await pool.fetchval("SELECT 1")
    before = {port: b.queries() for port, b in bouncers.items()}
    for i in range(20):
        await pool.execute("INSERT INTO bounced VALUES ($1, $2)", i, f"n{i}")
        assert await pool.fetchval("SELECT $1::int + 1", i) == i + 1
    after = {port: b.queries() for port, b in bouncers.items()}
    primary = cluster.primary.port
    # Writes through the primary's bouncer, reads through the replicas'; and no
    # reset query after them (elided), so one query per statement.
    assert after[primary] - before[primary] == 20, (before, after)
    assert sum(after[r.port] - before[r.port] for r in cluster.replicas) == 20
    # The servers see pgbouncer's connections only (at most its pool_size each).
    rows = await pool.fetch("SELECT count(*) FROM pg_stat_activity WHERE usename = 'postgres'"
                            " AND backend_type = 'client backend' AND application_name = ''")
    assert rows


async def test_unnamed_statements_survive_server_connection_switches(
        bounced: tuple[LocalCluster, dict[int, PgBouncer]], make_pool: PoolFactory) -> None:
    # 16 client connections share pgbouncer's 2 server connections per node, so
    # consecutive statements of one client land on different server connections.
    cluster, bouncers = bounced
    pool = await make_pool(cluster.dsn, address_map=mapping(bouncers),
                           statement_cache_size=0, min_size=8, max_size=8)

    async def reader(n: int) -> None:
        for i in range(25):
            assert await pool.fetchval(f"SELECT $1::int * {n % 5 + 1}", i) == i * (n % 5 + 1)
            row = await pool.fetchrow("SELECT $1::text AS a, $2::int AS b", str(i), n)
            assert row is not None and (row["a"], row["b"]) == (str(i), n)

    await asyncio.gather(*(reader(n) for n in range(16)))
    async with pool.transaction() as connection:  # one server connection for the whole of it
        await connection.execute("CREATE TEMP TABLE t_tx (x int) ON COMMIT DROP")
        await connection.execute("INSERT INTO t_tx SELECT generate_series(1, 3)")
        assert await connection.fetchval("SELECT count(*) FROM t_tx") == 3


async def test_acquired_connections_are_reset_and_pool_statements_are_not(
        bounced: tuple[LocalCluster, dict[int, PgBouncer]], make_pool: PoolFactory) -> None:
    cluster, bouncers = bounced
    pool = await make_pool(cluster.dsn, address_map=mapping(bouncers),
                           statement_cache_size=0, min_size=1, max_size=1)
    primary = bouncers[cluster.primary.port]
    await pool.execute("SELECT 1 /* picopool: role=primary */")  # warm: the pool is started
    before = primary.queries()
    async with pool.acquire(role="primary") as connection:
        await connection.fetchval("SELECT 1")
    # The statement, then asyncpg's reset (one simple-protocol query).
    assert primary.queries() - before == 2
    before = primary.queries()
    await pool.fetchval("SELECT 1", role="primary")
    assert primary.queries() - before == 1


async def test_failover_through_the_bouncers(
        bounced: tuple[LocalCluster, dict[int, PgBouncer]], make_pool: PoolFactory) -> None:
    cluster, bouncers = bounced
    pool = await make_pool(cluster.dsn, address_map=mapping(bouncers),
                           statement_cache_size=0, min_size=2, max_size=2)
    await pool.execute("CREATE TABLE IF NOT EXISTS acked (id int)")
    acked: list[int] = []
    errors: list[str] = []
    stop = asyncio.Event()
    resumed = asyncio.Event()
    target = [1 << 30]

    async def writer() -> None:
        i = 0
        while not stop.is_set():
            try:
                await pool.execute("INSERT INTO acked VALUES ($1)", i)
                acked.append(i)
                if len(acked) >= target[0]:
                    resumed.set()
            except Exception as exc:  # a write lost in flight is the caller's to retry
                errors.append(type(exc).__name__)
                await asyncio.sleep(0.05)
            i += 1

    task = asyncio.create_task(writer())
    await asyncio.sleep(0.5)
    old_port = cluster.primary.port
    new = await asyncio.to_thread(cluster.failover)
    # Writes resume on the new primary, through its bouncer.
    count = len(acked)
    target[0] = count + 20
    try:
        await asyncio.wait_for(resumed.wait(), 30)
    finally:
        stop.set()
        await task
    assert len(acked) >= count + 20, (errors[-5:], bouncers[new.port].log()[-2000:])
    assert pool.topology is not None
    assert pool.topology.primary is not None and pool.topology.primary.address.port == new.port
    assert await pool.fetchval("SELECT inet_server_port()", role="primary") == new.port
    assert bouncers[new.port].queries() > 0 and old_port != new.port
    # Synchronous replication: every acknowledged write is on the new primary.
    stored: Any = await pool.fetch("SELECT id FROM acked", role="primary")
    assert set(acked) <= {row["id"] for row in stored}
