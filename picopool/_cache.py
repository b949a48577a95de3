"""A cache of per-statement results bounded by entries and by bytes of statement text."""

from __future__ import annotations

from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")


class StatementCache(Generic[K, V]):
    """``{key: value}`` where each key carries a statement's text.

    Bounded twice: at most *max_entries* entries, and at most *max_bytes* of
    statement text (each entry's *size*, its statement's length). A statement
    longer than *max_statement* is never kept: such texts (bulk ``VALUES``) are
    rarely repeated. Crossing a bound clears the whole cache, which keeps a hit
    at one dict lookup; a steady workload refills it at once.
    """

    __slots__ = ("_bytes", "_entries", "_max_bytes", "_max_entries", "max_statement")

    def __init__(self, *, max_entries: int = 4096, max_bytes: int = 4 << 20,
                 max_statement: int = 16 << 10) -> None:
        self._entries: dict[K, V] = {}
        self._bytes = 0
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self.max_statement = max_statement

    def get(self, key: K) -> V | None:
        return self._entries.get(key)

    def put(self, key: K, value: V, size: int) -> None:
        if size > self.max_statement:
            return
        if key in self._entries:
            return
        if len(self._entries) >= self._max_entries or self._bytes + size > self._max_bytes:
            self.clear()
        self._entries[key] = value
        self._bytes += size

    def clear(self) -> None:
        self._entries.clear()
        self._bytes = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)
