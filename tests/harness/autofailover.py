"""A real pg_auto_failover formation for tests: a monitor and three keeper nodes on 127.0.0.1.

Follows shared/CLUSTERS.md, including its test-only tuning (monitor health
check GUCs and ``timeout.network_partition_timeout 1`` on each keeper), which
brings failover after a crash from about 52 s down to about 8 s::

    cluster = AutoFailoverCluster().start()     # ~15-20 s
    old = cluster.primary_node()
    cluster.kill_primary()                      # kill -9 keeper and postmaster
    new = cluster.wait_new_primary(old)         # writable
    cluster.stop()

Each ``pg_autoctl ... --run`` supervisor is started in its own session, so
``killpg`` reaches it and the services it forks; postmasters are found through
``postmaster.pid`` and checked against ``/proc`` before they are signalled.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ._process import (
    HOST,
    HarnessError,
    HarnessUnavailable,
    SupervisedCluster,
    SupervisedNode,
    kill_server,
    log_tail,
    make_owned_dir,
    psql,
    require_executable,
    run,
    server_env,
    wait_for,
)

__all__ = ["AutoFailoverCluster", "AutoFailoverNode", "HarnessError", "HarnessUnavailable"]

INSTALL_HINT = "run .ci/install-servers.sh (as root) to install postgresql-15-auto-failover"
FORMATION = "default"
GROUP = 0
MONITOR_DATABASE = "pg_auto_failover"

# Test-only tuning from CLUSTERS.md: detect a dead primary within a few seconds.
MONITOR_SETTINGS = {
    "pgautofailover.health_check_period": "1000",
    "pgautofailover.health_check_timeout": "1000",
    "pgautofailover.health_check_max_retries": "1",
    "pgautofailover.health_check_retry_delay": "500",
    "pgautofailover.node_considered_unhealthy_timeout": "2000",
    "pgautofailover.primary_demote_timeout": "2000",
}
PRIMARY_STATES = frozenset({"single", "primary", "wait_primary", "join_primary", "apply_settings"})


@dataclass
class AutoFailoverNode(SupervisedNode):
    """One keeper-managed PostgreSQL node (or the monitor)."""

    port: int

    @property
    def dsn(self) -> str:
        return f"postgres://postgres@{HOST}:{self.port}/postgres"


class AutoFailoverCluster(SupervisedCluster[AutoFailoverNode]):
    """A monitor plus ``nodes`` keepers in formation ``default``, group 0."""

    dir_prefix = "picopool-pgaf-"
    start_timeout = 120

    def __init__(self, *, nodes: int = 3, base_dir: Path | str | None = None,
                 pg_autoctl: Path | str | None = None) -> None:
        super().__init__(nodes=nodes, base_dir=base_dir)
        self.pg_autoctl_path = pg_autoctl
        self.monitor: AutoFailoverNode | None = None
        self._tuned: set[str] = set()
        self._pg_autoctl: Path | None = None

    # -- addresses -------------------------------------------------------------------

    @property
    def monitor_dsn(self) -> str:
        if self.monitor is None:
            raise HarnessError("cluster is not started")
        return (f"postgres://autoctl_node@{HOST}:{self.monitor.port}/{MONITOR_DATABASE}"
                "?sslmode=disable")

    @property
    def dsn(self) -> str:
        """Multi-host DSN over every node (not the monitor)."""
        hosts = ",".join(f"{HOST}:{node.port}" for node in self.nodes.values())
        return f"postgres://postgres@{hosts}/postgres"

    # -- lifecycle ---------------------------------------------------------------------

    def _find_programs(self) -> None:
        assert self._bin_dir is not None
        bundled = self._bin_dir / "pg_autoctl"
        default = bundled if bundled.exists() else "pg_autoctl"
        self._pg_autoctl = require_executable(self.pg_autoctl_path or default, INSTALL_HINT)

    def _boot(self, timeout: float) -> None:
        """Start the monitor and the nodes; return once one primary and all secondaries are up."""
        assert self.base_dir is not None
        for sub in ("xdg", "xdg/config", "xdg/share"):
            make_owned_dir(self.base_dir / sub)
        make_owned_dir(self.base_dir / "xdg" / "run", mode=0o700)  # pg_autoctl insists
        self._start_monitor(timeout)
        names = [f"node{i}" for i in range(1, self.node_count + 1)]
        for name in names:
            self.nodes[name] = self._new_node(name)
        # The first node becomes the primary; the others clone it, so wait for it.
        first, *others = self.nodes.values()
        self._start_keeper(first)
        self._wait_states({first.name: PRIMARY_STATES}, timeout)
        for node in others:
            self._start_keeper(node)
        self.wait_healthy(timeout)

    def _env(self) -> dict[str, str]:
        assert self.base_dir is not None and self._bin_dir is not None
        xdg = self.base_dir / "xdg"
        return server_env({
            # pg_autoctl finds initdb, pg_ctl and postgres through PATH.
            "PATH": f"{self._bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "PGHOST": HOST,
            "XDG_CONFIG_HOME": str(xdg / "config"),
            "XDG_DATA_HOME": str(xdg / "share"),
            "XDG_RUNTIME_DIR": str(xdg / "run"),
        })

    def _new_node(self, name: str) -> AutoFailoverNode:
        assert self.base_dir is not None
        (port,) = self._free_ports(1)
        node = AutoFailoverNode(name=name, port=port, data_dir=self.base_dir / name,
                                log_file=self.base_dir / f"{name}.log")
        self._data_dirs.append(node.data_dir)
        return node

    def _spawn(self, node: AutoFailoverNode, argv: list[str | Path]) -> None:
        assert self._pg_autoctl is not None
        self._supervise(node, [self._pg_autoctl, *argv], self._env())

    def _start_monitor(self, timeout: float) -> None:
        monitor = self.monitor = self._new_node("monitor")
        self._spawn(monitor, [
            "create", "monitor", "--pgdata", monitor.data_dir, "--pgport", str(monitor.port),
            "--listen", HOST, "--hostname", HOST, "--auth", "trust", "--no-ssl", "--run",
        ])  # fmt: skip
        wait_for(lambda: self.monitor_sql("select 1") == "1", timeout,
                 f"the monitor did not come up{log_tail(monitor.log_file)}", 0.2)
        for name, value in MONITOR_SETTINGS.items():
            self.monitor_sql(f"alter system set {name} = '{value}'", user="postgres")
        self.monitor_sql("select pg_reload_conf()", user="postgres")

    def _start_keeper(self, node: AutoFailoverNode) -> None:
        self._spawn(node, [
            "create", "postgres", "--pgdata", node.data_dir, "--pgport", str(node.port),
            "--listen", HOST, "--hostname", HOST, "--name", node.name,
            "--auth", "trust", "--no-ssl", "--monitor", self.monitor_dsn, "--run",
        ])  # fmt: skip

    def _tune_keeper(self, node: AutoFailoverNode) -> None:
        """Test-only: give up on an unreachable monitor after 1 s (reloaded live)."""
        assert self._pg_autoctl is not None
        env = self._env()
        run([self._pg_autoctl, "config", "set", "--pgdata", node.data_dir,
             "timeout.network_partition_timeout", "1"], env=env, timeout=30)
        run([self._pg_autoctl, "reload", "--pgdata", node.data_dir], env=env, timeout=30)

    # -- state -------------------------------------------------------------------------

    def monitor_sql(self, query: str, *, user: str = "autoctl_node", timeout: float = 10) -> str:
        assert self.monitor is not None and self._bin_dir is not None
        return psql(self._bin_dir, self.monitor.port, query, database=MONITOR_DATABASE,
                    user=user, timeout=timeout)

    def sql(self, name: str, query: str, timeout: float = 10) -> str:
        assert self._bin_dir is not None
        return psql(self._bin_dir, self.node(name).port, query, timeout=timeout)

    def states(self) -> dict[str, tuple[str, str, int]]:
        """``{name: (reportedstate, goalstate, health)}`` from the monitor."""
        rows = self.monitor_sql(
            "select nodename, reportedstate, goalstate, health from pgautofailover.node "
            f"where formationid = '{FORMATION}' and groupid = {GROUP} order by nodeid"
        )
        result = {}
        for line in rows.splitlines():
            name, reported, goal, health = line.split("|")
            result[name] = (reported, goal, int(health))
        return result

    def primary_name(self) -> str | None:
        """The node ``get_primary()`` names, or None while the group has no writable node."""
        try:
            name = self.monitor_sql(
                f"select primary_name from pgautofailover.get_primary('{FORMATION}', {GROUP})")
        except HarnessError:
            return None
        return name or None

    def primary_node(self) -> AutoFailoverNode:
        name = self.primary_name()
        if name is None:
            raise HarnessError("the monitor names no primary")
        return self.node(name)

    def _wait_states(self, wanted: dict[str, frozenset[str]], timeout: float) -> None:
        def reached() -> bool:
            states = self.states()
            return all(name in states and states[name][0] in allowed
                       and states[name][0] == states[name][1] for name, allowed in wanted.items())

        logs = "".join(log_tail(self.node(name).log_file, 15) for name in wanted)
        wait_for(reached, timeout, f"nodes did not reach {wanted}{logs}", 0.2)

    def wait_healthy(self, timeout: float = 90) -> AutoFailoverNode:
        """Wait for one writable primary and every other running node secondary and healthy."""
        running = [n for n in self.nodes.values() if n.is_running()]

        def healthy() -> str | None:
            states = self.states()
            primary = self.primary_name()
            if primary is None or primary not in states:
                return None
            for node in running:
                if node.name == primary:
                    continue
                reported, goal, health = states.get(node.name, ("", "", 0))
                if (reported, goal, health) != ("secondary", "secondary", 1):
                    return None
            if states[primary][:2] != ("primary", "primary"):
                return None
            return primary if self.sql(primary, "select not pg_is_in_recovery()") == "t" else None

        name: str = wait_for(healthy, timeout, "formation not healthy"
                             + "".join(log_tail(n.log_file, 10) for n in running), 0.2)
        for node in running:
            if node.name not in self._tuned:  # its config file exists only once it joined
                self._tune_keeper(node)
                self._tuned.add(node.name)
        return self.node(name)

    # -- faults and operations --------------------------------------------------------

    def kill_primary(self) -> AutoFailoverNode:
        """kill -9 the primary's keeper (and the services it forked) and its postmaster."""
        primary = self.primary_node()
        self.kill_node(primary.name)
        return primary

    def kill_node(self, name: str) -> None:
        """kill -9 a node's keeper (with the services it forked) and its postmaster."""
        node = self.node(name)
        kill_server(node.data_dir, node.process)

    def restart_node(self, name: str, timeout: float = 90) -> None:
        """Run a killed node's keeper again; return once it is a healthy secondary."""
        node = self.node(name)
        if node.is_running():
            return
        kill_server(node.data_dir)  # a leftover postmaster would confuse the keeper
        self._spawn(node, ["run", "--pgdata", node.data_dir])
        self._wait_states({name: frozenset({"secondary"})}, timeout)
        self.wait_healthy(timeout)

    def ensure_healthy(self, timeout: float = 90) -> AutoFailoverNode:
        """Restart killed nodes, then wait for a writable primary and healthy secondaries."""
        self._restart_killed_nodes(timeout)
        return self.wait_healthy(timeout)

    def wait_new_primary(self, old: AutoFailoverNode | str, timeout: float = 60
                         ) -> AutoFailoverNode:
        """Wait until the monitor names another primary and it takes writes."""
        old_name = old if isinstance(old, str) else old.name
        started = time.monotonic()

        def new_writable_primary() -> str | None:
            name = self.primary_name()
            if name is None or name == old_name:
                return None
            return name if self.sql(name, "select not pg_is_in_recovery()", 5) == "t" else None

        name: str = wait_for(new_writable_primary, timeout,
                             f"no new primary after {old_name}", 0.1)
        self.timings["failover"] = time.monotonic() - started
        return self.node(name)

    def switchover(self, timeout: float = 90) -> AutoFailoverNode:
        """``pg_autoctl perform switchover``; return the new primary once all is healthy again."""
        assert self._pg_autoctl is not None
        started = time.monotonic()
        old = self.primary_node()
        run([self._pg_autoctl, "perform", "switchover", "--pgdata", old.data_dir,
             "--formation", FORMATION, "--group", str(GROUP)], env=self._env(), timeout=timeout)
        new = self.wait_new_primary(old, timeout)
        self.timings["switchover"] = time.monotonic() - started
        self.wait_healthy(timeout)
        return new

