"""``python -m picopool topology DSN``: the cluster as picopool sees it.

    python -m picopool topology postgres://app:pw@h1:5432,h2:5432/app
    python -m picopool topology DSN --watch        # redraw every second, in place
    python -m picopool topology DSN --json         # one JSON document

A table for humans: each instance's role, state (``up`` if a connection to it works
now, else ``down``), replica lag, circuit breaker and the number of client
connections the server has. The exit status is 0 when a primary (or, on a symmetric
cluster such as Picodata, any peer) is reachable, 1 when none is, 2 when the pool
cannot start at all. Passwords never reach the output: the DSN is masked, and so is
any error text that could carry it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, TextIO

from ._dsn import mask_dsn
from ._errors import describe_error
from ._execute import Reset
from ._pool import Pool, create_pool
from ._routing import RoleRequest

_CONNECTIONS = ("SELECT count(*) FROM pg_stat_activity "
                "WHERE backend_type = 'client backend'")
_CLEAR = "\x1b[H\x1b[J"  # cursor home, clear to the end of the screen


@dataclass(frozen=True)
class Row:
    instance: str
    role: str
    state: str  # up, down
    lag_bytes: int | None
    lag_seconds: float | None
    breaker: str
    connections: int | None  # client backends on the server
    error: str | None


@dataclass(frozen=True)
class Snapshot:
    dsn: str  # masked
    provider: str
    version: int
    symmetric: bool
    rows: tuple[Row, ...]
    error: str | None  # the last refresh's error

    @property
    def healthy(self) -> bool:
        """A primary (any peer, on a symmetric cluster) answers."""
        return any(r.state == "up" and (self.symmetric or r.role == "primary")
                   for r in self.rows)


class _Scrubber:
    """Masks the DSN's password in error text (errors mask DSNs already: belt and braces)."""

    def __init__(self, password: str | None) -> None:
        self._password = password

    def __call__(self, text: str) -> str:
        return text.replace(self._password, "***") if self._password else text


def _password(dsn: str) -> str | None:
    match = re.match(r"^[a-z]+://[^@/]*?:([^@/]*)@", dsn)
    if match:
        from urllib.parse import unquote
        return unquote(match.group(1))
    match = re.search(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn)
    return match.group(1).strip("'") if match else None


async def _probe(pool: Pool, instance_id: str, timeout: float) -> tuple[bool, int | None, str]:
    """Whether *instance_id* takes a connection now, and its client connections."""
    executor = pool._executor
    try:
        async with asyncio.timeout(timeout):
            member, connection = await executor.acquire(RoleRequest.ANY, timeout,
                                                        instance=instance_id)
    except Exception as exc:
        return False, None, describe_error(exc)
    count: int | None = None
    try:
        async with asyncio.timeout(timeout):
            count = int(await connection._con.fetchval(_CONNECTIONS))
    except Exception:  # Picodata and other servers without pg_stat_activity
        count = None
    finally:
        await executor.release(member, connection, Reset.FULL, quiet=True)
    return True, count, ""


async def snapshot(pool: Pool, dsn: str, timeout: float, scrub: _Scrubber) -> Snapshot:
    error = None
    try:
        await pool.refresh_topology()
    except Exception as exc:
        error = scrub(describe_error(exc))
    stats = pool.stats()
    topology = pool.topology
    instances = list(topology.instances) if topology else []
    probes = await asyncio.gather(*(_probe(pool, i.id, timeout) for i in instances))
    by_label = {s.label: s for s in stats.instances}
    rows = []
    for instance, (up, count, problem) in zip(instances, probes, strict=True):
        s = by_label.get(instance.label)
        rows.append(Row(
            instance=instance.label, role=instance.role.value, state="up" if up else "down",
            lag_bytes=s.lag_bytes if s else None, lag_seconds=s.lag_seconds if s else None,
            breaker=s.breaker if s else "closed", connections=count,
            error=scrub(problem) if problem else None))
    return Snapshot(dsn=mask_dsn(dsn), provider=stats.provider,
                    version=stats.topology_version,
                    symmetric=bool(topology and topology.symmetric), rows=tuple(rows),
                    error=error)


def _lag(row: Row) -> str:
    if row.role != "replica":
        return "-"
    if row.lag_bytes is None and row.lag_seconds is None:
        return "?"
    size = "?" if row.lag_bytes is None else _bytes(row.lag_bytes)
    seconds = "?" if row.lag_seconds is None else f"{row.lag_seconds:.1f}s"
    return f"{size} / {seconds}"


def _bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def render(snap: Snapshot) -> str:
    header = ("INSTANCE", "ROLE", "STATE", "LAG", "BREAKER", "CONNECTIONS")
    lines = [header] + [
        (r.instance, r.role, r.state, _lag(r), r.breaker,
         "?" if r.connections is None else str(r.connections))
        for r in snap.rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [f"{snap.dsn}  ({snap.provider}, topology v{snap.version})"]
    out += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
            for line in lines]
    for r in snap.rows:
        if r.error:
            out.append(f"{r.instance}: {r.error}")
    if snap.error:
        out.append(f"refresh failed: {snap.error}")
    if not snap.healthy:
        out.append("no primary is reachable" if not snap.symmetric
                   else "no instance is reachable")
    return "\n".join(out) + "\n"


def as_json(snap: Snapshot) -> str:
    document: dict[str, Any] = asdict(snap)
    document["healthy"] = snap.healthy
    return json.dumps(document, indent=2) + "\n"


async def topology(dsn: str, *, watch: float | None, as_json_output: bool, timeout: float,
                   out: TextIO) -> int:
    scrub = _Scrubber(_password(dsn))
    pool = create_pool(dsn, min_size=0, max_size=1, topology_refresh_interval=None,
                       health_check_interval=None, connect_timeout=timeout,
                       failover_timeout=timeout, max_retries=0)
    try:
        await pool
    except Exception as exc:
        out.write(f"{mask_dsn(dsn)}: cannot start: {scrub(describe_error(exc))}\n")
        out.flush()
        return 2
    try:
        tty = out.isatty()
        while True:
            started = time.monotonic()
            snap = await snapshot(pool, dsn, timeout, scrub)
            text = as_json(snap) if as_json_output else render(snap)
            if watch is not None and tty and not as_json_output:
                text = _CLEAR + text + f"\nevery {watch:g} s, Ctrl-C to stop\n"
            out.write(text)
            out.flush()
            if watch is None:
                return 0 if snap.healthy else 1
            await asyncio.sleep(max(0.0, watch - (time.monotonic() - started)))
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(pool.close(), timeout)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m picopool")
    commands = parser.add_subparsers(dest="command", required=True)
    top = commands.add_parser("topology", help="show the cluster's instances")
    top.add_argument("dsn", help="a (multi-host) DSN, as create_pool takes it")
    top.add_argument("--watch", nargs="?", type=float, const=1.0, default=None,
                     metavar="SECONDS", help="redraw in place every SECONDS (default 1)")
    top.add_argument("--json", action="store_true", help="print JSON")
    top.add_argument("--timeout", type=float, default=3.0,
                     help="seconds to wait for each instance (default 3)")
    args = parser.parse_args(argv)
    try:
        return asyncio.run(topology(args.dsn, watch=args.watch, as_json_output=args.json,
                                    timeout=args.timeout, out=sys.stdout))
    except KeyboardInterrupt:
        return 130
