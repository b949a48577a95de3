"""What a failed attempt says: one outcome taxonomy, decided in one place.

Every failure of a pool-level statement (and of an acquire) is classified once,
here, into an :class:`Outcome`. The outcome alone says whether the instance is
at fault (its breaker opens), whether the statement may have run on the server,
and whether the topology should be refreshed. :func:`may_retry` then applies the
retry rule. Everything here is pure and synchronous: the executor does the I/O.

The retry rule
    A statement is run again only if it provably did not run (it failed before
    being sent, or the server refused it before running it), or if it may have
    run but provably cannot have written (see :func:`may_retry`). A caller's
    timeout or cancellation is never retried, and never counts against the
    instance. When in doubt, the error goes to the caller.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import asyncpg


class Phase(enum.Enum):
    """How far an attempt got."""

    ACQUIRE = "acquire"  # choosing an instance, connecting, checking a connection out
    RUN = "run"  # the statement was handed to the connection


@dataclass(frozen=True, slots=True)
class _Traits:
    instance_at_fault: bool  # count a failure against the instance (its breaker)
    may_have_run: bool  # the server may have executed the statement
    refresh: bool  # the topology may have changed: refresh now
    retryable: bool  # may run again elsewhere (subject to may_have_run)


class Outcome(enum.Enum):
    """The outcomes of one failed attempt."""

    CONNECT_FAILED = "connect-failed"
    """Connecting to the instance or checking a connection out failed."""
    LOST_IDLE = "lost-idle"
    """The connection was already dead: asyncpg refused the statement locally."""
    REFUSED = "refused"
    """The server refused before running anything (57P03: not accepting connections)."""
    DEMOTED = "demoted"
    """25006 read-only, and the instance confirmed it is in recovery: a former
    (or not yet promoted) primary. Nothing was written."""
    READ_ONLY = "read-only"
    """25006 read-only that is not (yet) confirmed as a demotion. Confirmation
    needs a round trip; unconfirmed, it is the statement's own error."""
    LOST_IN_FLIGHT = "lost-in-flight"
    """The connection broke after the statement was sent: it may have run."""
    UNRESPONSIVE = "unresponsive"
    """picopool cut the connection because the instance stopped answering."""
    CALLER_TIMEOUT = "caller-timeout"
    """The caller's timeout or cancellation. The caller's decision, not a fault."""
    STATEMENT_ERROR = "statement-error"
    """The statement's own error (a constraint, a syntax error, a permission)."""

    @property
    def instance_at_fault(self) -> bool:
        return _TRAITS[self].instance_at_fault

    @property
    def may_have_run(self) -> bool:
        return _TRAITS[self].may_have_run

    @property
    def refresh(self) -> bool:
        return _TRAITS[self].refresh

    @property
    def retryable(self) -> bool:
        return _TRAITS[self].retryable


_TRAITS = {
    Outcome.CONNECT_FAILED: _Traits(True, False, True, True),
    Outcome.LOST_IDLE: _Traits(True, False, True, True),
    Outcome.REFUSED: _Traits(True, False, True, True),
    Outcome.DEMOTED: _Traits(False, False, True, True),
    Outcome.READ_ONLY: _Traits(False, False, False, False),
    Outcome.LOST_IN_FLIGHT: _Traits(True, True, True, True),
    Outcome.UNRESPONSIVE: _Traits(True, True, True, True),
    Outcome.CALLER_TIMEOUT: _Traits(False, True, False, False),
    Outcome.STATEMENT_ERROR: _Traits(False, True, False, False),
}

# SQLSTATEs of a connection that is gone (class 08) or a server going away (57P0x).
_LOST_SQLSTATES = frozenset({"57P01", "57P02", "08000", "08003", "08006", "08001", "08004",
                             "53300"})  # too many connections: try another instance


def classify_failure(exc: BaseException, phase: Phase, *, budget_spent: bool = False) -> Outcome:
    """The outcome of an attempt that raised *exc* in *phase*.

    *budget_spent*: the caller's own time budget (its ``timeout=``) ran out
    while acquiring, as opposed to a connect timeout of the instance.

    ``asyncio.CancelledError`` never reaches here: a cancellation is always the
    caller's (picopool's own interruptions surface as :data:`Outcome.UNRESPONSIVE`
    through the executor, never as a cancellation).
    """
    if phase is Phase.ACQUIRE:
        if isinstance(exc, TimeoutError) and budget_spent:
            return Outcome.CALLER_TIMEOUT
        if isinstance(exc, asyncpg.PostgresError) and not _is_connection_level(exc):
            # A setup= callback's own error, an authentication failure...: nothing ran,
            # but it is not the instance going away either; the caller gets it.
            return Outcome.STATEMENT_ERROR
        return Outcome.CONNECT_FAILED
    if isinstance(exc, TimeoutError):
        # During a statement, asyncpg raises TimeoutError only for the caller's
        # timeout= (or command_timeout): it has cancelled the query on the server.
        return Outcome.CALLER_TIMEOUT
    if rejected_before_sending(exc):
        return Outcome.LOST_IDLE
    sqlstate = getattr(exc, "sqlstate", None)
    if sqlstate == "57P03":
        return Outcome.REFUSED
    if sqlstate == "25006":
        return Outcome.READ_ONLY
    if _is_connection_level(exc):
        return Outcome.LOST_IN_FLIGHT
    return Outcome.STATEMENT_ERROR


def confirm_read_only(*, in_recovery: bool | None, still_primary: bool) -> Outcome:
    """A 25006 from an instance picopool took for the primary is a demotion if the
    instance says it is in recovery, or if discovery now names another primary.
    Otherwise (a role or database with ``default_transaction_read_only``, or no
    way to tell) it is the statement's own error."""
    return Outcome.DEMOTED if in_recovery or not still_primary else Outcome.READ_ONLY


def may_retry(outcome: Outcome, *, provably_read_only: bool) -> bool:
    """The retry rule.

    *provably_read_only*: the statement is classified as a read, was not routed
    to the primary explicitly (``role=``, a hint, ``pool.route()``, the router),
    and every function it calls is known not to write (a read-only built-in, or
    a user function that pg_proc says is STABLE or IMMUTABLE).
    """
    if not outcome.retryable:
        return False
    if not outcome.may_have_run:
        return True
    return provably_read_only


def _is_connection_level(exc: BaseException) -> bool:
    """The connection or the server went away (not the statement's fault)."""
    if isinstance(exc, OSError | ConnectionError):
        return True
    if isinstance(exc, asyncpg.ConnectionDoesNotExistError | asyncpg.ConnectionFailureError):
        return True
    if _broken_protocol(exc):
        return True
    if isinstance(exc, asyncpg.InterfaceError):
        text = str(exc).lower()
        if "connection" in text and ("closed" in text or "lost" in text):
            return True
    return getattr(exc, "sqlstate", None) in _LOST_SQLSTATES


def is_connection_error(exc: BaseException) -> bool:
    """Errors that say the instance (not the statement) is the problem: used by
    discovery and the background tasks, where there is no statement."""
    return isinstance(exc, TimeoutError) or _is_connection_level(exc) or getattr(
        exc, "sqlstate", None) == "57P03"


def rejected_before_sending(exc: BaseException) -> bool:
    """asyncpg refused the statement locally: the server never saw it.

    "connection is closed" comes from the check before sending; "cannot switch
    to state" means the server's FATAL arrived on an idle pooled connection
    before the socket closed, and asyncpg rejects the next statement.
    """
    if isinstance(exc, asyncpg.InterfaceError) and "connection is closed" in str(exc):
        return True
    return _broken_protocol(exc)


def _broken_protocol(exc: BaseException) -> bool:
    """asyncpg's protocol is stuck in its error or failed state: the server sent a
    FATAL error (such as a shutdown's 57P01) to an idle connection whose socket has
    not closed yet. Misuse (two operations at once) raises a different error."""
    return isinstance(exc, asyncpg.InternalClientError) and str(exc).startswith(
        "cannot switch to state")
