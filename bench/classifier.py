"""Cost of classifying one statement: picopool's lexer, cached and uncached, and pglast.

    python bench/classifier.py [--rounds 7] [--iterations 2000]

Targets: <= 1 us per cached statement, <= 30 us uncached for typical statements.
"uncached" calls the classifier behind the cache directly, so every call lexes and
analyses the text.  When pglast (libpg_query) is installed, the same statements also
go through it: its raw C parse to JSON; that parse plus the cheapest way to get the
facts picopool needs (read/write, called functions) out of it, substring and regex
searches in the JSON text; the parse plus ``json.loads`` and a tree walk; and pglast's
Python AST.  Each figure is the best of --rounds rounds, the one least disturbed by
other processes on the machine.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import time
from collections.abc import Callable
from typing import Any

from picopool import _sql

STATEMENTS: dict[str, str] = {
    "point select": "SELECT * FROM items WHERE id = $1",
    "3-table join + CTE": (
        "WITH recent AS (SELECT o.id, o.customer_id FROM orders o "
        "WHERE o.created_at > now() - interval '1 day') "
        "SELECT c.name, count(*) FROM recent r "
        "JOIN customers c ON c.id = r.customer_id "
        "JOIN regions g ON g.id = c.region_id "
        "GROUP BY c.name ORDER BY 2 DESC"
    ),
    "insert returning": "INSERT INTO items (name, price) VALUES ($1, $2) RETURNING id, created_at",
    "update": "UPDATE items SET price = $1, updated_at = now() WHERE id = $2",
    "hinted + comments": (
        "/* picopool: role=replica */ SELECT name -- the label\n"
        "FROM items WHERE note = 'FOR UPDATE' AND id = ANY($1::int[])"
    ),
    "select for update": "SELECT * FROM jobs WHERE state = 'queued' "
                         "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED",
}

_WRITE_NODES = frozenset({
    "InsertStmt", "UpdateStmt", "DeleteStmt", "MergeStmt", "lockingClause", "intoClause",
})
_READ_STATEMENTS = frozenset({"SelectStmt", "VariableShowStmt", "ExplainStmt"})


def best_ns(function: Callable[[str], object], query: str, rounds: int,
            iterations: int) -> float:
    """Best per-call time in nanoseconds over *rounds* rounds of *iterations* calls."""
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter_ns()
        for _ in range(iterations):
            function(query)
        best = min(best, (time.perf_counter_ns() - start) / iterations)
    return best


def pglast_facts(parse_json: Callable[[str], str]) -> Callable[[str], object]:
    """What picopool's classifier extracts, computed from libpg_query's JSON tree."""

    def facts(query: str) -> tuple[bool, frozenset[str]]:
        tree: dict[str, Any] = json.loads(parse_json(query))
        statements = tree.get("stmts", [])
        write = len(statements) != 1 or next(iter(statements[0]["stmt"])) not in _READ_STATEMENTS
        functions: set[str] = set()
        pending: list[Any] = [tree]
        while pending:
            node = pending.pop()
            if isinstance(node, dict):
                for key, value in node.items():
                    if key in _WRITE_NODES:
                        write = True
                    elif key == "FuncCall":
                        name = value["funcname"][-1]["String"]
                        functions.add(name.get("sval") or name.get("str", ""))
                    pending.append(value)
            elif isinstance(node, list):
                pending.extend(node)
        return write, frozenset(functions)

    return facts


_FUNCTION_CALL_JSON_RE = re.compile(
    r'"FuncCall":\{"funcname":\[(?:\{"String":\{"sval":"[^"]*"\}\},)*'
    r'\{"String":\{"sval":"([^"]*)"\}\}\]'
)
_WRITE_NODE_KEYS = tuple(f'"{node}":' for node in _WRITE_NODES)
_READ_STATEMENT_STARTS = tuple(f'{{"{node}"' for node in _READ_STATEMENTS)


def pglast_scan(parse_json: Callable[[str], str]) -> Callable[[str], object]:
    """The same facts found by substring and regex searches in the JSON text, with
    no ``json.loads``: the cheapest way to use libpg_query from Python."""

    def facts(query: str) -> tuple[bool, frozenset[str]]:
        tree = parse_json(query)
        first = tree.find('{"stmt":')
        write = (
            first < 0
            or tree.count('{"stmt":') != 1
            or not tree.startswith(_READ_STATEMENT_STARTS, first + len('{"stmt":'))
            or any(key in tree for key in _WRITE_NODE_KEYS)
        )
        return write, frozenset(_FUNCTION_CALL_JSON_RE.findall(tree))

    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iterations", type=int, default=2000)
    args = parser.parse_args()

    columns: dict[str, Callable[[str], object]] = {
        "cached": _sql.classify,
        "uncached": _sql._classify_uncached,
    }
    try:
        pglast: Any = importlib.import_module("pglast")
    except ImportError:
        print("pglast is not installed: comparing with picopool alone\n")
    else:
        print(f"pglast {pglast.__version__} (libpg_query for PostgreSQL "
              f"{pglast.parser.get_postgresql_version()[0]})\n")
        columns["pglast C parse"] = pglast.parser.parse_sql_json
        columns["pglast C+scan"] = pglast_scan(pglast.parser.parse_sql_json)
        columns["pglast JSON+walk"] = pglast_facts(pglast.parser.parse_sql_json)
        columns["pglast AST"] = pglast.parse_sql

    width = max(map(len, STATEMENTS))
    print(f"{'us per statement':<{width}}" + "".join(f"{name:>17}" for name in columns))
    for label, query in STATEMENTS.items():
        _sql.classify(query)  # warm the cache for the "cached" column
        cells = []
        for name, function in columns.items():
            iterations = args.iterations * (20 if name == "cached" else 1)
            if name == "pglast AST":
                iterations = max(1, args.iterations // 10)
            nanoseconds = best_ns(function, query, args.rounds, iterations)
            cells.append(f"{nanoseconds / 1000:>17.2f}")
        print(f"{label:<{width}}" + "".join(cells))
    print("\ntargets: cached <= 1 us, uncached <= 30 us")


if __name__ == "__main__":
    main()
