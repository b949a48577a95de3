"""The topology snapshot and the pure reconciliation plan.

A :class:`Topology` is immutable: the poller builds a new one on every
refresh and swaps it in atomically. Routing reads whichever snapshot is
current, so it never sees a half-applied change.
"""

from __future__ import annotations

import enum
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field


class Role(enum.Enum):
    """What an instance can serve."""

    PRIMARY = "primary"  # accepts writes
    REPLICA = "replica"  # read-only
    PEER = "peer"  # symmetric cluster member (Picodata): serves anything
    UNKNOWN = "unknown"  # not probed (Static): treated as able to serve anything

    @property
    def writable(self) -> bool:
        return self is not Role.REPLICA


@dataclass(frozen=True, slots=True, order=True)
class Address:
    """A normalised ``host:port``. IPv6 literals are stored without brackets."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, *, default_port: int = 5432) -> Address:
        """Parse ``host``, ``host:port``, ``[v6]:port`` or a bare IPv6 literal.

        Raises ValueError on anything else: brackets around a non-IPv6 host, a
        non-ASCII or out-of-range port, whitespace or control characters.
        """
        text = text.strip()
        if not text:
            raise ValueError("empty address")
        port = default_port
        if text.startswith("["):
            host, sep, rest = text[1:].partition("]")
            if not sep:
                raise ValueError(f"unterminated IPv6 literal in {text!r}")
            if rest:
                if not rest.startswith(":"):
                    raise ValueError(f"garbage after IPv6 literal in {text!r}")
                port = _parse_port(rest[1:], text)
            if not _is_ipv6(host):
                raise ValueError(f"brackets hold no IPv6 literal in {text!r}")
        elif text.count(":") == 1 and not text.startswith("/"):
            host, port_text = text.split(":")
            port = _parse_port(port_text, text)
        elif ":" in text and not text.startswith("/") and not _is_ipv6(text):
            raise ValueError(f"neither host:port nor an IPv6 literal: {text!r}")
        else:
            host = text  # a name, IPv4, a socket directory, or a bare IPv6 literal
        return cls(normalize_host(host), port)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


_ASCII_PORT = re.compile(r"[0-9]{1,5}")
_HOST_NAME = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def _parse_port(port_text: str, whole: str) -> int:
    if not _ASCII_PORT.fullmatch(port_text):
        raise ValueError(f"invalid port in {whole!r}")
    port = int(port_text)
    if not 0 < port < 65536:
        raise ValueError(f"port out of range in {whole!r}")
    return port


def _is_ipv6(text: str) -> bool:
    try:
        return ipaddress.ip_address(text.rstrip(".")).version == 6
    except ValueError:
        return False


def normalize_host(host: str) -> str:
    """Lowercase names and canonicalise IP literals so one instance has one spelling."""
    if host.startswith("/"):
        if any(ord(c) < 32 for c in host):
            raise ValueError(f"control character in socket path {host!r}")
        return host  # unix socket directory: case-sensitive path
    bare = host.rstrip(".")
    try:
        return ipaddress.ip_address(bare).compressed
    except ValueError:
        pass
    if not _HOST_NAME.fullmatch(bare):
        raise ValueError(f"invalid host name {host!r}")
    return bare.lower()


@dataclass(frozen=True, slots=True)
class Instance:
    """One instance of the cluster as discovery sees it.

    ``id`` is the stable identity (a Picodata uuid, a Patroni member name, or
    the normalised address); two reports with the same id are one instance.
    """

    id: str
    address: Address
    role: Role
    name: str | None = None
    weight: float = 1.0
    usable: bool = True
    state: str = "online"
    lag_bytes: int | None = None
    lag_seconds: float | None = None
    no_load_balance: bool = False  # Patroni's noloadbalance tag: no reads
    attributes: tuple[tuple[str, str], ...] = ()  # provider extras: tier, replicaset, ...

    @property
    def label(self) -> str:
        """How logs and errors name the instance: ``name@host:port`` or just the address."""
        name = self.name or self.id
        return str(self.address) if name == str(self.address) else f"{name}@{self.address}"


@dataclass(frozen=True, slots=True)
class Topology:
    """An immutable snapshot of the cluster."""

    version: int
    instances: tuple[Instance, ...]
    provider: str
    symmetric: bool = False  # every instance serves reads and writes (Picodata)
    service_address: Address | None = None

    @property
    def primary(self) -> Instance | None:
        return next((i for i in self.instances if i.role is Role.PRIMARY), None)

    @property
    def replicas(self) -> tuple[Instance, ...]:
        return tuple(i for i in self.instances if i.role is Role.REPLICA)

    def get(self, instance_id: str) -> Instance | None:
        return next((i for i in self.instances if i.id == instance_id), None)

    def __repr__(self) -> str:
        members = ", ".join(f"{i.label} {i.role.value}" for i in self.instances)
        return f"<Topology v{self.version} {self.provider} [{members}]>"


def dedupe(instances: Iterable[Instance]) -> tuple[Instance, ...]:
    """Drop unusable instances and duplicates by id or by address.

    The first report wins. A second id at an address already taken is the
    same server spelled twice (e.g. a seed DSN versus its advertised address)
    and must never get a second sub-pool.
    """
    by_id: dict[str, Instance] = {}
    taken: set[Address] = set()
    for instance in instances:
        if not instance.usable or instance.id in by_id or instance.address in taken:
            continue
        by_id[instance.id] = instance
        taken.add(instance.address)
    return tuple(by_id.values())


@dataclass(frozen=True, slots=True)
class ReconcilePlan:
    """What the pool must do to match a new topology."""

    add: tuple[Instance, ...] = ()  # open a sub-pool
    remove: tuple[str, ...] = ()  # stop routing, drain and close
    expire: tuple[str, ...] = ()  # role changed: expire pooled connections
    keep: tuple[Instance, ...] = field(default=())  # unchanged or metadata-only change

    @property
    def changed(self) -> bool:
        return bool(self.add or self.remove or self.expire)


def plan_reconcile(current: Mapping[str, Instance], wanted: Sequence[Instance]) -> ReconcilePlan:
    """Decide how to move from the members the pool holds to *wanted*.

    Pure: no I/O. An address change of a known id is a remove plus an add,
    because the sub-pool's connect arguments are fixed at creation.
    """
    target = dedupe(wanted)
    target_ids = {i.id for i in target}
    add: list[Instance] = []
    remove = [member_id for member_id in current if member_id not in target_ids]
    expire: list[str] = []
    keep: list[Instance] = []
    for instance in target:
        held = current.get(instance.id)
        if held is None:
            add.append(instance)
        elif held.address != instance.address:
            remove.append(instance.id)
            add.append(instance)
        else:
            if held.role is not instance.role:
                expire.append(instance.id)
            keep.append(instance)
    return ReconcilePlan(tuple(add), tuple(remove), tuple(expire), tuple(keep))
