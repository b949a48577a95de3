"""Pure, synchronous statement classifier: which member may run a statement.

``classify(query)`` says whether a statement is a READ (any replica may run it) or a
WRITE (the primary must), which functions it calls, whether it may leave session
state behind (so the pool cannot skip asyncpg's reset on release), and which routing
hint comment it carries.  No I/O happens here; results are cached per query string.

How it works
    One regular expression walks the text once and yields PostgreSQL's lexical tokens
    (as scan.l defines them): ``--`` and ``/* */`` comments are dropped, ``'..'``,
    ``E'..'`` (backslash escapes), ``U&'..'``, ``B'..'``, ``X'..'``, ``N'..'`` and
    ``$$..$$`` literals become opaque tokens, ``"quoted identifiers"`` are names that
    are never keywords, ``$1`` is a parameter.  Texts with the rare constructs the
    fast pattern leaves out, tagged ``$tag$..$tag$`` quotes (case-sensitive tags) and
    nested comments, go through an exact, slower lexer.  A second, linear pass over
    the tokens tracks parentheses and finds what matters for routing: the leading
    keyword, INSERT/UPDATE/DELETE/MERGE starting a CTE body or sub-query, locking
    clauses, ``SELECT .. INTO``, called functions and ``;`` separators.  Anything the
    lexer cannot close (string, comment, quoted name, dollar quote) or unbalanced
    parentheses is "unparseable", hence a WRITE: when unsure, the classifier picks
    the primary, never a replica.  Plain strings are lexed as with
    ``standard_conforming_strings = on``, the default since PostgreSQL 9.1.

Why a hand-written lexer rather than pglast (libpg_query)
    ``bench/classifier.py`` on this project's 2-core machine (Python 3.11, pglast 8.8
    bundling libpg_query for PostgreSQL 18), microseconds per statement, best of 25
    rounds:

    ============================  ========  ========  ==========  ==========  ======
    statement                     picopool  pglast    pglast C    pglast C    pglast
                                  uncached  C parse   + JSON      + json.     AST
                                            only      text scan   loads+walk
    ============================  ========  ========  ==========  ==========  ======
    point SELECT by $1                 5.0       2.4         5.3        14.3      44
    3-table join with a CTE           22.3      12.7        22.9        69.5     221
    INSERT .. RETURNING                8.6       3.3         4.9        18.7      57
    UPDATE .. SET .. now()             7.8       3.0         4.9        17.1      53
    hint + comments + string          13.8       4.7         9.0        27.4      84
    SELECT .. FOR UPDATE               8.0       3.8         7.8        21.3      63
    ============================  ========  ========  ==========  ==========  ======

    A cached classification costs 0.09 us whichever parser filled the cache.
    libpg_query's raw parse is about twice as fast as this lexer, but it yields JSON
    text: getting the routing facts out of it through ``json.loads`` and a tree walk
    costs 2-3x more than this whole module, and through (brittle) substring and
    regex searches in the JSON text 0.6-1.05x as much.  pglast would also add a
    compiled dependency pinned to one server grammar, under which any statement that
    grammar rejects (newer syntax, another server's dialect) would be "unparseable"
    and sent to the primary, and the hint and comment functions here would still need
    this lexer.  It does not win clearly, so picopool does not depend on it.
"""

from __future__ import annotations

import enum
import functools
import re
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

from ._builtins import NON_VOLATILE_BUILTINS, REPLICA_SAFE_VOLATILE, VOLATILE_BUILTINS
from ._cache import StatementCache

__all__ = [
    "VALID_ROLES",
    "Classification",
    "RoutingHint",
    "StatementKind",
    "classify",
    "clear_cache",
    "format_hint",
    "is_write",
    "known_read_only",
    "parse_hint",
    "read_only_builtins",
    "strip_comments",
    "strip_hint",
]


class StatementKind(enum.Enum):
    READ = "read"
    WRITE = "write"


VALID_ROLES = frozenset({"primary", "replica", "any", "prefer-replica"})
_INSTANCE_RE = re.compile(r"[\w.:@-]+")


@dataclass(frozen=True, slots=True)
class RoutingHint:
    """A ``/* picopool: role=... instance=... */`` comment, parsed."""

    role: str | None
    instance: str | None

    def __post_init__(self) -> None:
        if self.role is not None and self.role not in VALID_ROLES:
            raise ValueError(f"invalid routing role {self.role!r}")
        if self.instance is not None and not _INSTANCE_RE.fullmatch(self.instance):
            raise ValueError(f"invalid instance name {self.instance!r}")

    def to_comment(self) -> str:
        """The comment that :func:`parse_hint` reads back as this hint."""
        return format_hint(self.role, self.instance)


@dataclass(frozen=True, slots=True)
class Classification:
    kind: StatementKind
    functions: frozenset[str]  # lowercased called function names (last name part)
    leaves_session_state: bool  # True: the connection must be reset after it
    hint: RoutingHint | None  # parsed from a comment at the very start or end
    reason: str  # short why, e.g. "select", "DML", "locking clause"
    # False when the statement may call a function missing from `functions`: it is
    # unparseable, or names an operator (OPERATOR(...)) or a TABLESAMPLE method that is
    # not built in.  Calls no lexer can see (operators, casts, views, defaults,
    # triggers) are never listed: `functions` is what the statement's text calls.
    functions_complete: bool = True

    @property
    def is_write(self) -> bool:
        return self.kind is StatementKind.WRITE


# --------------------------------------------------------------------------- lexer

_PG_WHITESPACE = " \t\n\r\f\v"
# PostgreSQL treats every byte >= 0x80 as an identifier character, so any non-ASCII
# character is one too.
_IDENT_START = "A-Za-z_\\x80-\\U0010ffff"
_IDENT_CONTINUE = f"[{_IDENT_START}0-9$]*"
_DOLLAR_TAG = f"[{_IDENT_START}][{_IDENT_START}0-9]*"


def _token_pattern(dollar_quote: str) -> str:
    """One token or comment.  Alternatives are tried in order, the common ones first.
    Groups: `token` (words, punctuation, operators, numbers, $1, quoted names),
    `literal` (strings), `error` (the opening of anything that does not close, which
    takes the rest of the text, so it is always the last match); a match with no
    group is a comment."""
    return (
        # A word: the first-character split keeps E'..', B'..', X'..', N'..', U&'..'
        # and U&".." for the literal alternatives below, without a costly lookahead.
        "(?P<token>(?:[ac-df-mo-tv-wy-zAC-DF-MO-TV-WY-Z_\\x80-\\U0010ffff]"
        f"|[bBeEnNxX](?!')|[uU](?!&['\"])){_IDENT_CONTINUE}"
        # punctuation, operators (never eating the start of a comment), numbers, $1
        r"|[(),;.\[\]]|(?:[~!@#^&|`?+*%<>=:]|-(?!-)|/(?!\*))+"
        r"|\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\$\d+"
        '|(?:[uU]&)?"[^"]*(?:""[^"]*)*")'  # a quoted name
        "|(?P<literal>'[^']*(?:''[^']*)*'"
        r"|[eE]'[^'\\]*(?:(?:\\.|'')[^'\\]*)*'"  # backslash escapes
        "|(?:[uU]&|[bBxXnN])'[^']*(?:''[^']*)*'"
        f"|{dollar_quote})"
        r"|--[^\n\r]*"
        # a block comment with no nested "/*" (nested ones: _nested_comment_end)
        r"|/\*[^*/]*(?:(?:\*(?!/)|/(?!\*))[^*/]*)*\*/"
        f"|(?P<error>(?:[eEbBxXnN]?'|[uU]&['\"]|\"|/\\*|\\$(?:{_DOLLAR_TAG})?\\$).*)"
    )


# The fast lexer knows only $$..$$: a tagged $tag$..$tag$ (case-sensitive, so it
# must not be lowercased first) or a nested comment is an `error` that sends the text
# to the exact lexer.  Each match also eats the whitespace after it.
_UNTAGGED_DOLLAR_QUOTE = r"\$\$.*?\$\$"
_DOLLAR_QUOTE = f"\\$(?P<tag>(?:{_DOLLAR_TAG})?)\\$.*?\\$(?P=tag)\\$"
_FAST_TOKEN_RE = re.compile(
    f"(?s)(?:{_token_pattern(_UNTAGGED_DOLLAR_QUOTE)})[{_PG_WHITESPACE}]*"
)
_EXACT_TOKEN_RE = re.compile(f"(?s){_token_pattern(_DOLLAR_QUOTE)}")
_NESTING_RE = re.compile(r"/\*|\*/")


class _Unparseable(Exception):
    """The text has an unterminated string, comment, quoted name or dollar quote."""


def _lex(query: str) -> list[str]:
    """Significant tokens of *query*: words lowercased, punctuation, operators and
    numbers as written, quoted names as ``"name"``, every string literal as ``''``;
    comments dropped."""
    matches = _FAST_TOKEN_RE.findall(query.lower())
    if matches and matches[-1][-1]:
        return _lex_exactly(query)
    if "--" in query or "/*" in query:
        return [token or "''" for token, literal, _ in matches if token or literal]
    return [token or "''" for token, _, _ in matches]


_COMMENT, _ERROR, _TOKEN, _LITERAL = 0, 1, 2, 3


def _lex_exactly(query: str) -> list[str]:
    """What _lex returns, for texts with tagged dollar quotes or nested comments."""
    tokens: list[str] = []
    for kind, start, end in _spans(query):
        if kind == _TOKEN:
            tokens.append(query[start:end].lower())
        elif kind == _LITERAL:
            tokens.append("''")
        elif kind == _ERROR:
            raise _Unparseable
    return tokens


def _spans(query: str) -> Iterator[tuple[int, int, int]]:
    """Exact ``(kind, start, end)`` of every token and comment; an _ERROR span runs
    from an unterminated construct to the end of the text and is always last."""
    pos = 0
    while True:
        for match in _EXACT_TOKEN_RE.finditer(query, pos):
            start, end = match.span()
            group = match.lastgroup
            if group == "token":
                yield _TOKEN, start, end
            elif group is None:
                yield _COMMENT, start, end
            elif group == "literal":
                yield _LITERAL, start, end
            elif query.startswith("/*", start) and (end := _nested_comment_end(query, start)):
                yield _COMMENT, start, end
                pos = end
                break  # resume lexing after the nested comment
            else:
                yield _ERROR, start, len(query)
                return
        else:
            return


def _nested_comment_end(query: str, start: int) -> int:
    """End of the (possibly nested) block comment opening at *start*; 0 if unclosed."""
    depth = 0
    for match in _NESTING_RE.finditer(query, start):
        depth += 1 if match.group() == "/*" else -1
        if depth == 0:
            return match.end()
    return 0


# ----------------------------------------------------------------------- keywords

_DML = frozenset({"insert", "update", "delete", "merge"})
_SELECT_HEADS = frozenset({"select", "values", "table", "with"})
_WITH_MAIN_STATEMENTS = frozenset({"select", "values", "table"}) | _DML

_WRITE_STATEMENT_REASONS: dict[str, str] = {
    **dict.fromkeys(_DML, "DML"),
    **dict.fromkeys(
        ("create", "alter", "drop", "truncate", "grant", "revoke", "comment", "security",
         "reassign", "import"),
        "DDL",
    ),
    **dict.fromkeys(
        ("begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release"),
        "transaction control",
    ),
    **dict.fromkeys(("set", "reset", "discard", "load"), "session state"),
    **dict.fromkeys(
        ("vacuum", "analyze", "analyse", "cluster", "reindex", "refresh", "checkpoint"),
        "maintenance",
    ),
    **dict.fromkeys(("listen", "unlisten", "notify"), "listen/notify"),
    **dict.fromkeys(("prepare", "execute", "deallocate"), "prepared statement"),
    **dict.fromkeys(("declare", "fetch", "move", "close"), "cursor"),
    "call": "call",
    "do": "do",
    "lock": "lock",
}

# Words that take a parenthesis without being a function call: PostgreSQL's reserved
# keywords plus the keywords with special call-like syntax (CAST(, COALESCE(, ...),
# type modifiers (numeric(10, 2)) and clause keywords (OVER (, FILTER (, ...).
_NOT_FUNCTIONS = frozenset({
    # reserved keywords
    "all", "analyse", "analyze", "and", "any", "array", "as", "asc", "asymmetric", "both",
    "case", "cast", "check", "collate", "column", "constraint", "create",
    "current_catalog", "current_date", "current_role", "current_time",
    "current_timestamp", "current_user", "default", "deferrable", "desc", "distinct", "do",
    "else", "end", "except", "false", "fetch", "for", "foreign", "from", "grant", "group",
    "having", "in", "initially", "intersect", "into", "lateral", "leading", "limit",
    "localtime", "localtimestamp", "not", "null", "offset", "on", "only", "or", "order",
    "placing", "primary", "references", "returning", "select", "session_user", "some",
    "symmetric", "system_user", "table", "then", "to", "trailing", "true", "union",
    "unique", "user", "using", "variadic", "when", "where", "window", "with",
    # special-syntax expressions (always pg_catalog, never a user function)
    "between", "coalesce", "exists", "extract", "greatest", "grouping", "least",
    "merge_action", "normalize", "nullif", "overlay", "position", "row", "substring",
    "treat", "trim", "values", "collation", "operator", "is", "isnull", "notnull", "like",
    "ilike", "similar", "overlaps", "escape",
    "json", "json_array", "json_arrayagg", "json_exists", "json_object", "json_objectagg",
    "json_query", "json_scalar", "json_serialize", "json_table", "json_value",
    "xmlattributes", "xmlconcat", "xmlelement", "xmlexists", "xmlforest", "xmlnamespaces",
    "xmlparse", "xmlpi", "xmlroot", "xmlserialize", "xmltable",
    # type names with modifiers and interval fields
    "bigint", "bit", "boolean", "char", "character", "dec", "decimal", "float", "int",
    "integer", "interval", "national", "nchar", "numeric", "precision", "real", "smallint",
    "time", "timestamp", "varchar", "varying", "zone", "year", "month", "day", "hour",
    "minute", "second",
    # clause keywords followed by a parenthesis
    "over", "filter", "within", "conflict", "set", "sets", "cube", "rollup", "columns",
    "materialized", "repeatable", "first", "next", "key", "include", "options", "join",
    "inner", "outer", "cross", "natural", "insert", "update", "delete", "merge",
    "partition",
})
# Names above that PostgreSQL also takes as a function name: its unreserved and
# type/function-name keywords, and words that became keywords only in later servers
# (json_value, ...).  Where an expression starts, "day(x)" calls a function "day".
_CALLABLE_KEYWORDS = frozenset({
    # unreserved
    "columns", "conflict", "cube", "day", "delete", "escape", "filter", "first", "hour",
    "include", "insert", "key", "materialized", "merge", "minute", "month", "next",
    "operator", "options", "over", "partition", "repeatable", "rollup", "second", "set",
    "sets", "update", "varying", "within", "year", "zone",
    # type/function-name keywords
    "collation", "cross", "ilike", "inner", "is", "isnull", "join", "like", "natural",
    "notnull", "outer", "overlaps", "similar",
    # keywords only since PostgreSQL 16 or 17
    "json", "json_array", "json_arrayagg", "json_exists", "json_object",
    "json_objectagg", "json_query", "json_scalar", "json_serialize", "json_table",
    "json_value", "merge_action", "system_user",
})
# Reserved keywords (and BY) after which an expression can start.
_EXPRESSION_STARTS = frozenset({
    "all", "and", "any", "array", "as", "asc", "both", "by", "case", "check", "default",
    "desc", "distinct", "do", "else", "except", "fetch", "for", "foreign", "from", "group",
    "having", "in", "intersect", "lateral", "leading", "limit", "not", "offset", "on",
    "only", "or", "order", "placing", "primary", "returning", "select", "some",
    "symmetric", "asymmetric", "then", "to", "trailing", "union", "using", "variadic",
    "when", "where", "window", "with",
})
# ... except in these pairs, which are syntax: NOT LIKE (, ON CONFLICT (, FETCH FIRST (,
# PRIMARY KEY (.
_KEYWORD_SYNTAX = frozenset({
    ("not", "like"), ("not", "ilike"), ("not", "similar"), ("on", "conflict"),
    ("fetch", "first"), ("fetch", "next"), ("primary", "key"), ("foreign", "key"),
})
# A name right after these is a table, alias or type, so "name(" is not a call.
_NAME_CONTEXTS = frozenset({"::", "as", "into", "tablesample", "references", "copy"})
_BUILTIN_TABLESAMPLE_METHODS = frozenset({"bernoulli", "system"})

# Functions that must run on the primary: they write, assign a transaction id, or
# belong to the session that ran nextval() (currval, lastval).
_WRITE_FUNCTIONS = frozenset({
    "nextval", "setval", "currval", "lastval", "set_config", "pg_notify", "txid_current",
    "pg_current_xact_id", "pg_switch_wal", "pg_switch_xlog", "pg_create_restore_point",
    "pg_backup_start", "pg_backup_stop", "pg_start_backup", "pg_stop_backup",
    "pg_create_physical_replication_slot", "pg_create_logical_replication_slot",
    "pg_copy_physical_replication_slot", "pg_copy_logical_replication_slot",
    "pg_drop_replication_slot", "pg_replication_slot_advance", "pg_logical_emit_message",
    "pg_logical_slot_get_changes", "pg_logical_slot_get_binary_changes",
    "pg_replication_origin_create", "pg_replication_origin_drop",
    "pg_replication_origin_advance", "pg_replication_origin_session_setup",
    "pg_log_standby_snapshot", "pg_import_system_collations", "lowrite", "dblink_exec",
})
_WRITE_FUNCTION_PREFIXES = ("pg_advisory", "pg_try_advisory", "lo_")
_READ_ONLY_LO_FUNCTIONS = frozenset({"lo_get"})

# Built-ins that neither write nor leave session state behind.  Any other called
# function may (SET inside a function, advisory locks, ...) so it forces the reset.
_SAFE_FUNCTIONS = frozenset({
    # aggregates and window functions
    "count", "sum", "avg", "min", "max", "bool_and", "bool_or", "every", "array_agg",
    "string_agg", "json_agg", "jsonb_agg", "json_object_agg", "jsonb_object_agg",
    "bit_and", "bit_or", "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop",
    "var_samp", "percentile_cont", "percentile_disc", "mode", "row_number", "rank",
    "dense_rank", "percent_rank", "cume_dist", "ntile", "lag", "lead", "first_value",
    "last_value", "nth_value",
    # time
    "now", "clock_timestamp", "statement_timestamp", "transaction_timestamp",
    "timeofday", "date_trunc", "date_part", "date_bin", "age", "to_char", "to_date",
    "to_timestamp", "to_number", "make_date", "make_time", "make_timestamp",
    "make_timestamptz", "make_interval", "justify_days", "justify_hours",
    "justify_interval", "isfinite", "date",
    # numbers
    "abs", "round", "ceil", "ceiling", "floor", "trunc", "mod", "power", "sqrt", "exp",
    "ln", "log", "log10", "sign", "div", "random", "width_bucket", "num_nulls",
    "num_nonnulls", "int2", "int4", "int8", "float4", "float8", "text", "bool",
    # strings
    "lower", "upper", "length", "char_length", "character_length", "octet_length",
    "bit_length", "concat", "concat_ws", "substr", "replace", "split_part", "strpos",
    "left", "right", "lpad", "rpad", "ltrim", "rtrim", "btrim", "initcap", "repeat",
    "reverse", "md5", "sha224", "sha256", "sha384", "sha512", "encode", "decode", "format",
    "quote_ident", "quote_literal", "quote_nullable", "regexp_replace", "regexp_match",
    "regexp_matches", "regexp_like", "regexp_count", "regexp_substr", "regexp_instr",
    "regexp_split_to_array", "regexp_split_to_table", "starts_with", "translate", "ascii",
    "chr", "to_hex", "string_to_array", "string_to_table", "unistr", "gen_random_uuid",
    "uuid_generate_v4",
    # arrays and sets
    "array_to_string", "array_length", "array_position", "array_positions",
    "array_append", "array_prepend", "array_cat", "array_remove", "array_replace",
    "array_dims", "array_lower", "array_upper", "array_ndims", "cardinality", "unnest",
    "generate_series", "generate_subscripts",
    # json
    "to_json", "to_jsonb", "row_to_json", "array_to_json", "json_build_object",
    "json_build_array", "jsonb_build_object", "jsonb_build_array", "json_object_keys",
    "jsonb_object_keys", "json_array_elements", "jsonb_array_elements",
    "json_array_elements_text", "jsonb_array_elements_text", "json_array_length",
    "jsonb_array_length", "json_each", "jsonb_each", "json_each_text", "jsonb_each_text",
    "json_extract_path", "jsonb_extract_path", "json_extract_path_text",
    "jsonb_extract_path_text", "json_typeof", "jsonb_typeof", "json_strip_nulls",
    "jsonb_strip_nulls", "jsonb_set", "jsonb_set_lax", "jsonb_insert", "jsonb_pretty",
    "jsonb_path_query", "jsonb_path_query_array", "jsonb_path_query_first",
    "jsonb_path_exists", "jsonb_path_match", "json_populate_record",
    "jsonb_populate_record", "json_to_record", "jsonb_to_record", "json_to_recordset",
    "jsonb_to_recordset",
    # full text search
    "to_tsvector", "to_tsquery", "plainto_tsquery", "phraseto_tsquery",
    "websearch_to_tsquery", "ts_rank", "ts_rank_cd", "ts_headline", "setweight",
    # server and replication status
    "version", "current_database", "current_schema", "current_schemas",
    "current_setting", "pg_backend_pid", "pg_postmaster_start_time", "inet_server_port",
    "inet_server_addr", "inet_client_addr", "inet_client_port", "pg_is_in_recovery",
    "pg_current_wal_lsn", "pg_current_wal_insert_lsn", "pg_current_wal_flush_lsn",
    "pg_last_wal_replay_lsn", "pg_last_wal_receive_lsn", "pg_last_xact_replay_timestamp",
    "pg_wal_lsn_diff", "pg_is_wal_replay_paused", "pg_current_snapshot",
    "txid_current_snapshot", "pg_typeof", "pg_relation_size", "pg_total_relation_size",
    "pg_table_size", "pg_indexes_size", "pg_database_size", "pg_size_pretty",
    "has_table_privilege", "has_schema_privilege", "has_database_privilege", "pg_sleep",
})


def _is_write_function(name: str) -> bool:
    if name in _WRITE_FUNCTIONS:
        return True
    return name.startswith(_WRITE_FUNCTION_PREFIXES) and name not in _READ_ONLY_LO_FUNCTIONS


def _is_primary_builtin(name: str) -> bool:
    """A VOLATILE built-in that a replica must not run (see picopool._builtins)."""
    return name in VOLATILE_BUILTINS and name not in REPLICA_SAFE_VOLATILE


def known_read_only(name: str) -> bool:
    """Whether *name* (as in ``Classification.functions``) is a built-in known to only
    read: STABLE or IMMUTABLE, or a VOLATILE one a replica may run
    (``picopool._builtins.REPLICA_SAFE_VOLATILE``), and not one that writes or takes
    a transaction id (nextval, txid_current, pg_advisory_*, lo_*, ...).

    It says nothing about a user function of the same name in another schema (a call
    may resolve to one): :class:`picopool._catalog.FunctionCatalog` checks that too.
    """
    if _is_write_function(name):
        return False
    return name in NON_VOLATILE_BUILTINS or name in REPLICA_SAFE_VOLATILE


def read_only_builtins(functions: frozenset[str]) -> frozenset[str]:
    """The names in *functions* that :func:`known_read_only` accepts."""
    return frozenset(name for name in functions if known_read_only(name))


def _is_name(token: str) -> bool:
    first = token[0]
    return first == '"' or first == "_" or "a" <= first <= "z" or first >= "\x80"


def _function_name(token: str) -> str:
    if token[0] == '"' or token.startswith('u&"'):
        return token[token.index('"') + 1 : -1].replace('""', '"')
    return token


# ----------------------------------------------------------------------- analysis

# What _scan looks at; every other token only moves `prev` along.
_SCAN_TRIGGERS = frozenset({"(", ")", "for", "into", "with"}) | _WITH_MAIN_STATEMENTS
_LOCK_STRENGTHS = frozenset({"update", "share"})
_NO_WITH, _WITH_CTES, _WITH_BODY = 0, 1, 2  # where a WITH clause at one depth is


class _Scan(NamedTuple):
    functions: frozenset[str]
    modifies_data: bool  # INSERT/UPDATE/DELETE/MERGE in a CTE or sub-query
    dml_after_with: bool  # WITH ... UPDATE ...: the statement itself is DML
    locking: bool  # FOR UPDATE / NO KEY UPDATE / SHARE / KEY SHARE anywhere
    select_into: bool
    balanced: bool
    complete: bool  # every call the text makes is in `functions`


def _scan(tokens: list[str], head: int) -> _Scan:
    """One pass over a statement whose leading keyword is ``tokens[head]``."""
    functions: set[str] = set()
    modifies_data = dml_after_with = locking = select_into = False
    complete = True
    with_states = [_NO_WITH]  # per open parenthesis, plus the statement level
    openers: list[str] = []  # the token before each open parenthesis
    last_closed_opener = ""
    for index, token in enumerate(tokens):
        if token not in _SCAN_TRIGGERS:
            continue
        prev = tokens[index - 1] if index else ""
        if token == "(":
            if index - 1 > head and _is_name(prev) and with_states[-1] != _WITH_CTES:
                name = _called_function(tokens, index, head, last_closed_opener)
                if name:
                    functions.add(name)
                elif name is not None:
                    complete = False
            openers.append(prev)
            with_states.append(_NO_WITH)
        elif token == ")":
            if not openers:
                balanced = False
                break
            last_closed_opener = openers.pop()
            with_states.pop()
        elif prev == "." or prev == "as":
            pass  # a column label or qualified name, never a keyword
        elif index == 0 or prev == "(":  # the first word of a (sub-)statement
            if token in _DML:
                modifies_data = True
            elif token == "with":
                with_states[-1] = _WITH_CTES
        elif with_states[-1] == _WITH_CTES and token in _WITH_MAIN_STATEMENTS:
            with_states[-1] = _WITH_BODY
            if token in _DML:
                modifies_data = True
                dml_after_with = dml_after_with or not openers
        elif token == "for":
            following = tokens[index + 1 : index + 4]
            if following and (
                following[0] in _LOCK_STRENGTHS
                or following == ["no", "key", "update"]
                or following[:2] == ["key", "share"]
            ):
                locking = True
        elif token == "into":
            select_into = True
    else:
        balanced = not openers
    return _Scan(frozenset(functions), modifies_data, dml_after_with, locking, select_into,
                 balanced, complete and balanced)


_UNATTRIBUTED = ""  # _called_function: something runs here, but which function is unknown


def _called_function(tokens: list[str], paren: int, head: int, closed: str) -> str | None:
    """The function called by ``name(`` just before ``tokens[paren]``, None when the
    name is a keyword, a table, an alias or a type rather than a function, or
    _UNATTRIBUTED for a call to a function the text does not name (a user operator,
    a TABLESAMPLE method that is not built in)."""
    name = tokens[paren - 1]
    first = paren - 1  # walk back over a qualified name: schema.name(
    while first - 2 >= head and tokens[first - 1] == "." and _is_name(tokens[first - 2]):
        first -= 2
    before = tokens[first - 1] if first > head else ""
    if first == paren - 1 and name in _NOT_FUNCTIONS:
        if name == "operator":  # a OPERATOR(schema.+) b: a built-in unless qualified otherwise
            return None if tokens[paren + 1 : paren + 3] == ["pg_catalog", "."] else _UNATTRIBUTED
        if name in _CALLABLE_KEYWORDS and _starts_expression(before) \
                and (before, name) not in _KEYWORD_SYNTAX \
                and not (name in _GROUPING_CLAUSES and _grouping_item(tokens, first, head)):
            return name
        return None
    if before in _NAME_CONTEXTS:
        if before == "tablesample" and name not in _BUILTIN_TABLESAMPLE_METHODS:
            return _UNATTRIBUTED
        return None
    if before == ")" and closed != "on":  # alias column list: f(x) AS t(a) / s(a)
        return None  # but DISTINCT ON (x) f(y) is a call
    return _function_name(name)


_GROUPING_CLAUSES = frozenset({"cube", "rollup"})
_GROUP_BY_ENDS = frozenset({
    "select", "from", "where", "having", "window", "order", "limit", "offset", "fetch",
    "union", "intersect", "except", "returning", "on", "using", "for",
})


def _grouping_item(tokens: list[str], name: int, head: int) -> bool:
    """Whether ``tokens[name]`` starts an item of a GROUP BY list (where CUBE ( and
    ROLLUP ( are grouping sets, not function calls)."""
    if tokens[name - 1] not in (",", "by", "all", "distinct"):
        return False
    depth = 0
    for index in range(name - 1, head, -1):
        token = tokens[index]
        if token == ")":
            depth += 1
        elif token == "(":
            if depth == 0:
                return False
            depth -= 1
        elif depth == 0:
            if token == "by":
                return tokens[index - 1] == "group"
            if token in _GROUP_BY_ENDS:
                return False
    return False


def _starts_expression(before: str) -> bool:
    """Whether an expression may start right after the token *before* ("" at the
    start): after punctuation, an operator or a reserved keyword, not after an
    operand (a name, literal, number, parameter or closing bracket)."""
    if not before:
        return True
    first = before[0]
    if first in "\"'$)]" or first.isdigit():
        return False
    if _is_name(before):
        return before in _EXPRESSION_STARTS
    return True


class _Verdict(NamedTuple):
    kind: StatementKind
    reason: str
    functions: frozenset[str]
    leaves_session_state: bool
    functions_complete: bool = True


_EMPTY: frozenset[str] = frozenset()
_UNPARSEABLE = _Verdict(StatementKind.WRITE, "unparseable", _EMPTY, True, False)


def _unsafe(functions: frozenset[str]) -> bool:
    return not functions <= _SAFE_FUNCTIONS


def _select_verdict(reason: str, scan: _Scan, with_clause: bool) -> _Verdict:
    """A statement that reads unless something inside it writes."""
    functions, complete = scan.functions, scan.complete
    if not scan.balanced:
        return _Verdict(StatementKind.WRITE, "unparseable", functions, True, False)
    if scan.modifies_data:
        why = "data-modifying CTE" if with_clause and not scan.dml_after_with else "DML"
        return _Verdict(StatementKind.WRITE, why, functions, _unsafe(functions), complete)
    if scan.locking:
        return _Verdict(StatementKind.WRITE, "locking clause", functions, _unsafe(functions),
                        complete)
    if scan.select_into:  # creates a table, possibly a session's TEMP one
        return _Verdict(StatementKind.WRITE, "select into", functions, True, complete)
    if functions:
        if any(_is_write_function(name) for name in functions):
            return _Verdict(StatementKind.WRITE, "write function", functions, True, complete)
        if any(_is_primary_builtin(name) for name in functions):
            return _Verdict(StatementKind.WRITE, "volatile built-in", functions,
                            _unsafe(functions), complete)
    return _Verdict(StatementKind.READ, reason, functions, _unsafe(functions), complete)


_EXPLAIN_OFF_VALUES = frozenset({"false", "off", "no", "0"})
_PARENTHESISED_STATEMENT = frozenset({"(", "select", "values", "table", "with"})


def _explain_verdict(tokens: list[str]) -> _Verdict:
    """EXPLAIN only plans (a read, nothing runs); EXPLAIN ANALYZE runs the statement."""
    analyze = False
    rest = 1
    options = (
        rest + 1 < len(tokens)
        and tokens[rest] == "("
        and tokens[rest + 1] not in _PARENTHESISED_STATEMENT  # EXPLAIN (SELECT ..)
    )
    if options:
        try:
            close = tokens.index(")", rest)
        except ValueError:
            return _UNPARSEABLE
        option: list[str] = []
        for token in [*tokens[rest + 1 : close], ","]:
            if token != ",":
                option.append(token)
                continue
            if option and option[0] in ("analyze", "analyse"):
                value = option[1].strip("'").lower() if len(option) > 1 else "true"
                analyze = value not in _EXPLAIN_OFF_VALUES
            option = []
        rest = close + 1
    else:
        while rest < len(tokens) and tokens[rest] in ("analyze", "analyse", "verbose"):
            analyze = analyze or tokens[rest] != "verbose"
            rest += 1
    inner = tokens[rest:]
    if not inner or inner[0] == "explain":  # EXPLAIN EXPLAIN is a syntax error
        return _Verdict(StatementKind.WRITE, "unknown statement", _EMPTY, True)
    if not analyze:
        return _Verdict(StatementKind.READ, "explain", _EMPTY, False)
    verdict = _statement_verdict(inner)
    if verdict.kind is StatementKind.WRITE:
        return verdict._replace(reason=f"explain analyze {verdict.reason}")
    return verdict._replace(reason="explain analyze")


def _copy_verdict(tokens: list[str]) -> _Verdict:
    """COPY ... TO STDOUT reads (a table or a query); COPY ... FROM writes, and so does
    COPY ... TO a server-side file or PROGRAM (on the primary, never a random replica)."""
    scan = _scan(tokens, 0)
    functions, complete = scan.functions, scan.complete
    depth = 0
    for index, token in enumerate(tokens):
        if token == "(":
            depth += 1
        elif token == ")":
            depth -= 1
        elif depth == 0 and token == "from":
            break
        elif depth == 0 and token == "to":
            target = tokens[index + 1 : index + 2]
            if target == ["program"]:  # runs a server command
                return _Verdict(StatementKind.WRITE, "copy to program", functions, True,
                                complete)
            if target != ["stdout"]:  # a file on the server
                return _Verdict(StatementKind.WRITE, "copy to file", functions,
                                _unsafe(functions), complete)
            return _select_verdict("copy to", scan, with_clause=False)
    return _Verdict(StatementKind.WRITE, "copy from", functions, _unsafe(functions), complete)


def _statement_verdict(tokens: list[str]) -> _Verdict:
    """Classify one statement (no ``;`` inside)."""
    head = 0
    while head < len(tokens) and tokens[head] == "(":
        head += 1
    if head == len(tokens):
        return _UNPARSEABLE
    keyword = tokens[head]
    if head == 0:
        if keyword == "explain":
            return _explain_verdict(tokens)
        if keyword == "show":
            return _Verdict(StatementKind.READ, "show", _EMPTY, False)
        if keyword == "copy":
            return _copy_verdict(tokens)
    scan = _scan(tokens, head)
    if keyword in _SELECT_HEADS:
        reason = "select" if keyword == "with" else keyword
        return _select_verdict(reason, scan, with_clause=keyword == "with")
    if keyword in _DML:
        if not scan.balanced:
            return _Verdict(StatementKind.WRITE, "unparseable", scan.functions, True, False)
        return _Verdict(StatementKind.WRITE, "DML", scan.functions, _unsafe(scan.functions),
                        scan.complete)
    reason = _WRITE_STATEMENT_REASONS.get(keyword, "unknown statement")
    if keyword == "prepare" and tokens[head + 1 : head + 2] == ["transaction"]:
        reason = "transaction control"
    return _Verdict(StatementKind.WRITE, reason, scan.functions, True, scan.complete)


def _verdict(query: str) -> _Verdict:
    try:
        tokens = _lex(query)
    except _Unparseable:
        return _UNPARSEABLE
    if ";" not in tokens:
        if not tokens:
            return _Verdict(StatementKind.WRITE, "empty", _EMPTY, True)
        return _statement_verdict(tokens)
    statements: list[list[str]] = []
    start = 0
    for index, token in enumerate(tokens):
        if token == ";":
            if index > start:
                statements.append(tokens[start:index])
            start = index + 1
    if start < len(tokens):
        statements.append(tokens[start:])
    if not statements:
        return _Verdict(StatementKind.WRITE, "empty", _EMPTY, True)
    if len(statements) == 1:
        return _statement_verdict(statements[0])
    verdicts = [_statement_verdict(statement) for statement in statements]
    return _Verdict(
        StatementKind.WRITE,
        "multi-statement",
        _EMPTY.union(*(v.functions for v in verdicts)),
        any(v.leaves_session_state for v in verdicts),
        all(v.functions_complete for v in verdicts),
    )


# -------------------------------------------------------------------------- hints

_HINT_COMMENT_BODY = r"/\*([^*/]*)\*/"  # hint comments never contain "*" or "/"
_START_HINT_RE = re.compile(f"[{_PG_WHITESPACE}]*{_HINT_COMMENT_BODY}")
_END_HINT_RE = re.compile(f"{_HINT_COMMENT_BODY}[{_PG_WHITESPACE}]*\\Z")
_HINT_PREFIX_RE = re.compile(r"[ \t\n\r\f\v]*picopool[ \t\n\r\f\v]*:", re.IGNORECASE)
_HINT_EQUALS_RE = re.compile(r"[ \t\n\r\f\v]*=[ \t\n\r\f\v]*")
_HINT_SEPARATORS_RE = re.compile(r"[ \t\n\r\f\v,;]+")
_HINT_KEYS = frozenset({"role", "instance"})


def _hint_from_body(body: str) -> RoutingHint | None:
    """Parse ``picopool: role=... instance=...``; None for anything malformed.
    (Split by hand: a regex with repeated key=value groups backtracks
    exponentially on adversarial text.)"""
    prefix = _HINT_PREFIX_RE.match(body)
    if prefix is None:
        return None
    pairs = _HINT_EQUALS_RE.sub("=", body[prefix.end() :])
    values: dict[str, str] = {}
    for item in _HINT_SEPARATORS_RE.split(pairs):
        if not item:
            continue
        key, _, value = item.partition("=")
        key = key.lower()
        if key not in _HINT_KEYS or key in values or not value or "=" in value:
            return None
        values[key] = value
    role = values.get("role")
    if role is not None:
        role = role.lower()
        if role not in VALID_ROLES:
            return None
    instance = values.get("instance")
    if instance is not None and not _INSTANCE_RE.fullmatch(instance):
        return None
    if role is None and instance is None:
        return None
    return RoutingHint(role, instance)


class _HintComment(NamedTuple):
    start: int
    end: int
    hint: RoutingHint | None  # None: a picopool comment, but malformed
    at_start: bool


def _hint_comments(query: str) -> list[_HintComment]:
    """The picopool comments at the very start and at the very end of *query*."""
    found: list[_HintComment] = []
    start_match = _START_HINT_RE.match(query)
    if start_match is not None and _HINT_PREFIX_RE.match(start_match.group(1)):
        hint = _hint_from_body(start_match.group(1))
        found.append(_HintComment(start_match.start(1) - 2, start_match.end(), hint, True))
    if not query.rstrip(_PG_WHITESPACE).endswith("*/"):
        return found
    comment_start = query.rfind("/*")  # hint bodies hold no "/": this is its opener
    end_match = _END_HINT_RE.match(query, comment_start) if comment_start >= 0 else None
    if end_match is None or not _HINT_PREFIX_RE.match(end_match.group(1)):
        return found
    if found and comment_start < found[0].end:
        return found  # the whole query is that one comment
    if _ends_inside_a_token(query[:comment_start]):
        return found  # the "comment" is really inside a string or another comment
    hint = _hint_from_body(end_match.group(1))
    found.append(_HintComment(comment_start, end_match.end(1) + 2, hint, False))
    return found


def _ends_inside_a_token(prefix: str) -> bool:
    """Whether text appended to *prefix* would continue an unterminated construct
    or a line comment (so it is not a comment of its own)."""
    last = deque(_EXACT_TOKEN_RE.finditer(prefix), maxlen=1)
    if not last:
        return False
    match = last[0]
    if match.lastgroup == "error":
        if not prefix.startswith("/*", match.start()):
            return True
        # A nested comment somewhere: walk the prefix exactly.
        exact = deque(_spans(prefix), maxlen=1)
        kind, start, end = exact[0]
        if kind == _ERROR:
            return True
    else:
        start, end = match.span()
    # A line comment running to the end of the prefix swallows what follows.
    return prefix.startswith("--", start) and end == len(prefix)


def _find_hint(query: str) -> RoutingHint | None:
    for comment in _hint_comments(query):
        if comment.hint is not None:
            return comment.hint
    return None


# --------------------------------------------------------------------- public API

_MAX_CACHED_QUERY_LENGTH = 16_384  # longer texts (bulk VALUES) are rarely repeated


def _classify_uncached(query: str) -> Classification:
    verdict = _verdict(query)
    hint = _find_hint(query) if "*/" in query else None
    return Classification(
        verdict.kind, verdict.functions, verdict.leaves_session_state, hint, verdict.reason,
        verdict.functions_complete,
    )


# Bounded by entries and by bytes: 4096 distinct 16 KiB statements stay under 4 MiB.
_cache: StatementCache[str, Classification] = StatementCache(
    max_entries=4096, max_bytes=4 << 20, max_statement=_MAX_CACHED_QUERY_LENGTH)


def classify(query: str) -> Classification:
    """Classify *query*: read or write, called functions, reset need and hint."""
    found = _cache.get(query)
    if found is None:
        found = _classify_uncached(query)
        _cache.put(query, found, len(query))
    return found


def clear_cache() -> None:
    """Forget every cached classification (tests and benchmarks)."""
    _cache.clear()


@functools.lru_cache(maxsize=256)
def _last_name_parts(names: frozenset[str]) -> frozenset[str]:
    return frozenset(name.rsplit(".", 1)[-1].strip('"').lower() for name in names)


def is_write(query: str, write_functions: frozenset[str] = frozenset()) -> bool:
    """Whether *query* must run on the primary.

    *write_functions* are user functions that write, matched case-insensitively by
    their last name part: ``audit.log_event`` and ``log_event`` both match calls to
    ``log_event(...)`` and ``audit.log_event(...)``.  (That may also match a function
    of the same name in another schema, which only errs towards the primary.)
    """
    info = classify(query)
    if info.kind is StatementKind.WRITE:
        return True
    if not write_functions or not info.functions:
        return False
    return not info.functions.isdisjoint(_last_name_parts(frozenset(write_functions)))


def parse_hint(query: str) -> RoutingHint | None:
    """The routing hint in a ``/* picopool: role=... [instance=...] */`` comment at
    the very start or very end of *query* (the start one wins).  Malformed or
    misplaced hints are ignored: None, never an exception."""
    if "*/" not in query:
        return None
    return _find_hint(query)


def format_hint(role: str | None = None, instance: str | None = None) -> str:
    """``/* picopool: role=ROLE instance=NAME */`` for the given (validated) values."""
    RoutingHint(role, instance)  # validates
    parts = [f"role={role}"] if role is not None else []
    if instance is not None:
        parts.append(f"instance={instance}")
    if not parts:
        raise ValueError("a routing hint needs a role or an instance")
    return f"/* picopool: {' '.join(parts)} */"


def strip_hint(query: str) -> str:
    """*query* without its picopool comments at the very start and end (well-formed
    or not), for servers that reject comments."""
    if "*/" not in query:
        return query
    comments = _hint_comments(query)
    if not comments:
        return query
    start, end = 0, len(query)
    for comment in comments:
        if comment.at_start:
            start = comment.end
        else:
            end = comment.start
    return query[start:end].strip(_PG_WHITESPACE)


def strip_comments(query: str) -> str:
    """*query* without any comment outside string literals.  A comment becomes one
    space unless whitespace already separates its neighbours, so no two tokens merge
    (``1-/**/-2`` must not become ``1--2``, a comment).  An unterminated string or
    comment and everything after it is kept verbatim (so it stays unparseable)."""
    if "--" not in query and "/*" not in query:
        return query
    parts: list[str] = []
    last = 0
    for kind, start, end in _spans(query):
        if kind == _ERROR:
            break
        if kind == _COMMENT:
            parts.append(query[last:start])
            before = query[start - 1] if start else " "
            after = query[end] if end < len(query) else " "
            if before not in _PG_WHITESPACE and after not in _PG_WHITESPACE:
                parts.append(" ")
            last = end
    else:
        if not parts:
            return query
        parts.append(query[last:])
        return "".join(parts).strip(_PG_WHITESPACE)
    parts.append(query[last:])
    return "".join(parts)
