"""DSN parsing: seed hosts from multi-host DSNs, checks, and masking of secrets.

asyncpg parses the DSN itself when it connects; picopool only needs the list
of seed addresses (to find the cluster) and a safe spelling for logs.
Per-instance sub-pools reuse the user's DSN and override ``host``/``port``,
which asyncpg lets explicit keyword arguments do.

**Secrets.** A parameter is secret when its name (any case, percent-decoded)
contains ``password``, ``passwd``, ``pwd``, ``secret``, ``token``, ``credential``
or ``apikey``/``api_key``: libpq's ``password`` and ``sslpassword``, and custom
settings such as ``?myapp.api_token=``. ``sslkey``, ``sslcert`` and ``passfile``
name files, not secrets, and stay visible. :func:`mask_dsn` replaces the value of
every secret parameter, and the password of a URL's user info, with ``***``;
every DSN picopool shows (reprs, logs, errors) goes through it.

**Unencoded passwords.** In a URL the password must be percent-encoded. A ``/``,
``?``, ``#`` or ``@`` left in it changes what asyncpg (and libpq) read: the host
part ends early and the rest of the password becomes a port, the path or the
query. :func:`mask_dsn` therefore takes the user info to run up to the *last*
``@`` of the URL (it may hide more than the password, never less), and
:func:`asyncpg_dsn` refuses such a URL with a :class:`ConfigurationError` that
shows only the masked DSN, before asyncpg can echo a piece of it in its own errors.
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
MASK = "***"

_URL_PREFIXES = ("postgres://", "postgresql://")
_ANY_URL = re.compile(r"\s*[A-Za-z][A-Za-z0-9+.-]*://")
_KEY_VALUE_START = re.compile(r"\s*[A-Za-z_][\w.]*\s*=")
_KV_PAIR = re.compile(r"([A-Za-z_][\w.]*)(\s*=\s*)('(?:[^'\\]|\\.)*(?:'|\\?$)|\S*)")
# A value runs to the next "&name=": a stray "&" without "=" after it stays in the value.
_QUERY_PAIR = re.compile(r"[?&]([^=&?#]*)=([^&]*(?:&(?![^=&?#]*=)[^&]*)*)")
_SECRET_NAME = re.compile(r"pass(?:word|wd)|pwd|secret|token|credential|api_?key", re.IGNORECASE)
_ENCODE_HINT = (
    "its user name or password seems to hold a character that a URL needs "
    "percent-encoded ('/', '?', '#', '@', a tab or line break, or a look-alike of "
    "these); percent-encode them (urllib.parse.quote(password, safe='')) or use "
    "the password= argument"
)


def is_secret_parameter(name: str) -> bool:
    """True if a connection parameter (DSN key or keyword argument) named *name* is a secret."""
    return bool(_SECRET_NAME.search(urllib.parse.unquote_plus(name)))


def mask_dsn(dsn: str | None) -> str:
    """Return *dsn* with its password and every other secret replaced by ``***``.

    See the module docstring for what counts as a secret. URLs: the user info's
    password (up to the last ``@``) and secret query parameters (each value up to
    the next ``&name=``). Key/value DSNs: the values of secret keys, quoted or not. Any
    other text: whatever lies between its first ``:`` and its last ``@``, and
    ``?name=value`` / ``&name=value`` pairs with a secret name.
    """
    if not dsn:
        return ""
    if _ANY_URL.match(dsn):
        head = dsn.index("://") + 3
        return dsn[:head] + _mask_spans(dsn[head:], _userinfo_spans(dsn[head:]))
    if _KEY_VALUE_START.match(dsn):
        return _KV_PAIR.sub(_mask_kv_pair, dsn)
    return _mask_spans(dsn, _userinfo_spans(dsn))


def _userinfo_spans(text: str) -> list[tuple[int, int]]:
    """Spans of *text* (a URL after ``scheme://``) that hold secrets."""
    spans: list[tuple[int, int]] = []
    at = text.rfind("@")
    colon = text.find(":", 0, at) if at >= 0 else -1
    if colon >= 0:
        spans.append((colon + 1, at))
    for match in _QUERY_PAIR.finditer(text):
        if is_secret_parameter(match.group(1)):
            spans.append(match.span(2))
    return spans


def _mask_spans(text: str, spans: list[tuple[int, int]]) -> str:
    """*text* with each span (overlapping spans merged) replaced by ``***``."""
    merged: list[list[int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    pieces = []
    position = 0
    for start, end in merged:
        pieces += [text[position:start], MASK]
        position = end
    pieces.append(text[position:])
    return "".join(pieces)


def _mask_kv_pair(match: re.Match[str]) -> str:
    if not is_secret_parameter(match.group(1)):
        return match.group(0)
    return match.group(1) + match.group(2) + MASK


def _url_problem(dsn: str) -> str | None:
    """Why asyncpg would misread the URL *dsn* (or echo a piece of it), or None.

    asyncpg reads the host part up to the first ``/``, ``?`` or ``#`` and splits
    the user info off at its first ``@``; an ``@`` elsewhere (outside a
    ``name=value`` query parameter) means the password was not percent-encoded.
    """
    if any(c in dsn for c in "\t\r\n"):
        return _ENCODE_HINT  # urllib drops them silently, so the password would change
    try:
        query = urllib.parse.urlsplit(dsn).query
    except ValueError:  # its message quotes the host part, password included
        return _ENCODE_HINT
    rest = dsn.split("://", 1)[1]
    cut = min([i for i in (rest.find(c) for c in "/?#") if i >= 0], default=len(rest))
    netloc, remainder = rest[:cut], rest[cut:]
    hostspec = netloc.partition("@")[2] if "@" in netloc else netloc
    if "@" in hostspec:
        return _ENCODE_HINT
    if "@" in remainder:
        if "=" not in remainder[: remainder.rfind("@")]:
            return _ENCODE_HINT
        if "@" not in netloc and not _valid_hostspec(hostspec):
            return _ENCODE_HINT
    if query:
        try:  # asyncpg parses the query strictly; its error quotes the bad field
            urllib.parse.parse_qs(query, strict_parsing=True)
        except ValueError:
            return ("its query string is malformed (every parameter must be name=value, "
                    "joined by '&', with '&', '#' and '=' in values percent-encoded)")
    return None


def _valid_hostspec(hostspec: str) -> bool:
    try:
        for item in _split_top_level_commas(hostspec):
            Address.parse(urllib.parse.unquote(item), default_port=DEFAULT_PORT)
    except ValueError:
        return False
    return True


def check_url(dsn: str) -> None:
    """Raise :class:`ConfigurationError` (showing only the masked DSN) if asyncpg would
    misread the URL *dsn*, most often because of a password that is not percent-encoded."""
    problem = _url_problem(dsn)
    if problem is not None:
        raise ConfigurationError(f"invalid DSN {mask_dsn(dsn)!r}: {problem}")


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
    check_url(dsn)
    rest = dsn.split("://", 1)[1]
    netloc = re.split(r"[/?#]", rest, maxsplit=1)[0]  # as urllib and asyncpg split it
    netloc = netloc.partition("@")[2] if "@" in netloc else netloc
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
    A URL that asyncpg would misread (see :func:`check_url`) is refused.
    """
    if not dsn:
        return dsn
    dsn = dsn.strip()
    if dsn.lower().startswith(_URL_PREFIXES):
        check_url(dsn)
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
