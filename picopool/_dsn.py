"""DSN parsing: seed hosts from multi-host DSNs, and password masking.

asyncpg parses the DSN itself when it connects; picopool only needs the list
of seed addresses (to find the cluster) and a safe spelling for logs.
Per-instance sub-pools reuse the user's DSN and override ``host``/``port``,
which asyncpg lets explicit keyword arguments do.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from collections.abc import Mapping
from typing import Any

from ._errors import ConfigurationError
from ._topology import Address

DEFAULT_PORT = 5432

_URL_PREFIXES = ("postgres://", "postgresql://")
_KV_PASSWORD = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_URL_PASSWORD = re.compile(r"^(\s*postgres(?:ql)?://[^:@/]*:)([^@/]*)(@)", re.IGNORECASE)
_QUERY_PASSWORD = re.compile(r"([?&]password=)([^&]*)", re.IGNORECASE)


def mask_dsn(dsn: str | None) -> str:
    """Return *dsn* with any password replaced by ``***``."""
    if not dsn:
        return ""
    masked = _URL_PASSWORD.sub(r"\1***\3", dsn)
    masked = _QUERY_PASSWORD.sub(r"\1***", masked)
    if not masked.lstrip().lower().startswith(_URL_PREFIXES):
        masked = _KV_PASSWORD.sub(r"\1***", masked)
    return masked


def _split_hosts(hosts: str, ports: str | None) -> list[Address]:
    """Pair a comma list of hosts with a comma list of ports (libpq rules)."""
    host_list = [h.strip() for h in hosts.split(",")]
    port_list = [p.strip() for p in ports.split(",")] if ports else []
    if port_list and len(port_list) not in (1, len(host_list)):
        raise ConfigurationError(
            f"DSN has {len(host_list)} hosts but {len(port_list)} ports"
        )
    addresses = []
    for index, host in enumerate(host_list):
        port_text = port_list[index if len(port_list) > 1 else 0] if port_list else ""
        addresses.append(Address.parse(host, default_port=_port(port_text)))
    return addresses


def _port(text: str) -> int:
    if not text:
        return DEFAULT_PORT
    try:
        port = int(text)
    except ValueError:
        raise ConfigurationError(f"invalid port {text!r} in DSN") from None
    if not 0 < port < 65536:
        raise ConfigurationError(f"port {port} out of range in DSN")
    return port


def _url_hosts(dsn: str) -> list[Address]:
    rest = dsn.split("://", 1)[1]
    netloc = re.split(r"[/?]", rest, maxsplit=1)[0]
    netloc = netloc.rsplit("@", 1)[-1]
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query)
    if not netloc:
        if "host" in query:
            return _split_hosts(query["host"][-1], query.get("port", [""])[-1])
        return []
    addresses = []
    for item in _split_top_level_commas(netloc):
        addresses.append(Address.parse(urllib.parse.unquote(item), default_port=DEFAULT_PORT))
    return addresses


def _split_top_level_commas(netloc: str) -> list[str]:
    # Commas never appear inside brackets of IPv6 literals, but be explicit.
    return [part for part in re.split(r",(?![^\[]*\])", netloc) if part]


def _kv_pairs(dsn: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for match in re.finditer(r"(\w+)\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", dsn):
        key, value = match.group(1).lower(), match.group(2)
        if value.startswith("'"):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        pairs[key] = value
    return pairs


def asyncpg_dsn(dsn: str | None) -> str | None:
    """The DSN in a form asyncpg accepts: key/value DSNs become URLs.

    asyncpg parses only URLs; libpq's ``host=a port=1 dbname=x`` spelling is
    turned into ``postgresql://`` with every other key as a query parameter.
    """
    if not dsn:
        return dsn
    dsn = dsn.strip()
    if dsn.lower().startswith(_URL_PREFIXES):
        return dsn
    if "=" not in dsn:
        raise ConfigurationError(f"unrecognised DSN {mask_dsn(dsn)!r}")
    pairs = _kv_pairs(dsn)
    quote = urllib.parse.quote
    userinfo = ""
    if "user" in pairs:
        userinfo = quote(pairs.pop("user"), safe="")
        if "password" in pairs:
            userinfo += ":" + quote(pairs.pop("password"), safe="")
        userinfo += "@"
    database = quote(pairs.pop("dbname", ""), safe="")
    query = urllib.parse.urlencode(pairs)  # host/port stay here; picopool overrides them
    return f"postgresql://{userinfo}/{database}" + (f"?{query}" if query else "")


def seed_addresses(dsn: str | None, connect_kwargs: Mapping[str, Any]) -> list[Address]:
    """The seed instances named by *dsn* and explicit ``host``/``port`` kwargs.

    Falls back to ``PGHOST``/``PGPORT`` and then ``localhost:5432``, as libpq does.
    Unix-socket paths are kept as hosts; asyncpg understands them.
    """
    try:
        return _seed_addresses(dsn.strip() if dsn else dsn, connect_kwargs)
    except ConfigurationError:
        raise
    except ValueError as exc:
        raise ConfigurationError(f"invalid host in DSN {mask_dsn(dsn)!r}: {exc}") from None


def _seed_addresses(dsn: str | None, connect_kwargs: Mapping[str, Any]) -> list[Address]:
    host = connect_kwargs.get("host")
    port = connect_kwargs.get("port")
    if host is not None:
        hosts = host if isinstance(host, list | tuple) else [host]
        ports: list[Any] = (
            list(port) if isinstance(port, list | tuple) else [port] * len(hosts)
        )
        if len(ports) != len(hosts):
            raise ConfigurationError("host and port lists differ in length")
        return [
            Address.parse(str(h), default_port=int(p or DEFAULT_PORT))
            for h, p in zip(hosts, ports, strict=True)
        ]
    addresses: list[Address] = []
    if dsn:
        if dsn.lower().startswith(_URL_PREFIXES):
            addresses = _url_hosts(dsn)
        elif "=" in dsn:
            pairs = _kv_pairs(dsn)
            if "host" in pairs:
                addresses = _split_hosts(pairs["host"], pairs.get("port"))
        else:
            raise ConfigurationError(f"unrecognised DSN {mask_dsn(dsn)!r}")
    if not addresses:
        env_host = os.environ.get("PGHOST", "localhost")
        addresses = _split_hosts(env_host, os.environ.get("PGPORT"))
    if port is not None and not isinstance(port, list | tuple):
        addresses = [Address(a.host, int(port)) for a in addresses]
    return addresses
