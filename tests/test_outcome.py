"""The outcome taxonomy and the retry rule (pure), and the byte-bounded statement cache."""

from __future__ import annotations

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st

from picopool._cache import StatementCache
from picopool._outcome import (
    Outcome,
    Phase,
    classify_failure,
    confirm_read_only,
    is_connection_error,
    may_retry,
)


def postgres_error(cls: type[asyncpg.PostgresError]) -> asyncpg.PostgresError:
    error: asyncpg.PostgresError = cls.new({"M": "message", "C": cls.sqlstate})
    return error


# Exceptions as asyncpg raises them, with the outcome each must get during a statement.
RUN_CASES: list[tuple[BaseException, Outcome]] = [
    (TimeoutError(), Outcome.CALLER_TIMEOUT),
    (asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
     Outcome.LOST_IN_FLIGHT),
    (ConnectionResetError(), Outcome.LOST_IN_FLIGHT),
    (asyncpg.InterfaceError("cannot call Connection.fetchval(): connection is closed"),
     Outcome.LOST_IDLE),
    (asyncpg.InternalClientError("cannot switch to state 12; another operation (2) is in "
                                 "progress"), Outcome.LOST_IDLE),
    (postgres_error(asyncpg.AdminShutdownError), Outcome.LOST_IN_FLIGHT),
    (postgres_error(asyncpg.CannotConnectNowError), Outcome.REFUSED),
    (postgres_error(asyncpg.ReadOnlySQLTransactionError), Outcome.READ_ONLY),
    (postgres_error(asyncpg.UniqueViolationError), Outcome.STATEMENT_ERROR),
    (postgres_error(asyncpg.QueryCanceledError), Outcome.STATEMENT_ERROR),
    (postgres_error(asyncpg.InsufficientPrivilegeError), Outcome.STATEMENT_ERROR),
    (asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
     Outcome.STATEMENT_ERROR),
    (ValueError("bad argument"), Outcome.STATEMENT_ERROR),
]


@pytest.mark.parametrize(("exc", "expected"), RUN_CASES, ids=lambda v: type(v).__name__)
def test_run_phase_outcomes(exc: BaseException, expected: Outcome) -> None:
    assert classify_failure(exc, Phase.RUN) is expected


def test_acquire_phase_outcomes() -> None:
    assert classify_failure(ConnectionRefusedError(), Phase.ACQUIRE) is Outcome.CONNECT_FAILED
    assert classify_failure(TimeoutError(), Phase.ACQUIRE) is Outcome.CONNECT_FAILED
    assert classify_failure(TimeoutError(), Phase.ACQUIRE,
                            budget_spent=True) is Outcome.CALLER_TIMEOUT
    assert classify_failure(postgres_error(asyncpg.TooManyConnectionsError),
                            Phase.ACQUIRE) is Outcome.CONNECT_FAILED
    # a setup= callback's own error, a wrong password: the caller's to see
    assert classify_failure(postgres_error(asyncpg.InvalidPasswordError),
                            Phase.ACQUIRE) is Outcome.STATEMENT_ERROR


def test_a_25006_is_a_demotion_only_when_confirmed() -> None:
    assert confirm_read_only(in_recovery=True, still_primary=True) is Outcome.DEMOTED
    assert confirm_read_only(in_recovery=False, still_primary=False) is Outcome.DEMOTED
    assert confirm_read_only(in_recovery=False, still_primary=True) is Outcome.READ_ONLY
    assert confirm_read_only(in_recovery=None, still_primary=True) is Outcome.READ_ONLY


outcomes = st.sampled_from(list(Outcome))


@given(outcomes, st.booleans())
def test_the_retry_rule(outcome: Outcome, read_only: bool) -> None:
    retried = may_retry(outcome, provably_read_only=read_only)
    if outcome in (Outcome.CALLER_TIMEOUT, Outcome.STATEMENT_ERROR, Outcome.READ_ONLY):
        assert not retried  # the caller's decision, or the caller's error
    if retried and outcome.may_have_run:
        assert read_only  # a statement that may have run again only if it cannot write
    if not outcome.may_have_run and outcome.retryable:
        assert retried  # provably not run: always safe elsewhere


@given(outcomes)
def test_a_callers_timeout_is_never_the_instance_at_fault(outcome: Outcome) -> None:
    if outcome is Outcome.CALLER_TIMEOUT:
        assert not outcome.instance_at_fault and not outcome.refresh
    if outcome.instance_at_fault:
        assert outcome.refresh


exceptions = st.one_of(
    st.sampled_from([exc for exc, _ in RUN_CASES]),
    st.builds(asyncpg.InterfaceError, st.text(max_size=60)),
    st.builds(asyncpg.InternalClientError, st.text(max_size=60)),
    st.builds(OSError, st.integers(0, 200), st.text(max_size=20)),
)


@given(exceptions)
def test_only_a_dead_connection_counts_as_not_sent(exc: BaseException) -> None:
    """Whatever text an error carries, 'not sent' (retried even for writes) needs asyncpg's
    local refusal; everything else that involves the network may have run."""
    outcome = classify_failure(exc, Phase.RUN)
    if outcome is Outcome.LOST_IDLE:
        text = str(exc)
        assert "connection is closed" in text or text.startswith("cannot switch to state")
    if outcome.instance_at_fault:
        assert is_connection_error(exc)


# -- the statement cache, against a reference model ----------------------------------------

operations = st.lists(st.tuples(st.integers(0, 30), st.integers(0, 3000)), max_size=200)


@given(operations, st.integers(1, 16), st.integers(1, 8000), st.integers(1, 3000))
def test_the_cache_is_bounded_by_entries_and_bytes(
        ops: list[tuple[int, int]], max_entries: int, max_bytes: int, max_statement: int) -> None:
    cache: StatementCache[int, int] = StatementCache(
        max_entries=max_entries, max_bytes=max_bytes, max_statement=max_statement)
    model: dict[int, int] = {}
    sizes: dict[int, int] = {}
    for key, size in ops:
        cache.put(key, key * 2, size)
        if size <= max_statement and key not in model:
            if len(model) >= max_entries or sum(sizes.values()) + size > max_bytes:
                model.clear()
                sizes.clear()
            model[key] = key * 2
            sizes[key] = size
        assert len(cache) == len(model) <= max_entries
        assert cache.bytes == sum(sizes.values()) <= max(max_bytes, max_statement)
        for known, value in model.items():
            assert cache.get(known) == value
