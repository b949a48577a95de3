"""What picopool knows about the functions statements call.

Built-ins come from :mod:`picopool._builtins` (generated from ``pg_proc``); user
functions' volatility is looked up in ``pg_proc`` over the pool's service
connection, once per name, and cached.

Lookups are single-flight and batched: a name already being looked up is not
asked again, and names requested while a lookup waits for the service connection
join that lookup, so N concurrent statements cost one query.  Every query runs
inside ``service.service_session()``, so it never collides with discovery or the
reset-elision catalog check on the same connection.

Names are matched like the classifier spells them (lowercased last name part),
against ``lower(proname)`` of every function outside ``pg_catalog`` and
``information_schema``: a name that any schema's function of any overload makes
VOLATILE is volatile.  That can only err towards the primary.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import asyncpg

from ._builtins import NON_VOLATILE_BUILTINS, VOLATILE_BUILTINS
from ._errors import describe_error
from ._sql import Classification, _is_write_function, known_read_only

if TYPE_CHECKING:
    from ._service import ServiceConnections

__all__ = ["USER_VOLATILITY_QUERY", "FunctionCatalog"]

logger = logging.getLogger("picopool")

USER_VOLATILITY_QUERY = """SELECT lower(p.proname), bool_or(p.provolatile = 'v') FROM pg_proc p
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE lower(p.proname) = ANY($1::text[])
  AND n.nspname NOT IN ('pg_catalog', 'information_schema')
GROUP BY lower(p.proname)"""

_BUILTINS = NON_VOLATILE_BUILTINS | VOLATILE_BUILTINS


class FunctionCatalog:
    """Built-in and user function volatility, for routing and for retries.

    ``volatile_user_functions`` and ``learn`` may run the lookup query;
    ``known_read_only`` never does I/O and answers from what is already known.
    """

    def __init__(self, service: ServiceConnections, *, timeout: float = 5.0) -> None:
        self._service = service
        self._timeout = timeout
        # name -> whether a user function of that name is VOLATILE (False: none is,
        # or there is no user function of that name)
        self._volatile: dict[str, bool] = {}
        # names being looked up -> the lookup's outcome (True: answered)
        self._in_flight: dict[str, asyncio.Future[bool]] = {}
        self._batch: set[str] = set()  # names the next lookup will ask about
        self._batch_done: asyncio.Future[bool] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._generation = 0  # bumped by clear(): answers from before are dropped

    # -- lookups ----------------------------------------------------------------------

    async def volatile_user_functions(self, names: frozenset[str]) -> frozenset[str]:
        """The names in *names* for which ``pg_proc`` has a VOLATILE user function
        (outside pg_catalog and information_schema).  A name with no user function
        is remembered as not volatile.  If the lookup fails, all of *names* (when in
        doubt, the primary), and nothing is cached."""
        if not names:
            return frozenset()
        keys = {name: name.lower() for name in names}
        if not await self._lookup(frozenset(keys.values())):
            return names
        volatile = self._volatile
        if any(key not in volatile for key in keys.values()):  # cleared meanwhile
            return names
        return frozenset(name for name, key in keys.items() if volatile[key])

    async def learn(self, names: frozenset[str]) -> None:
        """Look up the user functions named *names* that are not known yet (one
        shared query for concurrent callers).  Failures are logged, not raised."""
        if names:
            await self._lookup(frozenset(name.lower() for name in names))

    async def _lookup(self, keys: frozenset[str]) -> bool:
        """Make sure every key is known; False if a lookup failed."""
        missing = [key for key in keys if key not in self._volatile]
        if not missing:
            return True
        waits: set[asyncio.Future[bool]] = set()
        for key in missing:
            future = self._in_flight.get(key)
            if future is None:
                future = self._join_batch(key)
            waits.add(future)
        # shield: a cancelled caller must not cancel a lookup others wait for
        results = [await asyncio.shield(future) for future in waits]
        return all(results)

    def _join_batch(self, key: str) -> asyncio.Future[bool]:
        if self._batch_done is None:
            self._batch_done = asyncio.get_running_loop().create_future()
            task = asyncio.get_running_loop().create_task(self._run_batch())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self._batch.add(key)
        self._in_flight[key] = self._batch_done
        return self._batch_done

    async def _run_batch(self) -> None:
        generation = self._generation
        done: asyncio.Future[bool] | None = None
        keys: list[str] = []
        ok = False
        try:
            async with asyncio.timeout(self._timeout), \
                    self._service.service_session() as connection:
                # Names requested while this waited for the session join this query.
                keys, done = sorted(self._batch), self._batch_done
                self._batch, self._batch_done = set(), None
                try:
                    rows = await connection.fetch(USER_VOLATILITY_QUERY, keys)
                except Exception as exc:
                    if not isinstance(exc, asyncpg.PostgresError):
                        self._service.discard()  # broken: reopened by the next user
                    raise
            if generation == self._generation:
                found = {str(row[0]): bool(row[1]) for row in rows}
                for key in keys:
                    self._volatile[key] = found.get(key, False)
            ok = True
        except Exception as exc:
            logger.warning("cannot check function volatility: %s", describe_error(exc))
        finally:
            if done is None:  # failed before taking the batch: answer the batch itself
                keys, done = sorted(self._batch), self._batch_done
                self._batch, self._batch_done = set(), None
            for key in keys:
                if self._in_flight.get(key) is done:
                    del self._in_flight[key]
            if done is not None and not done.done():
                done.set_result(ok)

    # -- answers without I/O ----------------------------------------------------------

    def known_read_only(self, names: frozenset[str]) -> bool:
        """Whether every function in *names* is known to only read: a built-in that
        :func:`picopool._sql.known_read_only` accepts (STABLE/IMMUTABLE, or a volatile
        one on the replica allow-list) and not shadowed by a user function this
        catalog has learned is VOLATILE, or a user function learned as STABLE or
        IMMUTABLE.  A user function not learned yet is not known: call
        :meth:`learn` first.  No I/O."""
        volatile = self._volatile
        for name in names:
            key = name.lower()
            if name in _BUILTINS:
                if not known_read_only(name) or volatile.get(key, False):
                    return False
            elif volatile.get(key, True) or _is_write_function(name):
                return False
        return True

    def statement_read_only(self, info: Classification) -> bool:
        """Whether a classified statement is provably read-only as far as its text
        goes: a read, every call attributed, every function :meth:`known_read_only`.
        (Functions reached through views, operators, casts or defaults are not seen.)"""
        return (not info.is_write and info.functions_complete
                and self.known_read_only(info.functions))

    def clear(self) -> None:
        """Forget every learned user function (lookups in flight are not cached)."""
        self._volatile.clear()
        self._generation += 1

    def known(self) -> dict[str, bool]:
        """A copy of what is learned: name -> has a VOLATILE user function."""
        return dict(self._volatile)

    async def aclose(self) -> None:
        """Cancel lookups in flight (their callers get "lookup failed")."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def __repr__(self) -> str:
        return f"<FunctionCatalog known={len(self._volatile)} in_flight={len(self._in_flight)}>"
