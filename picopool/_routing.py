"""Which instances may serve a request: pure functions of the topology snapshot."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass

from ._errors import ConfigurationError
from ._sql import StatementKind, classify, strip_hint
from ._topology import Instance, Role
from .strategies import Candidate


class RoleRequest(enum.Enum):
    """What a request needs from an instance."""

    PRIMARY = "primary"  # writes, transactions
    REPLICA = "replica"  # reads that must not touch the primary
    ANY = "any"  # any instance that is up
    PREFER_REPLICA = "prefer-replica"  # a replica, else the primary
    SPILL = "spill"  # a replica; the primary too while every replica is saturated

    # Members are singletons compared by identity: hash them so too, in C (Enum's
    # own __hash__ is Python, and requests key per-statement lookups).
    __hash__ = object.__hash__


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


def select(request: RoleRequest, instances: list[Instance]) -> list[Instance]:
    """Which of the usable *instances* may serve *request*.

    Peers (symmetric clusters) and unprobed instances serve anything.
    """
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
    if request is RoleRequest.SPILL:
        return readers + [i for i in writable if i not in readers]
    return readers or writable


def spill(candidates: list[Candidate],
          busy: Callable[[Candidate], int] | None = None,
          reserve: int | None = None) -> list[Candidate]:
    """Where a ``SPILL`` read may go now, among *candidates* (``select``'s answer).

    The replicas that have a free connection; when every replica's connections
    are all in use, the primary too, but only while it keeps *reserve*
    connections free for writes (``write_reserve=``; by default
    ``write_reserve_for(max_size)``); else every replica (the read waits for
    one, as it would without the primary). With no replica at all, the primary
    (``fallback_to_primary``). *busy* counts a candidate's connections taken
    (default: ``in_use``; the waiter queue adds the ones it has promised).
    """
    taken: Callable[[Candidate], int] = _in_use if busy is None else busy
    free: list[Candidate] = []
    readers = 0
    for candidate in candidates:
        if not candidate.instance.role.writable:
            readers += 1
            if taken(candidate) < candidate.max_size:
                free.append(candidate)
    if free:
        return free
    if not readers:
        return candidates
    spare = [c for c in candidates if c.instance.role.writable
             and taken(c) < c.max_size - (
                 write_reserve_for(c.max_size) if reserve is None else reserve)]
    return spare or [c for c in candidates if not c.instance.role.writable]


def write_reserve_for(max_size: int) -> int:
    """The primary's connections that spilled reads leave to writes by default:
    a quarter, at least one."""
    return max(1, max_size // 4)


def _in_use(candidate: Candidate) -> int:
    return candidate.in_use


class ReadWriteSplit(enum.Enum):
    REPLICAS = "replicas"  # reads go to replicas
    INCLUDE_PRIMARY = "include_primary"  # reads go to replicas and the primary
    PREFER_REPLICAS = "prefer_replicas"  # replicas; the primary when they are saturated
    OFF = "off"  # everything goes to the primary


@dataclass(frozen=True, slots=True)
class RoutingPolicy:
    """The pool's routing settings, fixed at creation."""

    split: ReadWriteSplit = ReadWriteSplit.REPLICAS
    fallback_to_primary: bool = True
    write_functions: frozenset[str] = frozenset()
    router: Callable[[str, str], str | None] | None = None
    rewrite: Callable[[str], str] | None = None
    elide_reset: bool = True
    write_reserve: int | None = None  # prefer_replicas: None is write_reserve_for(max_size)


@dataclass(frozen=True, slots=True)
class Decision:
    """Where one statement goes and how it is sent."""

    request: RoleRequest
    instance: str | None  # a named instance (hint or router), overriding the role
    query: str  # what to send: rewritten, hint stripped where comments are refused
    is_write: bool
    leaves_session_state: bool  # may leave state: a full reset, prepared statements too
    elide_reset: bool  # provably leaves no state and the policy allows skipping the reset
    functions: frozenset[str] = frozenset()  # the functions it calls (last name part)
    # The user sent it to the primary or named an instance (role=, pool.route(), a
    # hint, the router): a sign that it may write, whatever the classifier says.
    user_routed_to_primary: bool = False
    reason: str = ""  # why it goes there: the classifier's verdict, or who decided


def read_request(policy: RoutingPolicy, symmetric: bool) -> RoleRequest:
    """Where a read goes under *policy*."""
    if symmetric:
        return RoleRequest.ANY
    if policy.split is ReadWriteSplit.OFF:
        return RoleRequest.PRIMARY
    if policy.split is ReadWriteSplit.INCLUDE_PRIMARY:
        return RoleRequest.ANY
    if policy.split is ReadWriteSplit.PREFER_REPLICAS:
        return RoleRequest.SPILL
    return RoleRequest.PREFER_REPLICA if policy.fallback_to_primary else RoleRequest.REPLICA


def decide(
    query: str,
    *,
    explicit: RoleRequest | None,
    scoped: RoleRequest | None,
    policy: RoutingPolicy,
    symmetric: bool,
    strip_comments: bool,
    volatile_functions: frozenset[str] = frozenset(),
) -> Decision:
    """Route one statement. Pure; priority: per-call role, ``pool.route()``,
    a hint comment, the user's router, then the classifier."""
    if policy.rewrite is not None:
        query = policy.rewrite(query)
    info = classify(query)
    write_functions = policy.write_functions | volatile_functions
    is_write = info.kind is StatementKind.WRITE or bool(info.functions & write_functions)
    guess = RoleRequest.PRIMARY if is_write else read_request(policy, symmetric)
    instance: str | None = None
    hint = info.hint
    by_user = True
    if explicit is not None:
        request = explicit
        reason = "role="
    elif scoped is not None:
        request = scoped
        reason = "pool.route()"
    elif hint is not None and (hint.role is not None or hint.instance is not None):
        request = parse_role(hint.role, guess) if hint.role else guess
        instance = hint.instance
        reason = "hint"
    else:
        request = guess
        by_user = False
        reason = info.reason if not (info.functions & write_functions) else "write function"
        if policy.router is not None:
            routed = policy.router(query, guess.value)
            if routed is not None:
                by_user = True
                reason = "router"
                if routed in _BY_NAME:
                    request = _BY_NAME[routed]
                else:
                    instance = routed
    user_routed_to_primary = by_user and (request is RoleRequest.PRIMARY or instance is not None)
    if symmetric and request is not RoleRequest.ANY and instance is None:
        request = RoleRequest.ANY  # every peer serves everything
    if strip_comments and hint is not None:
        query = strip_hint(query)
    leaves_state = info.leaves_session_state or bool(info.functions & write_functions)
    return Decision(
        request=request,
        instance=instance,
        query=query,
        is_write=is_write,
        leaves_session_state=leaves_state,
        elide_reset=policy.elide_reset and not leaves_state,
        functions=info.functions,
        user_routed_to_primary=user_routed_to_primary,
        reason=reason,
    )
