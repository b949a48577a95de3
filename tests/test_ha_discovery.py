"""Patroni and pg_auto_failover discovery against real clusters (see tests/harness/).

The clusters are session-scoped (``harness.fixtures``) and shared with other
HA tests, so every test here leaves them healthy: the ``*_healthy`` fixtures
restart whatever a previous test killed before handing a cluster over.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest
from harness.autofailover import AutoFailoverCluster
from harness.fixtures import NoConnections
from harness.patroni import PatroniCluster

import picopool
from picopool import Instance, Role
from picopool.discovery import AutoFailover, DiscoveryProvider, Patroni

pytestmark = [pytest.mark.integration, pytest.mark.ha]

APPLICATION = "picopool-ha-discovery-test"


async def discover(provider: DiscoveryProvider) -> dict[str, Instance]:
    try:
        found = await provider.discover(NoConnections())
    finally:
        await provider.aclose()
    return {instance.id: instance for instance in found.instances}


def roles(instances: dict[str, Instance]) -> dict[str, Role]:
    return {name: instance.role for name, instance in instances.items()}


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.1)


@contextlib.asynccontextmanager
async def checked_pool(cluster: PatroniCluster | AutoFailoverCluster,
                       provider: DiscoveryProvider) -> AsyncIterator[picopool.Pool]:
    """A small pool over *cluster*, closed at the end of the block; then no background
    task may be left here, nor any of its sessions on the servers."""
    pool = await picopool.create_pool(
        cluster.dsn, discovery=provider, min_size=1, max_size=2,
        server_settings={"application_name": APPLICATION},
    )
    try:
        yield pool
    except BaseException:
        pool.terminate()
        raise
    await pool.close()
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leftovers == []
    query = f"select count(*) from pg_stat_activity where application_name = '{APPLICATION}'"

    def no_sessions() -> bool:
        return sum(int(cluster.sql(name, query)) for name in cluster.nodes) == 0

    # A backend exits a moment after its client hangs up.
    await asyncio.to_thread(wait_until, no_sessions, 10)


def primaries(instances: dict[str, Instance]) -> list[str]:
    return [name for name, role in roles(instances).items() if role is Role.PRIMARY]


def check_reported(instances: dict[str, Instance], primary: str | None,
                   ports: dict[str, int]) -> None:
    """Every node (name: port) is reported, *primary* as the only primary; only replicas lag."""
    assert roles(instances) == {
        name: Role.PRIMARY if name == primary else Role.REPLICA for name in ports
    }
    for name, instance in instances.items():
        assert instance.address.port == ports[name]
        assert instance.lag_bytes is None if name == primary else instance.lag_bytes is not None


# -- Patroni ------------------------------------------------------------------------


async def test_patroni_reports_the_leader_as_the_only_primary(
    patroni_healthy: PatroniCluster,
) -> None:
    cluster = patroni_healthy
    leader = cluster.leader_name()
    instances = await discover(Patroni(cluster.rest_urls))
    check_reported(instances, leader, {n.name: n.pg_port for n in cluster.nodes.values()})
    assert all(instance.name == name for name, instance in instances.items())
    sync = [i for i in instances.values() if ("patroni_role", "sync_standby") in i.attributes]
    assert len(sync) == 1  # synchronous_mode


async def test_patroni_endpoints_that_are_down_are_skipped(
    patroni_healthy: PatroniCluster,
) -> None:
    cluster = patroni_healthy
    urls = ["http://127.0.0.1:1", *cluster.rest_urls]
    instances = await discover(Patroni(urls, timeout=1))
    assert sum(i.role is Role.PRIMARY for i in instances.values()) == 1


async def test_patroni_pool_sends_queries_to_the_leader(patroni_healthy: PatroniCluster) -> None:
    cluster = patroni_healthy
    leader = cluster.node(cluster.wait_leader())
    async with checked_pool(cluster, Patroni(cluster.rest_urls)) as pool:
        # Reads go to replicas by default (read_write_split), so name the role.
        assert await pool.fetchval("select inet_server_port()", role="primary") == leader.pg_port
        assert await pool.fetchval("select pg_is_in_recovery()", role="primary") is False
        replica_ports = {n.pg_port for n in cluster.nodes.values()} - {leader.pg_port}
        assert await pool.fetchval("select inet_server_port()", role="replica") in replica_ports


async def test_patroni_switchover_is_reported(patroni_healthy: PatroniCluster) -> None:
    cluster = patroni_healthy
    old = cluster.leader_name()
    new = await asyncio.to_thread(cluster.switchover)  # to the sync standby
    assert new != old
    instances = await discover(Patroni(cluster.rest_urls))
    assert primaries(instances) == [new]
    assert instances[str(old)].role is Role.REPLICA


async def test_patroni_killed_leader_is_replaced(patroni_healthy: PatroniCluster) -> None:
    cluster = patroni_healthy
    old = await asyncio.to_thread(cluster.kill_leader)
    new = await asyncio.to_thread(cluster.wait_leader, 30)
    assert new != old
    instances = await discover(Patroni(cluster.rest_urls))
    # The dead node's member key outlives it by up to ttl, so it may still be listed.
    assert primaries(instances) == [new]
    await asyncio.to_thread(cluster.restart_node, old)
    instances = await discover(Patroni(cluster.rest_urls))
    assert instances[old].role is Role.REPLICA


# -- pg_auto_failover ---------------------------------------------------------------


async def test_autofailover_reports_the_primary_and_secondaries(
    autofailover_healthy: AutoFailoverCluster,
) -> None:
    cluster = autofailover_healthy
    primary = cluster.primary_node().name
    instances = await discover(AutoFailover(cluster.monitor_dsn))
    check_reported(instances, primary, {n.name: n.port for n in cluster.nodes.values()})


async def test_autofailover_pool_sends_queries_to_the_primary(
    autofailover_healthy: AutoFailoverCluster,
) -> None:
    cluster = autofailover_healthy
    primary = cluster.primary_node()
    provider = AutoFailover(cluster.monitor_dsn)
    async with checked_pool(cluster, provider) as pool:
        assert await pool.fetchval("select inet_server_port()", role="primary") == primary.port
        replica_ports = {n.port for n in cluster.nodes.values()} - {primary.port}
        assert await pool.fetchval("select inet_server_port()", role="replica") in replica_ports
        monitor_connection = provider._connection
        assert monitor_connection is not None
    assert provider._connection is None and monitor_connection.is_closed()


async def test_autofailover_cancelled_refresh_leaks_no_connection(
    autofailover_healthy: AutoFailoverCluster,
) -> None:
    provider = AutoFailover(autofailover_healthy.monitor_dsn)
    refresh = asyncio.ensure_future(provider.discover(NoConnections()))
    for _ in range(100_000):  # until connected: then the queries are still on the wire
        if provider._connection is not None or refresh.done():
            break
        await asyncio.sleep(0)
    connection = provider._connection
    refresh.cancel()
    try:
        await refresh
    except asyncio.CancelledError:
        assert provider._connection is None and connection.is_closed()
    await provider.aclose()
    assert provider._connection is None


async def test_autofailover_switchover_is_reported(
    autofailover_healthy: AutoFailoverCluster,
) -> None:
    cluster = autofailover_healthy
    old = cluster.primary_node().name
    new = (await asyncio.to_thread(cluster.switchover)).name
    assert new != old
    instances = await discover(AutoFailover(cluster.monitor_dsn))
    assert primaries(instances) == [new]


async def test_autofailover_killed_primary_is_replaced(
    autofailover_healthy: AutoFailoverCluster,
) -> None:
    cluster = autofailover_healthy
    old = await asyncio.to_thread(cluster.kill_primary)
    new = await asyncio.to_thread(cluster.wait_new_primary, old, 60)
    instances = await discover(AutoFailover(cluster.monitor_dsn))
    assert primaries(instances) == [new.name]
    assert old.name not in instances  # unhealthy and being demoted: not even a replica
    await asyncio.to_thread(cluster.restart_node, old.name)
    instances = await discover(AutoFailover(cluster.monitor_dsn))
    assert instances[old.name].role is Role.REPLICA
