"""The Picodata provider against an emulated Picodata cluster (real PostgreSQL servers).

Each emulated instance is its own PostgreSQL server holding Picodata's
metadata tables (see ``tests/harness/picodata.py``). The cluster is shared by
the module and restored before every test.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from harness.picodata import EmulatedPicodata

import picopool
from picopool import Role, TopologyError
from picopool.cluster import ClusterError, find_pg_bin
from picopool.discovery import Picodata
from picopool.discovery import _picodata as picodata_module
from picopool.strategies import RoundRobin

try:
    find_pg_bin()
except ClusterError as exc:
    pytest.skip(f"PostgreSQL server not available: {exc}", allow_module_level=True)

pytestmark = pytest.mark.integration

POLL = 0.2  # the pools' topology_refresh_interval
FOLLOW_WITHIN = 2.0  # a change shows within a poll or two; slack for a busy 2-core box
PORT_QUERY = "select inet_server_port()"
# asyncpg's default reset; Picodata rejects every part of it.
DEFAULT_RESET_PARTS = ("pg_advisory_unlock_all", "CLOSE ALL", "UNLISTEN", "RESET ALL")


def ipv6_loopback_available() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


HAVE_IPV6 = ipv6_loopback_available()


@pytest.fixture(scope="module")
def cluster_once() -> Iterator[EmulatedPicodata]:
    with EmulatedPicodata(3, ipv6=HAVE_IPV6) as cluster:
        cluster.create_items_table()
        yield cluster


@pytest.fixture
def cluster(cluster_once: EmulatedPicodata) -> EmulatedPicodata:
    cluster_once.restore()
    return cluster_once


@asynccontextmanager
async def open_pool(dsn: str, **options: Any) -> AsyncIterator[picopool.Pool]:
    options.setdefault("topology_refresh_interval", POLL)
    pool = await picopool.create_pool(dsn, min_size=1, max_size=2, **options)
    try:
        yield pool
    finally:
        await pool.close()


async def harness(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a (blocking) harness call off the event loop, so the pool keeps polling."""
    return await asyncio.to_thread(function, *args, **kwargs)


async def eventually(condition: Callable[[], bool], what: str,
                     timeout: float = FOLLOW_WITHIN) -> float:
    """Wait until ``condition()`` holds; return how long it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def topology_ports(pool: picopool.Pool) -> set[int]:
    assert pool.topology is not None
    return {i.address.port for i in pool.topology.instances}


def sub_pool_ports(pool: picopool.Pool) -> list[int]:
    """One entry per sub-pool: a duplicate would show as a repeated port."""
    return [int(s.address.rsplit(":", 1)[1]) for s in pool.stats().instances]


def assert_one_sub_pool_each(pool: picopool.Pool, ports: set[int]) -> None:
    stats = pool.stats().instances
    assert sorted(sub_pool_ports(pool)) == sorted(ports)
    assert len({s.id for s in stats}) == len(stats)


async def ports_served(pool: picopool.Pool, calls: int = 30) -> Counter[int]:
    served: Counter[int] = Counter()
    for _ in range(calls):
        served[await pool.fetchval(PORT_QUERY)] += 1
    return served


def online_ports(cluster: EmulatedPicodata) -> set[int]:
    return {i.port for i in cluster.online()}


def client_sessions(cluster: EmulatedPicodata, name: str) -> int:
    """Sessions on an instance's server other than the one asking."""
    return int(cluster[name].node.sql(
        "select count(*) from pg_stat_activity "
        "where backend_type = 'client backend' and pid <> pg_backend_pid()"
    ))


# -- detection and the initial topology -------------------------------------------------


async def test_auto_detects_picodata_and_lists_online_peers(
    cluster: EmulatedPicodata, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="picopool.discovery")
    first, second, third = cluster.names()
    await harness(cluster.set_state, third, "Offline")
    async with open_pool(cluster.dsn(first)) as pool:
        assert pool.stats().provider == "picodata"
        assert any("auto-detected" in r.getMessage() and "Picodata" in r.getMessage()
                   for r in caplog.records)
        topology = pool.topology
        assert topology is not None and topology.symmetric
        assert topology.provider == "picodata"
        assert {i.name for i in topology.instances} == {first, second}
        for instance in topology.instances:
            emulated = cluster[instance.name or ""]
            assert instance.role is Role.PEER
            assert instance.id == emulated.uuid
            assert str(instance.address) == emulated.address
            assert dict(instance.attributes) == {
                "tier": "default", "replicaset_name": emulated.replicaset_name}
        assert_one_sub_pool_each(pool, {cluster[first].port, cluster[second].port})


async def test_seed_spelled_differently_gives_one_sub_pool(cluster: EmulatedPicodata) -> None:
    # The DSN names the seed "localhost"; Picodata advertises 127.0.0.1. picodata-go
    # opened a second pool for the same server here.
    seed = cluster[cluster.names()[0]]
    async with open_pool(seed.dsn_via("localhost"), discovery=Picodata()) as pool:
        assert pool.topology is not None
        assert pool.topology.service_address == picopool.Address("localhost", seed.port)
        assert_one_sub_pool_each(pool, online_ports(cluster))
        assert set(await ports_served(pool, 9)) == online_ports(cluster)


async def test_auto_detection_picks_streaming_without_the_metadata(
    cluster: EmulatedPicodata, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="picopool.discovery")
    seed = cluster.names()[0]
    with cluster.table_hidden("_pico_peer_address"):
        async with open_pool(cluster.dsn(seed)) as pool:
            assert pool.stats().provider == "streaming"
    assert any("Streaming" in r.getMessage() for r in caplog.records)


async def test_unreachable_seed_fails_detection_with_topology_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(TopologyError, match=f"127.0.0.1:{port}") as raised:
        async with open_pool(f"postgres://postgres:secret@127.0.0.1:{port}/postgres",
                             connect_timeout=1):
            pass
    assert "secret" not in str(raised.value)


async def test_object_state_format_is_understood(cluster: EmulatedPicodata) -> None:
    await harness(cluster.set_state_format, "object")
    await harness(cluster.set_state, cluster.names()[1], "Offline", 7)
    async with open_pool(cluster.dsn(), discovery=Picodata()) as pool:
        assert topology_ports(pool) == online_ports(cluster)
        assert len(topology_ports(pool)) == 2


async def test_tier_filter(cluster: EmulatedPicodata) -> None:
    storage = await harness(cluster.add_instance, tier="storage")
    async with open_pool(cluster.dsn(), discovery=Picodata(tiers=["storage"])) as pool:
        assert topology_ports(pool) == {storage.port}
        assert await pool.fetchval(PORT_QUERY) == storage.port
    with pytest.raises(TopologyError, match=r"no Online instance.*storage"):
        async with open_pool(cluster.dsn(), discovery=Picodata(tiers=["nowhere"])):
            pass


# -- balancing --------------------------------------------------------------------------


async def test_round_robin_spreads_evenly_over_online_instances(
    cluster: EmulatedPicodata,
) -> None:
    await harness(cluster.set_state, cluster.names()[2], "Expelled")
    expected = online_ports(cluster)
    async with open_pool(cluster.dsn(), strategy=RoundRobin()) as pool:
        served = await ports_served(pool, 120)
    assert set(served) == expected
    assert max(served.values()) - min(served.values()) <= 2, served


# -- following changes ------------------------------------------------------------------


async def test_follows_membership_changes(
    cluster: EmulatedPicodata, caplog: pytest.LogCaptureFixture
) -> None:
    first, second, third = cluster.names()
    async with open_pool(cluster.dsn(first), strategy=RoundRobin()) as pool:

        async def expect(ports: set[int], what: str) -> None:
            await eventually(lambda: topology_ports(pool) == ports, f"{what}: topology")
            await eventually(lambda: sorted(sub_pool_ports(pool)) == sorted(ports),
                             f"{what}: sub-pools")
            assert_one_sub_pool_each(pool, ports)
            assert set(await ports_served(pool, 4 * len(ports))) == ports, what

        everyone = online_ports(cluster)
        await expect(everyone, "start")

        # Offline: no more work, and its sub-pool is closed (no leaked connections).
        await harness(cluster.set_state, second, "Offline")
        await expect(everyone - {cluster[second].port}, "offline")
        await eventually(lambda: client_sessions(cluster, second) == 0,
                         "the offline instance's connections closed")

        await harness(cluster.set_state, second, "Online")
        await expect(everyone, "back online")

        joined = await harness(cluster.add_instance)
        await expect(everyone | {joined.port}, "joined")

        await harness(cluster.expel, joined.name)
        await expect(everyone, "expelled")

        # The same server under another spelling: one sub-pool, replaced.
        old_id = next(i.id for i in pool.topology.instances if i.name == third)  # type: ignore[union-attr]
        await harness(cluster.change_address, third, f"localhost:{cluster[third].port}")
        await eventually(lambda: any(str(i.address).startswith("localhost:")
                                     for i in pool.topology.instances),  # type: ignore[union-attr]
                         "address change")
        await expect(everyone, "renamed")
        assert next(i.id for i in pool.topology.instances if i.name == third) == old_id  # type: ignore[union-attr]

        # Restarted on another port.
        await harness(cluster.move, third)
        moved = cluster[third].port
        await expect({cluster[first].port, cluster[second].port, moved}, "moved")

        # A wildcard address maps to the service connection's host, warned once.
        caplog.clear()
        await harness(cluster.change_address, third, f"0.0.0.0:{moved}")
        await eventually(lambda: str(next(i.address for i in pool.topology.instances  # type: ignore[union-attr]
                                          if i.name == third)) == f"127.0.0.1:{moved}",
                         "wildcard mapped")
        await asyncio.sleep(4 * POLL)
        wildcard_warnings = [r for r in caplog.records if "wildcard" in r.getMessage()]
        assert len(wildcard_warnings) == 1, wildcard_warnings
        assert wildcard_warnings[0].levelno == logging.WARNING

        if HAVE_IPV6:
            await harness(cluster.change_address, third, f"[::1]:{moved}")
            await eventually(lambda: f"[::1]:{moved}" in {str(i.address) for i in
                                                          pool.topology.instances},  # type: ignore[union-attr]
                             "IPv6 address")
            await expect({cluster[first].port, cluster[second].port, moved}, "ipv6")
            addresses = {str(await pool.fetchval("select inet_server_addr()"))
                         for _ in range(6)}
            assert "::1" in addresses


# -- service connection fail-over --------------------------------------------------------


async def test_service_connection_moves_when_its_instance_dies(
    cluster: EmulatedPicodata,
) -> None:
    async with open_pool(cluster.dsn(), strategy=RoundRobin()) as pool:
        assert pool.topology is not None and pool.topology.service_address is not None
        service = cluster.at_port(pool.topology.service_address.port)
        survivors = online_ports(cluster) - {service.port}

        # A crash Picodata has not noticed yet: the metadata still says Online.
        await harness(cluster.kill, service.name)
        await pool.refresh_topology()
        assert pool.topology is not None
        moved_to = pool.topology.service_address
        assert moved_to is not None and moved_to.port in survivors
        assert set(await ports_served(pool, 12)) == survivors  # the dead one is skipped

        # Picodata notices: the survivors' metadata says Offline.
        await harness(cluster.set_state, service.name, "Offline")
        topology = await pool.refresh_topology()
        assert topology_ports(pool) == survivors
        assert topology.service_address is not None
        assert topology.service_address.port in survivors
        assert set(await ports_served(pool, 12)) == survivors
        assert_one_sub_pool_each(pool, survivors)


# -- bad metadata -----------------------------------------------------------------------


async def test_garbage_rows_are_skipped_with_one_warning_each(
    cluster: EmulatedPicodata, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="picopool.discovery")
    garbage = {
        "bad_json": ("127.0.0.1:1", '["Online", 5'),
        "unknown_variant": ("127.0.0.1:2", '["Sleepy", 5]'),
        "bad_address": ("not an address", '["Online", 5]'),
        "no_port": ("127.0.0.1", '["Online", 5]'),
    }
    for name, (address, state) in garbage.items():
        await harness(cluster.register, name, address=address, state=state)
    # Not Online, so its odd address does not matter: no warning.
    await harness(cluster.register, "gone", address="???", state='["Expelled", 2]')

    async with open_pool(cluster.dsn(), discovery=Picodata()) as pool:
        assert topology_ports(pool) == online_ports(cluster)
        assert_one_sub_pool_each(pool, online_ports(cluster))
        await asyncio.sleep(5 * POLL)  # several polls: still one warning per row
        version = pool.stats().topology_version
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    for name in garbage:
        assert len([m for m in messages if name in m]) == 1, (name, messages)
    assert not [m for m in messages if "gone" in m]
    assert version == 1  # garbage never churned the topology


async def test_missing_table_keeps_the_last_good_topology(cluster: EmulatedPicodata) -> None:
    async with open_pool(cluster.dsn(), discovery=Picodata()) as pool:
        before = pool.topology
        with cluster.table_hidden("_pico_instance"):
            with pytest.raises(TopologyError, match="metadata table missing"):
                await pool.refresh_topology()
            assert pool.topology is before
            assert pool.stats().last_refresh_error is not None
            assert set(await ports_served(pool, 9)) == online_ports(cluster)
            await asyncio.sleep(3 * POLL)  # the poller fails too, and keeps going
            assert pool.topology is before
        await pool.refresh_topology()
        assert pool.stats().last_refresh_error is None


async def test_missing_table_at_start_is_a_topology_error(cluster: EmulatedPicodata) -> None:
    with cluster.table_hidden("_pico_peer_address"), \
            pytest.raises(TopologyError, match="metadata table missing"):
        async with open_pool(cluster.dsn(), discovery=Picodata()):
            pass


async def test_old_version_falls_back_to_picodata_go_query(
    cluster: EmulatedPicodata, caplog: pytest.LogCaptureFixture
) -> None:
    # An older Picodata without the tier column: the full query fails, picodata-go's works.
    caplog.set_level(logging.WARNING, logger="picopool.discovery")
    await harness(cluster.run_everywhere,
                  "ALTER TABLE _pico_instance RENAME COLUMN tier TO tier_unknown")
    try:
        async with open_pool(cluster.dsn(), discovery=Picodata()) as pool:
            assert pool.topology is not None
            assert topology_ports(pool) == online_ports(cluster)
            for instance in pool.topology.instances:
                assert instance.id == str(instance.address) and instance.role is Role.PEER
            await asyncio.sleep(3 * POLL)
            assert pool.stats().topology_version == 1
        fallbacks = [r for r in caplog.records if "picodata-go's query" in r.getMessage()]
        assert len(fallbacks) == 1
        with pytest.raises(TopologyError, match="does not report tiers"):
            async with open_pool(cluster.dsn(), discovery=Picodata(tiers=["default"])):
                pass
    finally:
        await harness(cluster.run_everywhere,
                      "ALTER TABLE _pico_instance RENAME COLUMN tier_unknown TO tier")


# -- the reset on release ---------------------------------------------------------------


async def test_release_sends_nothing_picodata_would_reject(
    cluster: EmulatedPicodata, monkeypatch: pytest.MonkeyPatch
) -> None:
    resets = 0
    real_reset = picodata_module.reset_session

    async def counting_reset(connection: Any) -> None:
        nonlocal resets
        resets += 1
        await real_reset(connection)

    monkeypatch.setattr(picodata_module, "reset_session", counting_reset)
    log_sizes = {name: len(cluster.server_log(name)) for name in cluster.names()}
    async with open_pool(cluster.dsn()) as pool:
        await pool.execute("SET application_name = 'x'")
        for _ in range(6):
            async with pool.acquire() as connection:
                assert await connection.fetchval("select count(*) from items") == 2
        rows = await pool.fetch("select name from items order by id")
        assert [r["name"] for r in rows] == ["apple", "pear"]
    assert resets >= 6
    new_log = "".join(cluster.server_log(name)[size:] for name, size in log_sizes.items())
    assert "select count(*) from items" in new_log  # the statements are logged ...
    for part in DEFAULT_RESET_PARTS:  # ... and asyncpg's default reset is not among them
        assert part not in new_log, part
