"""pg_auto_failover: read the group's nodes from the monitor.

The provider keeps one connection to the monitor database of its own (the
pool's service connection goes to the data nodes, not the monitor).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from .._dsn import mask_dsn
from .._errors import ConfigurationError, TopologyError, describe_error
from .._topology import Address, Instance, Role, normalize_host
from .._wal import parse_lsn
from ._base import Discovered, DiscoveryContext, DiscoveryProvider

logger = logging.getLogger("picopool.discovery")

__all__ = ["AutoFailover", "parse_lsn", "parse_nodes"]

_PRIMARY_QUERY = "SELECT * FROM pgautofailover.get_primary($1, $2)"
_NODES_QUERY = (
    "SELECT nodeid, nodename, nodehost, nodeport, reportedstate::text AS reportedstate, "
    "goalstate::text AS goalstate, health, reportedlsn::text AS reportedlsn, "
    "formationid, groupid "
    "FROM pgautofailover.node WHERE formationid = $1 AND groupid = $2 ORDER BY nodeid"
)
# The goal states in which the monitor lets a node take writes (CanTakeWritesInState).
WRITABLE_STATES = frozenset({"single", "primary", "wait_primary", "join_primary", "apply_settings"})
READABLE_STATE = "secondary"
HEALTHY = 1


def parse_nodes(nodes: object, primary_id: object = None) -> tuple[Instance, ...]:
    """Map rows of ``pgautofailover.node`` to instances; pure, so it can be property-tested.

    *primary_id* is the node id ``get_primary()`` answered, or None when it
    failed. The monitor's word is taken only for a node whose goal state can
    take writes: get_primary() also names a primary that is being demoted
    (``draining``, ``demote_timeout``, ``demoted``), and after a crash the dead
    old primary. Without a usable answer, the one node whose goal state can take
    writes is the primary; if several claim it, none is (writes wait for the
    monitor rather than risk a split brain). ``node_is_primary`` is not used: it
    can be true for both the dead old primary and the new one.

    Readers are the healthy nodes in ``secondary`` (reported and goal); every
    other node is left out. Malformed rows are skipped with a logged warning.
    Raises :class:`TopologyError` only if *nodes* is not a list of rows.
    """
    if not isinstance(nodes, list | tuple):
        raise TopologyError(f"pg_auto_failover nodes are not a list: {_clip(nodes)}")
    unique: dict[str, _Node] = {}  # by name, which becomes the instance id
    seen_ids: set[int] = set()
    for node in (_parse_row(row) for row in nodes):
        if node is None:
            continue
        if node.name in unique or node.node_id in seen_ids:
            logger.warning("pg_auto_failover: skipping duplicate node %s (id %s)",
                           node.name, node.node_id)
            continue
        unique[node.name] = node
        seen_ids.add(node.node_id)
    writable = [n for n in unique.values() if n.goal_state in WRITABLE_STATES]
    named = next((n for n in writable if _same_id(n.node_id, primary_id)), None)
    if named is not None:
        primary: _Node | None = named
    elif len(writable) == 1:
        primary = writable[0]
    else:
        primary = None
        if writable:
            logger.warning("pg_auto_failover: several nodes may take writes (%s); none is "
                           "used as primary until the monitor settles",
                           ", ".join(n.name for n in writable))
    instances = []
    for node in unique.values():
        if node is primary:
            instances.append(node.instance(Role.PRIMARY, None))
        elif (node.health == HEALTHY and node.reported_state == READABLE_STATE
              and node.goal_state == READABLE_STATE):
            lag = None
            if primary is not None and primary.lsn is not None and node.lsn is not None:
                lag = max(0, primary.lsn - node.lsn)
            instances.append(node.instance(Role.REPLICA, lag))
        else:
            logger.debug("pg_auto_failover: node %s is %s -> %s (health %s): not usable",
                         node.name, node.reported_state, node.goal_state, node.health)
    return tuple(instances)


@dataclass(frozen=True, slots=True)
class _Node:
    """A validated row of ``pgautofailover.node``."""

    node_id: int
    name: str
    address: Address
    reported_state: str
    goal_state: str
    health: int | None
    lsn: int | None

    def instance(self, role: Role, lag_bytes: int | None) -> Instance:
        return Instance(
            id=self.name,
            address=self.address,
            role=role,
            name=self.name,
            state=self.reported_state,
            lag_bytes=lag_bytes,
            attributes=(
                ("node_id", str(self.node_id)),
                ("reported_state", self.reported_state),
                ("goal_state", self.goal_state),
            ),
        )


def _parse_row(row: object) -> _Node | None:
    if not isinstance(row, Mapping):
        logger.warning("pg_auto_failover: skipping a row that is not a mapping: %s", _clip(row))
        return None
    node_id = _integer(row.get("nodeid"))
    host, port = row.get("nodehost"), _integer(row.get("nodeport"))
    reported, goal = row.get("reportedstate"), row.get("goalstate")
    if node_id is None or not isinstance(reported, str) or not isinstance(goal, str):
        logger.warning("pg_auto_failover: skipping a malformed node row: %s", _clip(row))
        return None
    raw_name = row.get("nodename")
    name = raw_name.strip() if isinstance(raw_name, str) and raw_name.strip() else f"node_{node_id}"
    if not isinstance(host, str) or port is None or not 0 < port < 65536:
        logger.warning("pg_auto_failover: skipping node %s with a bad address (%s, %s)",
                       name, _clip(host), _clip(row.get("nodeport")))
        return None
    try:
        address = Address(normalize_host(host.strip()), port)
    except ValueError:
        logger.warning("pg_auto_failover: skipping node %s with a bad host %s", name, _clip(host))
        return None
    return _Node(node_id, name, address, reported, goal, _integer(row.get("health")),
                 parse_lsn(row.get("reportedlsn")))


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _same_id(node_id: int, primary_id: object) -> bool:
    return _integer(primary_id) == node_id


def _clip(value: object, limit: int = 160) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class AutoFailover(DiscoveryProvider):
    """Discover a pg_auto_failover group through its monitor.

    ``monitor_dsn`` is the monitor's URI (``pg_autoctl show uri --monitor``),
    e.g. ``postgres://autoctl_node@monitor:5432/pg_auto_failover``. The
    provider asks ``pgautofailover.get_primary()`` for the primary and reads
    ``pgautofailover.node`` for the rest of ``formation``/``group``: healthy
    secondaries serve reads, every other node is left out. ``timeout`` bounds
    connecting and the queries of one refresh.
    """

    name = "pg_auto_failover"

    def __init__(self, monitor_dsn: str, formation: str = "default", group: int = 0, *,
                 timeout: float = 2.0) -> None:
        if not isinstance(monitor_dsn, str) or not monitor_dsn.strip():
            raise ConfigurationError("AutoFailover needs the monitor's DSN")
        if timeout <= 0:
            raise ConfigurationError("timeout must be positive")
        self._dsn = monitor_dsn
        self._formation = formation
        self._group = group
        self._timeout = timeout
        self._connection: Any = None  # asyncpg.Connection to the monitor
        self._lock = asyncio.Lock()  # one query at a time on that connection

    async def discover(self, ctx: DiscoveryContext) -> Discovered:
        async with self._lock:
            try:
                async with asyncio.timeout(self._timeout):
                    connection = await self._monitor()
                    primary_id = await self._primary_id(connection)
                    rows = await connection.fetch(_NODES_QUERY, self._formation, self._group)
            except (Exception, asyncio.CancelledError) as exc:
                # A query cut short leaves the connection in an unknown state.
                self._drop_connection()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise TopologyError(
                    f"pg_auto_failover monitor {mask_dsn(self._dsn)}: {describe_error(exc)}"
                ) from exc
        return Discovered(parse_nodes([dict(row.items()) for row in rows], primary_id))

    async def _monitor(self) -> Any:
        connection = self._connection
        if connection is not None and not connection.is_closed():
            return connection
        self._connection = None
        # Assigned right after connect returns, with no await in between, so a
        # cancellation can't lose it; asyncpg closes a half-open one itself.
        self._connection = await asyncpg.connect(self._dsn, timeout=self._timeout)
        return self._connection

    async def _primary_id(self, connection: Any) -> int | None:
        """The node id ``get_primary()`` names, or None while it has no answer."""
        try:
            row = await connection.fetchrow(_PRIMARY_QUERY, self._formation, self._group)
        except asyncpg.PostgresError as exc:
            # "no primary" during a transition; the goal states decide instead.
            logger.debug("pg_auto_failover: get_primary failed: %s", describe_error(exc))
            return None
        return _integer(row[0]) if row is not None else None

    def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            connection.terminate()

    async def aclose(self) -> None:
        async with self._lock:
            connection, self._connection = self._connection, None
        if connection is None:
            return
        try:
            await asyncio.wait_for(connection.close(), self._timeout)
        except asyncio.CancelledError:
            connection.terminate()
            raise
        except Exception as exc:  # the monitor is gone: nothing left to release politely
            connection.terminate()
            logger.debug("pg_auto_failover: closing the monitor connection: %s",
                         describe_error(exc))

    def terminate(self) -> None:
        """Drop the monitor connection at once (for a pool that is terminated, not closed)."""
        self._drop_connection()

    def __repr__(self) -> str:
        return (f"AutoFailover({mask_dsn(self._dsn)!r}, formation={self._formation!r}, "
                f"group={self._group})")
