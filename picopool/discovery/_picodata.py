"""Picodata: every Online instance is a peer that accepts any SQL.

The instances are read from Picodata's system tables through the service
connection, as picodata-go does. Picodata's SQL is small (no comments, one
statement per query, BEGIN/COMMIT/ROLLBACK are stubs), so everything sent
here is a single plain SELECT.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import re
from collections.abc import Collection, Mapping
from typing import Any

import asyncpg

from .._errors import ConfigurationError, TopologyError, describe_error
from .._member import is_connection_error
from .._topology import Address, Instance, Role, normalize_host
from ._base import Discovered, DiscoveryContext, DiscoveryProvider, address_id, service_session

logger = logging.getLogger("picopool.discovery")

__all__ = ["Picodata", "PicodataMetadataError", "parse_address", "parse_state", "reset_session"]

# picodata-go's query, plus the columns that identify an instance and its tier.
_FULL_QUERY = (
    "SELECT pi.name, pi.uuid, pi.replicaset_name, pi.tier, ppa.address, pi.current_state "
    "FROM _pico_peer_address AS ppa JOIN _pico_instance AS pi ON ppa.raft_id = pi.raft_id "
    "WHERE connection_type = 'pgproto'"
)
# Exactly picodata-go's query: the fallback for versions that lack a column above.
_BASIC_QUERY = (
    "SELECT ppa.address, pi.current_state "
    "FROM _pico_peer_address AS ppa JOIN _pico_instance AS pi ON ppa.raft_id = pi.raft_id "
    "WHERE connection_type = 'pgproto'"
)

ONLINE = "Online"
_KNOWN_STATES = frozenset({ONLINE, "Offline", "Expelled"})
_VARIANT = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_HOSTNAME = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]*[A-Za-z0-9_.])?")
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})
_RETRIES_ON_ANOTHER_INSTANCE = 1


class PicodataMetadataError(ValueError):
    """A value in Picodata's metadata that cannot be understood."""


def parse_state(text: str) -> tuple[str, int | None]:
    """Parse ``current_state``: ``'["Online", 5]'`` or ``'{"Online": 5}'``.

    Also accepts a variant alone (``'"Online"'``, ``'["Online"]'``), which
    gives no incarnation. Raises :class:`PicodataMetadataError` on
    anything else. The variant is returned as sent, known or not.
    """
    if not isinstance(text, str):
        raise PicodataMetadataError(f"state is not text: {text!r}")
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):  # JSONDecodeError, or an over-long integer
        raise PicodataMetadataError(f"state is not JSON: {_clip(text)}") from None
    variant: object
    incarnation: object = None
    if isinstance(value, str):
        variant = value
    elif isinstance(value, list) and len(value) in (1, 2):
        variant = value[0]
        incarnation = value[1] if len(value) == 2 else None
    elif isinstance(value, dict) and len(value) == 1:
        ((variant, incarnation),) = value.items()
    else:
        raise PicodataMetadataError(f"unexpected state shape: {_clip(text)}")
    if not isinstance(variant, str) or not _VARIANT.fullmatch(variant):
        raise PicodataMetadataError(f"invalid state variant in {_clip(text)}")
    if incarnation is not None and (
        not isinstance(incarnation, int) or isinstance(incarnation, bool) or incarnation < 0
    ):
        raise PicodataMetadataError(f"invalid incarnation in {_clip(text)}")
    return variant, incarnation


def parse_address(text: str, service_host: str | None) -> Address:
    """Parse an advertised pgproto address: ``host:port`` or ``[v6]:port``.

    A wildcard host (``0.0.0.0``, ``::``: the instance listens on every
    interface and advertises nothing better) becomes *service_host*, the host
    the service connection reached. Raises :class:`PicodataMetadataError`.
    """
    address = _parse_advertised(text)
    if address.host not in _WILDCARD_HOSTS:
        return address
    if not service_host:
        raise PicodataMetadataError(f"wildcard address {text!r} and no service host to use")
    return Address(_checked_host(service_host, service_host, bracketed=False), address.port)


def is_wildcard(address: Address) -> bool:
    return address.host in _WILDCARD_HOSTS


def _parse_advertised(text: str) -> Address:
    """``host:port`` with an explicit port; wildcards are kept."""
    if not isinstance(text, str):
        raise PicodataMetadataError(f"address is not text: {text!r}")
    stripped = text.strip()
    if stripped.startswith("["):
        host, sep, port_text = stripped[1:].partition("]:")
        if not sep:
            raise PicodataMetadataError(f"no port in address {_clip(text)}")
    else:
        # A bare IPv6 literal is ambiguous ("::1:4327"): Picodata brackets it.
        host, sep, port_text = stripped.partition(":")
        if not sep or ":" in port_text:
            raise PicodataMetadataError(f"expected host:port, got {_clip(text)}")
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise PicodataMetadataError(f"invalid port in address {_clip(text)}")
    host = _checked_host(host, text, bracketed=stripped.startswith("["))
    return Address(host, int(port_text))


def _checked_host(host: str, text: str, *, bracketed: bool) -> str:
    """The normalised host: an IP literal (IPv6 only in brackets) or a DNS name."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        pass
    else:
        if bracketed and ip.version == 4:
            raise PicodataMetadataError(f"IPv4 address in brackets: {_clip(text)}")
        return ip.compressed
    if bracketed:
        raise PicodataMetadataError(f"not an IPv6 literal in brackets: {_clip(text)}")
    if not _HOSTNAME.fullmatch(host) or re.fullmatch(r"[0-9.]+", host):
        raise PicodataMetadataError(f"invalid host in address {_clip(text)}")
    return normalize_host(host)


def _clip(text: object, limit: int = 80) -> str:
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


async def reset_session(connection: Any) -> None:
    """asyncpg's ``reset=`` hook for Picodata: sends nothing.

    asyncpg's default reset (``pg_advisory_unlock_all()``, ``CLOSE ALL``,
    ``UNLISTEN *``, ``RESET ALL``) is rejected by Picodata, which has none of
    that session state. With a custom hook asyncpg still does its own
    client-side cleanup first (listeners; ``ROLLBACK`` only if a transaction
    is open, which Picodata accepts as a stub).
    """


class Picodata(DiscoveryProvider):
    """Picodata cluster: the Online instances from ``_pico_instance``, all peers.

    ``tiers`` keeps only instances of those tiers. The metadata is read
    through the pool's service connection; if that instance dies, the next
    attempt reads it through another known instance.
    """

    name = "picodata"

    def __init__(self, *, tiers: Collection[str] | None = None,
                 query_timeout: float = 5.0) -> None:
        if isinstance(tiers, str):
            tiers = (tiers,)
        if tiers is not None and not tiers:
            raise ConfigurationError("tiers must name at least one tier (or be None)")
        self._tiers = frozenset(tiers) if tiers is not None else None
        self._query_timeout = query_timeout
        # Where the full query failed but picodata-go's worked (an older version).
        self._basic_query_on: Address | None = None
        self._warned: set[tuple[str, str]] = set()

    def sub_pool_options(self) -> Mapping[str, Any]:
        return {"reset": reset_session}

    async def discover(self, ctx: DiscoveryContext) -> Discovered:
        for attempt in range(_RETRIES_ON_ANOTHER_INSTANCE + 1):
            service: Address | None = None
            try:
                async with service_session(ctx) as connection:
                    service = ctx.service_address()
                    try:
                        rows, basic = await self._read_metadata(connection, service)
                    except Exception as exc:
                        if is_connection_error(exc):
                            # The instance is gone: the next service connection goes
                            # elsewhere.
                            ctx.discard()
                        raise
            except Exception as exc:
                if not is_connection_error(exc) or attempt == _RETRIES_ON_ANOTHER_INSTANCE:
                    raise
                logger.warning("reading Picodata metadata from %s failed (%s); "
                               "retrying on another instance", service, describe_error(exc))
                continue
            return Discovered(self._instances(rows, basic, service), symmetric=True)
        raise AssertionError("unreachable")

    async def _read_metadata(
        self, connection: Any, service: Address | None
    ) -> tuple[list[Any], bool]:
        """The rows, and whether they came from picodata-go's narrower query."""
        if self._basic_query_on is None or self._basic_query_on != service:
            try:
                return await connection.fetch(_FULL_QUERY, timeout=self._query_timeout), False
            except asyncpg.PostgresError as exc:
                if is_connection_error(exc):
                    raise
                full_error = exc
            try:
                rows = await connection.fetch(_BASIC_QUERY, timeout=self._query_timeout)
            except asyncpg.PostgresError as exc:
                if is_connection_error(exc):
                    raise
                raise _metadata_error(full_error, service) from full_error
            logger.warning(
                "Picodata on %s rejected the full metadata query (%s); using picodata-go's "
                "query: instances are identified by address and tiers are unknown",
                service, describe_error(full_error))
            self._basic_query_on = service
            return rows, True
        try:
            return await connection.fetch(_BASIC_QUERY, timeout=self._query_timeout), True
        except asyncpg.PostgresError as exc:
            if is_connection_error(exc):
                raise
            raise _metadata_error(exc, service) from exc

    def _instances(
        self, rows: list[Any], basic: bool, service: Address | None
    ) -> tuple[Instance, ...]:
        if basic and self._tiers is not None:
            raise TopologyError(
                f"cannot filter by tier: Picodata on {service} does not report tiers"
            )
        service_host = service.host if service is not None else None
        problems: dict[tuple[str, str], str] = {}
        instances: list[Instance] = []
        tiers_seen: set[str] = set()
        for row in rows:
            label = _row_label(row, basic)
            try:
                instance = self._instance(row, basic, service_host, problems, tiers_seen)
            except PicodataMetadataError as exc:
                problems[(label, str(exc))] = f"skipping Picodata instance {label}: {exc}"
                continue
            if instance is not None:
                instances.append(instance)
        for key, message in problems.items():
            if key not in self._warned:
                logger.warning("%s", message)
        self._warned = set(problems)  # a problem that goes away and comes back warns again
        if not instances:
            wanted = f" in tiers {sorted(self._tiers)} (seen: {sorted(tiers_seen)})" \
                if self._tiers is not None else ""
            raise TopologyError(
                f"Picodata metadata on {service} lists no Online instance with a pgproto "
                f"address{wanted} ({len(rows)} rows read)"
            )
        instances.sort(key=lambda i: (i.name or i.id, str(i.address)))
        return tuple(instances)

    def _instance(
        self, row: Any, basic: bool, service_host: str | None,
        problems: dict[tuple[str, str], str], tiers_seen: set[str],
    ) -> Instance | None:
        state_value = row["current_state"]
        if isinstance(state_value, list | dict):  # a driver that decodes JSON itself
            state_value = json.dumps(state_value)
        variant, _ = parse_state(state_value)
        if variant != ONLINE:
            if variant not in _KNOWN_STATES:
                raise PicodataMetadataError(f"unknown state {variant!r}")
            return None
        tier = None if basic else _text(row["tier"])
        if tier is not None:
            tiers_seen.add(tier)
        if self._tiers is not None and tier not in self._tiers:
            return None
        raw_address = row["address"]
        advertised = _parse_advertised(raw_address)
        address = parse_address(raw_address, service_host)
        if is_wildcard(advertised):
            problems[("wildcard", str(advertised))] = (
                f"Picodata instance {_row_label(row, basic)} advertises the wildcard address "
                f"{advertised}; connecting to {address} (the service connection's host). "
                "Set an advertised pgproto address on the instance to avoid this guess."
            )
        if basic:
            return Instance(id=address_id(address), address=address, role=Role.PEER)
        name = _text(row["name"])
        attributes = tuple(
            (key, value)
            for key, value in (("tier", tier), ("replicaset_name", _text(row["replicaset_name"])))
            if value is not None
        )
        return Instance(
            id=_text(row["uuid"]) or name or address_id(address),
            address=address,
            role=Role.PEER,
            name=name,
            attributes=attributes,
        )

    def __repr__(self) -> str:
        return "Picodata()" if self._tiers is None else f"Picodata(tiers={sorted(self._tiers)})"


def _text(value: object) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _row_label(row: Any, basic: bool) -> str:
    name = None if basic else _text(row["name"])
    return name or _clip(row["address"])


def _metadata_error(exc: BaseException, service: Address | None) -> TopologyError:
    sqlstate = getattr(exc, "sqlstate", None)
    detail = describe_error(exc)
    if sqlstate == "42P01":
        return TopologyError(
            f"Picodata metadata table missing on {service} ({detail}); "
            "is this a Picodata cluster? Pass discovery= to choose another provider"
        )
    if sqlstate == "42501":
        return TopologyError(
            f"permission denied reading Picodata metadata on {service} ({detail}); "
            "the pool's user needs read access to _pico_instance and _pico_peer_address"
        )
    return TopologyError(f"cannot read Picodata metadata on {service}: {detail}")
