"""An emulated Picodata cluster: real PostgreSQL servers holding Picodata's metadata.

Picodata itself cannot run here, so each "instance" is an independent
PostgreSQL server (a :class:`~picopool.cluster.LocalCluster` without
replicas) whose ``_pico_instance`` and ``_pico_peer_address`` tables have
Picodata's names and column types. The harness keeps the metadata as a Python
model and rewrites it, in one transaction, on every running server after each
change, so every instance answers the discovery query alike, as Picodata's
replicated system tables do::

    with EmulatedPicodata(3) as cluster:
        pool = await picopool.create_pool(cluster.dsn())
        cluster.set_state("default_2_1", "Offline")
        cluster.kill("default_1_1")                 # metadata still says Online

The API is synchronous; from async tests call it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import uuid
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import TracebackType
from typing import Literal

from picopool.cluster import HOST, LocalCluster, LocalNode

__all__ = ["EmulatedInstance", "EmulatedPicodata", "StateFormat", "format_state"]

StateFormat = Literal["array", "object"]
Variant = Literal["Online", "Offline", "Expelled"]

METADATA_TABLES = ("_pico_instance", "_pico_peer_address")

# Column names and order as in Picodata; raft_id is unsigned there, bigint over pgproto.
_SCHEMA = (
    "CREATE TABLE _pico_instance ("
    "name text NOT NULL PRIMARY KEY, uuid text NOT NULL, raft_id bigint NOT NULL UNIQUE, "
    "replicaset_name text NOT NULL, replicaset_uuid text NOT NULL, "
    "current_state text NOT NULL, target_state text NOT NULL, failure_domain text NOT NULL, "
    "tier text NOT NULL, picodata_version text NOT NULL); "
    "CREATE TABLE _pico_peer_address ("
    "raft_id bigint NOT NULL, address text NOT NULL, connection_type text NOT NULL, "
    "PRIMARY KEY (raft_id, connection_type))"
)
_ITEMS = "CREATE TABLE IF NOT EXISTS items (id int PRIMARY KEY, name text, stock int)"
PICODATA_VERSION = "25.1.0"


def format_state(variant: str, incarnation: int, state_format: StateFormat = "array") -> str:
    """``current_state`` as Picodata sends it over pgproto."""
    if state_format == "object":
        return json.dumps({variant: incarnation})
    return json.dumps([variant, incarnation])


@dataclass
class EmulatedInstance:
    """One instance: its metadata, and the server behind it (None for metadata-only rows)."""

    name: str
    uuid: str
    raft_id: int
    replicaset_name: str
    tier: str
    address: str  # the advertised pgproto address, exactly as written
    variant: str = "Online"
    incarnation: int = 1
    raw_state: str | None = None  # written instead of the formatted state (garbage tests)
    server: LocalCluster | None = field(default=None, repr=False)
    replicaset_uuid: str = field(default_factory=lambda: str(uuid.uuid4()))

    @property
    def node(self) -> LocalNode:
        if self.server is None:
            raise LookupError(f"{self.name} has no server")
        return self.server.primary

    @property
    def port(self) -> int:
        return self.node.port

    @property
    def dsn(self) -> str:
        return self.node.dsn

    def dsn_via(self, host: str) -> str:
        """The DSN spelled with another host name for the same server (e.g. localhost)."""
        return self.node.dsn_at(host)

    def is_running(self) -> bool:
        return self.server is not None and self.node.is_running()


class EmulatedPicodata:
    """``size`` emulated Picodata instances, each a real PostgreSQL server.

    ``state_format`` picks how ``current_state`` is written: ``"array"``
    (``["Online", 5]``) or ``"object"`` (``{"Online": 5}``). ``ipv6=True`` makes
    the servers also listen on ``::1``. ``log_statements`` logs every
    statement to the server logs (see :meth:`server_log`). Every server has the
    same superuser password (``password``), which the DSNs carry: a pool reaches
    every instance with the credentials of the one in its DSN, as with Picodata.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        state_format: StateFormat = "array",
        tier: str = "default",
        ipv6: bool = False,
        log_statements: bool = True,
        settings: Mapping[str, str] | None = None,
        base_dir: str | Path | None = None,
    ) -> None:
        self.initial_size = size
        self.state_format: StateFormat = state_format
        self.default_tier = tier
        self.ipv6 = ipv6
        self._settings = dict(settings or {})
        if log_statements:
            self._settings.setdefault("log_statement", "all")
        if ipv6:
            self._settings["listen_addresses"] = f"{HOST},::1"
        self._base_dir = base_dir
        self.password = secrets.token_urlsafe(24)
        self.instances: dict[str, EmulatedInstance] = {}
        self._next_raft_id = 1
        self._baseline: dict[str, EmulatedInstance] = {}

    # -- lifecycle ----------------------------------------------------------------------

    def __enter__(self) -> EmulatedPicodata:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None,
                 exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> EmulatedPicodata:
        try:
            servers = self._start_servers(self.initial_size)
            for server in servers:
                self._register(server, tier=self.default_tier)
            self._sync()
        except BaseException:
            self.stop()
            raise
        self._baseline = {name: replace(i) for name, i in self.instances.items()}
        return self

    def stop(self) -> None:
        for instance in self.instances.values():
            if instance.server is not None:
                instance.server.stop()
        for instance in self._baseline.values():
            if instance.server is not None:
                instance.server.stop()

    def restore(self) -> None:
        """Back to the state right after start(): the same instances, all Online and up.

        Instances added since are stopped and removed; killed ones are restarted.
        """
        for name, instance in list(self.instances.items()):
            if name not in self._baseline and instance.server is not None:
                instance.server.stop()
        self.instances = {name: replace(i) for name, i in self._baseline.items()}
        self.state_format = "array"
        for instance in self.instances.values():
            instance.node.start()
            instance.address = f"{instance.node.host}:{instance.node.port}"  # move() may differ
            self._prepare_schema(instance.node)
        self._sync()

    def _start_servers(self, count: int) -> list[LocalCluster]:
        def start_one(_: int) -> LocalCluster:
            server = LocalCluster(replicas=0, settings=self._settings, base_dir=self._base_dir,
                                  password=self.password)
            server.start()
            try:
                if self.ipv6:
                    hba = server.primary.data_dir / "pg_hba.conf"
                    hba.write_text(hba.read_text() + "host all all ::1/128 scram-sha-256\n")
                    server.primary.reload()
                self._prepare_schema(server.primary)
            except BaseException:
                server.stop()
                raise
            return server

        with ThreadPoolExecutor(max_workers=min(count, 4) or 1) as executor:
            futures = [executor.submit(start_one, n) for n in range(count)]
            servers: list[LocalCluster] = []
            errors: list[BaseException] = []
            for future in futures:
                try:
                    servers.append(future.result())
                except BaseException as exc:  # stop the ones that did start
                    errors.append(exc)
        if errors:
            for server in servers:
                server.stop()
            raise errors[0]
        return servers

    @staticmethod
    def _prepare_schema(node: LocalNode) -> None:
        exists = node.sql("SELECT count(*) FROM pg_class WHERE relname = '_pico_instance'")
        if exists == "0":
            node.sql(_SCHEMA)

    def _register(self, server: LocalCluster | None, *, tier: str, name: str | None = None,
                  address: str | None = None, variant: str = "Online",
                  raw_state: str | None = None) -> EmulatedInstance:
        raft_id = self._next_raft_id
        self._next_raft_id += 1
        replicaset_name = f"{tier}_{raft_id}"
        name = name or f"{replicaset_name}_1"
        if name in self.instances:
            raise ValueError(f"instance {name} already exists")
        if address is None:
            if server is None:
                raise ValueError("a metadata-only instance needs an address")
            address = f"{server.primary.host}:{server.primary.port}"
        instance = EmulatedInstance(
            name=name, uuid=str(uuid.uuid4()), raft_id=raft_id, replicaset_name=replicaset_name,
            tier=tier, address=address, variant=variant, raw_state=raw_state, server=server,
        )
        self.instances[name] = instance
        return instance

    # -- looking things up --------------------------------------------------------------

    def __getitem__(self, name: str) -> EmulatedInstance:
        return self.instances[name]

    def names(self) -> list[str]:
        return list(self.instances)

    def online(self) -> list[EmulatedInstance]:
        """Instances the metadata calls Online (whether their server runs or not)."""
        return [i for i in self.instances.values() if i.raw_state is None
                and i.variant == "Online"]

    def at_port(self, port: int) -> EmulatedInstance:
        for instance in self.instances.values():
            if instance.server is not None and instance.port == port:
                return instance
        raise LookupError(f"no instance listens on port {port}")

    def dsn(self, name: str | None = None) -> str:
        """The DSN of one instance (the first by default)."""
        instance = self.instances[name] if name else next(iter(self.instances.values()))
        return instance.dsn

    def server_log(self, name: str) -> str:
        node = self.instances[name].node
        return node.log_file.read_text(errors="replace") if node.log_file.exists() else ""

    def server_logs(self) -> str:
        return "\n".join(self.server_log(i.name) for i in self.instances.values()
                         if i.server is not None)

    # -- changing the cluster -----------------------------------------------------------

    def set_state(self, name: str, variant: Variant | str, incarnation: int | None = None) -> None:
        """Set ``current_state``. Coming back Online bumps the incarnation, as Picodata does."""
        instance = self.instances[name]
        if incarnation is None:
            coming_back = variant == "Online" and instance.variant != "Online"
            incarnation = instance.incarnation + (1 if coming_back else 0)
        instance.variant, instance.incarnation, instance.raw_state = variant, incarnation, None
        self._sync()

    def set_raw_state(self, name: str, text: str) -> None:
        """Write ``current_state`` verbatim (malformed JSON, unknown variants, ...)."""
        self.instances[name].raw_state = text
        self._sync()

    def set_state_format(self, state_format: StateFormat) -> None:
        """Rewrite every state as ``["Online", 5]`` (array) or ``{"Online": 5}`` (object)."""
        self.state_format = state_format
        self._sync()

    def add_instance(self, name: str | None = None, *, tier: str | None = None,
                     variant: Variant | str = "Online") -> EmulatedInstance:
        """Start a new server and register it (Online by default)."""
        (server,) = self._start_servers(1)
        instance = self._register(server, tier=tier or self.default_tier, name=name,
                                  variant=variant)
        self._sync()
        return instance

    def register(self, name: str, *, address: str, state: str | None = None,
                 tier: str | None = None) -> EmulatedInstance:
        """Add metadata for an instance with no server behind it (``state`` written verbatim)."""
        instance = self._register(None, tier=tier or self.default_tier, name=name,
                                  address=address, raw_state=state)
        self._sync()
        return instance

    def expel(self, name: str, *, stop_server: bool = True) -> None:
        """Mark Expelled; an expelled Picodata instance shuts down, so its server stops too."""
        instance = self.instances[name]
        instance.variant, instance.raw_state = "Expelled", None
        self._sync()
        if stop_server and instance.server is not None:
            instance.node.stop()

    def remove(self, name: str) -> None:
        """Delete the instance's metadata rows (and stop its server)."""
        instance = self.instances.pop(name)
        self._sync()
        if instance.server is not None and name not in self._baseline:
            instance.server.stop()
        elif instance.server is not None:
            instance.node.stop()

    def change_address(self, name: str, address: str) -> None:
        """Advertise another pgproto address (written verbatim)."""
        self.instances[name].address = address
        self._sync()

    def move(self, name: str) -> str:
        """Restart the instance's server on a new port and advertise it; return the address."""
        from picopool.cluster import _free_port  # the harness reuses the cluster's port picker

        instance = self.instances[name]
        node = instance.node
        node.stop()
        node.port = _free_port()
        node.set_parameter("port", str(node.port))
        node.start()
        instance.address = f"{node.host}:{node.port}"
        self._sync()
        return instance.address

    def kill(self, name: str) -> None:
        """SIGKILL the server. The metadata still says Online, as before Picodata notices."""
        self.instances[name].node.kill()

    def restart(self, name: str) -> None:
        """Start a killed or stopped server again and bring its metadata up to date."""
        self.instances[name].node.start()
        self._sync()

    @contextlib.contextmanager
    def table_hidden(self, table: str) -> Iterator[None]:
        """Rename a metadata table on every running server for the duration."""
        if table not in METADATA_TABLES:
            raise ValueError(f"not a metadata table: {table}")
        self.run_everywhere(f"ALTER TABLE {table} RENAME TO {table}_hidden")
        try:
            yield
        finally:
            self.run_everywhere(f"ALTER TABLE IF EXISTS {table}_hidden RENAME TO {table}")

    def create_items_table(self) -> None:
        """The example's table on every server, each with its own rows."""
        for instance in self._running():
            instance.node.sql(
                f"{_ITEMS}; INSERT INTO items VALUES (1, 'apple', 10), (2, 'pear', 5) "
                "ON CONFLICT DO NOTHING"
            )

    def run_everywhere(self, sql: str) -> None:
        for instance in self._running():
            instance.node.sql(sql)

    # -- writing the metadata -----------------------------------------------------------

    def _running(self) -> list[EmulatedInstance]:
        return [i for i in self.instances.values() if i.is_running()]

    def _state_text(self, instance: EmulatedInstance) -> str:
        if instance.raw_state is not None:
            return instance.raw_state
        return format_state(instance.variant, instance.incarnation, self.state_format)

    def _metadata_sql(self) -> str:
        statements = ["BEGIN", "DELETE FROM _pico_peer_address", "DELETE FROM _pico_instance"]
        instances = list(self.instances.values())
        if instances:
            target = {"Online": "Online", "Offline": "Offline", "Expelled": "Expelled"}
            rows = ", ".join(
                "(" + ", ".join([
                    _literal(i.name), _literal(i.uuid), str(i.raft_id),
                    _literal(i.replicaset_name), _literal(i.replicaset_uuid),
                    _literal(self._state_text(i)),
                    _literal(format_state(target.get(i.variant, "Online"), i.incarnation,
                                          self.state_format)),
                    _literal("{}"), _literal(i.tier), _literal(PICODATA_VERSION),
                ]) + ")"
                for i in instances
            )
            statements.append(f"INSERT INTO _pico_instance VALUES {rows}")
            addresses = ", ".join(
                f"({i.raft_id}, {_literal(address)}, {_literal(kind)})"
                for i in instances
                for address, kind in ((f"{HOST}:{3300 + i.raft_id}", "iproto"),
                                      (i.address, "pgproto"))
            )
            statements.append(f"INSERT INTO _pico_peer_address VALUES {addresses}")
        statements.append("COMMIT")
        return "; ".join(statements)

    def _sync(self) -> None:
        """Write the whole model to every running server, atomically per server."""
        sql = self._metadata_sql()
        for instance in self._running():
            instance.node.sql(sql)


def _literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"
