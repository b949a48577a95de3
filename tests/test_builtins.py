"""The built-in function lists (picopool._builtins) and the volatility routing rule.

Unit part: the shipped lists are well-formed, the replica allow-list holds only
volatile built-ins, and ``classify`` applies the rule to every built-in name.
Live part: the shipped lists still match the test server's ``pg_proc``, so a
server upgrade that adds a function or changes a volatility fails here.
"""

from __future__ import annotations

import asyncpg
import pytest

from picopool import _builtins
from picopool._builtins import (
    NON_VOLATILE_BUILTINS,
    REPLICA_SAFE_VOLATILE,
    VOLATILE_BUILTINS,
    fetch_builtins,
    render,
)
from picopool._sql import (
    _NOT_FUNCTIONS,
    StatementKind,
    _is_write_function,
    classify,
    known_read_only,
    read_only_builtins,
)
from picopool.cluster import LocalCluster

# Defect 14: each of these ran on (or failed on) a random replica.
PRIMARY_ONLY = [
    "pg_current_wal_lsn", "pg_current_wal_insert_lsn", "pg_current_wal_flush_lsn",
    "pg_reload_conf", "pg_terminate_backend", "pg_cancel_backend", "pg_stat_reset",
    "pg_stat_reset_shared", "pg_rotate_logfile", "pg_read_file", "pg_ls_dir",
    "pg_sequence_last_value", "pg_xact_status", "query_to_xml", "pg_promote",
    "setseed", "pg_export_snapshot", "pg_control_checkpoint", "pg_lock_status",
]
REPLICA_OK = [
    "random", "clock_timestamp", "timeofday", "pg_sleep", "pg_sleep_for", "pg_sleep_until",
    "gen_random_uuid", "pg_is_in_recovery", "pg_last_wal_replay_lsn",
    "pg_last_wal_receive_lsn", "pg_last_xact_replay_timestamp", "pg_relation_size",
    "pg_database_size", "pg_stat_get_xact_numscans", "lo_get",
]


def test_lists_are_well_formed() -> None:
    assert len(NON_VOLATILE_BUILTINS) > 2000 and len(VOLATILE_BUILTINS) > 150
    assert not NON_VOLATILE_BUILTINS & VOLATILE_BUILTINS
    for name in NON_VOLATILE_BUILTINS | VOLATILE_BUILTINS:
        assert name == name.lower() and name.strip() == name and name
    assert _builtins.SERVER_VERSION.startswith("15.")
    for name in ("now", "lower", "count", "pg_backend_pid", "version", "current_setting"):
        assert name in NON_VOLATILE_BUILTINS, name


def test_allow_list_holds_only_volatile_built_ins() -> None:
    """A stale allow-list entry (a function that became STABLE, or was renamed)
    fails here rather than lingering."""
    assert REPLICA_SAFE_VOLATILE <= VOLATILE_BUILTINS
    assert not any(_is_write_function(name) for name in REPLICA_SAFE_VOLATILE)
    for name in REPLICA_OK:
        assert name in REPLICA_SAFE_VOLATILE, name
    for name in PRIMARY_ONLY:
        assert name in VOLATILE_BUILTINS and name not in REPLICA_SAFE_VOLATILE, name


@pytest.mark.parametrize("name", sorted(VOLATILE_BUILTINS - REPLICA_SAFE_VOLATILE))
def test_every_other_volatile_built_in_goes_to_the_primary(name: str) -> None:
    info = classify(f"SELECT {name}(1)")
    assert info.kind is StatementKind.WRITE, (name, info)
    assert name in info.functions
    assert not known_read_only(name)


def test_non_volatile_and_allowed_built_ins_stay_reads() -> None:
    for name in sorted(NON_VOLATILE_BUILTINS | REPLICA_SAFE_VOLATILE):
        info = classify(f"SELECT {name}(1)")
        if _is_write_function(name):  # txid_current, pg_current_xact_id: take an xid
            assert info.kind is StatementKind.WRITE, name
            assert not known_read_only(name)
            continue
        assert info.kind is StatementKind.READ, (name, info)
        assert name in info.functions or name in _NOT_FUNCTIONS, name
        assert known_read_only(name), name


def test_read_only_builtins() -> None:
    names = frozenset({"now", "lower", "random", "pg_reload_conf", "nextval", "my_fn",
                       "txid_current"})
    assert read_only_builtins(names) == {"now", "lower", "random"}
    assert read_only_builtins(frozenset()) == frozenset()


def test_unknown_functions_are_classified_as_before() -> None:
    """A user function is a read unless write_functions / the catalog says otherwise."""
    assert classify("SELECT my_fn(1)").kind is StatementKind.READ
    assert not known_read_only("my_fn")


def test_render_round_trips() -> None:
    text = render("15.0", frozenset({"b", "a"}), frozenset({"c"}))
    namespace: dict[str, object] = {}
    exec(text, namespace)
    assert namespace["NON_VOLATILE_BUILTINS"] == {"a", "b"}
    assert namespace["VOLATILE_BUILTINS"] == {"c"}
    assert namespace["SERVER_VERSION"] == "15.0"


@pytest.mark.integration
async def test_shipped_lists_match_the_servers_pg_proc(cluster: LocalCluster) -> None:
    """Regenerate with ``python -m picopool._builtins --generate DSN`` if this fails
    after a server upgrade (then review REPLICA_SAFE_VOLATILE)."""
    connection = await asyncpg.connect(cluster.dsn)  # any node: pg_proc is replicated
    try:
        non_volatile, volatile = await fetch_builtins(connection)
    finally:
        await connection.close()
    assert sorted(volatile - VOLATILE_BUILTINS) == [], "new or newly volatile built-ins"
    assert sorted(VOLATILE_BUILTINS - volatile) == [], "no longer volatile (or gone)"
    assert sorted(non_volatile - NON_VOLATILE_BUILTINS) == [], "new non-volatile built-ins"
    assert sorted(NON_VOLATILE_BUILTINS - non_volatile) == [], "gone or now volatile"
