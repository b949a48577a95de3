"""Tests for picopool._sql, the statement classifier: table-driven cases for every
rule, then hypothesis properties (decoys in comments and literals, never raising,
comment stripping, hint round-trips)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picopool import _sql
from picopool._sql import (
    VALID_ROLES,
    Classification,
    RoutingHint,
    StatementKind,
    classify,
    clear_cache,
    format_hint,
    is_write,
    parse_hint,
    strip_comments,
    strip_hint,
)

READ, WRITE = StatementKind.READ, StatementKind.WRITE

# ------------------------------------------------------------------ reads

READS: list[tuple[str, str]] = [
    ("SELECT * FROM items WHERE id = $1", "select"),
    ("select 1", "select"),
    ("  SELECT 1  ", "select"),
    ("SELECT 1;", "select"),
    ("SELECT 1;;  ; -- trailing comment", "select"),
    ("SELECT 'DELETE FROM x'", "select"),
    ("SELECT 'it''s; DELETE FROM t'", "select"),
    ("SELECT $$ UPDATE $$", "select"),
    ("SELECT $fn$ DELETE FROM t; $fn$", "select"),
    ("SELECT $a$ $b$ DROP TABLE t $b$ $a$", "select"),
    ("SELECT $a$ x $A$ ; DELETE FROM t $a$", "select"),  # tags are case-sensitive
    ('SELECT "update" FROM t', "select"),
    ('SELECT "a""; DELETE FROM t" FROM t', "select"),
    ('SELECT U&"d\\0061t" FROM t', "select"),
    ("SELECT 1 -- ; DROP TABLE x", "select"),
    ("SELECT 1 --; DROP TABLE x\r", "select"),
    ("/* /* */ DELETE */ SELECT 1", "select"),
    ("SELECT /* ; DELETE FROM t; */ 1", "select"),
    ("SELECT /* a /* b */ DELETE */ 1 /**/", "select"),
    ("SELECT E'\\'; DELETE FROM t; --'", "select"),
    ("SELECT e'\\\\' AS backslash", "select"),
    ("SELECT U&'d\\0061t\\+000061', B'1010', X'1F', N'UPDATE t'", "select"),
    ("SELECT $1, $2::text FROM t WHERE a = $3", "select"),
    ("SELECT $1::int", "select"),
    ("SELECT * FROM t WHERE name = $1 -- FOR UPDATE", "select"),
    ("SELECT t.update, t.delete, t.into FROM t", "select"),
    ("SELECT 1 AS update, 2 AS into", "select"),
    ("SELECT substring(name FROM 1 FOR 3) FROM t", "select"),
    ("SELECT * FROM t WHERE a IN (SELECT b FROM u) AND EXISTS (SELECT 1)", "select"),
    ("SELECT * FROM t WHERE x = ANY($1::int[])", "select"),
    ("SELECT count(*) FILTER (WHERE x > 0) OVER (PARTITION BY y) FROM t", "select"),
    ("SELECT a FROM t ORDER BY 1 FETCH FIRST 5 ROWS ONLY", "select"),
    ("SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn()", "select"),
    ("(SELECT 1) UNION (SELECT 2)", "select"),
    ("((SELECT 1))", "select"),
    ("WITH x AS (SELECT 1) SELECT * FROM x", "select"),
    ("WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 5) "
     "SELECT * FROM r", "select"),
    ("WITH a AS MATERIALIZED (SELECT 1), b AS NOT MATERIALIZED (VALUES (2)) "
     "SELECT * FROM a, b", "select"),
    ("VALUES (1), (2)", "values"),
    ("TABLE items", "table"),
    ("SHOW search_path", "show"),
    ("EXPLAIN SELECT 1", "explain"),
    ("EXPLAIN DELETE FROM t", "explain"),  # plans only: nothing runs
    ("EXPLAIN (FORMAT JSON) INSERT INTO t VALUES (1)", "explain"),
    ("EXPLAIN VERBOSE UPDATE t SET a = 1", "explain"),
    ("EXPLAIN SELECT nextval('s')", "explain"),
    ("EXPLAIN (SELECT 1)", "explain"),
    ("EXPLAIN (ANALYZE off) UPDATE t SET a = 1", "explain"),
    ("EXPLAIN (ANALYZE false, COSTS true) DELETE FROM t", "explain"),
    ("EXPLAIN ANALYZE SELECT * FROM t", "explain analyze"),
    ("EXPLAIN ANALYSE VERBOSE SELECT * FROM t", "explain analyze"),
    ("EXPLAIN (ANALYZE, BUFFERS) SELECT 1", "explain analyze"),
    ("EXPLAIN (ANALYZE true, FORMAT JSON) SELECT 1", "explain analyze"),
    ("EXPLAIN (FORMAT JSON, ANALYZE) WITH x AS (SELECT 1) SELECT * FROM x", "explain analyze"),
    ("COPY t TO STDOUT", "copy to"),
    ("COPY t (a, b) TO STDOUT WITH (FORMAT csv)", "copy to"),
    ("COPY (SELECT * FROM t WHERE a > 1) TO STDOUT", "copy to"),
    ("/* picopool: role=primary */ SELECT 1", "select"),  # a hint does not change the kind
]


@pytest.mark.parametrize(("query", "reason"), READS)
def test_reads(query: str, reason: str) -> None:
    info = classify(query)
    assert (info.kind, info.reason) == (READ, reason)
    assert not info.is_write
    assert not is_write(query)


# ----------------------------------------------------------------- writes

WRITES: list[tuple[str, str]] = [
    # DML
    ("INSERT INTO t (a) VALUES ($1)", "DML"),
    ("insert into t values (1) returning id", "DML"),
    ("UPDATE t SET a = 1 WHERE id = $1", "DML"),
    ("DELETE FROM t WHERE id = $1", "DML"),
    ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN UPDATE SET a = s.a", "DML"),
    ("(DELETE FROM t)", "DML"),
    ("WITH x AS (SELECT 1) DELETE FROM t", "DML"),
    ("WITH x AS (SELECT 1) INSERT INTO t SELECT * FROM x", "DML"),
    # data-modifying CTEs and sub-statements
    ("WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d", "data-modifying CTE"),
    ("WITH a AS (SELECT 1), b AS (UPDATE t SET x = 1 RETURNING *) SELECT * FROM a, b",
     "data-modifying CTE"),
    ("WITH a AS (WITH b AS (SELECT 1) INSERT INTO t SELECT * FROM b RETURNING *) "
     "SELECT * FROM a", "data-modifying CTE"),
    ("WITH RECURSIVE a(x) AS MATERIALIZED (MERGE INTO t USING s ON true "
     "WHEN MATCHED THEN DELETE RETURNING *) SELECT 1", "data-modifying CTE"),
    ("SELECT * FROM (WITH d AS (DELETE FROM t RETURNING *) SELECT * FROM d) s", "DML"),
    ("COPY (DELETE FROM t RETURNING *) TO STDOUT", "DML"),
    # DDL
    ("CREATE TABLE t (a int)", "DDL"),
    ("CREATE TEMP TABLE t AS SELECT 1", "DDL"),
    ("ALTER TABLE t ADD COLUMN b int", "DDL"),
    ("DROP TABLE t", "DDL"),
    ("TRUNCATE t", "DDL"),
    ("GRANT SELECT ON t TO u", "DDL"),
    ("REVOKE SELECT ON t FROM u", "DDL"),
    ("COMMENT ON TABLE t IS 'SELECT'", "DDL"),
    ("SECURITY LABEL ON TABLE t IS 'x'", "DDL"),
    # COPY
    ("COPY t FROM STDIN", "copy from"),
    ("COPY t (a, b) FROM '/tmp/x' WITH (FORMAT csv)", "copy from"),
    ("COPY t TO PROGRAM 'gzip > /tmp/t.gz'", "copy to program"),
    # procedures, locks, transactions, session state
    ("CALL p(1)", "call"),
    ("DO $$ BEGIN PERFORM 1; END $$", "do"),
    ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", "lock"),
    ("BEGIN", "transaction control"),
    ("START TRANSACTION READ ONLY", "transaction control"),
    ("COMMIT", "transaction control"),
    ("END", "transaction control"),
    ("ROLLBACK", "transaction control"),
    ("ABORT", "transaction control"),
    ("SAVEPOINT s", "transaction control"),
    ("RELEASE SAVEPOINT s", "transaction control"),
    ("PREPARE TRANSACTION 'x'", "transaction control"),
    ("SET search_path = app", "session state"),
    ("SET LOCAL statement_timeout = 0", "session state"),
    ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", "session state"),
    ("RESET ALL", "session state"),
    ("DISCARD ALL", "session state"),
    ("LOAD 'auto_explain'", "session state"),
    # maintenance, notifications, prepared statements, cursors
    ("VACUUM t", "maintenance"),
    ("VACUUM (VERBOSE, ANALYZE) t", "maintenance"),
    ("ANALYZE t", "maintenance"),
    ("CLUSTER t USING i", "maintenance"),
    ("REINDEX TABLE t", "maintenance"),
    ("REFRESH MATERIALIZED VIEW v", "maintenance"),
    ("CHECKPOINT", "maintenance"),
    ("LISTEN channel", "listen/notify"),
    ("NOTIFY channel, 'payload'", "listen/notify"),
    ("UNLISTEN *", "listen/notify"),
    ("PREPARE p(int) AS SELECT $1", "prepared statement"),
    ("EXECUTE p(1)", "prepared statement"),
    ("DEALLOCATE p", "prepared statement"),
    ("DECLARE c CURSOR WITH HOLD FOR SELECT 1", "cursor"),
    ("FETCH 10 FROM c", "cursor"),
    ("CLOSE c", "cursor"),
    # multi-statement strings
    ("SELECT 1; SELECT 2", "multi-statement"),
    ("SELECT 1; -- x\nSELECT 2", "multi-statement"),
    ("SELECT 1 -- x\n; DELETE FROM t", "multi-statement"),
    ("SELECT 'a'; SELECT 'b';", "multi-statement"),
    ("SELECT 1 /* ; */ ; SELECT $$;$$", "multi-statement"),
    # locking clauses, nested included
    ("SELECT * FROM t FOR UPDATE", "locking clause"),
    ("SELECT * FROM t FOR NO KEY UPDATE", "locking clause"),
    ("SELECT * FROM t FOR SHARE", "locking clause"),
    ("SELECT * FROM t FOR KEY SHARE", "locking clause"),
    ("SELECT * FROM t FOR UPDATE OF t SKIP LOCKED", "locking clause"),
    ("select * from t for update nowait", "locking clause"),
    ("SELECT * FROM (SELECT * FROM t FOR SHARE) s", "locking clause"),
    ("SELECT * FROM t WHERE id IN (SELECT id FROM u FOR UPDATE)", "locking clause"),
    ("WITH x AS (SELECT * FROM t FOR UPDATE) SELECT * FROM x", "locking clause"),
    ("(SELECT * FROM t FOR KEY SHARE)", "locking clause"),
    # SELECT INTO creates a table
    ("SELECT * INTO new_t FROM t", "select into"),
    ("SELECT * INTO TEMP t2 FROM t", "select into"),
    ("SELECT 1 INTO", "select into"),
    # functions that write, or must run on the primary
    ("SELECT nextval('s')", "write function"),
    ("SELECT pg_catalog.nextval('s')", "write function"),
    ('SELECT "nextval"(\'s\')', "write function"),
    ("SELECT NEXTVAL ( 's' )", "write function"),
    ("SELECT setval('s', 1)", "write function"),
    ("SELECT currval('s')", "write function"),
    ("SELECT lastval()", "write function"),
    ("SELECT * FROM t WHERE id = nextval('s')", "write function"),
    ("VALUES (nextval('s'))", "write function"),
    ("SELECT pg_advisory_lock(1)", "write function"),
    ("SELECT pg_advisory_xact_lock_shared(1)", "write function"),
    ("SELECT pg_try_advisory_lock(1)", "write function"),
    ("SELECT pg_advisory_unlock_all()", "write function"),
    ("SELECT set_config('a.b', 'c', false)", "write function"),
    ("SELECT lo_import('/tmp/x')", "write function"),
    ("SELECT lo_unlink(1)", "write function"),
    ("SELECT lo_put(1, 0, 'x')", "write function"),
    ("SELECT pg_notify('c', 'x')", "write function"),
    ("SELECT txid_current()", "write function"),
    ("SELECT pg_current_xact_id()", "write function"),
    ("SELECT pg_switch_wal()", "write function"),
    ("SELECT DISTINCT ON (a) nextval('s') FROM t", "write function"),
    ("WITH x AS (SELECT nextval('s')) SELECT * FROM x", "write function"),
    ("COPY (SELECT nextval('s')) TO STDOUT", "write function"),
    # EXPLAIN ANALYZE runs the statement
    ("EXPLAIN ANALYZE DELETE FROM t", "explain analyze DML"),
    ("EXPLAIN ANALYZE VERBOSE DELETE FROM t", "explain analyze DML"),
    ("EXPLAIN (ANALYZE) INSERT INTO t VALUES (1)", "explain analyze DML"),
    ("EXPLAIN (ANALYZE true) UPDATE t SET a = 1", "explain analyze DML"),
    ("EXPLAIN (ANALYZE 1, BUFFERS) UPDATE t SET a = 1", "explain analyze DML"),
    ("EXPLAIN (FORMAT JSON, ANALYZE on) DELETE FROM t", "explain analyze DML"),
    ("EXPLAIN (ANALYZE 'off') DELETE FROM t", "explain analyze DML"),  # unsure: primary
    ("EXPLAIN ANALYZE SELECT * FROM t FOR UPDATE", "explain analyze locking clause"),
    ("EXPLAIN ANALYZE SELECT nextval('s')", "explain analyze write function"),
    ("EXPLAIN ANALYZE WITH d AS (DELETE FROM t RETURNING 1) SELECT * FROM d",
     "explain analyze data-modifying CTE"),
    # unparseable and empty
    ("SELECT 'oops", "unparseable"),
    ("SELECT E'oops\\'", "unparseable"),
    ("SELECT 'a''", "unparseable"),
    ('SELECT "oops', "unparseable"),
    ('SELECT U&"oops', "unparseable"),
    ("SELECT $$ oops", "unparseable"),
    ("SELECT $a$ oops $b$", "unparseable"),
    ("SELECT $A$ oops $a$", "unparseable"),
    ("SELECT 1 /* oops", "unparseable"),
    ("/* /* */ SELECT 1", "unparseable"),
    ("SELECT /* a /* b */ c", "unparseable"),
    ("SELECT (1", "unparseable"),
    ("SELECT 1)", "unparseable"),
    ("EXPLAIN (ANALYZE SELECT 1", "unparseable"),
    ("", "empty"),
    ("   \n\t", "empty"),
    ("-- only a comment", "empty"),
    ("/* c */", "empty"),
    (";", "empty"),
    (" ; ;", "empty"),
    # anything else
    ("FOO BAR", "unknown statement"),
    ("'abc'", "unknown statement"),
    ("EXPLAIN", "unknown statement"),
    ("EXPLAIN ANALYZE", "unknown statement"),
]


@pytest.mark.parametrize(("query", "reason"), WRITES)
def test_writes(query: str, reason: str) -> None:
    info = classify(query)
    assert (info.kind, info.reason) == (WRITE, reason)
    assert info.is_write
    assert is_write(query)


def test_unparseable_must_reset() -> None:
    for query in ("SELECT 'oops", "", "SELECT (1"):
        assert classify(query).leaves_session_state


# -------------------------------------------------------------- functions

FUNCTIONS: list[tuple[str, set[str], bool]] = [
    ("SELECT count(*), lower(name) FROM t", {"count", "lower"}, False),
    ("SELECT my_func(1)", {"my_func"}, True),
    ("SELECT s.my_func(1), other . f2 (2)", {"my_func", "f2"}, True),
    ('SELECT "MyFunc"(1), s."x""y"(2)', {"myfunc", 'x"y'}, True),
    ("SELECT * FROM generate_series(1, 3) AS g(i)", {"generate_series"}, False),
    ("SELECT * FROM generate_series(1, 3) g(i)", {"generate_series"}, False),
    ("SELECT * FROM (SELECT 1) AS s(a)", set(), False),
    ("SELECT a FROM t WHERE b IN (1, 2) AND EXISTS (SELECT 1) AND c = ANY($1)", set(), False),
    ("SELECT CAST(x AS numeric(10, 2)), COALESCE(a, b), NULLIF(a, b), GREATEST(1, 2), "
     "LEAST(1, 2), ROW(1, 2), ARRAY(SELECT 1) FROM t", set(), False),
    ("SELECT count(*) FILTER (WHERE a) OVER (PARTITION BY b) FROM t", {"count"}, False),
    ("SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY x) FROM t",
     {"percentile_cont"}, False),
    ("SELECT x::varchar(10), y::character varying(5), z::timestamp(3) with time zone, "
     "w::pg_catalog.numeric(4)", set(), False),
    ("SELECT EXTRACT(YEAR FROM ts), date_trunc('day', ts) FROM t", {"date_trunc"}, False),
    ("SELECT * FROM t TABLESAMPLE bernoulli(10) REPEATABLE (1)", set(), False),
    ("SELECT json_build_object('a', 1), jsonb_agg(x) FROM t",
     {"json_build_object", "jsonb_agg"}, False),
    ("SELECT left(name, 2) FROM t LEFT JOIN u ON true", {"left"}, False),
    ("SELECT DISTINCT ON (a) lower(b) FROM t", {"lower"}, False),
    ("SELECT * FROM t GROUP BY ROLLUP (a), CUBE (b), GROUPING SETS ((c))", set(), False),
    ("SELECT * FROM t WHERE (a, b) OVERLAPS (c, d)", set(), False),
    ("SELECT now() - interval '1 day', random()", {"now", "random"}, False),
    ("SELECT $1::int", set(), False),
    ("SELECT 'f(x)', $$g(y)$$, \"h\" FROM t -- i(z)", set(), False),
    ("WITH RECURSIVE r(n) AS (SELECT 1) SELECT * FROM r", set(), False),
    ("WITH a(x) AS (SELECT 1), b(y) AS (SELECT f(2)) SELECT * FROM a, b", {"f"}, True),
    ("INSERT INTO t (a, b) VALUES ($1, $2)", set(), False),
    ("INSERT INTO s.t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET a = EXCLUDED.a",
     set(), False),
    ("INSERT INTO t AS x (a) VALUES (1) RETURNING (a)", set(), False),
    ("UPDATE t SET a = now() WHERE id = $1", {"now"}, False),
    ("UPDATE t SET (a, b) = ROW(1, 2)", set(), False),
    ("DELETE FROM t WHERE id = $1 RETURNING *", set(), False),
    ("UPDATE t SET a = audit(a)", {"audit"}, True),
    ("INSERT INTO t VALUES (nextval('s'))", {"nextval"}, True),
    ("COPY t (a, b) TO STDOUT", set(), False),
    ("SELECT pg_advisory_lock(1)", {"pg_advisory_lock"}, True),
    ("SELECT set_config('a.b', 'c', false)", {"set_config"}, True),
    ("EXPLAIN SELECT my_func()", set(), False),  # nothing runs
    ("EXPLAIN ANALYZE SELECT my_func()", {"my_func"}, True),
    ("SELECT 1; SELECT f(2)", {"f"}, True),
]


@pytest.mark.parametrize(("query", "functions", "leaves_state"), FUNCTIONS)
def test_functions_and_session_state(query: str, functions: set[str],
                                     leaves_state: bool) -> None:
    info = classify(query)
    assert info.functions == functions
    assert info.leaves_session_state is leaves_state


LEAVES_SESSION_STATE = [
    "SET search_path = x", "RESET ALL", "SELECT set_config('a.b', 'c', false)",
    "SELECT pg_advisory_lock(1)", "SELECT pg_try_advisory_lock(1)", "LISTEN c",
    "DECLARE c CURSOR FOR SELECT 1", "DECLARE c CURSOR WITH HOLD FOR SELECT 1",
    "PREPARE p AS SELECT 1", "SELECT unknown_function()", "DO $$ BEGIN END $$", "CALL p()",
    "BEGIN", "COMMIT", "SELECT 'oops", "", "CREATE TEMP TABLE t (a int)",
    "SELECT * INTO TEMP t FROM u", "SELECT 1; BEGIN", "UPDATE t SET a = my_fn()",
]
NO_SESSION_STATE = [
    "SELECT $1::int", "SELECT * FROM items WHERE id = $1", "INSERT INTO t VALUES ($1)",
    "UPDATE t SET a = $1, b = now() WHERE id = $2", "DELETE FROM t WHERE id = $1",
    "SHOW search_path", "EXPLAIN SELECT 1", "SELECT count(*) FROM t",
    "SELECT * FROM t FOR UPDATE", "SELECT 1; SELECT 2", "VALUES (1)", "TABLE t",
    "WITH d AS (DELETE FROM t RETURNING *) SELECT count(*) FROM d",
]


@pytest.mark.parametrize("query", LEAVES_SESSION_STATE)
def test_must_reset(query: str) -> None:
    assert classify(query).leaves_session_state


@pytest.mark.parametrize("query", NO_SESSION_STATE)
def test_reset_can_be_elided(query: str) -> None:
    assert not classify(query).leaves_session_state


# ------------------------------------------------------- user write functions

@pytest.mark.parametrize(
    ("query", "write_functions", "expected"),
    [
        ("SELECT audit.log_event(1)", {"log_event"}, True),
        ("SELECT audit.log_event(1)", {"audit.log_event"}, True),
        ("SELECT audit.log_event(1)", {"AUDIT.Log_Event"}, True),
        ('SELECT "Log_Event"(1)', {"log_event"}, True),
        ("SELECT log_event(1)", {"audit.log_event"}, True),  # search_path: erring safe
        ("SELECT * FROM t WHERE a = log_event(1)", {"log_event"}, True),
        ("SELECT other(1)", {"log_event"}, False),
        ("SELECT 'log_event(1)' -- log_event(2)", {"log_event"}, False),
        ("SELECT log_event FROM t", {"log_event"}, False),  # a column, not a call
        ("SELECT 1", set(), False),
        ("DELETE FROM t", set(), True),
        ("SELECT nextval('s')", {"log_event"}, True),
    ],
)
def test_is_write_with_user_functions(query: str, write_functions: set[str],
                                      expected: bool) -> None:
    assert is_write(query, frozenset(write_functions)) is expected


# ------------------------------------------------------------------- hints

HINTS: list[tuple[str, RoutingHint | None]] = [
    ("/* picopool: role=primary */ SELECT 1", RoutingHint("primary", None)),
    ("SELECT 1 /* picopool: role=replica */", RoutingHint("replica", None)),
    ("\n  /*picopool:role=prefer-replica*/SELECT 1", RoutingHint("prefer-replica", None)),
    ("SELECT 1 /* picopool: role=any instance=pg-2:5432 */ \n", RoutingHint("any", "pg-2:5432")),
    ("/* picopool: role=replica, instance=db_1 */ SELECT 1", RoutingHint("replica", "db_1")),
    ("/* picopool: instance=db1 */ SELECT 1", RoutingHint(None, "db1")),
    ("/* PICOPOOL: ROLE = Primary */ SELECT 1", RoutingHint("primary", None)),
    ("SELECT 1; /* picopool: role=replica */", RoutingHint("replica", None)),
    ("SELECT 1 /* a *//* picopool: role=replica */", RoutingHint("replica", None)),
    ("/* other */ SELECT 1 /* picopool: role=replica */", RoutingHint("replica", None)),
    ("/* picopool: role=primary */ SELECT 1 /* picopool: role=replica */",
     RoutingHint("primary", None)),  # the start one wins
    ("/* picopool: role=bogus */ SELECT 1 /* picopool: role=replica */",
     RoutingHint("replica", None)),
    # not hints
    ("SELECT /* picopool: role=replica */ 1", None),  # in the middle
    ("SELECT '/* picopool: role=replica */'", None),  # in a string
    ("SELECT $$ /* picopool: role=replica */ $$", None),
    ("SELECT $$ /* picopool: role=replica */", None),  # unterminated dollar quote
    ("SELECT 1 -- /* picopool: role=replica */", None),  # inside a line comment
    ("SELECT 1 /* x /* picopool: role=replica */", None),  # inside an open comment
    ("SELECT 1 /* x /* picopool: role=replica */ */", None),  # nested in a comment
    ("/* picopool: role=bogus */ SELECT 1", None),
    ("/* picopool: role=primary role=replica */ SELECT 1", None),
    ("/* picopool: colour=red */ SELECT 1", None),
    ("/* picopool: */ SELECT 1", None),
    ("/* picopool: role= */ SELECT 1", None),
    ("/* picopool: instance=a*b */ SELECT 1", None),
    ("/* picopool role=primary */ SELECT 1", None),
    ("/* pgbouncer: role=primary */ SELECT 1", None),
    ("-- picopool: role=primary\nSELECT 1", None),
    ("SELECT 1", None),
]


@pytest.mark.parametrize(("query", "hint"), HINTS)
def test_parse_hint(query: str, hint: RoutingHint | None) -> None:
    assert parse_hint(query) == hint
    assert classify(query).hint == hint


@pytest.mark.parametrize(
    ("query", "stripped"),
    [
        ("/* picopool: role=primary */ SELECT 1", "SELECT 1"),
        ("SELECT 1 /* picopool: role=replica */  ", "SELECT 1"),
        ("/* picopool: role=bogus */ SELECT 1", "SELECT 1"),  # malformed, still ours
        ("/* other */ SELECT 1 /* picopool: role=replica */", "/* other */ SELECT 1"),
        ("/* picopool: role=primary */ SELECT 1 /* picopool: role=replica */", "SELECT 1"),
        ("SELECT /* picopool: role=replica */ 1", "SELECT /* picopool: role=replica */ 1"),
        ("SELECT 1 -- /* picopool: role=replica */", "SELECT 1 -- /* picopool: role=replica */"),
        ("SELECT '/* picopool: role=replica */'", "SELECT '/* picopool: role=replica */'"),
        ("SELECT 1", "SELECT 1"),
    ],
)
def test_strip_hint(query: str, stripped: str) -> None:
    assert strip_hint(query) == stripped


def test_format_hint() -> None:
    assert format_hint("primary") == "/* picopool: role=primary */"
    assert format_hint("replica", "pg-1") == "/* picopool: role=replica instance=pg-1 */"
    assert format_hint(instance="pg-1") == "/* picopool: instance=pg-1 */"
    assert RoutingHint("any", None).to_comment() == "/* picopool: role=any */"
    for bad in ({"role": "master"}, {"instance": "a b"}, {}):
        with pytest.raises(ValueError):
            format_hint(**bad)
    with pytest.raises(ValueError):
        RoutingHint("leader", None)


# ---------------------------------------------------------- strip_comments

@pytest.mark.parametrize(
    ("query", "stripped"),
    [
        ("SELECT 1 -- c", "SELECT 1"),
        ("SELECT /* c */ 1", "SELECT  1"),
        ("SELECT/* c */1", "SELECT 1"),
        ("SELECT 1-/**/-2", "SELECT 1- -2"),  # must not turn into a -- comment
        ("SELECT 'x' -- c\nFROM t", "SELECT 'x' \nFROM t"),
        ("/* a /* nested */ b */SELECT 1", "SELECT 1"),
        ("SELECT '--not a comment', $$/* nor this */$$, \"--\", E'\\' -- no'",
         "SELECT '--not a comment', $$/* nor this */$$, \"--\", E'\\' -- no'"),
        ("SELECT 1 /* unterminated", "SELECT 1 /* unterminated"),
        ("SELECT /* c */ 'unterminated -- x", "SELECT  'unterminated -- x"),
        ("SELECT 1", "SELECT 1"),
    ],
)
def test_strip_comments(query: str, stripped: str) -> None:
    assert strip_comments(query) == stripped


# ------------------------------------------------------------------ caching

def test_results_are_cached() -> None:
    clear_cache()
    first = classify("SELECT * FROM cached_table WHERE id = $1")
    assert classify("SELECT * FROM cached_table WHERE id = $1") is first
    clear_cache()
    assert classify("SELECT * FROM cached_table WHERE id = $1") is not first


def test_long_statements_bypass_the_cache() -> None:
    query = "INSERT INTO t VALUES " + ", ".join(f"({i}, 'x')" for i in range(5000))
    assert len(query) > _sql._MAX_CACHED_QUERY_LENGTH
    info = classify(query)
    assert (info.kind, info.reason, info.leaves_session_state) == (WRITE, "DML", False)
    assert classify(query) is not info


def test_adversarial_texts_stay_fast() -> None:
    # Nested EXPLAINs must not recurse; hint bodies must not backtrack exponentially.
    assert classify("EXPLAIN ANALYZE " * 5000 + "SELECT 1").kind is WRITE
    assert parse_hint("/* picopool: role=" + "ab=ab" * 2000 + " = */ SELECT 1") is None
    assert parse_hint("/* picopool: role=" + "ab=ab" * 20 + " = */ SELECT 1") is None
    assert classify("SELECT " + "(" * 5000 + "1" + ")" * 5000).kind is READ
    assert classify("SELECT '" + "''" * 50_000).reason == "unparseable"
    assert classify("SELECT 1 /* " + "/* " * 10_000).reason == "unparseable"


def test_classification_is_immutable() -> None:
    info = classify("SELECT 1")
    assert isinstance(info, Classification)
    with pytest.raises(AttributeError):
        info.reason = "x"  # type: ignore[misc]


# --------------------------------------------------------------- properties

_PLAIN_NAMES = st.sampled_from(["id", "name", "price", "items", "t", "u", "created_at"])
_DECOY_WRITES = st.sampled_from([
    "DELETE FROM t", "DROP TABLE x", "UPDATE t SET a = 1", "INSERT INTO t VALUES (1)",
    "; TRUNCATE t", "FOR UPDATE", "FOR SHARE", "nextval('s')", "pg_advisory_lock(1)",
    "INTO t2", "BEGIN;", "SET x = 1", "WITH d AS (DELETE FROM t RETURNING *)", "*/", "/*",
    "--", "'", '"', "$$", "$x$", ";", "\\", "E'", "picopool: role=primary",
])
_DECOY_READS = st.sampled_from([
    "SELECT 1", "EXPLAIN SELECT 1", "picopool: role=replica", "VALUES (1)", "TABLE t",
    "*/", "/*", "--", "'", '"', "$$", ";", "\\",
])
_NOISE = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)


def _decoy_text(decoys: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    return st.lists(st.one_of(decoys, _NOISE), min_size=1, max_size=4).map(" ".join)


@st.composite
def _comment(draw: st.DrawFn, decoys: st.SearchStrategy[str]) -> str:
    """Nothing, or a line, block or nested comment hiding decoy text."""
    form = draw(st.sampled_from(["none", "none", "line", "block", "nested"]))
    if form == "none":
        return ""
    text = draw(_decoy_text(decoys))
    if form == "line":
        return "--" + text.replace("\n", " ").replace("\r", " ") + "\n"
    if form == "block":
        return "/*" + text.replace("/", " ") + "*/"
    inner = draw(_decoy_text(decoys)).replace("/", " ")
    return "/* " + text.replace("/", " ") + " /* " + inner + " */ */"


@st.composite
def _literal(draw: st.DrawFn, decoys: st.SearchStrategy[str]) -> str:
    """A literal (or parameter) whose content is decoy text."""
    form = draw(st.sampled_from(["plain", "escape", "dollar", "tagged", "param", "number"]))
    if form == "param":
        return f"${draw(st.integers(1, 20))}"
    if form == "number":
        return str(draw(st.integers(0, 10**6)))
    text = draw(_decoy_text(decoys))
    if form == "plain":
        return "'" + text.replace("'", "''") + "'"
    if form == "escape":
        return "E'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if form == "dollar":
        return "$$" + text.replace("$", " ") + "$$"
    return "$q$" + text.replace("$", " ") + "$q$"


@st.composite
def _quoted_name(draw: st.DrawFn, decoys: st.SearchStrategy[str]) -> str:
    text = draw(_decoy_text(decoys)) or "x"
    return '"' + text.replace('"', '""') + '"'


def _assemble(draw: st.DrawFn, parts: list[str],
              decoys: st.SearchStrategy[str]) -> tuple[str, str]:
    """Join *parts* with spaces and decoy comments: ``(with comments, without)``."""
    with_comments: list[str] = []
    without: list[str] = []
    for part in parts:
        with_comments += [draw(_comment(decoys)), part]
        without.append(part)
    with_comments.append(draw(_comment(decoys)))
    return " ".join(with_comments), " ".join(without)


@st.composite
def read_statements(draw: st.DrawFn) -> tuple[str, str]:
    decoys = _DECOY_WRITES
    column = st.one_of(_PLAIN_NAMES, _quoted_name(decoys))
    value = st.one_of(_literal(decoys), _PLAIN_NAMES)
    shape = draw(st.sampled_from(["select", "where", "cte", "values", "subquery", "explain"]))
    if shape == "select":
        parts = ["SELECT", draw(column), ",", draw(value), "AS", draw(column), "FROM",
                 draw(_PLAIN_NAMES)]
    elif shape == "where":
        parts = ["SELECT", "*", "FROM", draw(_PLAIN_NAMES), "WHERE", draw(column), "=",
                 draw(value), "ORDER", "BY", draw(column), "LIMIT", "10"]
    elif shape == "cte":
        parts = ["WITH", "x", "AS", "(", "SELECT", draw(value), "AS", draw(column), ")",
                 "SELECT", "count", "(", "*", ")", "FROM", "x"]
    elif shape == "values":
        parts = ["VALUES", "(", draw(value), ",", draw(value), ")"]
    elif shape == "subquery":
        parts = ["SELECT", "*", "FROM", "(", "SELECT", draw(value), ")", "AS", "s",
                 "WHERE", "EXISTS", "(", "SELECT", "1", "FROM", "u", "WHERE", "u.a", "IN",
                 "(", draw(value), ")", ")"]
    else:
        parts = ["EXPLAIN", "DELETE", "FROM", "t", "WHERE", "a", "=", draw(value)]
    if draw(st.booleans()):
        parts.append(";")
    return _assemble(draw, parts, decoys)


@st.composite
def write_statements(draw: st.DrawFn) -> tuple[str, str]:
    decoys = _DECOY_READS
    value = st.one_of(_literal(decoys), _PLAIN_NAMES)
    column = st.one_of(_PLAIN_NAMES, _quoted_name(decoys))
    shape = draw(st.sampled_from(
        ["insert", "update", "delete", "lock", "cte", "nextval", "ddl", "set", "multi",
         "into", "explain"]
    ))
    if shape == "insert":
        parts = ["INSERT", "INTO", "t", "(", "a", ")", "VALUES", "(", draw(value), ")"]
    elif shape == "update":
        parts = ["UPDATE", "t", "SET", draw(column), "=", draw(value)]
    elif shape == "delete":
        parts = ["DELETE", "FROM", "t", "WHERE", draw(column), "=", draw(value)]
    elif shape == "lock":
        parts = ["SELECT", draw(value), "FROM", "t", "FOR", "NO", "KEY", "UPDATE"]
    elif shape == "cte":
        parts = ["WITH", "d", "AS", "(", "DELETE", "FROM", "t", "RETURNING", draw(column),
                 ")", "SELECT", "*", "FROM", "d"]
    elif shape == "nextval":
        parts = ["SELECT", "nextval", "(", draw(value), ")"]
    elif shape == "ddl":
        parts = ["CREATE", "TABLE", "x", "(", draw(column), "int", ")"]
    elif shape == "set":
        parts = ["SET", "search_path", "=", draw(value)]
    elif shape == "multi":
        parts = ["SELECT", draw(value), ";", "SELECT", draw(value)]
    elif shape == "into":
        parts = ["SELECT", draw(value), "INTO", "x", "FROM", "t"]
    else:
        parts = ["EXPLAIN", "ANALYZE", "UPDATE", "t", "SET", "a", "=", draw(value)]
    return _assemble(draw, parts, decoys)


_FAST = settings(max_examples=120, deadline=None)


@_FAST
@given(read_statements())
def test_decoys_never_make_a_read_a_write(statement: tuple[str, str]) -> None:
    query, plain = statement
    assert classify(query).kind is READ, query
    assert classify(plain).kind is READ, plain


@_FAST
@given(write_statements())
def test_decoys_never_make_a_write_a_read(statement: tuple[str, str]) -> None:
    query, plain = statement
    assert classify(query).kind is WRITE, query
    assert classify(plain).kind is WRITE, plain


@_FAST
@given(st.one_of(read_statements(), write_statements()))
def test_strip_comments_removes_exactly_the_comments(statement: tuple[str, str]) -> None:
    query, plain = statement
    stripped = strip_comments(query)
    assert not [kind for kind, _, _ in _sql._spans(stripped)
                if kind in (_sql._COMMENT, _sql._ERROR)]
    assert _sql._lex(stripped) == _sql._lex(plain)
    assert _same_verdict(classify(stripped), classify(query))


_SQLISH = st.lists(
    st.sampled_from([*"SELECTDFROMWHUPAINXeuxbn &$'\"-/*;()\\\n\r\t1_.,=:",
                     "FOR UPDATE", "DELETE", "$a$", "E'", "U&", "/*", "*/", "--",
                     "picopool: role=replica", "nextval("]),
    max_size=40,
).map("".join)


def _same_verdict(left: Classification, right: Classification) -> bool:
    return (left.kind, left.reason, left.functions, left.leaves_session_state) == (
        right.kind, right.reason, right.functions, right.leaves_session_state
    )


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), _SQLISH))
def test_never_raises_on_arbitrary_text(text: str) -> None:
    info = _sql._classify_uncached(text)
    assert info.kind in (READ, WRITE)
    assert is_write(text, frozenset({"f"})) in (True, False)
    hint = parse_hint(text)
    assert hint is None or hint.role is None or hint.role in VALID_ROLES
    strip_hint(text)
    stripped = strip_comments(text)
    assert _same_verdict(_sql._classify_uncached(stripped), info), (text, stripped)
    if info.kind is READ:
        assert info.reason in ("select", "values", "table", "show", "explain",
                               "explain analyze", "copy to")


_HINTS = st.builds(
    RoutingHint,
    st.sampled_from([*sorted(VALID_ROLES), None]),
    st.one_of(st.none(), st.from_regex(r"[A-Za-z0-9_.:@-]{1,20}", fullmatch=True)),
).filter(lambda hint: hint.role is not None or hint.instance is not None)
_WHITESPACE = st.sampled_from(["", " ", "\n", "\t ", " \r\n "])


@_FAST
@given(_HINTS, st.one_of(read_statements(), write_statements()), st.booleans(),
       _WHITESPACE, _WHITESPACE)
def test_hints_round_trip(hint: RoutingHint, statement: tuple[str, str], at_start: bool,
                          outer: str, inner: str) -> None:
    base = statement[0].strip(" \t\n\r\f\v")
    if _sql._hint_comments(base):  # a generated comment that happens to look like one
        return
    comment = hint.to_comment()
    # A newline ends a line comment the statement may end with.
    hinted = f"{outer}{comment}{inner}{base}" if at_start else f"{base}\n{inner}{comment}{outer}"
    assert parse_hint(hinted) == hint
    info = classify(hinted)
    assert info.hint == hint
    assert _same_verdict(info, classify(base))
    assert strip_hint(hinted) == base
    assert parse_hint(strip_hint(hinted)) is None
    # The same comment anywhere but the very start or end is no hint.
    head, _, tail = base.partition(" ")
    if head and tail.strip():
        assert parse_hint(f"{head} {comment} {tail}") is None
