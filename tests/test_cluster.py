"""Tests of picopool.cluster against real PostgreSQL servers (skipped when none is installed).

The module-scoped cluster is shared, so tests run in file order and failover comes last.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from picopool.cluster import ClusterError, LocalCluster, LocalNode, find_pg_bin

try:
    find_pg_bin()
except ClusterError as exc:
    pytest.skip(f"PostgreSQL server not available: {exc}", allow_module_level=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster(replicas=2) as cluster:
        cluster.primary.sql("create table items (id int primary key, note text)")
        yield cluster


def wait_until(condition: Callable[[], bool], timeout: float = 10) -> float:
    """Poll until ``condition()`` holds; return the seconds it took."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > timeout:
            pytest.fail(f"condition not met within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - started


def has_item(node: LocalNode, item_id: int) -> bool:
    return node.sql(f"select count(*) from items where id = {item_id}") == "1"


def process_alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # zombies are dead


def test_find_pg_bin(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert (find_pg_bin() / "initdb").exists()
    monkeypatch.setenv("PICOPOOL_PG_BIN", str(tmp_path))
    with pytest.raises(ClusterError, match="PICOPOOL_PG_BIN"):
        find_pg_bin()


def test_roles_and_dsn(cluster: LocalCluster) -> None:
    node0, node1, node2 = cluster.nodes
    assert cluster.primary is node0
    assert cluster.replicas == [node1, node2]
    assert cluster.primary.sql("select pg_is_in_recovery()") == "f"
    assert [r.sql("select pg_is_in_recovery()") for r in cluster.replicas] == ["t", "t"]
    assert len({n.port for n in cluster.nodes}) == 3
    hosts = ",".join(f"127.0.0.1:{n.port}" for n in cluster.nodes)
    assert cluster.dsn == f"postgres://postgres@{hosts}/postgres"
    assert node1.dsn == f"postgres://postgres@127.0.0.1:{node1.port}/postgres"
    streaming = node0.sql(
        "select application_name from pg_stat_replication where state = 'streaming' order by 1"
    )
    assert streaming.split() == ["node1", "node2"]
    for node in cluster.nodes:
        assert node.pid is not None and process_alive(node.pid)
        assert node.sql("show port") == str(node.port)
        assert node.sql("show fsync") == "off"


def test_write_replicates(cluster: LocalCluster) -> None:
    cluster.primary.sql("insert into items values (1, 'replicated')")
    cluster.wait_replayed()
    for replica in cluster.replicas:
        assert replica.sql("select note from items where id = 1") == "replicated"
    with pytest.raises(ClusterError, match="read-only"):
        cluster.replicas[0].sql("insert into items values (99, 'nope')")


def test_kill_and_restart_replica(cluster: LocalCluster) -> None:
    replica = cluster.replicas[1]
    pid = replica.pid
    assert pid is not None
    replica.kill()
    assert not process_alive(pid)
    assert replica.pid is None and not replica.is_running()
    replica.kill()  # already dead: no-op
    with pytest.raises(ClusterError):
        replica.sql("select 1")

    cluster.primary.sql("insert into items values (2, 'written while down')")
    replica.start()
    assert replica.pid not in (None, pid)
    cluster.wait_streaming()
    wait_until(lambda: has_item(replica, 2))


def test_apply_delay(cluster: LocalCluster) -> None:
    delayed, prompt = cluster.replicas
    delayed.set_apply_delay("2s")
    assert delayed.sql("show recovery_min_apply_delay") == "2s"
    try:
        cluster.primary.sql("insert into items values (3, 'delayed')")
        wait_until(lambda: has_item(prompt, 3))
        assert not has_item(delayed, 3)
        assert wait_until(lambda: has_item(delayed, 3)) > 0.5
    finally:
        delayed.set_apply_delay(None)
    assert delayed.sql("show recovery_min_apply_delay") == "0"


def test_failover(cluster: LocalCluster) -> None:
    old_primary = cluster.primary
    old_pid = old_primary.pid
    assert old_pid is not None
    node1, node2 = cluster.replicas

    new_primary = cluster.failover()

    assert new_primary is node1 is cluster.primary
    assert cluster.replicas == [node2]
    assert cluster.failed == [old_primary]
    assert not old_primary.is_running() and not process_alive(old_pid)
    assert new_primary.sql("select pg_is_in_recovery()") == "f"
    assert node2.sql("select sender_port from pg_stat_wal_receiver") == str(node1.port)
    # Rows from before survive; rows written on the new primary reach the follower.
    assert has_item(new_primary, 3)
    new_primary.sql("insert into items values (4, 'after failover')")
    wait_until(lambda: has_item(node2, 4))


def test_synchronous_add_replica_and_stop() -> None:
    cluster = LocalCluster(replicas=1, synchronous=True, settings={"work_mem": "8MB"})
    with cluster:
        primary = cluster.primary
        assert primary.sql("show synchronous_commit") == "on"
        assert primary.sql("show work_mem") == "8MB"
        assert primary.sql("select sync_state from pg_stat_replication") == "quorum"

        added = cluster.add_replica()
        assert added.name == "node2" and cluster.replicas[-1] is added
        assert primary.sql("show synchronous_standby_names") == "ANY 1 (node1, node2)"
        states = primary.sql("select application_name, sync_state from pg_stat_replication")
        assert sorted(states.split()) == ["node1|quorum", "node2|quorum"]

        base_dir = cluster.base_dir
        pids = [node.pid for node in cluster.nodes]
    assert base_dir is not None and not base_dir.exists()
    assert all(pid is not None and not process_alive(pid) for pid in pids)
    cluster.stop()  # idempotent


def test_apply_delay_option_and_stop_after_crash() -> None:
    cluster = LocalCluster(replicas=1, apply_delay="150ms").start()
    try:
        assert cluster.replicas[0].sql("show recovery_min_apply_delay") == "150ms"
        cluster.primary.kill()  # dead nodes must not trouble stop()
    finally:
        pids = [node.pid for node in cluster.nodes]
        base_dir = cluster.base_dir
        cluster.stop()
    assert base_dir is not None and not base_dir.exists()
    assert pids[0] is None and pids[1] is not None and not process_alive(pids[1])
    assert base_dir.name.startswith("picopool-cluster-")
