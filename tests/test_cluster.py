"""Tests of picopool.cluster against real PostgreSQL servers (skipped when none is installed).

The module-scoped cluster is shared, so tests run in file order and failover comes last.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import picopool.cluster
from picopool.cluster import ClusterError, LocalCluster, LocalNode, find_pg_bin

pytestmark = pytest.mark.integration

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


def shared_memory_ids() -> set[str]:
    lines = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {line.split()[1] for line in lines}


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
    password = cluster.password
    assert cluster.dsn == f"postgres://postgres:{password}@{hosts}/postgres"
    assert node1.dsn == f"postgres://postgres:{password}@127.0.0.1:{node1.port}/postgres"
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
    shmid = (replica.data_dir / "postmaster.pid").read_text().splitlines()[6].split()[1]
    replica.kill()
    assert not process_alive(pid)
    assert shmid not in shared_memory_ids()  # kill() cleans up like a shutdown would
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
        # Walsenders apply the new standby list a moment after the reload.
        query = "select application_name || ':' || sync_state from pg_stat_replication"
        wait_until(lambda: sorted(primary.sql(query).split()) == ["node1:quorum", "node2:quorum"])

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


def test_failed_start_cleans_up() -> None:
    parent = Path(tempfile.mkdtemp())
    parent.chmod(0o755)  # reachable for the postgres user when we are root
    try:
        cluster = LocalCluster(replicas=1, base_dir=parent, settings={"shared_buffers": "bogus"})
        with pytest.raises(ClusterError, match="did not start") as failure:
            cluster.start()
        assert "shared_buffers" in str(failure.value)  # the server log's tail is included
        assert list(parent.iterdir()) == []
    finally:
        parent.rmdir()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands the servers to another user")
def test_unreachable_base_dir_is_reported() -> None:
    with tempfile.TemporaryDirectory() as private:  # mode 0700, owned by root, like /root
        base_dir = Path(private) / "clusters"
        base_dir.mkdir(mode=0o755)
        with pytest.raises(ClusterError, match="cannot enter"):
            LocalCluster(replicas=0, base_dir=base_dir).start()
        assert list(base_dir.iterdir()) == []


def test_watchdog_cleans_up_after_owner_is_killed() -> None:
    owner_script = (
        "import sys\n"
        "from picopool.cluster import LocalCluster\n"
        "cluster = LocalCluster(replicas=1).start()\n"
        "print(cluster.base_dir, *(node.pid for node in cluster.nodes), flush=True)\n"
        "sys.stdin.read()\n"
    )
    repo_root = Path(picopool.cluster.__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo_root)}
    with subprocess.Popen(
        [sys.executable, "-c", owner_script],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    ) as owner:
        assert owner.stdout is not None
        base_dir, *pids = owner.stdout.readline().split()
        owner.kill()  # no atexit, no finalizer: only the watchdog can clean up
    wait_until(lambda: not Path(base_dir).exists(), timeout=20)
    assert len(pids) == 2 and not any(process_alive(int(pid)) for pid in pids)
