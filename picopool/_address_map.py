"""``address_map=``: where picopool connects for each discovered instance.

Discovery names the servers; ``address_map`` sends each sub-pool's connections
somewhere else, typically to a connection pooler (pgbouncer) beside every
server, while discovery, the service connection and the liveness watch keep
talking to the servers themselves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeAlias

from ._errors import ConfigurationError
from ._topology import Address

#: A callable from an instance's :class:`Address` to the ``(host, port)`` (or
#: Address, or ``"host:port"``) to connect to, None meaning "the instance itself";
#: or a mapping from ``"host:port"`` (or Address) to such a target.
AddressMap: TypeAlias = (
    "Callable[[Address], Address | tuple[str, int] | str | None]"
    " | Mapping[Address | str, Address | tuple[str, int] | str]")


def _target(value: Address | tuple[str, int] | str | None,
            default: Address) -> tuple[str, int]:
    if value is None:
        return default.host, default.port
    if isinstance(value, Address):
        return value.host, value.port
    if isinstance(value, str):
        parsed = Address.parse(value)
        return parsed.host, parsed.port
    host, port = value
    return str(host), int(port)


def address_mapper(spec: AddressMap | None) -> Callable[[Address], tuple[str, int]] | None:
    """*spec* as one callable ``Address -> (host, port)``; None for no mapping."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        table: dict[Address, Address | tuple[str, int] | str] = {}
        for key, value in spec.items():
            table[key if isinstance(key, Address) else Address.parse(str(key))] = value
        return lambda address: _target(table.get(address), address)
    if callable(spec):
        mapping = spec
        return lambda address: _target(mapping(address), address)
    raise ConfigurationError("address_map must be a mapping or a callable")
