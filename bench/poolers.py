"""pgbouncer and pgpool-II for the benches: started on free ports, stopped after.

Both run as the ``postgres`` user when this process is root (neither runs as
root). Debian 12's packages: pgbouncer 1.18 (no prepared statements in
transaction mode: clients need ``statement_cache_size=0``), pgpool-II 4.3.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from picopool.cluster import LocalCluster, LocalNode

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"
PGPOOL = shutil.which("pgpool") or "/usr/sbin/pgpool"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _signal_and_wait(pid: int, signum: int, timeout: float) -> None:
    """Signal *pid*; SIGKILL it if it has not exited after *timeout* seconds."""
    try:
        os.kill(pid, signum)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            time.sleep(0.02)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return


class _Daemon:
    def __init__(self, prefix: str) -> None:
        self.port = free_port()
        self.directory = Path(tempfile.mkdtemp(prefix=prefix))
        self.process: subprocess.Popen[bytes] | None = None

    def _start(self, command: list[str], log: Path) -> None:
        if os.geteuid() == 0:
            shutil.chown(self.directory, "postgres")
            for path in self.directory.iterdir():
                shutil.chown(path, "postgres")
            command = ["runuser", "-u", "postgres", "--", *command]
        with open(log, "ab") as output:
            self.process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{command[-1]} did not start: {log.read_text()[-2000:]}")

    #: The signal that shuts the daemon down without waiting for its clients, and
    #: where it writes its PID (runuser, which started it, does not always pass a
    #: signal on: the daemon is signalled directly).
    stop_signal = signal.SIGTERM
    pid_file = ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            daemon = self._daemon_pid()
            if daemon is not None:
                _signal_and_wait(daemon, self.stop_signal, 10)
            else:
                self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        shutil.rmtree(self.directory, ignore_errors=True)

    def _daemon_pid(self) -> int | None:
        try:
            return int((self.directory / self.pid_file).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def __enter__(self) -> _Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class PgBouncer(_Daemon):
    """pgbouncer in transaction mode in front of one server."""

    pid_file = "pgbouncer.pid"  # SIGTERM: its immediate shutdown

    def __init__(self, node: LocalNode, password: str, *, pool_size: int = 8) -> None:
        super().__init__("picopool-pgbouncer-")
        self.config = self.directory / "pgbouncer.ini"
        self.config.write_text(f"""[databases]
* = host={node.host} port={node.port}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = scram-sha-256
auth_file = {self.directory}/userlist.txt
pool_mode = transaction
default_pool_size = {pool_size}
max_client_conn = 500
logfile = {self.directory}/pgbouncer.log
pidfile = {self.directory}/pgbouncer.pid
""")
        (self.directory / "userlist.txt").write_text(f'"postgres" "{password}"\n')

    def start(self) -> PgBouncer:
        self._start([PGBOUNCER, str(self.config)], self.directory / "stdout.log")
        return self


class PgPool(_Daemon):
    """pgpool-II in streaming-replication mode with read load balancing over *cluster*."""

    stop_signal = signal.SIGQUIT  # its immediate shutdown (SIGTERM waits for clients)
    pid_file = "pgpool.pid"

    def __init__(self, cluster: LocalCluster, *, num_init_children: int = 80) -> None:
        super().__init__("picopool-pgpool-")
        backends = []
        for index, node in enumerate(cluster.nodes):
            backends.append(f"backend_hostname{index} = '{node.host}'\n"
                            f"backend_port{index} = {node.port}\n"
                            f"backend_weight{index} = 1\n"
                            f"backend_flag{index} = 'ALLOW_TO_FAILOVER'\n")
        d = self.directory
        self.config = d / "pgpool.conf"
        self.config.write_text(f"""backend_clustering_mode = 'streaming_replication'
listen_addresses = '127.0.0.1'
port = {self.port}
unix_socket_directories = '{d}'
pcp_listen_addresses = ''
pcp_port = {free_port()}
pcp_socket_dir = '{d}'
wd_ipc_socket_dir = '{d}'
pid_file_name = '{d}/pgpool.pid'
logdir = '{d}'
{''.join(backends)}
enable_pool_hba = off
pool_passwd = '{d}/pool_passwd'
allow_clear_text_frontend_auth = off
num_init_children = {num_init_children}
max_pool = 1
load_balance_mode = on
statement_level_load_balance = on
sr_check_period = 0
health_check_period = 0
failover_on_backend_error = off
connection_cache = off
reset_query_list = 'ABORT; DISCARD ALL'
log_min_messages = warning
""")
        (d / "pool_passwd").write_text(f"postgres:TEXT{cluster.password}\n")
        (d / "pcp.conf").write_text("")

    def start(self) -> PgPool:
        self._start([PGPOOL, "-n", "-f", str(self.config), "-F", str(self.directory / "pcp.conf")],
                    self.directory / "pgpool.log")
        return self
