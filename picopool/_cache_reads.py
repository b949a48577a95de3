"""The opt-in read cache: ``create_pool(cache=ReadCache(ttl=..., max_bytes=...))``.

What is cached: pool-level ``fetch``, ``fetchrow`` and ``fetchval`` of statements
that are reads (``SELECT``, ``VALUES``, ``TABLE``, ``WITH`` without data-modifying
parts), leave no session state, and call no VOLATILE function: only built-ins
PostgreSQL marks STABLE or IMMUTABLE, and user functions picopool's catalog has
learned are STABLE or IMMUTABLE. Never inside a read-your-writes scope (or with
``read_your_writes=True``); statements on ``acquire()``d connections and in
``pool.transaction()`` never pass through here.

An entry is keyed by the statement, its arguments (with their types: ``1``,
``1.0`` and ``True`` differ), the method and its ``column``/``record_class``, and
the role request. It lives ``ttl`` seconds (``cache_ttl=`` per call), and the
least recently used entries are evicted past ``max_bytes`` (an estimate of the
results' size in memory, keys included).

Invalidation: a write through the same pool drops the entries whose statements
name a table it writes (``INSERT INTO``, ``UPDATE``, ``DELETE FROM``, ``TRUNCATE``,
``MERGE INTO``, ``COPY ... FROM``, also inside ``WITH``); a write whose targets are
unknown (DDL, ``CALL``, ``DO``, a function that may write, anything else) drops
every entry. A read that was running while an invalidation happened is not
stored. Writes by other clients, on ``acquire()``d connections or in
``pool.transaction()``, and effects through triggers, views, rules or functions
are not seen: only the TTL bounds them (``pool.invalidate_cache()`` drops entries
by hand).

Results handed out are never shared mutable objects: ``fetch`` returns a new list
of (immutable) records each time, and a ``fetchval`` value that is mutable (an
array decoded as a list, a JSON codec's dict) is deep-copied on every hit.
Records holding a mutable value cannot be copied (asyncpg's records cannot be
built from Python), so such ``fetch``/``fetchrow`` results are not cached.
"""

from __future__ import annotations

import copy
import datetime
import decimal
import ipaddress
import sys
import time
import uuid
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from dataclasses import dataclass
from typing import Any

import asyncpg

from ._builtins import NON_VOLATILE_BUILTINS, VOLATILE_BUILTINS
from ._cache import StatementCache
from ._errors import ConfigurationError
from ._execute import causal_scope, route_scope
from ._sql import _is_name, _lex, _Unparseable, classify, known_read_only

__all__ = ["CacheStats", "ReadCache", "read_tables", "write_targets"]

CACHED_METHODS = frozenset({"fetch", "fetchrow", "fetchval"})
_MISS: Any = object()
_IMMUTABLE_SCALARS = (str, bytes, int, float, bool, type(None), decimal.Decimal,
                      datetime.date, datetime.datetime, datetime.time, datetime.timedelta,
                      uuid.UUID,
                      ipaddress.IPv4Address, ipaddress.IPv6Address,
                      ipaddress.IPv4Network, ipaddress.IPv6Network,
                      ipaddress.IPv4Interface, ipaddress.IPv6Interface)
_READ_STARTS = frozenset({"select", "values", "table", "with", "("})
_SEQUENCE_FUNCTIONS = frozenset({"nextval", "setval", "currval", "lastval"})


@dataclass(frozen=True, slots=True)
class CacheStats:
    """The read cache's counters, in ``pool.stats().cache``."""

    hits: int
    misses: int  # eligible reads not found (or expired)
    evictions: int  # entries dropped to stay under max_bytes
    invalidations: int  # entries dropped by writes through the pool
    entries: int
    bytes: int
    max_bytes: int


class _Entry:
    __slots__ = ("expires", "frozen", "size", "tables", "value")

    def __init__(self, value: Any, expires: float, size: int, tables: frozenset[str],
                 frozen: bool) -> None:
        self.value = value
        self.expires = expires
        self.size = size
        self.tables = tables
        self.frozen = frozen


class ReadCache:
    """A TTL and size-bounded cache of read results; one per pool.

    ``ttl``: seconds an entry lives, for every eligible read (``0``: only calls that
    pass ``cache_ttl=`` are cached). ``max_bytes``: the bound on the estimated
    memory of keys and results.
    """

    __slots__ = ("_bytes", "_eligible", "_entries", "_tables", "epoch", "evictions", "hits",
                 "invalidations", "max_bytes", "misses", "ttl")

    def __init__(self, ttl: float = 1.0, max_bytes: int = 16 << 20) -> None:
        if not ttl >= 0:
            raise ConfigurationError("ReadCache.ttl must be >= 0")
        if max_bytes <= 0:
            raise ConfigurationError("ReadCache.max_bytes must be positive")
        self.ttl = float(ttl)
        self.max_bytes = max_bytes
        self._entries: OrderedDict[Hashable, _Entry] = OrderedDict()
        self._tables: dict[str, set[Hashable]] = {}  # table name -> keys reading it
        self._bytes = 0
        # statement text -> the names it mentions (None: never cacheable)
        self._eligible: StatementCache[str, frozenset[str]] = StatementCache()
        self.epoch = 0  # moves on every invalidation
        self.hits = self.misses = self.evictions = self.invalidations = 0

    # -- lookups ---------------------------------------------------------------------

    def get(self, key: Hashable, now: float) -> Any:
        """The cached result for *key* (a copy where it holds mutable values), or
        ``_MISS``."""
        entry = self._entries.get(key)
        if entry is None:
            self.misses += 1
            return _MISS
        if entry.expires <= now:
            self._remove(key, entry)
            self.misses += 1
            return _MISS
        self._entries.move_to_end(key)
        self.hits += 1
        value = entry.value
        if not entry.frozen:
            return copy.deepcopy(value)
        if type(value) is tuple:
            return list(value)
        return value

    def put(self, key: Hashable, value: Any, ttl: float, epoch: int,
            tables: frozenset[str], now: float) -> None:
        """Store *value* unless an invalidation happened since *epoch* (the read
        may have seen data older than a write that has since completed)."""
        if epoch != self.epoch or ttl <= 0:
            return
        if type(value) is list:
            value = tuple(value)
        size, frozen = _measure(value)
        size += _measure(key)[0] + 64
        if size > self.max_bytes:
            return
        if not frozen:
            try:
                value = copy.deepcopy(value)
            except TypeError:  # a record holding a mutable value: asyncpg cannot copy it
                return
        old = self._entries.get(key)
        if old is not None:
            self._remove(key, old)
        while self._entries and self._bytes + size > self.max_bytes:
            oldest, entry = next(iter(self._entries.items()))
            self._remove(oldest, entry)
            self.evictions += 1
        self._entries[key] = _Entry(value, now + ttl, size, tables, frozen)
        self._bytes += size
        for table in tables:
            self._tables.setdefault(table, set()).add(key)

    def _remove(self, key: Hashable, entry: _Entry) -> None:
        del self._entries[key]
        self._bytes -= entry.size
        for table in entry.tables:
            keys = self._tables.get(table)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._tables[table]

    # -- invalidation ------------------------------------------------------------------

    def invalidate(self, tables: Iterable[str] | None = None) -> int:
        """Drop the entries that read any of *tables* (None: every entry); how many."""
        self.epoch += 1
        if tables is None:
            dropped = len(self._entries)
            self._entries.clear()
            self._tables.clear()
            self._bytes = 0
        else:
            dropped = 0
            for table in tables:
                for key in list(self._tables.get(table.lower(), ())):
                    entry = self._entries.get(key)
                    if entry is not None:
                        self._remove(key, entry)
                        dropped += 1
        self.invalidations += dropped
        return dropped

    def after_statement(self, query: str, read_only: bool) -> None:
        """A statement ran through the pool: invalidate what it may have changed."""
        if read_only:
            return
        self.invalidate(write_targets(query))

    # -- eligibility -------------------------------------------------------------------

    def names_read(self, query: str, learned: dict[str, bool]) -> frozenset[str] | None:
        """The names *query* mentions if its result may be cached, else None.

        *learned*: user function name -> has a VOLATILE definition (the catalog's).
        """
        names = self._eligible.get(query)
        if names is not None:
            return None if names is _NEVER else names
        info = classify(query)
        cacheable = (not info.is_write and info.functions_complete
                     and not info.leaves_session_state)
        memo = True
        if cacheable:
            for name in info.functions:
                if name in NON_VOLATILE_BUILTINS and name not in VOLATILE_BUILTINS \
                        and known_read_only(name):
                    if learned.get(name, False):  # a volatile user function shadows it
                        cacheable = False
                        break
                    continue
                verdict = learned.get(name)
                if verdict is None:
                    cacheable = False
                    memo = False  # not learned yet: ask again next time
                    break
                if verdict:
                    cacheable = False
                    break
        found = read_tables(query) if cacheable else None
        if memo:
            self._eligible.put(query, found if found is not None else _NEVER, len(query))
        return found

    def stats(self) -> CacheStats:
        return CacheStats(hits=self.hits, misses=self.misses, evictions=self.evictions,
                          invalidations=self.invalidations, entries=len(self._entries),
                          bytes=self._bytes, max_bytes=self.max_bytes)

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return (f"<ReadCache ttl={self.ttl:g} entries={len(self._entries)} "
                f"bytes={self._bytes}/{self.max_bytes} hits={self.hits} misses={self.misses}>")


_NEVER: frozenset[str] = frozenset({"\0never"})  # memo for "not cacheable"


def _name(token: str) -> str:
    if token[0] == '"':
        return token[1:-1].replace('""', '"').lower()
    return token


def read_tables(query: str) -> frozenset[str] | None:
    """Every name *query* mentions (a superset of the tables it reads), or None if
    it is not a plain read the cache can reason about."""
    try:
        tokens = _lex(query)
    except _Unparseable:
        return None
    if not tokens or tokens[0] not in _READ_STARTS or ";" in tokens[:-1]:
        return None
    return frozenset(_name(t) for t in tokens if _is_name(t))


def write_targets(query: str) -> frozenset[str] | None:
    """The tables a write names as its targets, or None when they are unknown
    (DDL, CALL, DO, a function that may write elsewhere, anything unparsed)."""
    try:
        tokens = _lex(query)
    except _Unparseable:
        return None
    if not tokens or ";" in tokens[:-1]:
        return None
    info = classify(query)
    if not info.functions_complete or any(
            not known_read_only(f) and f not in _SEQUENCE_FUNCTIONS for f in info.functions):
        return None
    if tokens[0] not in ("insert", "update", "delete", "truncate", "merge", "copy", "with"):
        return None
    targets: set[str] = set()
    count = len(tokens)
    for index, token in enumerate(tokens):
        follow: int | None = None
        after = tokens[index + 1] if index + 1 < count else ""
        if (token in ("insert", "merge") and after == "into") or \
                (token == "delete" and after == "from"):
            follow = index + 2
        elif token == "update" or (token == "copy" and index == 0):
            follow = index + 1
        elif token == "truncate":
            follow = index + 1
            while follow < count and tokens[follow] in ("table", "only"):
                follow += 1
            while follow < count:  # TRUNCATE a, b, c
                name = _qualified(tokens, follow)
                if name is None:
                    break
                targets.add(name[0])
                follow = name[1]
                if follow < count and tokens[follow] == ",":
                    follow += 1
                else:
                    break
            continue
        if follow is None:
            continue
        if follow < count and tokens[follow] == "only":
            follow += 1
        name = _qualified(tokens, follow)
        if name is not None:
            targets.add(name[0])
    return frozenset(targets) if targets else None


def _qualified(tokens: list[str], index: int) -> tuple[str, int] | None:
    """The last part of a possibly schema-qualified name at *index*, and what follows."""
    if index >= len(tokens) or not _is_name(tokens[index]):
        return None
    name = _name(tokens[index])
    index += 1
    while index + 1 < len(tokens) and tokens[index] == "." and _is_name(tokens[index + 1]):
        name = _name(tokens[index + 1])
        index += 2
    return name, index


def cache_key(query: str, method: str, args: tuple[Any, ...], extra: Any,
              request: Any) -> Hashable:
    """The entry's key (unhashable when an argument is, such as a list)."""
    if not args:
        return (query, method, (), extra, request)
    return (query, method, tuple([(type(a), a) for a in args]), extra, request)


def _measure(value: Any) -> tuple[int, bool]:
    """An estimate of *value*'s memory in bytes, and whether it is deeply immutable."""
    if isinstance(value, _IMMUTABLE_SCALARS):
        if isinstance(value, str | bytes):
            return sys.getsizeof(value), True
        return 32, True
    if isinstance(value, asyncpg.Record | tuple):
        size, frozen = 56 + 8 * len(value), True
        for item in (value.values() if isinstance(value, asyncpg.Record) else value):
            item_size, item_frozen = _measure(item)
            size += item_size
            frozen = frozen and item_frozen
        return size, frozen
    if isinstance(value, type):
        return 64, True  # a record class in a key
    if isinstance(value, list | dict | set | bytearray):
        size = 64 + 8 * len(value)
        items: Iterable[Any] = value.items() if isinstance(value, dict) else value
        for item in items:
            size += _measure(item)[0]
        return size, False
    if isinstance(value, frozenset):
        return 64 + sum(_measure(item)[0] for item in value), True
    return sys.getsizeof(value), False


async def cached_call(executor: Any, cache: ReadCache, method: str, query: str,
                      args: tuple[Any, ...], kwargs: dict[str, Any], role: str | None,
                      cache_ttl: float | None) -> Any:
    """A pool-level call with the read cache on: served from it where allowed,
    stored after a miss, and invalidating what a write may have changed."""
    decision = executor.decisions.get(
        (query, role, None, route_scope.get(), executor._membership.symmetric)
    ) or await executor.decide(query, role, None)
    ttl = cache.ttl if cache_ttl is None else cache_ttl
    key = tables = None
    if not decision.is_write and method in CACHED_METHODS and ttl > 0 \
            and causal_scope.get() is None and not executor.read_your_writes:
        tables = cache.names_read(decision.query, executor._catalog._volatile)
        if tables is not None:
            key = cache_key(decision.query, method, args,
                            kwargs.get("column", kwargs.get("record_class")), decision.request)
    if key is None or tables is None:
        try:
            return await executor.run(method, query, args, kwargs, role)
        finally:
            cache.after_statement(decision.query, executor.provably_read_only(decision))
    try:
        found = cache.get(key, time.monotonic())
    except TypeError:  # an unhashable argument: not cacheable
        return await executor.run(method, query, args, kwargs, role)
    if found is not _MISS:
        return found
    epoch = cache.epoch
    result = await executor.run(method, query, args, kwargs, role)
    cache.put(key, result, ttl, epoch, tables, time.monotonic())
    return result
