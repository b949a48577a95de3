"""Embedded local PostgreSQL cluster: one primary plus streaming replicas on 127.0.0.1.

Meant for tests, benchmarks and examples that need a real cluster with real
replication lag and real failover, without Docker or an HA manager::

    from picopool.cluster import LocalCluster

    with LocalCluster(replicas=2) as cluster:        # 0.8 s on tmpfs, 2 s on disk
        cluster.primary.sql("create table t (id int)")
        cluster.wait_replayed()                      # replicas have caught up
        print(cluster.dsn)       # postgres://postgres:PW@127.0.0.1:p0,127.0.0.1:p1,.../postgres
        cluster.replicas[0].set_apply_delay("500ms") # real replication lag
        new_primary = cluster.failover()             # kill -9 the primary, promote node1

The API is synchronous; from async code call it through ``asyncio.to_thread``.

How it works:

* ``initdb`` creates node0, ``pg_basebackup -R`` clones each replica from it, and
  every node runs under ``pg_ctl`` with its own loopback port (chosen at runtime)
  written into its ``postgresql.auto.conf``.
* Everything lives in a fresh directory under ``base_dir`` (default:
  ``$PICOPOOL_CLUSTER_DIR``, else the system temp dir): data dirs, server logs
  (``node0.log``, ...) and the Unix sockets. ``stop()`` removes it.
* PostgreSQL refuses to run as root, so under root every server program runs as
  the ``postgres`` user, which then owns the directory.
* Every connection needs the superuser's password (``scram-sha-256`` over TCP and
  the Unix socket, replication included): a random one per cluster
  (``cluster.password``), carried in ``cluster.dsn`` and ``node.dsn``. Without it,
  any local user could connect as superuser and run programs as the server's OS
  user (``COPY ... TO PROGRAM``). Replicas find it in a ``pgpass`` file (mode 0600,
  owned by the server user) in the cluster's directory, which their
  ``primary_conninfo`` names; ``initdb`` reads it from a file deleted right after.
* Settings favour speed over durability (``fsync=off``, ``synchronous_commit=off``);
  ``synchronous=True`` turns on quorum commit (``ANY 1`` of the replicas).
* Processes are tracked and signalled by the PID in ``postmaster.pid``, checked
  against ``/proc/PID/cmdline`` first. A finalizer that also runs at interpreter
  exit stops the servers if the caller never calls ``stop()``.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["ClusterError", "LocalCluster", "LocalNode", "find_pg_bin"]

HOST = "127.0.0.1"
SUPERUSER = "postgres"
DATABASE = "postgres"
_OS_USER = "postgres"  # who runs the servers when we are root

_SERVER_PROGRAMS = ("initdb", "pg_ctl", "postgres", "pg_basebackup")
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}
_HAVE_PROCFS = Path("/proc/self/stat").exists()
_IPC_RMID = 0  # shmctl() command, the same on Linux and macOS
_PARAMETER_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")

BASE_SETTINGS: Mapping[str, str] = {
    "listen_addresses": HOST,
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "on",  # off would break pg_rewind
    "shared_buffers": "32MB",
    "max_connections": "200",
    "wal_level": "replica",
    "hot_standby": "on",
    "hot_standby_feedback": "on",
    "max_wal_senders": "10",
    # Keeps recent WAL for replicas that were down or are being cloned, so a
    # checkpoint cannot remove a segment a concurrent pg_basebackup still needs.
    "wal_keep_size": "256MB",
    # Segments in the data dir, not /dev/shm: a killed server cannot leak them.
    "dynamic_shared_memory_type": "mmap",
    # A replica whose upstream died retries after this long; the default 5 s
    # would dominate every failover.
    "wal_retrieve_retry_interval": "100ms",
}
"""postgresql.conf settings every cluster gets; ``settings=`` overrides them."""


class ClusterError(RuntimeError):
    """A server program failed, or the cluster did not reach the expected state in time."""


def find_pg_bin() -> Path:
    """Locate the PostgreSQL server binaries (initdb, pg_ctl, postgres, pg_basebackup).

    Order: ``$PICOPOOL_PG_BIN``, ``pg_config --bindir``, newest ``/usr/lib/postgresql/*/bin``.
    """
    configured = os.environ.get("PICOPOOL_PG_BIN")
    if configured:
        if not _has_server_programs(Path(configured)):
            raise ClusterError(f"PICOPOOL_PG_BIN={configured} lacks one of {_SERVER_PROGRAMS}")
        return Path(configured)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            bindir = subprocess.run(
                [pg_config, "--bindir"], capture_output=True, text=True, check=True, timeout=10
            ).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            bindir = ""
        # Debian's pg_config comes with libpq-dev even when no server is installed.
        if bindir and _has_server_programs(Path(bindir)):
            return Path(bindir)
    installed = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=_version_key, reverse=True)
    for candidate in installed:
        if _has_server_programs(candidate):
            return candidate
    raise ClusterError(
        "PostgreSQL server binaries not found: install postgresql "
        "or set PICOPOOL_PG_BIN to the directory holding initdb and postgres"
    )


def _has_server_programs(bindir: Path) -> bool:
    return all(os.access(bindir / name, os.X_OK) for name in _SERVER_PROGRAMS)


def _version_key(bindir: Path) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in bindir.parent.name.split("."))
    except ValueError:
        return (-1,)


class LocalNode:
    """One PostgreSQL server of a :class:`LocalCluster` (usable on its own, too).

    ``password`` is the superuser's password (None: the server trusts its
    clients); ``passfile`` a pgpass file holding it for the server user, which
    ``primary_conninfo`` then names instead of the password itself.
    """

    def __init__(
        self,
        name: str,
        port: int,
        data_dir: Path,
        *,
        pg_bin: Path,
        log_file: Path,
        password: str | None = None,
        passfile: Path | None = None,
    ) -> None:
        self.name = name
        self.host = HOST
        self.port = port
        self.data_dir = data_dir
        self.log_file = log_file
        self.pg_bin = pg_bin
        self.password = password
        self.passfile = passfile

    def __repr__(self) -> str:
        return f"<LocalNode {self.name} port={self.port} pid={self.pid}>"

    @property
    def dsn(self) -> str:
        """``postgres://postgres:PASSWORD@127.0.0.1:PORT/postgres``."""
        return self.dsn_at()

    def dsn_at(self, host: str | None = None, port: int | None = None) -> str:
        """This node's DSN, password included, aimed at ``host``/``port`` instead.

        For a proxy in front of the node, or another spelling of its address::

            node.dsn_at(port=proxy.port)   # postgres://postgres:PW@127.0.0.1:PROXY/postgres
        """
        host = self.host if host is None else host
        shown = f"[{host}]" if ":" in host else host
        return f"postgres://{_userinfo(self.password)}@{shown}:{port or self.port}/{DATABASE}"

    @property
    def pid(self) -> int | None:
        """The live postmaster's PID, or None when this node's server is not running."""
        try:
            first_line = (self.data_dir / "postmaster.pid").read_text().split("\n", 1)[0]
            pid = int(first_line)
        except (OSError, ValueError):
            return None
        # The file outlives a killed server and its PID may be reused by then.
        return pid if _is_postmaster_of(pid, self.data_dir) else None

    def is_running(self) -> bool:
        return self.pid is not None

    def start(self, timeout: float = 60) -> None:
        """Start the server and wait until it accepts connections. No-op if running."""
        if self.is_running():
            return
        _run_server_program(
            [
                self.pg_bin / "pg_ctl",
                "start",
                "-D", self.data_dir,
                "-l", self.log_file,
                "-w", "-t", str(round(timeout)),
            ],
            timeout=timeout + 10,
            failure=f"{self.name} did not start",
            log_file=self.log_file,
        )  # fmt: skip

    def stop(self, mode: str = "fast", timeout: float = 30) -> None:
        """Shut down cleanly (``smart``, ``fast`` or ``immediate``) and wait until it exits."""
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"unknown shutdown mode {mode!r}")
        pid = self.pid
        if pid is None:
            return
        _signal(pid, _STOP_SIGNALS[mode])
        if not _wait_gone([pid], timeout):
            raise ClusterError(f"{self.name} (pid {pid}) did not stop within {timeout} s")

    def kill(self, timeout: float = 10) -> None:
        """SIGKILL the postmaster and its children, as in a crash; ``start()`` recovers it."""
        pid = self.pid
        if pid is None:
            return
        lock_file = self.data_dir / "postmaster.pid"
        try:
            lock_lines = lock_file.read_text().splitlines()  # pid, dir, start, port, sockets, ...
        except FileNotFoundError:
            lock_lines = []  # it exited on its own just now
        # Each server process leads its own process group, so killing the
        # postmaster's group would miss them, and orphaned backends would keep the
        # shared memory busy and block a restart. A stopped postmaster cannot
        # fork a child we would not see.
        _signal(pid, signal.SIGSTOP)
        children = _child_pids(pid)
        _signal(pid, signal.SIGKILL)
        for child in children:
            _signal(child, signal.SIGKILL)
        if not _wait_gone([pid, *children], timeout):
            raise ClusterError(f"{self.name} (pid {pid}) survived SIGKILL for {timeout} s")
        _remove_crash_leftovers(lock_file, lock_lines)

    def promote(self, timeout: float = 60) -> None:
        """Promote this replica and wait until it accepts writes."""
        _run_server_program(
            [self.pg_bin / "pg_ctl", "promote", "-D", self.data_dir, "-w", "-t", f"{timeout:.0f}"],
            timeout=timeout + 10,
            failure=f"{self.name} could not be promoted",
            log_file=self.log_file,
        )
        _wait_for(
            lambda: self.sql("select pg_is_in_recovery()") == "f",
            timeout,
            f"{self.name} still in recovery after promotion",
        )

    def set_apply_delay(self, delay: str | None) -> None:
        """Set ``recovery_min_apply_delay`` (e.g. ``"500ms"``); ``None`` removes the delay."""
        self.set_parameter("recovery_min_apply_delay", delay)

    def repoint(self, primary: LocalNode) -> None:
        """Stream from ``primary`` from now on. A running replica switches without a restart."""
        self.set_parameter("primary_conninfo", self.conninfo_for(primary))

    def conninfo_for(self, primary: LocalNode) -> str:
        """``primary_conninfo`` for streaming from ``primary`` under this node's name.

        With a ``passfile`` it names that file; else it holds the password itself.
        """
        conninfo = (
            f"host={primary.host} port={primary.port} user={SUPERUSER} application_name={self.name}"
        )
        if self.passfile is not None:
            conninfo += f" passfile={_conninfo_literal(str(self.passfile))}"
        elif self.password is not None:
            conninfo += f" password={_conninfo_literal(self.password)}"
        return conninfo

    def set_parameter(self, name: str, value: str | None) -> None:
        """Persist a setting in postgresql.auto.conf (``None`` resets it) and reload.

        Uses ALTER SYSTEM when the server runs, else edits the file directly.
        """
        if not _PARAMETER_NAME.match(name):
            raise ValueError(f"invalid parameter name: {name!r}")
        if not self.is_running():
            self._edit_auto_conf({name: value})
            return
        if value is None:
            self.sql(f"alter system reset {name}")
        else:
            self.sql(f"alter system set {name} = {_sql_literal(value)}")
        self.reload()  # a separate statement: ALTER SYSTEM may not run in a transaction

    def reload(self, timeout: float = 10) -> None:
        """Reload the configuration and wait until the postmaster has applied it."""
        # pg_reload_conf() only sends SIGHUP. New sessions inherit the
        # postmaster's load time, so a newer one proves the reload happened.
        before = self.sql("select pg_conf_load_time()")
        self.sql("select pg_reload_conf()")
        _wait_for(
            lambda: self.sql(f"select pg_conf_load_time() > '{before}'") == "t",
            timeout,
            f"{self.name} did not reload its configuration",
        )

    def sql(self, query: str, timeout: float = 30, *, database: str = DATABASE) -> str:
        """Run ``query`` through psql and return its unaligned, tuples-only output."""
        psql = self.pg_bin / "psql"
        if not psql.exists():
            psql = Path(shutil.which("psql") or "psql")
        argv: list[str | Path] = [
            psql, "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
            "-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "-d", database,
            "-c", query,
        ]  # fmt: skip
        env = _clean_env() | {
            "PGAPPNAME": "picopool.cluster",
            "PGCLIENTENCODING": "UTF8",
            "PGCONNECT_TIMEOUT": str(max(1, round(timeout))),
        }
        if self.password is not None:
            env["PGPASSWORD"] = self.password  # in the environment, never in argv
        try:
            result = subprocess.run(
                argv, capture_output=True, env=env, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired as exc:
            raise ClusterError(f"{self.name}: query timed out after {timeout} s: {query}") from exc
        if result.returncode != 0:
            error = result.stderr.decode(errors="replace").strip()
            raise ClusterError(f"{self.name}: {error} (query: {query})")
        return result.stdout.decode(errors="replace").strip()

    def _edit_auto_conf(self, settings: Mapping[str, str | None]) -> None:
        """Replace (or with None, drop) settings in postgresql.auto.conf of a stopped node."""
        path = self.data_dir / "postgresql.auto.conf"
        lines = path.read_text().splitlines() if path.exists() else []
        replaced = {name.lower() for name in settings}
        kept = [line for line in lines if _conf_line_name(line) not in replaced]
        kept += [f"{name} = {_conf_literal(v)}" for name, v in settings.items() if v is not None]
        _write_owned(path, "\n".join(kept) + "\n")


class LocalCluster:
    """A primary (node0) and ``replicas`` streaming replicas on loopback ports.

    ``base_dir`` is where the cluster's own temporary directory is created
    (default ``$PICOPOOL_CLUSTER_DIR``, else the system temp dir; a tmpfs such
    as ``/dev/shm`` starts about 3x faster than a disk). ``settings`` extend or
    override :data:`BASE_SETTINGS`; ``synchronous=True`` makes commits wait for
    any one replica; ``apply_delay`` (e.g. ``"200ms"``) sets
    ``recovery_min_apply_delay`` on every replica. ``password`` is the
    superuser's (default: a fresh random one); every connection needs it.
    """

    def __init__(
        self,
        replicas: int = 2,
        *,
        base_dir: str | Path | None = None,
        pg_bin: Path | None = None,
        settings: Mapping[str, str] | None = None,
        synchronous: bool = False,
        apply_delay: str | None = None,
        password: str | None = None,
    ) -> None:
        if replicas < 0:
            raise ValueError("replicas must be >= 0")
        if password is not None and (not password or "\n" in password or "\0" in password):
            raise ValueError("password must be non-empty, without line breaks or NUL")
        self.password: str = password if password is not None else secrets.token_urlsafe(24)
        self.initial_replicas = replicas
        parent = base_dir or os.environ.get("PICOPOOL_CLUSTER_DIR") or tempfile.gettempdir()
        # Absolute, because the data dir path identifies the postmaster in /proc/PID/cmdline.
        self.parent_dir = Path(os.path.abspath(parent))
        self.pg_bin = pg_bin if pg_bin is not None else find_pg_bin()
        self.synchronous = synchronous
        self.apply_delay = apply_delay
        self.settings: dict[str, str] = dict(BASE_SETTINGS)
        self.settings["synchronous_commit"] = "on" if synchronous else "off"
        self.settings.update(settings or {})
        self.nodes: list[LocalNode] = []
        self.failed: list[LocalNode] = []  # old primaries killed by failover()
        self.base_dir: Path | None = None  # created by start(), removed by stop()
        self._primary: LocalNode | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def __repr__(self) -> str:
        return f"<LocalCluster {self.base_dir} nodes={self.nodes}>"

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    @property
    def primary(self) -> LocalNode:
        if self._primary is None:
            raise ClusterError("cluster is not started")
        return self._primary

    @property
    def replicas(self) -> list[LocalNode]:
        """Nodes that follow the current primary (running or not); excludes failed primaries."""
        return [n for n in self.nodes if n is not self._primary and n not in self.failed]

    @property
    def dsn(self) -> str:
        """Multi-host DSN over all nodes, in creation order, with the superuser's password."""
        hosts = ",".join(f"{n.host}:{n.port}" for n in self.nodes)
        return f"postgres://{_userinfo(self.password)}@{hosts}/{DATABASE}"

    @property
    def passfile(self) -> Path:
        """The pgpass file (in the cluster's directory) the replicas read the password from."""
        if self.base_dir is None:
            raise ClusterError("cluster is not started")
        return self.base_dir / "pgpass"

    def start(self) -> LocalCluster:
        """Create and start the whole cluster; return once every replica is streaming."""
        if self.base_dir is not None:
            raise ClusterError("a LocalCluster can be started only once")
        _check_server_can_enter(self.parent_dir)
        self.base_dir = Path(tempfile.mkdtemp(prefix="picopool-cluster-", dir=self.parent_dir))
        watchdog = _start_watchdog(self.base_dir)
        # Registered before any server exists, so a failure half-way cleans up too.
        self._finalizer = weakref.finalize(
            self, _shut_down, self.nodes, self.base_dir, watchdog=watchdog
        )
        try:
            _chown_to_server_user(self.base_dir)
            self.base_dir.chmod(0o755)
            _write_private(self.passfile, f"*:*:*:*:{_pgpass_escape(self.password)}\n")
            self._primary = self._create_primary()
            self._create_replicas(self.initial_replicas)
            self.wait_streaming()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every node (fast, then SIGKILL) and remove the directory. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()  # runs _shut_down at most once
        self._primary = None

    def add_replica(self) -> LocalNode:
        """Clone a new replica from the current primary and wait until it streams."""
        (node,) = self._create_replicas(1)
        self._update_synchronous_standbys()
        self.wait_streaming()
        return node

    def failover(self, new_primary: LocalNode | None = None) -> LocalNode:
        """Kill the primary, promote ``new_primary`` (default: first replica), repoint the rest.

        Returns once the other running replicas stream from the new primary. The
        old primary stays down and is listed in ``failed``. Caveats:

        * Replicas that received more WAL than the new primary cannot follow it; for
          zero-loss tests pass the most advanced replica (``pg_last_wal_receive_lsn()``).
        * A replica with an apply delay switches over only after applying the
          delayed WAL, so this can take up to that delay.
        """
        candidates = [n for n in self.replicas if n.is_running()]
        target = new_primary or (candidates[0] if candidates else None)
        if target is None or target not in candidates:
            raise ClusterError(f"no running replica to promote (asked for {new_primary})")
        old = self.primary
        old.kill()  # before promoting: two writable primaries would split the brain
        self.failed.append(old)
        target.promote()
        self._primary = target
        self._update_synchronous_standbys()
        for replica in self.replicas:
            replica.repoint(target)
        self.wait_streaming()
        return target

    def wait_streaming(self, count: int | None = None, timeout: float = 30) -> None:
        """Wait until ``count`` replicas (default: every running one) stream from the primary."""
        expected = {n.name for n in self.replicas if n.is_running()}
        query = "select application_name from pg_stat_replication where state = 'streaming'"

        def ready() -> bool:
            streaming = set(self.primary.sql(query).split())
            return len(streaming) >= count if count is not None else expected <= streaming

        want = f"{count} replicas" if count is not None else ", ".join(sorted(expected))
        _wait_for(ready, timeout, f"not streaming from {self.primary.name} in time: {want}")

    def wait_replayed(self, timeout: float = 30) -> None:
        """Wait until every running replica has replayed all WAL the primary has written now."""
        # The insert position: with synchronous_commit=off, the write position
        # (pg_current_wal_lsn) can still lag behind the last commit record.
        lsn = self.primary.sql("select pg_current_wal_insert_lsn()")
        pending = [r for r in self.replicas if r.is_running()]
        query = f"select pg_last_wal_replay_lsn() >= '{lsn}'::pg_lsn"

        def replayed() -> bool:
            pending[:] = [r for r in pending if r.sql(query) != "t"]
            return not pending

        _wait_for(replayed, timeout, f"replicas did not replay up to {lsn}")

    # -- building nodes ---------------------------------------------------------

    def _create_primary(self) -> LocalNode:
        assert self.base_dir is not None
        node = self._new_node()
        # initdb reads the password from a file the server user can read; only
        # for as long as initdb runs.
        pwfile = self.base_dir / "initdb.pw"
        _write_private(pwfile, self.password + "\n")
        try:
            _run_server_program(
                [
                    self.pg_bin / "initdb",
                    "-D", node.data_dir,
                    "-U", SUPERUSER,
                    "--auth=scram-sha-256", f"--pwfile={pwfile}",
                    "--no-sync", "--no-instructions",
                    "--encoding=UTF8", "--locale=C",
                ],
                timeout=120,
                failure="initdb failed",
            )  # fmt: skip
        finally:
            pwfile.unlink(missing_ok=True)
        settings = dict(self.settings)
        settings["unix_socket_directories"] = str(self.base_dir)
        if self.synchronous and self.initial_replicas:
            names = [f"node{i}" for i in range(1, self.initial_replicas + 1)]
            settings["synchronous_standby_names"] = _quorum(names)
        conf = node.data_dir / "postgresql.conf"
        # Appended, so these win over initdb's defaults; replicas inherit the file.
        lines = [f"{name} = {_conf_literal(value)}" for name, value in settings.items()]
        _write_owned(conf, conf.read_text() + "\n# picopool.cluster\n" + "\n".join(lines) + "\n")
        _write_owned(
            node.data_dir / "pg_hba.conf",
            "local all all scram-sha-256\n"
            "local replication all scram-sha-256\n"
            f"host all all {HOST}/32 scram-sha-256\n"
            f"host replication all {HOST}/32 scram-sha-256\n",
        )
        node._edit_auto_conf({"port": str(node.port), "cluster_name": node.name})
        self._first_start(node)
        return node

    def _create_replicas(self, count: int) -> list[LocalNode]:
        nodes = [self._new_node() for _ in range(count)]
        # Cloning is mostly file copying; in parallel it takes about half the time.
        with ThreadPoolExecutor(max_workers=max(1, count)) as executor:
            for future in [executor.submit(self._build_replica, node) for node in nodes]:
                future.result()  # re-raise a failure
        return nodes

    def _build_replica(self, node: LocalNode) -> None:
        primary = self.primary
        _run_server_program(
            [
                self.pg_bin / "pg_basebackup",
                "-h", primary.host, "-p", str(primary.port), "-U", SUPERUSER,
                "-D", node.data_dir,
                "-R", "-X", "stream", "-c", "fast", "--no-sync",
            ],
            timeout=300,
            failure=f"pg_basebackup of {node.name} failed",
            env={"PGPASSFILE": str(self.passfile)},
        )  # fmt: skip
        # The copied postgresql.conf still names the primary's port, and -R's
        # primary_conninfo has no application_name (needed to tell replicas apart)
        # and holds the password itself, where ours names the pgpass file.
        node._edit_auto_conf(
            {
                "port": str(node.port),
                "cluster_name": node.name,
                "primary_conninfo": node.conninfo_for(primary),
                "recovery_min_apply_delay": self.apply_delay,
            }
        )
        self._first_start(node)

    def _new_node(self) -> LocalNode:
        assert self.base_dir is not None
        name = f"node{len(self.nodes)}"
        node = LocalNode(
            name,
            _free_port(),
            self.base_dir / name,
            pg_bin=self.pg_bin,
            log_file=self.base_dir / f"{name}.log",
            password=self.password,
            passfile=self.passfile,
        )
        self.nodes.append(node)  # before it runs, so cleanup always finds it
        return node

    def _first_start(self, node: LocalNode, attempts: int = 5) -> None:
        """Start a new node, moving it to another port if someone took its port meanwhile."""
        for attempt in range(attempts):
            try:
                node.start()
                return
            except ClusterError:
                if attempt == attempts - 1 or _port_is_free(node.port):
                    raise
            with _ports_lock:
                _ports_in_use.discard(node.port)
            node.port = _free_port()
            node._edit_auto_conf({"port": str(node.port)})

    def _update_synchronous_standbys(self) -> None:
        if self.synchronous:
            standbys = _quorum([n.name for n in self.replicas]) if self.replicas else None
            self.primary.set_parameter("synchronous_standby_names", standbys)


# -- cleanup ----------------------------------------------------------------------


def _shut_down(
    nodes: Sequence[LocalNode],
    base_dir: Path,
    *,
    watchdog: subprocess.Popen[bytes] | None = None,
) -> None:
    """Stop all nodes in parallel and delete their directory; never raises."""
    pids: dict[LocalNode, int] = {}
    for node in nodes:
        pid = node.pid
        if pid is not None:
            pids[node] = pid
            _signal(pid, _STOP_SIGNALS["fast"])
    _wait_gone(pids.values(), timeout=10)
    for node in pids:
        with contextlib.suppress(ClusterError):  # nothing more to try; still remove the files
            node.kill()
    shutil.rmtree(base_dir, ignore_errors=True)
    with _ports_lock:
        _ports_in_use.difference_update(node.port for node in nodes)
    if watchdog is not None:
        _release_watchdog(watchdog)


# The finalizer covers interpreter exit, but not a test run killed by SIGKILL or
# by `timeout` (SIGTERM skips atexit). So each cluster also gets a watchdog: a
# small process in its own session that holds the read end of a pipe from us.
# EOF without a goodbye means we died, and it shuts the cluster down.
_WATCHDOG_GOODBYE = b"stopped cleanly"
_WATCHDOG_SCRIPT = """\
import importlib.util, sys
spec = importlib.util.spec_from_file_location("_picopool_cluster_watchdog", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
module._watch(sys.argv[2])
"""


def _start_watchdog(base_dir: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        # -I: neither the caller's cwd nor PYTHONPATH can shadow a stdlib module.
        [sys.executable, "-I", "-c", _WATCHDOG_SCRIPT, __file__, str(base_dir)],
        stdin=subprocess.PIPE,
        # Not the caller's stdout: whoever reads it would wait for the watchdog too.
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/",
        start_new_session=True,  # outlives Ctrl-C and `timeout` signalling our group
    )


def _release_watchdog(watchdog: subprocess.Popen[bytes]) -> None:
    assert watchdog.stdin is not None
    with contextlib.suppress(OSError):
        watchdog.stdin.write(_WATCHDOG_GOODBYE)
        watchdog.stdin.close()
    try:
        watchdog.wait(timeout=5)
    except subprocess.TimeoutExpired:
        watchdog.kill()
        watchdog.wait()


def _watch(base_dir: str) -> None:
    """The watchdog's main: wait for the owner to go away, then clean up unless told not to."""
    if sys.stdin.buffer.read() == _WATCHDOG_GOODBYE:
        return
    directory = Path(base_dir)
    if not directory.exists():
        return
    data_dirs = [d for d in directory.iterdir() if (d / "PG_VERSION").exists()]
    # Only the data dir matters for finding and stopping the servers.
    nodes = [LocalNode(d.name, 0, d, pg_bin=Path(), log_file=Path()) for d in data_dirs]
    _shut_down(nodes, directory)


# -- processes ----------------------------------------------------------------------


def _remove_crash_leftovers(lock_file: Path, lock_lines: Sequence[str]) -> None:
    """Remove what a shutdown would have, once every process of the server is dead.

    The lock files would make the restart refuse to run while their PID exists,
    and a zombie (this init reaps slowly) or a reused PID does. Without
    postmaster.pid the restart would not know the shared memory segment, so it
    goes too. Dynamic shared memory lives in the data dir (``mmap``).
    """
    lock_file.unlink(missing_ok=True)
    if len(lock_lines) > 4 and lock_lines[4]:  # socket directory, port
        socket_path = Path(lock_lines[4]) / f".s.PGSQL.{lock_lines[3]}"
        socket_path.with_name(socket_path.name + ".lock").unlink(missing_ok=True)
        socket_path.unlink(missing_ok=True)
    shmem_key_and_id = lock_lines[6].split() if len(lock_lines) > 6 else []
    if len(shmem_key_and_id) == 2 and shmem_key_and_id[1].isdigit():
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None).shmctl(int(shmem_key_and_id[1]), _IPC_RMID, None)


def _server_user_ids() -> tuple[int, int] | None:
    """(uid, gid) to run server programs as, or None to run them as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(_OS_USER)
    except KeyError:
        raise ClusterError(
            f"running as root, but there is no {_OS_USER!r} user to run PostgreSQL as"
        ) from None
    return entry.pw_uid, entry.pw_gid


def _run_server_program(
    argv: Sequence[str | Path],
    *,
    timeout: float,
    failure: str,
    log_file: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    ids = _server_user_ids()
    env = _clean_env() | {"LC_MESSAGES": "C"} | dict(env or {})
    if ids is not None:
        env["HOME"] = pwd.getpwuid(ids[0]).pw_dir  # not root's home, which postgres can't read
    try:
        result = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=env,
            cwd="/",  # initdb fails if it cannot read its cwd (e.g. /root as postgres)
            timeout=timeout,
            check=False,
            user=ids[0] if ids else None,
            group=ids[1] if ids else None,
            extra_groups=[] if ids else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(f"{failure}: timed out after {timeout} s{_log_tail(log_file)}") from exc
    if result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        command = " ".join(map(str, argv))
        raise ClusterError(f"{failure}: {command}\n{output}{_log_tail(log_file)}")


def _clean_env() -> dict[str, str]:
    # Inherited PGHOST, PGPORT, PGDATA, ... would override what we pass explicitly.
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def _log_tail(log_file: Path | None, lines: int = 20) -> str:
    if log_file is None or not log_file.exists():
        return ""
    tail = log_file.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- {log_file} (tail) ---\n" + "\n".join(tail)


def _is_postmaster_of(pid: int, data_dir: Path) -> bool:
    if not _HAVE_PROCFS:  # macOS: settle for "alive"
        return _is_alive(pid)
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    # pg_ctl runs "<bindir>/postgres -D <data_dir>"; a zombie has an empty cmdline.
    return (
        os.path.basename(argv[0]) in (b"postgres", b"postmaster")
        and os.fsencode(str(data_dir)) in argv
    )


def _is_alive(pid: int) -> bool:
    """True while ``pid`` runs; zombies count as gone (they hold no port or memory)."""
    if not _HAVE_PROCFS:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    try:
        proc_stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return proc_stat.rsplit(")", 1)[1].split()[0] != "Z"  # the state follows "(command)"


def _child_pids(parent: int) -> list[int]:
    """Direct children of ``parent`` (none found without procfs)."""
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[1]) == parent:
            children.append(int(stat_file.parent.name))
    return children


def _signal(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signum)


def _wait_gone(pids: Iterable[int], timeout: float) -> bool:
    remaining = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        remaining = [pid for pid in remaining if _is_alive(pid)]
        if not remaining:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def _wait_for(condition: Callable[[], bool], timeout: float, failure: str) -> None:
    """Poll ``condition()`` until true; query errors while waiting count as "not yet"."""
    deadline = time.monotonic() + timeout
    last_error: ClusterError | None = None
    while time.monotonic() < deadline:
        try:
            if condition():
                return
        except ClusterError as exc:
            last_error = exc
        time.sleep(0.05)
    detail = f" (last error: {last_error})" if last_error else ""
    raise ClusterError(f"{failure} within {timeout} s{detail}")


# -- files and ports ---------------------------------------------------------------


def _chown_to_server_user(path: Path) -> None:
    ids = _server_user_ids()
    if ids is not None:
        os.chown(path, *ids)


def _check_server_can_enter(directory: Path) -> None:
    """Fail early and clearly if the server user can't reach ``directory`` (e.g. under /root)."""
    ids = _server_user_ids()
    if ids is None:
        return  # we run the servers as ourselves, and we could create the directory
    uid, gid = ids
    for path in [directory, *directory.parents]:
        info = path.stat()
        if info.st_uid == uid:
            needed = stat.S_IXUSR
        elif info.st_gid == gid:
            needed = stat.S_IXGRP
        else:
            needed = stat.S_IXOTH
        if not info.st_mode & needed:
            raise ClusterError(
                f"user {_OS_USER!r} cannot enter {path}; "
                f"pass a base_dir it can reach, such as one under {tempfile.gettempdir()}"
            )


def _write_owned(path: Path, text: str) -> None:
    """Write a file the server must own (we may be root, it is not)."""
    path.write_text(text)
    _chown_to_server_user(path)


def _write_private(path: Path, text: str) -> None:
    """Create a file only the server user (and root) can read: mode 0600 from the start."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as file:
        _chown_to_server_user(path)
        file.write(text)


def _userinfo(password: str | None) -> str:
    """``postgres`` or ``postgres:PASSWORD`` (percent-encoded) for a URL."""
    if password is None:
        return SUPERUSER
    return f"{SUPERUSER}:{urllib.parse.quote(password, safe='')}"


def _conninfo_literal(value: str) -> str:
    """A quoted libpq key/value conninfo value."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _pgpass_escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _conf_literal(value: str) -> str:
    """A quoted postgresql.conf value (there, unlike in SQL, backslash escapes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _quorum(names: Sequence[str]) -> str:
    return f"ANY 1 ({', '.join(names)})"


def _conf_line_name(line: str) -> str | None:
    match = re.match(r"\s*([A-Za-z_][A-Za-z0-9_.]*)\s*=", line)
    return match.group(1).lower() if match else None


_ports_lock = threading.Lock()
_ports_in_use: set[int] = set()  # handed to nodes of live clusters in this process


def _free_port() -> int:
    """A loopback port nobody listens on now and no other node of ours was given."""
    with _ports_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port: int = sock.getsockname()[1]
            # A stopped node's port is free to the kernel but it will want it back.
            if port not in _ports_in_use:
                _ports_in_use.add(port)
                return port


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as postgres does
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True
