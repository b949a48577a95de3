"""Which instances may serve a request: pure functions of the topology snapshot."""

from __future__ import annotations

import enum
from collections.abc import Callable

from ._errors import ConfigurationError
from ._topology import Instance, Role, Topology


class RoleRequest(enum.Enum):
    """What a request needs from an instance."""

    PRIMARY = "primary"  # writes, transactions
    REPLICA = "replica"  # reads that must not touch the primary
    ANY = "any"  # any instance that is up
    PREFER_REPLICA = "prefer-replica"  # a replica, else the primary


_BY_NAME = {r.value: r for r in RoleRequest} | {"prefer_replica": RoleRequest.PREFER_REPLICA}


def parse_role(role: str | RoleRequest | None, default: RoleRequest) -> RoleRequest:
    if role is None:
        return default
    if isinstance(role, RoleRequest):
        return role
    try:
        return _BY_NAME[role.lower()]
    except (KeyError, AttributeError):
        raise ConfigurationError(
            f"unknown role {role!r}; expected one of {', '.join(r.value for r in RoleRequest)}"
        ) from None


def eligible(
    topology: Topology, request: RoleRequest, usable: Callable[[Instance], bool]
) -> list[Instance]:
    """The instances that can serve *request*, in topology order.

    Peers (symmetric clusters) and unprobed instances serve anything.
    """
    instances = [i for i in topology.instances if usable(i)]
    if request is RoleRequest.ANY:
        return instances
    writable = [i for i in instances if i.role.writable]
    if request is RoleRequest.PRIMARY:
        return writable
    readers = [
        i for i in instances
        if i.role in (Role.REPLICA, Role.PEER, Role.UNKNOWN) and not i.no_load_balance
    ]
    if request is RoleRequest.REPLICA:
        return readers
    return readers or writable
