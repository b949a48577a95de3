"""LocalCluster's servers require the superuser's password, over TCP, the Unix socket
and replication alike; ``cluster.dsn`` and ``node.dsn`` carry it.

Before, every loopback connection was trusted as superuser, so any local user
could run ``COPY ... TO PROGRAM`` as the server's OS user.
"""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import Iterator

import asyncpg
import pytest

import picopool
from picopool.cluster import ClusterError, LocalCluster, find_pg_bin

pytestmark = pytest.mark.integration

try:
    find_pg_bin()
except ClusterError as exc:
    pytest.skip(f"PostgreSQL server not available: {exc}", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(replicas=2) as cluster:
        yield cluster


def _refused(**connect: object) -> type[BaseException]:
    """The error asyncpg raises when connecting with *connect*; fails if it connects."""

    async def attempt() -> type[BaseException]:
        try:
            connection = await asyncpg.connect(**connect, timeout=10)
        except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError,
                asyncpg.ClientCannotConnectError) as exc:
            return type(exc)
        await connection.close()
        pytest.fail(f"connected without the right password: {connect}")

    return asyncio.run(attempt())


def test_no_password_no_connection(cluster: LocalCluster) -> None:
    for node in cluster.nodes:
        tcp = {"host": node.host, "port": node.port, "user": "postgres", "database": "postgres"}
        assert _refused(**tcp) is asyncpg.InvalidPasswordError
        assert _refused(**tcp, password="wrong") is asyncpg.InvalidPasswordError
        unix = {**tcp, "host": str(cluster.base_dir)}  # the Unix socket's directory
        assert _refused(**unix) is asyncpg.InvalidPasswordError
        assert _refused(**unix, password="wrong") is asyncpg.InvalidPasswordError
        replication = {**tcp, "server_settings": {"replication": "database"}}
        assert _refused(**replication) is asyncpg.InvalidPasswordError


def test_the_dsns_carry_the_password(cluster: LocalCluster) -> None:
    assert len(cluster.password) >= 24
    assert f"postgres:{cluster.password}@" in cluster.dsn
    assert LocalCluster(replicas=0).password != cluster.password  # fresh for each cluster

    async def check() -> None:
        for node in cluster.nodes:
            for dsn in (node.dsn, node.dsn_at(port=node.port), node.dsn_at("localhost")):
                connection = await asyncpg.connect(dsn, timeout=10)
                try:
                    assert await connection.fetchval("select inet_server_port()") in (
                        node.port, None)  # None: localhost may resolve to the socket
                finally:
                    await connection.close()
        async with picopool.create_pool(cluster.dsn, min_size=1, max_size=1) as pool:
            assert await pool.fetchval("select 1") == 1
            assert pool.topology is not None and len(pool.topology.instances) == 3
            assert cluster.password not in repr(pool)

    asyncio.run(check())


def test_the_password_stays_out_of_reach(cluster: LocalCluster) -> None:
    assert cluster.base_dir is not None
    assert not (cluster.base_dir / "initdb.pw").exists()  # initdb's copy is gone
    info = os.stat(cluster.passfile)  # the replicas' copy: the server user's alone
    assert info.st_mode & 0o777 == 0o600
    if os.geteuid() == 0:
        assert info.st_uid == pwd.getpwnam("postgres").pw_uid
    for node in cluster.nodes:
        assert cluster.password not in repr(node)
        assert cluster.password not in (node.data_dir / "postgresql.auto.conf").read_text()
    assert cluster.password not in repr(cluster)


def test_replication_and_failover_authenticate(cluster: LocalCluster) -> None:
    # Every replica streams (so each authenticated with the password) ...
    streaming = "select count(*) from pg_stat_replication where state = 'streaming'"
    assert cluster.primary.sql(streaming) == "2"
    # ... and still does from the promoted replica.
    old = cluster.primary
    new = cluster.failover()
    assert new is not old and cluster.primary is new
    assert new.sql(streaming) == "1"
    (follower,) = [n for n in cluster.replicas if n.is_running()]
    assert follower.sql("select sender_port from pg_stat_wal_receiver") == str(new.port)
    new.sql("create table after_failover (id int)")
    cluster.wait_replayed()
    assert follower.sql("select count(*) from after_failover") == "0"


def test_a_chosen_password() -> None:
    with pytest.raises(ValueError):
        LocalCluster(replicas=0, password="")
    with LocalCluster(replicas=0, password="it's a p@ss:w/rd\\") as cluster:
        assert cluster.password == "it's a p@ss:w/rd\\"
        assert cluster.primary.sql("select 1") == "1"

        async def check() -> None:
            connection = await asyncpg.connect(cluster.dsn, timeout=10)
            await connection.close()
            connection = await asyncpg.connect(
                host=cluster.primary.host, port=cluster.primary.port, user="postgres",
                password="it's a p@ss:w/rd\\", timeout=10)
            await connection.close()

        asyncio.run(check())
