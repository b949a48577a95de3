"""A real Patroni cluster for tests: one etcd and three Patroni nodes on 127.0.0.1.

Follows shared/CLUSTERS.md: etcd 3.4 from Debian, Patroni from a venv built on
/usr/bin/python3 (``.ci/install-servers.sh``), every server run as ``postgres`` on
free loopback ports, data under a fresh temp dir. Synchronous API::

    cluster = PatroniCluster(synchronous_mode=True).start()   # ~10 s
    cluster.leader_name()           # which node won the race
    cluster.switchover()            # planned; returns the new leader's name
    old = cluster.kill_leader()     # kill -9 Patroni + postmaster, drop the leader key
    cluster.wait_leader()           # the new leader is primary, running and writable
    cluster.restart_node(old)       # it rejoins as a replica
    cluster.stop()

Every process is tracked by PID: Patroni by its Popen (own session), each
postmaster through ``postmaster.pid`` checked against ``/proc``, because
Patroni's postmaster is reparented to init. A finalizer stops everything at
interpreter exit if ``stop()`` was never called.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._process import (
    HOST,
    HarnessError,
    HarnessUnavailable,
    SupervisedCluster,
    SupervisedNode,
    http_json,
    kill_server,
    log_tail,
    pg_bin,
    postmaster_pid,
    psql,
    require_executable,
    run,
    server_env,
    spawn,
    wait_for,
    write_owned,
)

__all__ = ["HarnessError", "HarnessUnavailable", "PatroniCluster", "PatroniNode"]

DEFAULT_VENV = Path(os.environ.get("PICOPOOL_PATRONI_VENV", "/opt/picopool-ha/patroni-venv"))
INSTALL_HINT = "run .ci/install-servers.sh (as root) to install etcd and the Patroni venv"
SCOPE = "demo"
NAMESPACE = "/demo/"
REPLICA_ROLES = frozenset({"replica", "sync_standby", "quorum_standby"})


@dataclass
class PatroniNode(SupervisedNode):
    """One Patroni node: its ports, files and (while it runs) its process."""

    rest_port: int
    pg_port: int
    config_file: Path

    @property
    def rest_url(self) -> str:
        return f"http://{HOST}:{self.rest_port}"

    @property
    def dsn(self) -> str:
        return f"postgres://postgres@{HOST}:{self.pg_port}/postgres"


class PatroniCluster(SupervisedCluster[PatroniNode]):
    """etcd plus ``nodes`` Patroni nodes (scope ``demo``, namespace ``/demo/``)."""

    dir_prefix = "picopool-patroni-"

    def __init__(self, *, synchronous_mode: bool = False, nodes: int = 3,
                 venv: Path | str | None = None, base_dir: Path | str | None = None) -> None:
        super().__init__(nodes=nodes, base_dir=base_dir)
        self.synchronous_mode = synchronous_mode
        self.venv = Path(venv) if venv is not None else DEFAULT_VENV
        self.etcd_client_port = 0
        self.etcd_peer_port = 0
        self.etcd: subprocess.Popen[bytes] | None = None
        self._etcd_bin: Path | None = None
        self._patroni_bin: Path | None = None

    # -- addresses -------------------------------------------------------------------

    @property
    def rest_urls(self) -> list[str]:
        return [node.rest_url for node in self.nodes.values()]

    @property
    def dsn(self) -> str:
        """Multi-host DSN over every node's PostgreSQL port."""
        hosts = ",".join(f"{HOST}:{node.pg_port}" for node in self.nodes.values())
        return f"postgres://postgres@{hosts}/postgres"

    @property
    def etcd_url(self) -> str:
        return f"http://{HOST}:{self.etcd_client_port}"

    # -- lifecycle ---------------------------------------------------------------------

    def _find_programs(self) -> None:
        self._etcd_bin = require_executable("etcd", INSTALL_HINT)
        self._patroni_bin = require_executable(self.venv / "bin" / "patroni", INSTALL_HINT)
        try:  # the venv must be readable by the server user, not only by root
            run([self._patroni_bin, "--version"], env=server_env(), timeout=60)
        except HarnessError as exc:
            raise HarnessUnavailable(f"Patroni does not run as postgres: {exc}\n{INSTALL_HINT}"
                                     ) from None

    def _boot(self, timeout: float) -> None:
        """Start etcd and every node; return once a leader is writable and replicas stream."""
        self.etcd_client_port, self.etcd_peer_port = self._free_ports(2)
        self._start_etcd()
        for index in range(1, self.node_count + 1):
            node = self._configure_node(f"node{index}")
            self.nodes[node.name] = node
        for node in self.nodes.values():
            self._start_node(node)
        self.wait_leader(timeout)
        self.wait_replicas_streaming(timeout=timeout)

    def _start_etcd(self) -> None:
        assert self.base_dir is not None and self._etcd_bin is not None
        peer = f"http://{HOST}:{self.etcd_peer_port}"
        log_file = self.base_dir / "etcd.log"
        process = spawn(
            [
                self._etcd_bin, "--name", "etcd0",
                "--data-dir", self.base_dir / "etcd",
                "--listen-client-urls", self.etcd_url,
                "--advertise-client-urls", self.etcd_url,
                "--listen-peer-urls", peer,
                "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"etcd0={peer}",
                "--log-level", "warn",
            ],
            log_file=log_file, env=server_env(), cwd=self.base_dir,
        )  # fmt: skip
        self.etcd = process
        self._services.append(process)
        wait_for(lambda: http_json("GET", f"{self.etcd_url}/health", timeout=1)[0] == 200,
                 20, f"etcd did not come up{log_tail(log_file)}")

    def _configure_node(self, name: str) -> PatroniNode:
        assert self.base_dir is not None and self._bin_dir is not None
        rest_port, pg_port = self._free_ports(2)
        node = PatroniNode(
            name=name, rest_port=rest_port, pg_port=pg_port,
            data_dir=self.base_dir / f"data-{name}",
            config_file=self.base_dir / f"{name}.yml",
            log_file=self.base_dir / f"{name}.log",
        )  # fmt: skip
        self._data_dirs.append(node.data_dir)
        # Synchronous mode is for tests that must lose no acknowledged write.
        synchronous_commit = "on" if self.synchronous_mode else "off"
        parameters = {"fsync": "off", "synchronous_commit": synchronous_commit}
        config = {
            "scope": SCOPE,
            "namespace": NAMESPACE,
            "name": name,
            "log": {"level": "WARNING"},
            "restapi": {"listen": f"{HOST}:{rest_port}", "connect_address": f"{HOST}:{rest_port}"},
            "etcd3": {"hosts": f"{HOST}:{self.etcd_client_port}"},
            "bootstrap": {
                "dcs": {
                    # The minimums Patroni accepts: fast elections for tests.
                    "ttl": 20,
                    "loop_wait": 1,
                    "retry_timeout": 3,
                    "maximum_lag_on_failover": 1048576,
                    "synchronous_mode": self.synchronous_mode,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "use_slots": True,
                        "remove_data_directory_on_rewind_failure": True,
                        "remove_data_directory_on_diverged_timelines": True,
                        "parameters": parameters,
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "no-sync"],
            },
            "postgresql": {
                "listen": f"{HOST}:{pg_port}",
                "connect_address": f"{HOST}:{pg_port}",
                "data_dir": str(node.data_dir),
                "bin_dir": str(self._bin_dir),
                "pgpass": str(self.base_dir / f"pgpass-{name}"),
                "authentication": {
                    "superuser": {"username": "postgres"},
                    "replication": {"username": "postgres"},
                    "rewind": {"username": "postgres"},
                },
                "parameters": {
                    "unix_socket_directories": str(self.base_dir),
                    "shared_buffers": "32MB",
                    "max_connections": 100,
                    # A replica whose upstream died retries after this long.
                    "wal_retrieve_retry_interval": "100ms",
                },
                "pg_hba": [
                    "local all all trust",
                    f"host all all {HOST}/32 trust",
                    f"host replication all {HOST}/32 trust",
                ],
                "basebackup": [{"checkpoint": "fast"}],
            },
        }
        # YAML is a superset of JSON, so Patroni reads this as it is.
        write_owned(node.config_file, json.dumps(config, indent=2) + "\n", mode=0o600)
        return node

    def _start_node(self, node: PatroniNode) -> None:
        assert self._patroni_bin is not None
        self._supervise(node, [self._patroni_bin, node.config_file], server_env())

    # -- state -------------------------------------------------------------------------

    def members(self) -> list[dict[str, Any]]:
        """``GET /cluster`` from the first node that answers: the members as Patroni lists them."""
        errors = []
        for node in self.nodes.values():
            if not node.is_running():
                continue
            try:
                status, body = http_json("GET", f"{node.rest_url}/cluster", timeout=2)
            except OSError as exc:
                errors.append(f"{node.name}: {exc}")
                continue
            if status == 200 and isinstance(body, dict):
                members: list[dict[str, Any]] = body.get("members", [])
                return members
            errors.append(f"{node.name}: HTTP {status}")
        raise HarnessError(f"no Patroni REST API answered: {'; '.join(errors)}")

    def leader_name(self) -> str | None:
        """The member holding the leader lock now (it may still be promoting)."""
        return next((m["name"] for m in self.members() if m.get("role") == "leader"), None)

    def sync_standby_name(self) -> str | None:
        return next((m["name"] for m in self.members() if m.get("role") == "sync_standby"), None)

    def sql(self, name: str, query: str, timeout: float = 10) -> str:
        return psql(pg_bin(), self.node(name).pg_port, query, timeout=timeout)

    def wait_leader(self, timeout: float = 60, *, exclude: str | None = None) -> str:
        """Wait for a leader that is primary, running and writable; return its name.

        ``/cluster`` lists a leader as soon as it holds the lock, before promotion
        finishes, so also ask the node itself and try a write-only probe.
        """

        def writable_leader() -> str | None:
            name = self.leader_name()
            if name is None or name == exclude:
                return None
            status, body = http_json("GET", f"{self.node(name).rest_url}/patroni", timeout=2)
            if status != 200 or not isinstance(body, dict):
                return None
            if body.get("role") != "primary" or body.get("state") != "running":
                return None
            return name if self.sql(name, "select not pg_is_in_recovery()", 5) == "t" else None

        name: str = wait_for(writable_leader, timeout, "no writable Patroni leader", 0.05)
        return name

    def wait_replicas_streaming(self, count: int | None = None, timeout: float = 60) -> None:
        """Wait until ``count`` replicas (default: every running node but the leader) stream.

        In synchronous mode also wait until one of them is the sync standby.
        """
        running = sum(node.is_running() for node in self.nodes.values())
        expected = count if count is not None else running - 1

        def ready() -> bool:
            members = self.members()
            streaming = [m for m in members
                         if m.get("role") in REPLICA_ROLES and m.get("state") == "streaming"]
            has_sync = any(m.get("role") == "sync_standby" for m in streaming)
            return len(streaming) >= expected and (has_sync or not self.synchronous_mode
                                                   or expected == 0)

        wait_for(ready, timeout, f"{expected} replicas not streaming", 0.1)

    # -- faults and operations --------------------------------------------------------

    def switchover(self, candidate: str | None = None, timeout: float = 60) -> str:
        """Planned switchover to *candidate*; return the new leader once it is writable.

        Returns after the old leader streams again too, so the cluster can fail over.

        With synchronous mode the candidate must be the current sync standby
        (Patroni answers 412 otherwise), which is also the default pick.
        """
        started = time.monotonic()
        leader = self.leader_name()
        if leader is None:
            raise HarnessError("no leader to switch over from")
        if candidate is None:
            candidate = self.sync_standby_name() if self.synchronous_mode else next(
                (m["name"] for m in self.members()
                 if m.get("role") in REPLICA_ROLES and m.get("state") == "streaming"), None)
            if candidate is None:
                raise HarnessError("no replica to switch over to")
        status, body = http_json("POST", f"{self.node(leader).rest_url}/switchover",
                                 {"leader": leader, "candidate": candidate}, timeout=timeout)
        if status != 200:
            raise HarnessError(f"switchover {leader} -> {candidate} refused: HTTP {status} {body}")
        new_leader = self.wait_leader(timeout, exclude=leader)
        self.timings["switchover"] = time.monotonic() - started
        if new_leader != candidate:
            raise HarnessError(f"switchover went to {new_leader}, not {candidate}")
        # The old leader must rejoin (as the sync standby in synchronous mode)
        # before anything else: with no sync standby nobody may take over.
        self.wait_replicas_streaming(timeout=timeout)
        return new_leader

    def kill_leader(self) -> str:
        """kill -9 the leader's Patroni and postmaster, then drop its leader key; return its name.

        Deleting the key spares the test the 20 s lease expiry. The node stays
        down until :meth:`restart_node`.
        """
        leader = self.leader_name()
        if leader is None:
            raise HarnessError("no leader to kill")
        self.kill_node(leader)
        self.delete_leader_key()
        return leader

    def kill_node(self, name: str) -> None:
        """kill -9 a node's Patroni and postmaster (and the postmaster's children)."""
        node = self.node(name)
        # Without the postmaster kill the old primary keeps taking writes: a split brain.
        kill_server(node.data_dir, node.process)

    def delete_leader_key(self) -> None:
        key = base64.b64encode(f"{NAMESPACE}{SCOPE}/leader".encode()).decode()
        status, body = http_json("POST", f"{self.etcd_url}/v3/kv/deleterange", {"key": key})
        if status != 200:
            raise HarnessError(f"etcd refused to delete the leader key: HTTP {status} {body}")

    def restart_node(self, name: str, timeout: float = 60) -> None:
        """Start a killed node's Patroni again and wait until it streams as a replica."""
        node = self.node(name)
        if node.is_running():
            return
        if postmaster_pid(node.data_dir) is not None:
            kill_server(node.data_dir)  # a postmaster without its Patroni
        self._start_node(node)

        def streaming() -> bool:
            return any(m.get("name") == name and m.get("state") == "streaming"
                       and m.get("role") in REPLICA_ROLES for m in self.members())

        wait_for(streaming, timeout, f"{name} did not rejoin as a streaming replica"
                 f"{log_tail(node.log_file)}", 0.1)

    def ensure_healthy(self, timeout: float = 60) -> str:
        """Restart killed nodes, then wait for a writable leader and streaming replicas."""
        self._restart_killed_nodes(timeout)
        leader = self.wait_leader(timeout)
        self.wait_replicas_streaming(timeout=timeout)
        return leader

