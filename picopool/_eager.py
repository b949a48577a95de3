"""``asyncio.shield`` without a task for work that finishes without waiting.

asyncpg returns a connection to its pool under ``asyncio.shield``, so that a
cancelled caller cannot leave it half released. The shield costs a task and
two or three turns of the event loop on every release, although a release
that has no query to run (nothing to roll back, no reset) never waits for
anything. :func:`shielded` runs the coroutine's first step at once, in the
caller's task: if it finishes there, nothing could have interrupted it and no
task is made. If it does wait, the rest of it runs in a task of its own that
the caller awaits through ``asyncio.shield``, as before. This is what
Python 3.12's eager tasks do, kept to one place.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Generator
from typing import Any, Generic, TypeVar

T = TypeVar("T")

__all__ = ["shielded"]


async def shielded(coroutine: Coroutine[Any, Any, T]) -> T:
    """Await *coroutine*; a cancellation of the caller does not stop it."""
    try:
        waiting_on = coroutine.send(None)
    except StopIteration as finished:
        return finished.value  # type: ignore[no-any-return]
    rest = asyncio.get_running_loop().create_task(_resume(coroutine, waiting_on))
    return await asyncio.shield(rest)


async def _resume(coroutine: Coroutine[Any, Any, T], waiting_on: Any) -> T:
    return await _Resumed(coroutine, waiting_on)


class _Resumed(Generic[T]):
    """Awaitable: a coroutine that has already run up to its first wait, handed to
    the task that awaits this. It passes on what the coroutine waits for (a
    future, or None for a bare yield), and what the task sends or throws back."""

    __slots__ = ("_coroutine", "_waiting_on")

    def __init__(self, coroutine: Coroutine[Any, Any, T], waiting_on: Any) -> None:
        self._coroutine = coroutine
        self._waiting_on = waiting_on

    def __await__(self) -> Generator[Any, Any, T]:
        coroutine, waiting_on = self._coroutine, self._waiting_on
        while True:
            try:
                sent = yield waiting_on
            except BaseException as exc:  # thrown into the task: pass it on
                try:
                    waiting_on = coroutine.throw(exc)
                except StopIteration as finished:
                    return finished.value  # type: ignore[no-any-return]
            else:
                try:
                    waiting_on = coroutine.send(sent)
                except StopIteration as finished:
                    return finished.value  # type: ignore[no-any-return]
