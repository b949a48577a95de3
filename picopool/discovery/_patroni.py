"""Patroni: read the members from the REST API's ``GET /cluster``.

Every Patroni node serves the whole cluster's view from the DCS, so one
answering endpoint is enough. The endpoints are tried in order, starting
with the one that answered last.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._errors import ConfigurationError, TopologyError, describe_error
from .._topology import Address, Instance, Role, normalize_host
from ._base import Discovered, DiscoveryContext, DiscoveryProvider

if TYPE_CHECKING:
    import httpx

logger = logging.getLogger("picopool.discovery")

__all__ = ["ClientCert", "Patroni", "mask_url", "parse_cluster"]

ClientCert = str | tuple[str, str] | tuple[str, str, str]
"""A PEM file holding certificate and key, or (certfile, keyfile[, password])."""

# Roles in /cluster. A leader may be listed before its promotion has finished;
# it is reported as primary anyway and the pool copes with 25006 (read-only) errors.
_LEADER_ROLES = frozenset({"leader", "master"})  # "master": very old Patroni
_REPLICA_ROLES = frozenset({"replica", "sync_standby", "quorum_standby"})
# A standby cluster's leader follows a remote primary: it serves reads only.
_STANDBY_LEADER_ROLE = "standby_leader"
_LEADER_STATES = frozenset({"running"})
_REPLICA_STATES = frozenset({"running", "streaming"})
_URL_PASSWORD = re.compile(r"(//[^/@:]*:)[^/@]*@")


def parse_cluster(payload: object) -> tuple[Instance, ...]:
    """Map a ``GET /cluster`` body to instances; pure, so it can be property-tested.

    Raises :class:`TopologyError` only when *payload* is not a Patroni cluster
    document at all (no ``members`` list). Members that cannot serve (state
    not ``running``/``streaming``) are left out; malformed ones are skipped
    with a logged warning. At most one primary is returned: should a payload
    list several leaders, the one on the latest timeline wins.
    """
    if not isinstance(payload, Mapping) or not isinstance(payload.get("members"), list):
        raise TopologyError(f"not a Patroni /cluster document: {_clip(payload)}")
    instances: list[Instance] = []
    timelines: dict[str, int] = {}  # by member name
    for member in payload["members"]:
        parsed = _parse_member(member)
        if parsed is None:
            continue
        instance, timeline = parsed
        if instance.id in timelines:
            logger.warning("patroni: skipping a second member named %r", instance.id)
            continue
        instances.append(instance)
        timelines[instance.id] = timeline
    leaders = [i for i in instances if i.role is Role.PRIMARY]
    if len(leaders) > 1:
        newest = max(leaders, key=lambda i: timelines[i.id])  # max keeps the first of equals
        logger.warning("patroni: several leaders listed (%s); using %s, the latest timeline",
                       ", ".join(i.label for i in leaders), newest.label)
        instances = [i for i in instances if i.role is not Role.PRIMARY or i is newest]
    return tuple(instances)


def _parse_member(member: object) -> tuple[Instance, int] | None:
    """One member as (instance, timeline), or None if it is unusable or malformed."""
    if not isinstance(member, Mapping):
        logger.warning("patroni: skipping a member that is not an object: %s", _clip(member))
        return None
    name = member.get("name")
    role_name = member.get("role")
    state = member.get("state")
    if not isinstance(name, str) or not name.strip():
        logger.warning("patroni: skipping a member without a name: %s", _clip(member))
        return None
    if not isinstance(role_name, str) or not isinstance(state, str):
        logger.warning("patroni: skipping member %r without role or state", name)
        return None
    if role_name in _LEADER_ROLES:
        role, usable_states = Role.PRIMARY, _LEADER_STATES
    elif role_name in _REPLICA_ROLES or role_name == _STANDBY_LEADER_ROLE:
        role, usable_states = Role.REPLICA, _REPLICA_STATES
    else:
        logger.warning("patroni: skipping member %r with unknown role %r", name, role_name)
        return None
    if state not in usable_states:
        logger.debug("patroni: member %r (%s) is %r: not usable", name, role_name, state)
        return None
    address = _address(member.get("host"), member.get("port"))
    if address is None:
        logger.warning("patroni: skipping member %r with a bad address (host %s, port %s)",
                       name, _clip(member.get("host")), _clip(member.get("port")))
        return None
    raw_tags = member.get("tags")
    tags: Mapping[Any, Any] = raw_tags if isinstance(raw_tags, Mapping) else {}
    timeline_number = _count(member.get("timeline")) or 0
    attributes = [("patroni_role", role_name)]
    if timeline_number:
        attributes.append(("timeline", str(timeline_number)))
    # nofailover/nosync only matter to Patroni's elections: kept for the curious.
    # Patroni reads these tags with bool(), so any truthy JSON value counts, as here.
    attributes.extend((tag, "true") for tag in ("nofailover", "nosync") if tags.get(tag))
    instance = Instance(
        id=name,
        address=address,
        role=role,
        name=name,
        state=state,
        lag_bytes=_lag(member.get("lag")) if role is Role.REPLICA else None,
        no_load_balance=bool(tags.get("noloadbalance")),
        attributes=tuple(attributes),
    )
    return instance, timeline_number


def _address(host: object, port: object) -> Address | None:
    if not isinstance(host, str) or isinstance(port, bool):
        return None
    if isinstance(port, str) and port.isascii() and port.isdigit():
        port = int(port)
    if not isinstance(port, int) or not 0 < port < 65536:
        return None
    try:
        return Address(normalize_host(host.strip()), port)
    except ValueError:
        return None


def _lag(value: object) -> int | None:
    """Replication lag in bytes; Patroni says ``"unknown"`` when it cannot tell."""
    return _count(value)


def _count(value: object) -> int | None:
    """A non-negative JSON integer (not a bool), else None."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _clip(value: object, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def mask_url(url: str) -> str:
    """*url* with the password of any ``user:password@`` replaced by ``***``."""
    return _URL_PASSWORD.sub(r"\1***@", url)


def _import_httpx() -> Any:
    try:
        import httpx
    except ImportError:
        raise ConfigurationError(
            "the Patroni provider needs httpx: pip install picopool[patroni]"
        ) from None
    return httpx


def _tls_verify(verify: bool | str | ssl.SSLContext, cert: ClientCert | None,
                httpx: Any) -> bool | ssl.SSLContext:
    """What to pass as httpx's ``verify``: an SSLContext, built once, or False.

    Newer httpx deprecates ``verify=<path>`` and ``cert=``, so a CA path or a
    client certificate is turned into an SSLContext here (a given SSLContext
    gets the client certificate loaded into it).
    """
    if verify is True and cert is None:
        default: ssl.SSLContext = httpx.create_ssl_context()  # httpx's default trust store
        return default
    if cert is None and not isinstance(verify, str):
        return verify
    try:
        if isinstance(verify, ssl.SSLContext):
            context = verify
        elif isinstance(verify, str):
            ca_dir = Path(verify).is_dir()
            context = ssl.create_default_context(cafile=None if ca_dir else verify,
                                                 capath=verify if ca_dir else None)
        else:
            context = ssl.create_default_context()
            if not verify:
                context.check_hostname = False
                context.verify_mode = ssl.CERT_NONE
        if isinstance(cert, str):
            context.load_cert_chain(cert)
        elif cert is not None:
            context.load_cert_chain(*cert)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(f"Patroni TLS settings: {describe_error(exc)}") from exc
    return context


class Patroni(DiscoveryProvider):
    """Discover a Patroni cluster through its REST API (``GET /cluster``).

    ``urls`` are REST endpoints such as ``http://10.0.0.1:8008``; one is
    enough, more give redundancy. The leader is the primary (even while its
    promotion finishes); replicas, sync/quorum standbys and a standby
    cluster's ``standby_leader`` are replicas. Members whose state is not
    ``running``/``streaming`` are left out, and the ``noloadbalance`` tag keeps
    a replica from serving reads.

    ``timeout`` bounds each request, ``verify``/``cert`` configure TLS (a CA
    bundle path or an SSLContext; a client certificate), ``auth`` is
    ``(user, password)`` for HTTP basic auth, and ``transport`` an httpx
    transport to use instead of the default one (a proxy, a mock in tests).
    Needs ``pip install picopool[patroni]``.

    Each refresh uses a fresh HTTP client: no keep-alive connection to a node
    that may have died since, and nothing left open between refreshes, so a
    pool's ``terminate()`` leaves no socket behind.
    """

    name = "patroni"

    def __init__(
        self,
        urls: Sequence[str],
        *,
        timeout: float = 2.0,
        verify: bool | str | ssl.SSLContext = True,
        cert: ClientCert | None = None,
        auth: tuple[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._httpx = _import_httpx()
        if isinstance(urls, str):
            urls = [urls]
        cleaned = [_normalize_url(url) for url in urls]
        if not cleaned:
            raise ConfigurationError("Patroni needs at least one REST API URL")
        if timeout <= 0:
            raise ConfigurationError("timeout must be positive")
        self._urls: tuple[str, ...] = tuple(cleaned)
        self._timeout = timeout
        # Built once: loading a CA bundle for every refresh would cost more than the request.
        self._verify = _tls_verify(verify, cert, self._httpx)
        self._auth = auth
        self._transport = transport
        self._preferred = 0  # index of the URL that answered last

    async def discover(self, ctx: DiscoveryContext) -> Discovered:
        async with self._httpx.AsyncClient(
            timeout=self._timeout,
            verify=self._verify,
            auth=self._auth,
            headers={"Accept": "application/json"},
            transport=self._transport,
        ) as client:
            return await self._ask(client)

    async def _ask(self, client: httpx.AsyncClient) -> Discovered:
        errors: list[str] = []
        count = len(self._urls)
        for step in range(count):
            index = (self._preferred + step) % count
            url = self._urls[index]
            try:
                async with asyncio.timeout(self._timeout):
                    response = await client.get(f"{url}/cluster")
                response.raise_for_status()
                instances = parse_cluster(response.json())
            except Exception as exc:  # any failure of one endpoint: try the next
                # httpx quotes the URL, credentials included, in its messages.
                error = f"{mask_url(url)}: {mask_url(describe_error(exc))}"
                errors.append(error)
                logger.debug("patroni: %s", error)
                continue
            self._preferred = index
            return Discovered(instances)
        raise TopologyError(f"no Patroni REST API answered ({'; '.join(errors)})")

    def __repr__(self) -> str:
        return f"Patroni({', '.join(mask_url(url) for url in self._urls)})"


def _normalize_url(url: str) -> str:
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError(f"invalid Patroni REST API URL: {url!r}")
    url = url.strip().rstrip("/")
    return url if "://" in url else f"http://{url}"
