"""``classify(query).functions`` lists every function the text calls, wherever the
call stands (sub-queries, CTEs, FROM, ORDER BY, window clauses, ...) and however it
is spelled (schema-qualified, quoted, spaced, with comments); a call it cannot
attribute clears ``functions_complete``.  Also COPY's targets and the volatile
built-in rule's reasons."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from picopool._sql import _NOT_FUNCTIONS, StatementKind, classify

READ, WRITE = StatementKind.READ, StatementKind.WRITE

# {f} is replaced by the call.
CONTEXTS = [
    "SELECT {f}",
    "SELECT a, {f} AS x FROM t WHERE b = 1",
    "SELECT a FROM t WHERE b = {f}",
    "SELECT * FROM (SELECT {f} AS x) AS s",
    "SELECT * FROM (SELECT {f} AS x) s(a)",
    "WITH c AS (SELECT {f} AS x) SELECT * FROM c",
    "WITH c AS MATERIALIZED (SELECT 1), d(x) AS (SELECT {f}) SELECT * FROM c, d",
    "WITH RECURSIVE c(n) AS (SELECT {f} UNION ALL SELECT n FROM c) SELECT * FROM c",
    "SELECT lower({f})",
    "SELECT * FROM {f}",
    "SELECT * FROM {f} AS x(a, b)",
    "SELECT * FROM t, LATERAL {f} AS x(a)",
    "SELECT * FROM ROWS FROM ({f}, generate_series(1, 2))",
    "SELECT * FROM t ORDER BY {f} DESC",
    "SELECT CASE WHEN a THEN {f} ELSE 0 END FROM t",
    "SELECT ARRAY[{f}]",
    "SELECT a FROM t WHERE a IN ({f}, 2)",
    "SELECT EXISTS (SELECT 1 WHERE {f} > 0)",
    "VALUES ({f}), (2)",
    "SELECT count(*) OVER (PARTITION BY {f}) FROM t",
    "SELECT count(*) FILTER (WHERE {f}) FROM t",
    "SELECT a FROM t GROUP BY {f}",
    "SELECT a FROM t GROUP BY ROLLUP (a), {f}",
    "SELECT a FROM t HAVING {f} > 1",
    "SELECT {f}::text",
    "SELECT CAST({f} AS text)",
    "SELECT 1 FROM t JOIN u ON {f} = u.a",
    "SELECT 1 FROM t JOIN u USING (a) WHERE NOT {f}",
    "SELECT DISTINCT ON (a) {f} FROM t",
    "SELECT * FROM t WHERE a = ANY({f})",
    "SELECT (SELECT {f})",
    "SELECT 1 UNION SELECT {f}",
    "SELECT a FROM t WHERE a LIKE {f}",
    "SELECT a FROM t LIMIT {f}",
    "TABLE t; SELECT {f}",
    "COPY (SELECT {f}) TO STDOUT",
    "EXPLAIN ANALYZE SELECT {f}",
    "SELECT a FROM t FOR UPDATE OF t SKIP LOCKED; SELECT {f}",
    "INSERT INTO t (a) VALUES ({f}) RETURNING a",
    "UPDATE t SET a = {f} WHERE b = 1",
    "DELETE FROM t WHERE a = {f}",
    "WITH d AS (DELETE FROM t RETURNING a) SELECT {f} FROM d",
    "CALL {f}",
]

_KEYWORDS = frozenset({
    "select", "from", "where", "as", "and", "or", "not", "in", "is", "on", "by", "to",
    "with", "union", "group", "order", "having", "limit", "offset", "case", "when", "then",
    "else", "end", "join", "using", "lateral", "rows", "array", "distinct", "values",
    "table", "null", "true", "false", "all", "any", "some", "e", "b", "x", "n", "u",
})
_PLAIN = st.from_regex(r"[a-z_][a-z0-9_$]{0,12}", fullmatch=True).filter(
    lambda n: n not in _NOT_FUNCTIONS and n not in _KEYWORDS)
_QUOTED_BODY = st.text(
    st.characters(whitelist_categories=("Lu", "Ll", "Nd"), max_codepoint=0x24F)
    | st.sampled_from(list(' _-.;()"*/')),
    min_size=1, max_size=12,
)


@st.composite
def callees(draw: st.DrawFn) -> tuple[str, str]:
    """What stands before a call's "(" as written, and the name classify() reports."""
    if draw(st.booleans()):
        body = draw(_QUOTED_BODY)
        name_text, expected = '"' + body.replace('"', '""') + '"', body.lower()
    else:
        name_text = draw(_PLAIN)
        expected = name_text
    schema = draw(st.sampled_from(["", "app.", '"My Schema".', "pg_catalog.", "db.app."]))
    gap = draw(st.sampled_from(["", " ", "\n", " /* c */ ", " -- c\n"]))
    return f"{schema}{name_text}{gap}", expected


@st.composite
def calls(draw: st.DrawFn) -> tuple[str, str]:
    """A call as written, and the name classify() should report."""
    callee, expected = draw(callees())
    args = draw(st.sampled_from(["", "1", "a, 'x'", "$1", "(SELECT 1)", "VARIADIC $2"]))
    return f"{callee}({args})", expected


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(CONTEXTS), calls())
def test_every_call_is_listed(context: str, call: tuple[str, str]) -> None:
    text, name = call
    query = context.format(f=text)
    info = classify(query)
    assert name in info.functions, (query, info)
    assert info.functions_complete, (query, info)


@settings(max_examples=100, deadline=None)
@given(st.lists(callees(), min_size=2, max_size=4))
def test_nested_calls_are_all_listed(nested: list[tuple[str, str]]) -> None:
    expression = "a"
    for callee, _ in nested:  # f(g(h(a)))
        expression = f"{callee}({expression}, 1)"
    query = f"SELECT {expression} FROM t"
    info = classify(query)
    for _, name in nested:
        assert name in info.functions, (query, info)


# Unreserved keywords are function names where an expression starts.
@pytest.mark.parametrize(("query", "name"), [
    ("SELECT day(x) FROM t", "day"),
    ("SELECT a FROM t WHERE year(b) = 1", "year"),
    ("SELECT a FROM t ORDER BY cube(a)", "cube"),
    ("SELECT a, rollup(b) FROM t", "rollup"),
    ("SELECT like('a', 'b')", "like"),
    ("SELECT json_value(x) FROM t", "json_value"),  # a plain function name before PG 16
    ("SELECT count(*) FROM t WHERE key(a)", "key"),
])
def test_keyword_named_calls(query: str, name: str) -> None:
    assert name in classify(query).functions


@pytest.mark.parametrize("query", [
    "SELECT * FROM t GROUP BY ROLLUP (a), CUBE (b), GROUPING SETS ((c))",
    "SELECT * FROM t GROUP BY DISTINCT CUBE (a, b)",
    "SELECT sum(a) OVER (ORDER BY b), count(*) FILTER (WHERE c) FROM t",
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY a) FROM t",
    "SELECT a FROM t WHERE b LIKE ($1) AND c NOT LIKE ('x') AND d SIMILAR TO ('y')",
    "SELECT a FROM t FETCH FIRST (5) ROWS ONLY",
    "SELECT CAST(a AS character varying(10)), b::numeric(10, 2) FROM t",
    "SELECT * FROM t TABLESAMPLE bernoulli (10) REPEATABLE (42)",
    "SELECT a FROM t JOIN (u JOIN v ON true) ON true",
    "SELECT (a, b) OVERLAPS (c, d) FROM t",
    "SELECT a OPERATOR(pg_catalog.+) b FROM t",
])
def test_keyword_syntax_is_not_a_call(query: str) -> None:
    info = classify(query)
    assert info.kind is READ
    assert not info.functions & {"cube", "rollup", "sets", "over", "filter", "within",
                                 "like", "similar", "first", "varying", "numeric",
                                 "bernoulli", "repeatable", "join", "overlaps", "operator"}
    assert info.functions_complete


@pytest.mark.parametrize("query", [
    "SELECT a OPERATOR(app.+++) b FROM t",  # a user operator: its function is unnamed
    "SELECT * FROM t TABLESAMPLE system_rows (10)",  # an extension's sampling method
    "SELECT f(",  # unparseable
    "SELECT 'unterminated",
    "SELECT 1; SELECT a OPERATOR(app.+) b",
])
def test_unattributable_calls_clear_functions_complete(query: str) -> None:
    assert not classify(query).functions_complete


@pytest.mark.parametrize(("query", "kind", "reason"), [
    ("COPY t TO '/tmp/out.csv'", WRITE, "copy to file"),
    ("copy t (a, b) to '/tmp/out.csv' with (format csv)", WRITE, "copy to file"),
    ("COPY (SELECT * FROM t) TO E'/tmp/x'", WRITE, "copy to file"),
    ("COPY t TO PROGRAM 'gzip > /tmp/x.gz'", WRITE, "copy to program"),
    ("COPY t TO STDOUT", READ, "copy to"),
    ("COPY (SELECT lower(a) FROM t) TO STDOUT WITH (FORMAT binary)", READ, "copy to"),
    ("COPY (SELECT pg_reload_conf()) TO STDOUT", WRITE, "volatile built-in"),
    ("COPY t FROM STDIN", WRITE, "copy from"),
    ("COPY t FROM '/tmp/in.csv'", WRITE, "copy from"),
])
def test_copy_targets(query: str, kind: StatementKind, reason: str) -> None:
    info = classify(query)
    assert (info.kind, info.reason) == (kind, reason)


@pytest.mark.parametrize("query", [
    "SELECT pg_current_wal_lsn()",
    "SELECT pg_catalog.pg_current_wal_insert_lsn()::text",
    "SELECT pg_reload_conf()",
    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = 'x'",
    "SELECT * FROM t WHERE pg_stat_reset() IS NOT NULL",
    "WITH x AS (SELECT pg_cancel_backend(1)) SELECT * FROM x",
    "SELECT (SELECT pg_read_file('/etc/hostname'))",
])
def test_volatile_built_ins_route_to_the_primary(query: str) -> None:
    info = classify(query)
    assert (info.kind, info.reason) == (WRITE, "volatile built-in")


def test_elision_safety_is_unchanged_by_the_rule() -> None:
    """pg_current_wal_lsn() leaves no session state (it was a safe built-in before);
    pg_reload_conf() is not on the safe list, so the connection still gets reset."""
    assert not classify("SELECT pg_current_wal_lsn()").leaves_session_state
    assert classify("SELECT pg_reload_conf()").leaves_session_state
    assert classify("SELECT setseed(0.5)").leaves_session_state
    assert classify("SELECT set_config('a.b', 'c', false)").leaves_session_state
    assert classify("SELECT my_fn()").leaves_session_state
