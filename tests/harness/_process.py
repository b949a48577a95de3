"""Process plumbing shared by the HA test harnesses.

Servers run as the ``postgres`` user when we are root (PostgreSQL refuses root),
each started in its own session so one ``killpg`` reaches a supervisor and the
helpers it forks. Postmasters are found through ``postmaster.pid`` and checked
against ``/proc/PID/cmdline`` before they are signalled. :class:`SupervisedCluster`
is the lifecycle both HA clusters share.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, Self, TypeVar

HOST = "127.0.0.1"
SERVER_USER = "postgres"


class HarnessError(RuntimeError):
    """A cluster did not start, or did not reach the expected state in time."""


class HarnessUnavailable(HarnessError):
    """A program the harness needs is not installed (run ``.ci/install-servers.sh``)."""


def pg_bin() -> Path:
    """The server binaries: ``$PICOPOOL_PG_BIN``, else the newest /usr/lib/postgresql/*/bin."""
    configured = os.environ.get("PICOPOOL_PG_BIN")
    candidates = [Path(configured)] if configured else sorted(
        Path("/usr/lib/postgresql").glob("*/bin"), key=_major_version, reverse=True)
    for candidate in candidates:
        if all(os.access(candidate / p, os.X_OK) for p in ("initdb", "postgres", "psql")):
            return candidate
    raise HarnessUnavailable("PostgreSQL server binaries not found: install postgresql "
                             "or set PICOPOOL_PG_BIN to the directory holding initdb")


def _major_version(bin_dir: Path) -> int:
    return int(bin_dir.parent.name) if bin_dir.parent.name.isdigit() else -1


def require_executable(path: Path | str, hint: str) -> Path:
    resolved = Path(path) if os.sep in str(path) else Path(shutil.which(str(path)) or path)
    if not os.access(resolved, os.X_OK):
        raise HarnessUnavailable(f"{resolved} is missing or not executable: {hint}")
    return resolved


# -- users and files ---------------------------------------------------------------


def server_ids() -> tuple[int, int] | None:
    """(uid, gid) of the server user when we are root; None to run as ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        entry = pwd.getpwnam(SERVER_USER)
    except KeyError:
        raise HarnessUnavailable(f"running as root but there is no {SERVER_USER!r} user") from None
    return entry.pw_uid, entry.pw_gid


def chown_to_server(path: Path) -> None:
    ids = server_ids()
    if ids is not None:
        os.chown(path, *ids)


def write_owned(path: Path, text: str, mode: int = 0o644) -> None:
    path.write_text(text)
    path.chmod(mode)
    chown_to_server(path)


def make_owned_dir(path: Path, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(mode)
    chown_to_server(path)
    return path


def server_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Our environment minus PG* variables (they would override explicit settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_MESSAGES"] = "C"
    ids = server_ids()
    if ids is not None:
        # Root's HOME is unreadable to the server user.
        env["HOME"] = pwd.getpwuid(ids[0]).pw_dir
    env.update(extra or {})
    return env


# -- running programs ---------------------------------------------------------------


def spawn(argv: Sequence[str | Path], *, log_file: Path, env: Mapping[str, str],
          cwd: Path) -> subprocess.Popen[bytes]:
    """Start a long-running server as the server user, in its own session."""
    ids = server_ids()
    with open(log_file, "ab") as log:
        return subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            user=ids[0] if ids else None,
            group=ids[1] if ids else None,
            extra_groups=[] if ids else None,
        )


def run(argv: Sequence[str | Path], *, env: Mapping[str, str], timeout: float,
        cwd: Path | str = "/", check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a short command as the server user and return its output."""
    ids = server_ids()
    try:
        result = subprocess.run(
            [str(a) for a in argv],
            capture_output=True,
            text=True,
            env=dict(env),
            cwd=cwd,
            timeout=timeout,
            check=False,
            stdin=subprocess.DEVNULL,
            user=ids[0] if ids else None,
            group=ids[1] if ids else None,
            extra_groups=[] if ids else None,
        )
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"timed out after {timeout} s: {' '.join(map(str, argv))}") from exc
    if check and result.returncode != 0:
        output = (result.stdout + result.stderr).strip()
        raise HarnessError(f"failed ({result.returncode}): {' '.join(map(str, argv))}\n{output}")
    return result


def psql(bin_dir: Path, port: int, query: str, *, database: str = "postgres",
         user: str = "postgres", timeout: float = 10) -> str:
    """Run one query through psql over TCP; unaligned, tuples-only output."""
    argv = [
        bin_dir / "psql", "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
        "-h", HOST, "-p", str(port), "-U", user, "-d", database, "-c", query,
    ]  # fmt: skip
    env = server_env({"PGCONNECT_TIMEOUT": str(max(1, round(timeout))),
                      "PGAPPNAME": "picopool-harness"})
    try:
        result = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env,
                                timeout=timeout, check=False, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired as exc:
        raise HarnessError(f"port {port}: query timed out: {query}") from exc
    if result.returncode != 0:
        raise HarnessError(f"port {port}: {result.stderr.strip()} (query: {query})")
    return result.stdout.strip()


# -- HTTP ---------------------------------------------------------------------------


def http_json(method: str, url: str, body: object | None = None,
              timeout: float = 5) -> tuple[int, Any]:
    """One JSON request; returns (status, decoded body or raw text). Raises OSError if down."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:  # 4xx/5xx still carry a useful body
        status, raw = exc.code, exc.read()
    text = raw.decode(errors="replace")
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


# -- processes ----------------------------------------------------------------------


def postmaster_pid(data_dir: Path) -> int | None:
    """The live postmaster of *data_dir*, verified through /proc, or None."""
    try:
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    # A stale file may name a PID reused by something else: check it is our server.
    is_ours = (os.path.basename(argv[0]) in (b"postgres", b"postmaster")
               and any(os.fsencode(str(data_dir)) in arg for arg in argv))
    return pid if is_ours and is_alive(pid) else None


def postmaster_family(data_dir: Path) -> list[int]:
    """The postmaster of *data_dir* and its children, or [] if it is not running.

    Collect them before killing anything: once the postmaster dies its children
    are reparented to init and no longer traceable through it.
    """
    pid = postmaster_pid(data_dir)
    return [] if pid is None else [pid, *child_pids(pid)]


def kill_server(data_dir: Path, supervisor: subprocess.Popen[bytes] | None = None,
                timeout: float = 10) -> None:
    """kill -9 a node as in a crash: its supervisor (Patroni, pg_autoctl) and its postmaster.

    The supervisor goes first so it cannot restart postgres. The postmaster is
    not reached through it: Patroni's is reparented to init, and pg_autoctl's
    may die with the supervisor's session while its children live on. So the
    postmaster (read from postmaster.pid, checked in /proc) and its children
    are collected first, and any process still working in the data directory
    is killed last.
    """
    family = postmaster_family(data_dir)
    if supervisor is not None:
        kill_session(supervisor, signal.SIGKILL, timeout)
    for pid in family:
        send_signal(pid, signal.SIGKILL)
    if not wait_gone(family, timeout):
        raise HarnessError(f"postmaster of {data_dir} survived SIGKILL")
    kill_processes_under(data_dir, timeout)
    # Everything is verifiably dead, so the lock file is stale: a reused PID must
    # not block a restart.
    (data_dir / "postmaster.pid").unlink(missing_ok=True)


def processes_under(directory: Path) -> list[int]:
    """Processes whose working directory is *directory* or below it.

    Every postgres process works in its data directory and the harness starts
    its servers in the cluster's own temp dir, so this finds exactly what a
    cluster left behind, whatever its parent or session.
    """
    prefix = os.fsencode(str(directory))
    found = []
    for cwd_link in Path("/proc").glob("[0-9]*/cwd"):
        try:
            cwd = os.readlink(cwd_link)
        except OSError:
            continue  # exited, or not ours to read
        cwd_bytes = os.fsencode(cwd).removesuffix(b" (deleted)")
        if cwd_bytes == prefix or cwd_bytes.startswith(prefix + b"/"):
            found.append(int(cwd_link.parent.name))
    return [pid for pid in found if pid != os.getpid()]


def kill_processes_under(directory: Path, timeout: float = 10) -> None:
    pids = processes_under(directory)
    for pid in pids:
        send_signal(pid, signal.SIGKILL)
    if not wait_gone(pids, timeout):
        raise HarnessError(f"processes under {directory} survived SIGKILL: {pids}")


def immediate_shutdown(data_dirs: Iterable[Path], timeout: float = 5) -> None:
    """SIGQUIT every running postmaster (it ends its children) and wait for them."""
    pids = [pid for pid in (postmaster_pid(d) for d in data_dirs) if pid is not None]
    for pid in pids:
        send_signal(pid, signal.SIGQUIT)
    wait_gone(pids, timeout)


def kill_session(process: subprocess.Popen[bytes], sig: int = signal.SIGKILL,
                 timeout: float = 10) -> None:
    """Signal a server started by :func:`spawn` and every process of its session."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)
    if sig == signal.SIGKILL:
        # Helpers of the session that outlived the leader (reaped by init, not us).
        for pid in session_pids(process.pid):
            send_signal(pid, signal.SIGKILL)


def session_pids(session_id: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[3]) == session_id:  # field 6 of stat: the session id
            found.append(int(stat_file.parent.name))
    return found


def child_pids(parent: int) -> list[int]:
    children = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == parent:
            children.append(int(stat_file.parent.name))
    return children


def is_alive(pid: int) -> bool:
    """True while *pid* runs; zombies count as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def send_signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def wait_gone(pids: Iterable[int], timeout: float) -> bool:
    remaining = list(pids)
    deadline = time.monotonic() + timeout
    while True:
        remaining = [pid for pid in remaining if is_alive(pid)]
        if not remaining:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)


def wait_for(condition: Callable[[], Any], timeout: float, failure: str,
             interval: float = 0.1) -> Any:
    """Poll until ``condition()`` returns something truthy and return it.

    Errors while waiting (a server still starting) count as "not yet"; the
    last one is reported if time runs out.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = condition()
        except (HarnessError, OSError, ValueError, KeyError, TypeError) as exc:
            last_error = exc
        else:
            if result:
                return result
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise HarnessError(f"{failure} within {timeout} s{detail}")
        time.sleep(interval)


def log_tail(path: Path, lines: int = 30) -> str:
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return ""
    return f"\n--- {path} (tail) ---\n" + "\n".join(tail)


# -- ports --------------------------------------------------------------------------

_ports_lock = threading.Lock()
_ports_handed_out: set[int] = set()


def free_port() -> int:
    """A loopback port nobody listens on now and that this process has not handed out."""
    with _ports_lock:
        while True:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                sock.bind((HOST, 0))
                port: int = sock.getsockname()[1]
            if port not in _ports_handed_out:
                _ports_handed_out.add(port)
                return port


def release_ports(ports: Iterable[int]) -> None:
    with _ports_lock:
        _ports_handed_out.difference_update(ports)


# -- clusters -----------------------------------------------------------------------


@dataclass
class SupervisedNode:
    """A PostgreSQL node run by a supervisor (Patroni, pg_autoctl): ``process`` while it runs."""

    name: str
    data_dir: Path
    log_file: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False, kw_only=True)

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None


N = TypeVar("N", bound=SupervisedNode)


class SupervisedCluster(Generic[N]):
    """Supervised nodes in a fresh temp dir, started once.

    Every process, data directory and port is tracked for a finalizer, which
    stops everything at interpreter exit if ``stop()`` was never called.
    Subclasses find their programs in :meth:`_find_programs` and start the
    servers in :meth:`_boot`.
    """

    dir_prefix = "picopool-"
    start_timeout: float = 90

    def __init__(self, *, nodes: int, base_dir: Path | str | None) -> None:
        self.node_count = nodes
        self.parent_dir = Path(os.path.abspath(base_dir or tempfile.gettempdir()))
        self.base_dir: Path | None = None
        self.nodes: dict[str, N] = {}
        self.timings: dict[str, float] = {}  # seconds: start, switchover, failover, ...
        # Shared with the finalizer, which must not hold a reference to self.
        self._supervisors: list[subprocess.Popen[bytes]] = []
        self._services: list[subprocess.Popen[bytes]] = []  # e.g. etcd: killed last
        self._data_dirs: list[Path] = []
        self._ports: list[int] = []
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._bin_dir: Path | None = None  # PostgreSQL's, once started

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.base_dir} nodes={list(self.nodes)}>"

    def start(self, timeout: float | None = None) -> Self:
        """Start every server; return once the cluster is healthy (default ``start_timeout``)."""
        if self.base_dir is not None:
            raise HarnessError(f"{type(self).__name__} can be started only once")
        self._bin_dir = pg_bin()
        self._find_programs()
        started = time.monotonic()
        self.base_dir = Path(tempfile.mkdtemp(prefix=self.dir_prefix, dir=self.parent_dir))
        self._finalizer = weakref.finalize(
            self, shut_down, self._supervisors, self._data_dirs, self._services, self._ports,
            self.base_dir,
        )
        try:
            make_owned_dir(self.base_dir)
            self._boot(self.start_timeout if timeout is None else timeout)
        except BaseException:
            self.stop()
            raise
        self.timings["start"] = time.monotonic() - started
        return self

    def stop(self) -> None:
        """Kill every process the cluster started and remove its directory. Idempotent."""
        if self._finalizer is not None:
            self._finalizer()

    def _find_programs(self) -> None:
        """Raise :class:`HarnessUnavailable` if a program the cluster needs is missing."""
        raise NotImplementedError

    def _boot(self, timeout: float) -> None:
        """Start the servers in ``base_dir``; return once the cluster is healthy."""
        raise NotImplementedError

    def _free_ports(self, count: int) -> list[int]:
        ports = [free_port() for _ in range(count)]
        self._ports.extend(ports)
        return ports

    def _supervise(self, node: N, argv: Sequence[str | Path], env: Mapping[str, str]) -> None:
        """Start *node*'s supervisor."""
        assert self.base_dir is not None
        node.process = spawn(argv, log_file=node.log_file, env=env, cwd=self.base_dir)
        self._supervisors.append(node.process)

    def node(self, name: str) -> N:
        try:
            return self.nodes[name]
        except KeyError:
            raise HarnessError(f"no node named {name!r}") from None

    def restart_node(self, name: str, timeout: float) -> None:
        """Start a killed node's supervisor again; return once it is a healthy replica."""
        raise NotImplementedError

    def _restart_killed_nodes(self, timeout: float) -> None:
        for node in self.nodes.values():
            if not node.is_running():
                self.restart_node(node.name, timeout)


def shut_down(supervisors: list[subprocess.Popen[bytes]], data_dirs: list[Path],
              services: list[subprocess.Popen[bytes]], ports: list[int], base_dir: Path) -> None:
    """Kill the supervisors (so nothing restarts postgres), then every postmaster, then the
    services (etcd); remove *base_dir*. Never raises."""
    with contextlib.suppress(Exception):
        for process in supervisors:
            kill_session(process, signal.SIGKILL)
        immediate_shutdown(data_dirs)  # SIGQUIT: each postmaster ends its backends
        for process in services:
            kill_session(process, signal.SIGKILL)
    with contextlib.suppress(Exception):
        # Whatever outlived its parent, e.g. the children of a postmaster that died
        # with its supervisor's session.
        kill_processes_under(base_dir)
    shutil.rmtree(base_dir, ignore_errors=True)
    release_ports(ports)
    supervisors.clear()
    services.clear()
